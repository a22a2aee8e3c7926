"""Owner-only files and folders, written atomically: a crash leaves the old file or the new
one, never half of one, and nothing written here is readable by other users.

A site home holds the site's key, its updates (which say something about its data) and task
logs; an audit trail names people and experiments; a bundle is a scientist's code. So every
folder is 0700 and every file 0600 whatever the umask. Shared by the site, the hub's audit
record and the bundle tools, and imported by the task worker, so it uses nothing beyond the
standard library.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "open_private", "private_dir", "replace_dir", "tighten", "write_atomic"]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def write_atomic(path: Path, data: bytes | str, *, mode: int = PRIVATE_FILE, fsync: bool = False) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_private(path: Path) -> int:
    """Create or truncate ``path`` for writing, mode 0600 from its first byte; a file descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, PRIVATE_FILE)  # an existing file keeps its old mode through O_CREAT
    return fd


def private_dir(path: Path) -> Path:
    """``mkdir -p path`` whose last level, if created here, is 0700 whatever the umask.

    Folders above ``path`` are created with the default mode: create the home with this
    first, then what lies under it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=PRIVATE_DIR)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path
    os.chmod(path, PRIVATE_DIR)
    return path


def tighten(path: Path) -> int | None:
    """chmod folder ``path`` to 0700 if group or others have any access; its old mode, or None."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if os.name != "posix" or not mode & 0o077:
        return None
    os.chmod(path, PRIVATE_DIR)
    return mode


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final`` (same file system), so readers see the
    old folder or the new one, never half of one; an existing ``final`` is renamed aside
    first, put back if the swap fails, and removed once replaced."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
    os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old / final.name, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
