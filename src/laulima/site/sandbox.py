"""Confine the process that runs a task's algorithm: what it may read, write, reach and use.

:func:`apply` is called in the task's child process after the fork and before the
algorithm's module is imported. It changes this process for good, in this order:

1. **Environment.** Everything the agent inherited (tokens, proxy settings, the site's
   paths) is dropped; what is left is a fixed ``PATH``, the locale, the user's name,
   ``HOME`` and ``TMPDIR`` inside the task folder and the thread-count variables the site set.
2. **Network.** A network namespace of its own (``unshare(CLONE_NEWNET)``; a user namespace
   too when not root): it holds only a loopback device that is down, so no address —
   the site's own 127.0.0.1 included — can be reached. Checked after the fact.
3. **Resource limits.** Address space, CPU seconds, open files (hard limits too), no core
   dumps.
4. **Capabilities.** An agent run as root would otherwise hand root to the algorithm, and
   root can raise its own limits, load kernel code or reach raw devices; only reading and
   writing past file permissions (inside the paths allowed below) is kept.
5. **File system.** Landlock: read (and execute) beneath the dataset, the interpreter, the
   installed packages and the bundle; read, write, create and remove beneath the task
   folder; nothing else, whatever the file permissions say. Where the kernel has it
   (Landlock ABI 4+), TCP connect and bind are denied as well, and (ABI 6+) signals to
   processes outside the sandbox.
6. **Sockets.** A seccomp filter denies every socket family but IP and netlink: a Unix
   socket by path (the site's services) or a VM socket to the host is not covered by the
   network namespace, nor by Landlock.

Not granted, on purpose: ``/dev/shm`` (shared with every other process of the machine, so
multiprocessing's locks and torch's DataLoader workers fail; joblib falls back to serial),
``/etc`` beyond the loader cache and time zone, other processes' ``/proc`` entries.

Landlock and namespaces bind only the calling thread, so :func:`apply` refuses to run in a
process that has started threads. A part the kernel lacks is refused (``PolicyError``, the
default) or, with ``on_unsupported="warn"``, reported in the :class:`SandboxReport`; after a
``PolicyError`` the process is partly confined and must only report and exit.

Who does what: the agent builds each task's policy from ``policy.toml`` with
:func:`sandbox_for`; the runner writes it into the task's ``task.json``
(:meth:`SandboxPolicy.to_json`); the task's own process (:mod:`laulima.site.worker`)
applies it before it imports the algorithm.

:func:`explain_violation` turns what the algorithm then runs into (a ``PermissionError``,
an unreachable network, a ``MemoryError``) into a short reason for the hub, without the
path. Only the standard library is used: this runs in every task's child.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import resource
import signal
import site
import socket
import stat
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from laulima.errors import ConfigurationError, PolicyError

if TYPE_CHECKING:  # the policy file's model needs pydantic, which a task's process never imports
    from laulima.site.policy import SitePolicy

__all__ = [
    "THREAD_VARIABLES",
    "KernelSupport",
    "SandboxPolicy",
    "SandboxReport",
    "apply",
    "explain_exit",
    "explain_violation",
    "policy_for_task",
    "probe_kernel",
    "sandbox_for",
    "system_readable_paths",
]

OnUnsupported = Literal["refuse", "warn"]

THREAD_VARIABLES: tuple[str, ...] = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "PYTHONHASHSEED",
)
"""Kept from the agent's environment when set: they size thread pools and pick GPUs, and hold no secret."""

