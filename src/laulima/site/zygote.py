"""The agent's fork server ("zygote"): import once, fork a fresh child per task.

``python -m laulima.site.worker --zygote`` imports numpy, safetensors, the algorithm API and
the bundle loader once, and on request a built-in algorithm's module (torch and MONAI take
seconds). Each task then costs a ``fork()`` (milliseconds) instead of an interpreter
start-up plus those imports. The child runs exactly what ``worker TASK_DIR`` runs,
sandbox included: it confines itself before it imports the algorithm.

Only built-in modules (``laulima.algorithms.*``, ``laulima.nnunet``) are preloaded, with the
modules a built-in names in its ``__preload__``. A bundle's code is never
imported here: its import-time code would run unconfined, in the process every later task
is forked from, and a name on ``sys.path`` is not the verified bundle anyway. Each task
imports its bundle in its own (confined) child.

Protocol: one line of text per message on the zygote's stdin and stdout (paths in the
file-system encoding), never pickle::

    runner -> zygote    preload MODULE          import built-in MODULE now (its answer is read later)
                        run TASK_DIR            fork a child to run that task
    zygote -> runner    ready                   the zygote's own imports are done
                        preloaded MODULE
                        preload-failed MODULE REASON
                        stale PATH              instead of forking: a preloaded file changed; the zygote exits
                        pid PID                 right after the fork; PID is also the child's process group
                        exit PID CODE           the child ended: its exit code, or -N if killed by signal N
                        error REASON            the fork failed

Isolation: a child is a fork of a zygote that has only *imported* modules, so nothing one
task does (module globals, caches, threads, memory) reaches the next. The child gets its
own process group (a time-out kills the group: data-loader workers too, nothing else),
/dev/null as stdin and the task's log files as stdout and stderr, none of the zygote's
pipes, the default signal handlers, a fresh seed for numpy's global RNG (the stdlib's
``random`` reseeds itself), and it ends itself if the zygote dies.

Limits: the zygote must stay single-threaded and must not start thread pools or CUDA, so
it only imports (numpy's OpenBLAS threads stop themselves around a fork). A preloaded
module that starts a Python thread at import makes the zygote quit; tasks of that
algorithm then import it in the child. What a module computes at import time
(environment variables, files read) dates from the preload. Before each fork the zygote
checks that no preloaded file changed on disk (a stat each, about 2 µs: milliseconds for
the thousands of files of torch and MONAI) and exits if one did, so that an upgraded
algorithm runs as new code. Children share the zygote's hash seed (PYTHONHASHSEED).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NoReturn

from laulima.core.bundle import BUILTIN_PACKAGES
from laulima.site.worker import exit_child

__all__ = ["Zygote", "ZygoteGone", "is_builtin_module", "serve"]

log = logging.getLogger("laulima.site")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
_WATCH_S = 0.5
_ANSWER_S = 10.0
"""How long an idle zygote may take to fork; one that takes longer is wedged (a busy one,
importing a module, is given up to the task's deadline: a new process would import it too)."""
_REASON_MAX = 300


def is_builtin_module(module: str) -> bool:
    """Whether ``module`` names a module of Laulima's built-in algorithms, the only ones preloaded."""
    return bool(_MODULE.fullmatch(module)) and any(
        module == package or module.startswith(package + ".") for package in BUILTIN_PACKAGES
    )


class ZygoteGone(Exception):
    """The zygote died, or broke the protocol; the runner stops using it."""


# -- the runner's side ------------------------------------------------------------------
class Zygote:
    """The runner's handle on a zygote started as ``Popen([... '--zygote'], stdin=PIPE, stdout=PIPE)``.

    ``no_preload`` collects the modules whose preload failed; the runner keeps it across
    restarts so that a broken module is not imported again and again.
    """

    def __init__(self, proc: subprocess.Popen[bytes], no_preload: set[str]) -> None:
        assert proc.stdin is not None and proc.stdout is not None, "the zygote needs pipes"
        self.proc = proc
        self.no_preload = no_preload
        self.forks = 0
        """Children forked so far (a zygote that never forked and died counts as a failed start)."""
        self._busy = 1
        """Imports asked for and not answered yet (its own at start-up, then preloads)."""
        self._in = proc.stdin.fileno()
        self._out = proc.stdout.fileno()
        self._poll = select.poll()  # not select(): the agent may hold more than FD_SETSIZE files
        self._poll.register(self._out, select.POLLIN)
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def preload(self, module: str) -> None:
        """Ask for built-in ``module`` to be imported (not awaited; a no-op for known-bad
        modules and for anything but a built-in, which the zygote would refuse)."""
        if module not in self.no_preload and is_builtin_module(module):
            self._send(b"preload " + module.encode())
            self._busy += 1

    def fork(self, task_dir: Path, deadline: float) -> int | None:
        """Have a child run ``task_dir``; its pid, or None if no answer came by ``deadline``."""
        path = os.fsencode(task_dir)
        if b"\n" in path:
            raise ZygoteGone(f"a task folder with a newline in its name: {task_dir!r}")
        self._send(b"run " + path)
        heard = time.monotonic()
        while True:
            until = deadline if self._busy else min(deadline, heard + _ANSWER_S)
            line = self._read_line(until)
            if line is None:
                if until < deadline:
                    raise ZygoteGone(f"it did not answer within {_ANSWER_S:.0f} s")
                return None
            heard = time.monotonic()
            verb, _, rest = line.partition(" ")
            if verb == "pid":
                self.forks += 1
                return int(rest)
            if verb == "error":
                raise ZygoteGone(rest)

    def wait(self, pid: int, deadline: float) -> int | None:
        """Exit code of child ``pid`` (negative: killed by that signal), or None at ``deadline``."""
        while (line := self._read_line(deadline)) is not None:
            verb, _, rest = line.partition(" ")
            child, _, code = rest.partition(" ")
            if verb == "exit" and child == str(pid):
                return int(code)
        return None

    def terminate(self) -> None:
        """SIGTERM: the zygote ends its children and exits (safe from a signal handler)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)

    def close(self) -> None:
        """Kill the zygote and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def _send(self, line: bytes) -> None:
        try:
            os.write(self._in, line + b"\n")
        except OSError as exc:  # BrokenPipeError: it died
            raise ZygoteGone(f"it is gone ({exc})") from exc

    def _read_line(self, deadline: float) -> str | None:
        """The next line (import answers are also noted here); None at ``deadline``; ZygoteGone at EOF."""
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(remaining * 1000):
                return None
            chunk = os.read(self._out, 65536)
            if not chunk:
                raise ZygoteGone("it exited")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\n")
        line = os.fsdecode(raw)
        verb, _, rest = line.partition(" ")
        if verb in ("ready", "preloaded", "preload-failed"):
            self._busy -= 1
        if verb == "preload-failed":
            module, _, reason = rest.partition(" ")
            self.no_preload.add(module)
            log.warning("the algorithm module %s cannot be preloaded: %s", module, reason)
        elif verb == "stale":
            log.info("%s changed on disk; restarting the fork server", rest)
        return line


# -- the zygote's side ------------------------------------------------------------------
class _Stop(BaseException):
    """SIGTERM, or a reason to quit: leave the loop, end the children."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def serve() -> NoReturn:
    """The zygote's main loop; exits when the agent closes the pipe, dies, or sends SIGTERM."""
    importlib.import_module("safetensors.numpy")  # the worker imports the rest; these lazily
    importlib.import_module("laulima.algorithms.bundle")
    server = _Server()
    code = 0
    try:
        server.send("ready")
        server.loop()
    except _Stop:
        pass
    except BaseException:  # noqa: BLE001 - a bug: say so on stderr, end the children
        traceback.print_exc()
        code = 1
    finally:
        server.end_children()
    os._exit(code)  # not sys.exit: a thread a preloaded module started must not keep it alive


class _Server:
    def __init__(self) -> None:
        from laulima.site.worker import agent_pid

        self.parent = agent_pid()
        self.pid = os.getpid()
        # The protocol gets private copies of stdin/stdout; fd 0 becomes /dev/null and fd 1
        # the zygote's stderr, so that a module printing at import cannot garble the protocol.
        self.cmd = os.dup(0)
        self.out = os.dup(1)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(2, 1)
        os.close(null)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select() via wake_w
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.children: set[int] = set()
        self.files: dict[str, tuple[int, int]] = {}
        """(mtime, size) of every file imported by a preload."""
        self.preloaded: set[str] = set()
        self.buf = b""

    def loop(self) -> None:
        from laulima.site.worker import orphaned

        while not orphaned(self.parent):
            ready = select.select([self.cmd, self.wake_r], [], [], _WATCH_S)[0]
            if self.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 512):
                        pass
            self.reap()
            if self.cmd in ready:
                chunk = os.read(self.cmd, 65536)
                if not chunk:
                    return  # the agent closed the pipe: it is gone or done
                self.buf += chunk
                while b"\n" in self.buf:
                    raw, _, self.buf = self.buf.partition(b"\n")
                    verb, _, arg = raw.partition(b" ")
                    if verb == b"run":
                        self.fork(Path(os.fsdecode(arg)))
                    elif verb == b"preload":
                        self.preload(arg.decode(errors="replace"))

    def send(self, line: str) -> None:
        os.write(self.out, os.fsencode(line) + b"\n")

    def reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.children.discard(pid)
                self.send(f"exit {pid} {os.waitstatus_to_exitcode(status)}")

    def end_children(self) -> None:
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGTERM)

    def fork(self, task_dir: Path) -> None:
        stale = self.changed()
        if stale:
            self.send(f"stale {stale}")
            raise _Stop
        sys.stdout.flush()
        sys.stderr.flush()
        # No signal handler may run in the child before it has its own (it would unwind
        # into this loop), so they wait until both sides are set up.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                self.send(f"error fork failed: {exc}")
                return
            if pid == 0:
                self.child(task_dir, mask)  # never returns
            # Both sides set the process group, so it exists before the runner hears the pid.
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)
            self.children.add(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.send(f"pid {pid}")

    def child(self, task_dir: Path, mask: set[int | signal.Signals]) -> NoReturn:
        code = 70
        try:
            from laulima.site.worker import _redirect_output, _terminate, run_task

            os.setpgid(0, 0)
            signal.set_wakeup_fd(-1)
            for fd in (self.cmd, self.out, self.wake_r, self.wake_w):
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, _terminate)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _redirect_output(task_dir)
            if "numpy.random" in sys.modules:
                sys.modules["numpy.random"].seed()  # else every task would draw the same numbers
            sys.argv = [sys.argv[0], str(task_dir)]
            # Still single-threaded here (a fork copies only the calling thread): run_task
            # applies the task's sandbox, and only then starts the thread watching this zygote.
            code = run_task(task_dir, watch_parent=self.pid)
        except BaseException:  # noqa: BLE001 - never return into the zygote's loop
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            exit_child(code)  # what an interpreter's exit would do, then os._exit: never back into the loop

    def preload(self, module: str) -> None:
        if not is_builtin_module(module):
            self.send(f"preload-failed {module[:_REASON_MAX]} only built-in algorithms are preloaded")
            return
        if module in self.preloaded:
            self.send(f"preloaded {module}")
            return
        before = set(sys.modules)
        try:
            imported = importlib.import_module(module)
            for also in getattr(imported, "__preload__", ()):  # a built-in names its heavy imports
                importlib.import_module(also)
        except (Exception, SystemExit) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            self.send(f"preload-failed {module} {reason[:_REASON_MAX]}")
            return
        for name in set(sys.modules) - before:
            path = getattr(sys.modules[name], "__file__", None)
            if isinstance(path, str):
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    self.files[path] = (st.st_mtime_ns, st.st_size)
        self.preloaded.add(module)
        if threading.active_count() > 1:
            self.send(f"preload-failed {module} it starts a thread at import, which makes forking unsafe")
            raise _Stop
        self.send(f"preloaded {module}")

    def changed(self) -> str | None:
        """A preloaded file that changed or vanished since, if any."""
        for path, seen in self.files.items():
            try:
                st = os.stat(path)
            except OSError:
                return path
            if (st.st_mtime_ns, st.st_size) != seen:
                return path
        return None