DEVICES: tuple[Path, ...] = tuple(Path(p) for p in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"))
TMP_DIR = "tmp"
"""``TMPDIR`` is this folder inside the task folder."""

_MAX_MEMORY = 1 << 50  # 1 PiB: anything above is a typo, not a limit
_MAX_CPU_S = 10 * 365 * 86400
_MAX_OPEN_FILES = 1 << 20

# -- Linux ABI ---------------------------------------------------------------------------
_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (generic table)
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
"""The rights a rule on a single file (not a folder) may carry."""
_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_WRITE = (
    _FS_READ_FILE
    | _FS_READ_DIR
    | _FS_WRITE_FILE
    | _FS_REMOVE_DIR
    | _FS_REMOVE_FILE
    | _FS_MAKE_DIR
    | _FS_MAKE_REG
    | _FS_MAKE_FIFO
    | _FS_MAKE_SYM
    | _FS_REFER
    | _FS_TRUNCATE
)
_DEVICE = _FS_READ_FILE | _FS_WRITE_FILE | _FS_IOCTL_DEV

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2
_KEPT_CAPS = (1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)
"""Landlock bounds every path anyway; these let root read a dataset whatever its owner."""


def _handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    """``syscall(2)``, every integer argument passed as a C long; -1 with errno on failure."""
    call = _libc().syscall
    call.restype = ctypes.c_long
    return int(call(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args)))


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


# -- the policy --------------------------------------------------------------------------
@dataclass(frozen=True)
class SandboxPolicy:
    """What one task's process may touch. Paths are absolute and must exist when applied.

    ``readable``: folders or files it may read and execute (its dataset, the interpreter,
    the installed packages, its bundle: see :func:`policy_for_task`). ``task_dir``: its own
    folder, read-write, also ``HOME``; ``writable``: further read-write folders. ``devices``:
    character devices it may read, write and ioctl. ``network``: True leaves the network
    alone. ``memory_bytes`` (address space), ``cpu_seconds``, ``open_files``: None for no
    limit. ``on_unsupported``: what to do on a kernel that cannot enforce a part of it.
    """

    task_dir: Path
    readable: tuple[Path, ...]
    writable: tuple[Path, ...] = ()
    devices: tuple[Path, ...] = DEVICES
    network: bool = False
    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    open_files: int | None = 1024
    keep_env: tuple[str, ...] = THREAD_VARIABLES
    on_unsupported: OnUnsupported = "refuse"

    def __post_init__(self) -> None:
        for name in ("readable", "writable", "devices", "keep_env"):
            value = getattr(self, name)
            if isinstance(value, str | Path) or not isinstance(value, tuple | list):
                raise ConfigurationError(
                    f"sandbox policy: {name} must be a list, got {type(value).__name__}", field=name
                )
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "task_dir", _absolute(self.task_dir, "task_dir"))
        for name in ("readable", "writable", "devices"):
            paths = tuple(_absolute(p, name) for p in getattr(self, name))
            if name != "devices" and Path("/") in paths:
                raise ConfigurationError(
                    f"sandbox policy: {name} contains the root folder '/', which would allow everything; "
                    "name the folders the algorithm needs",
                    field=name,
                )
            object.__setattr__(self, name, paths)
        _bounded(self.memory_bytes, "memory_bytes", 1 << 20, _MAX_MEMORY)
        _bounded(self.cpu_seconds, "cpu_seconds", 1, _MAX_CPU_S)
        _bounded(self.open_files, "open_files", 16, _MAX_OPEN_FILES)
        if self.on_unsupported not in ("refuse", "warn"):
            raise ConfigurationError(
                f"sandbox policy: on_unsupported is {self.on_unsupported!r}; use 'refuse' or 'warn'",
                field="on_unsupported",
            )
        if not isinstance(self.network, bool):
            raise ConfigurationError("sandbox policy: network must be true or false", field="network")

    def to_json(self) -> dict[str, Any]:
        """The policy as JSON values (paths as strings), for the task's ``task.json``: the
        runner decides the policy, the task's process applies it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: object) -> SandboxPolicy:
        """The policy :meth:`to_json` wrote; ``ConfigurationError`` for anything else (an unknown
        key, a wrong type: whoever wrote the task file made a mistake, and it must not run)."""
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"sandbox policy: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"sandbox policy: unknown fields {unknown}", field=unknown[0])
        if "task_dir" not in data or "readable" not in data:
            raise ConfigurationError("sandbox policy: task_dir and readable are required", field="task_dir")
        values: dict[str, Any] = dict(data)
        for name in ("readable", "writable", "devices", "keep_env"):
            if name in values and isinstance(values[name], list):
                values[name] = tuple(values[name])
        return cls(**values)


def _absolute(path: object, name: str) -> Path:
    if not isinstance(path, str | Path) or not str(path) or "\0" in str(path):
        raise ConfigurationError(f"sandbox policy: {name} holds {path!r}, which is not a path", field=name)
    p = Path(path)
    if not p.is_absolute():
        raise ConfigurationError(f"sandbox policy: {name} holds a relative path; give absolute paths", field=name)
    return p


def _bounded(value: object, name: str, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(
            f"sandbox policy: {name} is {value!r}; it must be a whole number from {low} to {high}, or unset",
            field=name,
        )


def system_readable_paths() -> tuple[Path, ...]:
    """What any Python task needs to read, beyond its dataset and bundle (existing ones only).

    The interpreter and its standard library (``sys.base_prefix``), the environment and its
    packages (``sys.prefix``, site-packages), Laulima itself (an editable install lives
    outside site-packages), the shared libraries and their cache (numpy's OpenBLAS, torch's
    libgomp), the time zone, and what numpy and torch read about the machine: CPU and memory
    from ``/proc`` and ``/sys``, and this process's own ``/proc/self`` (resolved when
    applied, so it is the task's own, never the agent's). Not ``/etc`` as a whole (it holds
    ``passwd``, host names and credentials), not ``/proc`` (other processes' environments).
    """
    import laulima

    candidates: list[str] = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        *site.getsitepackages(),
        site.getusersitepackages() if site.ENABLE_USER_SITE else "",
        *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")),
        os.path.dirname(os.path.realpath(sys.executable)),
        str(Path(laulima.__file__).resolve().parent.parent),  # its sys.path entry (the import system lists it)
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/lib",
        "/lib64",
        "/etc/ld.so.cache",
        "/etc/localtime",
        "/usr/share/zoneinfo",
        "/proc/self",
        "/proc/cpuinfo",
        "/proc/meminfo",
        "/sys/devices/system/cpu",
        "/sys/devices/system/node",
    ]
    seen: list[Path] = []
    for raw in candidates:
        if not raw or raw == "/" or not os.path.exists(raw):
            continue
        path = Path(raw) if raw.startswith("/proc/self") else Path(os.path.realpath(raw))
        if path != Path("/") and path not in seen:
            seen.append(path)
    return tuple(seen)


def policy_for_task(
    task_dir: Path,
    dataset_dir: Path,
    *,
    bundle_dir: Path | None = None,
    memory_bytes: int | None = None,
    cpu_seconds: int | None = None,
    open_files: int | None = 1024,
    network: bool = False,
    gpu: bool = False,
    on_unsupported: OnUnsupported = "refuse",
    extra_readable: Sequence[Path] = (),
    extra_writable: Sequence[Path] = (),
) -> SandboxPolicy:
    """The usual policy: read the dataset, the bundle and the system; write the task folder.

    ``gpu`` adds NVIDIA's device files and driver information; leave ``memory_bytes`` unset
    then (CUDA reserves far more address space than it uses). ``extra_readable`` and
    ``extra_writable`` are what the site's policy adds (a shared model cache, say).
    """
    readable = [
        Path(dataset_dir),
        *([Path(bundle_dir)] if bundle_dir else []),
        *map(Path, extra_readable),
        *system_readable_paths(),
    ]
    devices = list(DEVICES)
    if gpu:
        devices += sorted(Path("/dev").glob("nvidia*"))
        devices = [d for d in devices if d.exists() and not d.is_dir()]
        readable += [p for p in map(Path, ("/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices")) if p.exists()]
    return SandboxPolicy(
        task_dir=Path(task_dir),
        readable=tuple(readable),
        writable=tuple(map(Path, extra_writable)),
        devices=tuple(d for d in devices if d.exists()),
        network=network,
        memory_bytes=memory_bytes,
        cpu_seconds=cpu_seconds,
        open_files=open_files,
        on_unsupported=on_unsupported,
    )


def sandbox_for(
    policy: SitePolicy,
    task_dir: Path,
    dataset_path: Path,
    bundle_dir: Path | None,
    *,
    dataset_readable: Sequence[Path] = (),
    gpu: bool | None = None,
    cache_dir: Path | None = None,
) -> SandboxPolicy:
    """The sandbox of one task under the site's ``policy.toml``, for ``TaskRunner.run(sandbox=...)``.

    Maps ``max_memory_mb`` to the address-space limit, ``max_cpu_seconds`` (rounded up) to
    the CPU limit, and ``[sandbox]`` ``network``, ``on_unsupported``, ``readable`` and
    ``writable`` as they are. ``dataset_path`` may be a folder or a single file; only it is
    readable, not its siblings (other datasets); ``dataset_readable``: what else the dataset's
    cases live in (a DICOM source tree, label files: the catalog's ``readable``). ``gpu``:
    grant the NVIDIA devices; None grants them when this machine has any (a GPU-less site
    gives none away). ``cache_dir``: the experiment's persistent folder at the site
    (``SiteContext.cache_dir``), writable as the task folder is; it must exist.

    An extra folder of the policy that does not exist is a ``ConfigurationError`` naming
    the policy entry: the site's administrator fixes ``policy.toml`` or creates the folder.
    """
    section = policy.sandbox
    extra: dict[str, list[Path]] = {}
    for name in ("readable", "writable"):
        paths = []
        for i, raw in enumerate(getattr(section, name)):
            if not os.path.exists(raw):
                raise ConfigurationError(
                    f"site policy: [sandbox] {name} entry {i + 1} does not exist on this machine; create that "
                    f"folder or remove it from {name} in policy.toml",
                    field=f"sandbox.{name}",
                    path=raw,
                )
            paths.append(Path(os.path.realpath(raw)))
        extra[name] = paths
    if gpu is None:
        gpu = os.path.exists("/dev/nvidiactl")
    return policy_for_task(
        Path(os.path.realpath(task_dir)),
        Path(os.path.realpath(dataset_path)),
        bundle_dir=Path(os.path.realpath(bundle_dir)) if bundle_dir is not None else None,
        memory_bytes=policy.max_memory_mb * (1 << 20) if policy.max_memory_mb is not None else None,
        cpu_seconds=math.ceil(policy.max_cpu_seconds) if policy.max_cpu_seconds is not None else None,
        network=section.network,
        gpu=gpu,
        on_unsupported=section.on_unsupported,
        extra_readable=[
            *extra["readable"],
            *(Path(os.path.realpath(p)) for p in dataset_readable if os.path.exists(p)),
        ],
        extra_writable=[*extra["writable"], *([Path(os.path.realpath(cache_dir))] if cache_dir is not None else [])],
    )


# -- what the kernel offers --------------------------------------------------------------
@dataclass(frozen=True)
class KernelSupport:
    """What the kernel can enforce: the Landlock ABI (0: none), network namespaces, seccomp.

    :func:`probe_kernel` asks the running kernel; tests pass a smaller one to see how
    :func:`apply` behaves on an older kernel (it then uses only what this one names).
    """

    landlock_abi: int
    network_namespace: bool
    socket_filter: bool = True
    """A seccomp filter for this architecture (denies local, VM and other non-IP sockets)."""


def probe_kernel() -> KernelSupport:
    """Ask the running kernel (no side effects)."""
    abi = 0
    if sys.platform.startswith("linux"):
        abi = max(_syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION), 0)
    return KernelSupport(
        landlock_abi=abi,
        network_namespace=os.path.exists("/proc/self/ns/net"),
        socket_filter=_native_arch() is not None and os.path.exists("/proc/sys/kernel/seccomp/actions_avail"),
    )


# -- the report --------------------------------------------------------------------------
@dataclass(frozen=True)
class SandboxReport:
    """What :func:`apply` did. No paths: it may be logged with the task and summarized to the hub."""

    applied: tuple[str, ...]
    unsupported: tuple[str, ...]
    landlock_abi: int
    kept_env: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """Every part of the policy is enforced."""
        return not self.unsupported

    def summary(self) -> str:
        text = "sandbox: " + "; ".join(self.applied)
        if self.unsupported:
            text += " | NOT enforced: " + "; ".join(self.unsupported)
        return text


# -- apply -------------------------------------------------------------------------------
def apply(policy: SandboxPolicy, *, kernel: KernelSupport | None = None) -> SandboxReport:
    """Confine this process (and every process it starts) to ``policy``, irreversibly.

    Call it single-threaded, after the fork and before the algorithm's code is imported.
    Raises ``PolicyError`` when the kernel cannot enforce a part and the policy says
    ``refuse`` (or when threads are running), ``ConfigurationError`` when a path of the
    policy does not exist (the path is in ``context``, not in the message).
    """
    if not sys.platform.startswith("linux"):
        raise PolicyError(
            f"sandbox: {sys.platform} has no Landlock or network namespaces; run the site agent on Linux",
        )
    kernel = kernel or probe_kernel()
    threads = _thread_count()
    if threads > 1:
        raise PolicyError(
            f"sandbox: {threads} threads are running; the sandbox binds only the calling thread, so it must be "
            "applied before any thread starts (right after the fork)"
        )
    _check_paths(policy)
    applied: list[str] = []
    unsupported: list[str] = []
    # What the kernel plainly lacks is refused before anything changes.
    if kernel.landlock_abi < 1:
        unsupported.append("file-system confinement (the kernel has no Landlock)")
    if not policy.network and not kernel.network_namespace:
        unsupported.append(_no_network_message("the kernel has no network namespaces", kernel))
    if not policy.network and not kernel.socket_filter:
        unsupported.append("local sockets (no seccomp filter for this machine): the site's own services stay reachable")
    if unsupported:
        _maybe_refuse(policy, unsupported)

    kept = _reset_environment(policy)
    applied.append(f"environment cleared ({len(kept)} variables kept)")

    if not policy.network and kernel.network_namespace:
        problem = _isolate_network()
        if problem is None:
            applied.append("network: a namespace of its own with no usable interface")
        else:
            unsupported.append(_no_network_message(problem, kernel))
            _maybe_refuse(policy, unsupported)

    limits = _set_limits(policy)
    applied.append("limits: " + ", ".join(limits))

    if _drop_capabilities():
        applied.append("capabilities dropped (file permission override kept)")

    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) != 0:  # Landlock and seccomp require it; no setuid gains
        raise PolicyError(f"sandbox: no_new_privs could not be set ({_errno_name(ctypes.get_errno())})")
    if kernel.landlock_abi >= 1:
        _restrict_filesystem(policy, kernel.landlock_abi, block_tcp=not policy.network)
        what = f"file system: Landlock ABI {kernel.landlock_abi}"
        if kernel.landlock_abi >= 4 and not policy.network:
            what += ", TCP denied"
        if kernel.landlock_abi >= 6:
            what += ", signals outside the sandbox denied"
        applied.append(what)
    if not policy.network and kernel.socket_filter:
        _filter_sockets()
        applied.append("sockets: only IP (in its empty namespace) and netlink; no io_uring")
    return SandboxReport(
        applied=tuple(applied), unsupported=tuple(unsupported), landlock_abi=kernel.landlock_abi, kept_env=kept
    )


def _maybe_refuse(policy: SandboxPolicy, unsupported: list[str]) -> None:
    if policy.on_unsupported == "refuse":
        raise PolicyError(
            "sandbox: this site cannot enforce " + "; ".join(unsupported) + ". The site policy refuses to run "
            "algorithms less confined; upgrade the kernel (Landlock, network namespaces), or set the policy's "
            "unsupported-sandbox choice to 'warn' to run them anyway",
            unsupported=tuple(unsupported),
        )


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _check_paths(policy: SandboxPolicy) -> None:
    if not policy.task_dir.is_dir():
        raise ConfigurationError("sandbox: the task folder does not exist", field="task_dir", path=str(policy.task_dir))
    for name in ("readable", "writable", "devices"):
        for path in getattr(policy, name):
            if not os.path.exists(path):
                raise ConfigurationError(
                    f"sandbox: a path in the policy's {name} list does not exist; register the dataset again "
                    "or fix the site's installation",
                    field=name,
                    path=str(path),
                )


def _reset_environment(policy: SandboxPolicy) -> tuple[str, ...]:
    home = str(policy.task_dir)
    tmp = policy.task_dir / TMP_DIR
    tmp.mkdir(mode=0o700, exist_ok=True)
    env = {
        "PATH": os.pathsep.join(dict.fromkeys([os.path.dirname(sys.executable), "/usr/bin", "/bin"])),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "HOME": home,
        "TMPDIR": str(tmp),
        # getpass.getuser() reads these first; /etc/passwd is out of reach (MONAI asks at import).
        "USER": _user_name(),
        "LOGNAME": _user_name(),
    }
    if os.environ.get("LC_ALL"):
        env["LC_ALL"] = os.environ["LC_ALL"]
    for name in policy.keep_env:
        if name in os.environ and name not in env:
            env[name] = os.environ[name]
    os.environ.clear()  # unsetenv() each: the C environment (and children's) too
    os.environ.update(env)
    _erase_initial_environment()
    tempfile.tempdir = None  # gettempdir() caches; let it find TMPDIR
    return tuple(sorted(env))


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError):
        return str(os.getuid())


def _erase_initial_environment() -> None:
    """Zero the environment strings the process started with.

    ``/proc/self/environ`` shows that memory (on the initial stack) whatever ``unsetenv``
    did, and ``/proc/self`` stays readable. Nothing points into it once the environment has
    been cleared. The agent should still start its zygote with a scrubbed environment: a
    copy of each value also passed through Python's own memory.
    """
    try:
        stat_line = Path("/proc/self/stat").read_text()
        fields = stat_line[stat_line.rindex(")") + 2 :].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end: fields 50 and 51
    except (OSError, ValueError, IndexError):
        return
    if 0 < start < end and end - start < (1 << 24):
        ctypes.memset(start, 0, end - start)


def _no_network_message(problem: str, kernel: KernelSupport) -> str:
    fallback = "; TCP is blocked by Landlock, other protocols are not" if kernel.landlock_abi >= 4 else ""
    return f"network isolation ({problem}){fallback}"


def _isolate_network() -> str | None:
    """Enter a network namespace of its own; None, or why that failed."""
    libc = _libc()
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        if libc.unshare(_CLONE_NEWNET) != 0:
            return f"unshare failed: {_errno_name(ctypes.get_errno())}"
    else:
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            return f"unshare of a user namespace failed: {_errno_name(ctypes.get_errno())}"
        try:
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
            Path("/proc/self/setgroups").write_text("deny\n")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")
        except OSError as exc:
            return f"the user namespace's id maps could not be written: {_errno_name(exc.errno or 0)}"
    return _check_no_network()


def _check_no_network() -> str | None:
    """A UDP connect sends nothing, but needs a route: in an empty namespace there is none."""
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "192.0.2.1")):
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((address, 9))
            except OSError:
                continue
            return f"{address} is still reachable after unshare"
    return None


def _set_limits(policy: SandboxPolicy) -> list[str]:
    done = []
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    done.append("no core dumps")
    if policy.memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (policy.memory_bytes, policy.memory_bytes))
        done.append(f"memory {_mib(policy.memory_bytes)}")
    if policy.cpu_seconds is not None:
        # SIGXCPU at the soft limit, SIGKILL a little later if it is caught.
        resource.setrlimit(resource.RLIMIT_CPU, (policy.cpu_seconds, policy.cpu_seconds + 5))
        done.append(f"CPU {policy.cpu_seconds} s")
    if policy.open_files is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = policy.open_files if hard == resource.RLIM_INFINITY else min(policy.open_files, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        done.append(f"{limit} open files")
    return done


def _drop_capabilities() -> bool:
    """Empty the bounding set and keep only the file-permission overrides; False if none were held."""
    try:
        effective = int(_status_field("CapEff"), 16)
    except (OSError, ValueError):
        return False
    if not effective:
        return False
    libc = _libc()
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        if not (1 << cap) & _KEPT_CAPS:
            libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL for caps this kernel lacks: fine
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = effective & _KEPT_CAPS
    data[0].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise PolicyError(f"sandbox: dropping capabilities failed ({_errno_name(ctypes.get_errno())})")
    return True


def _status_field(name: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise ValueError(name)


def _restrict_filesystem(policy: SandboxPolicy, abi: int, *, block_tcp: bool) -> None:
    handled = _handled_fs(abi)
    attr = _RulesetAttr(handled_access_fs=handled, handled_access_net=0, scoped=0)
    size = 8
    if abi >= 4:
        size = 16
        if block_tcp:
            attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP  # handled, no rule: all denied
    if abi >= 6:
        size = 24
        attr.scoped = _SCOPE_SIGNAL | (_SCOPE_ABSTRACT_UNIX_SOCKET if block_tcp else 0)
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise PolicyError(f"sandbox: Landlock refused the rule set ({_errno_name(ctypes.get_errno())})")
    try:
        for path, rights in _rules(policy):
            _add_rule(ruleset, path, rights & handled)
        if _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            raise PolicyError(f"sandbox: Landlock could not restrict the process ({_errno_name(ctypes.get_errno())})")
    finally:
        os.close(ruleset)


def _rules(policy: SandboxPolicy) -> Iterator[tuple[Path, int]]:
    for path in policy.readable:
        yield path, _READ
    for path in (policy.task_dir, *policy.writable):
        yield path, _WRITE
    for path in policy.devices:
        yield path, _DEVICE


def _add_rule(ruleset: int, path: Path, rights: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FS_FILE_ONLY
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        if _syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            raise PolicyError(f"sandbox: Landlock refused a rule ({_errno_name(ctypes.get_errno())})", path=str(path))
    finally:
        os.close(fd)


# -- seccomp: sockets the namespace does not cover ---------------------------------------
_AUDIT_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
"""machine -> (AUDIT_ARCH_*, number of socket(2)); little-endian both, which the filter assumes."""
_SYS_IO_URING_SETUP = 425  # io_uring creates sockets without socket(2)
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS = 0x20
_BPF_JEQ = 0x15
_BPF_JGE = 0x35
_BPF_RET = 0x06
_X32_SYSCALL_BIT = 0x40000000
_ALLOWED_FAMILIES = (socket.AF_INET, socket.AF_INET6, 16)  # 16: AF_NETLINK (interfaces of its own namespace)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _native_arch() -> tuple[int, int] | None:
    return _AUDIT_ARCH.get(os.uname().machine)


def _prctl(option: int, arg: int) -> int:
    return int(_libc().prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))


def _filter_sockets() -> None:
    """Deny socket(2) for every family but IP and netlink, io_uring, and foreign syscall ABIs.

    A network namespace covers IP only: a Unix socket by path (the site's proxy, a container
    runtime, ``nscd``) or a VM socket to the host would still connect, and Landlock does not
    check either. ``socketpair`` stays allowed (multiprocessing's pipes).
    """
    native = _native_arch()
    if native is None:
        raise PolicyError(f"sandbox: no socket filter for {os.uname().machine}")
    arch, sys_socket = native
    deny = _RET_ERRNO | errno.EACCES
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # 0: seccomp_data.arch
        (_BPF_JEQ, 1, 0, arch),  # 1: native -> 3
        (_BPF_RET, 0, 0, _RET_ERRNO | errno.ENOSYS),  # 2: a foreign ABI (int 0x80): nothing
        (_BPF_LD_W_ABS, 0, 0, 0),  # 3: seccomp_data.nr
        (_BPF_JGE, 6, 0, _X32_SYSCALL_BIT),  # 4: x32 numbers -> deny (11)
        (_BPF_JEQ, 5, 0, _SYS_IO_URING_SETUP),  # 5: -> deny (11)
        (_BPF_JEQ, 0, 5, sys_socket),  # 6: not socket(2) -> allow (12)
        (_BPF_LD_W_ABS, 0, 0, 16),  # 7: low half of args[0], the family
        (_BPF_JEQ, 3, 0, _ALLOWED_FAMILIES[0]),  # 8: -> allow (12)
        (_BPF_JEQ, 2, 0, _ALLOWED_FAMILIES[1]),  # 9: -> allow (12)
        (_BPF_JEQ, 1, 0, _ALLOWED_FAMILIES[2]),  # 10: -> allow (12)
        (_BPF_RET, 0, 0, deny),  # 11
        (_BPF_RET, 0, 0, _RET_ALLOW),  # 12
    ]
    filters = (_SockFilter * len(program))(*(_SockFilter(*op) for op in program))
    prog = _SockFprog(len(program), filters)
    libc = _libc()
    if libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0) != 0:
        raise PolicyError(f"sandbox: the socket filter was refused ({_errno_name(ctypes.get_errno())})")


# -- what a violation looks like from inside ---------------------------------------------
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}


def explain_violation(exc: BaseException, policy: SandboxPolicy) -> str | None:
    """A short reason when ``exc`` (or what caused it) is the sandbox saying no; else None.

    The reason names the kind of violation, never the path or address, so it may be sent to
    the hub as the task's failure reason; the full exception stays in the site's log.
    """
    for err in _chain(exc):
        if isinstance(err, MemoryError) or _is_torch_oom(err):
            if policy.memory_bytes is None:
                return None
            return f"sandbox: the algorithm exceeded its memory limit of {_mib(policy.memory_bytes)}"
        if policy.network:
            pass
        elif isinstance(err, socket.gaierror):
            return "sandbox: the algorithm tried to look up a network address; it has no network"
        elif isinstance(err, OSError) and err.errno in _NETWORK_ERRNOS:
            return "sandbox: the algorithm tried to open a network connection; it has no network"
        if isinstance(err, OSError) and err.errno in _DENIED_ERRNOS:
            name = err.filename
            if isinstance(name, str | bytes) and name:
                path = Path(os.fsdecode(name))
                if _beneath(path, (policy.task_dir, *policy.writable)):
                    return None  # its own folder: a permission problem, not the sandbox
                if _beneath(path, policy.readable):
                    return "sandbox: the algorithm tried to write outside its task folder"
                return "sandbox: the algorithm tried to open a file outside its dataset and task folder"
            if err.errno == errno.EACCES and not policy.network:
                return "sandbox: the algorithm tried to open a network connection; it has no network"
            return "sandbox: the algorithm tried an operation its sandbox forbids"
    return None


def explain_exit(code: int, policy: SandboxPolicy) -> str | None:
    """A short reason for an exit code the limits cause (negative: killed by that signal)."""
    if policy.cpu_seconds is not None and code == -signal.SIGXCPU:
        return f"sandbox: the algorithm used up its CPU time limit of {policy.cpu_seconds} s"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, what it was raised from or during, and a URLError's reason; each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 32:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        reason = getattr(err, "reason", None)
        for nxt in (err.__cause__, err.__context__, reason):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _is_torch_oom(err: BaseException) -> bool:
    text = str(err) if isinstance(err, RuntimeError) else ""
    return "can't allocate memory" in text or "not enough memory" in text


def _beneath(path: Path, roots: tuple[Path, ...]) -> bool:
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError):
        resolved = path
    return any(resolved == root or root in resolved.parents for root in (Path(os.path.realpath(r)) for r in roots))


def _mib(n: int) -> str:
    mib = n / (1 << 20)
    return f"{mib:.0f} MiB" if n % (1 << 20) == 0 else f"{mib:.1f} MiB"
