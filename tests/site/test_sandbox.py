"""The task sandbox, applied for real: each test forks a child, confines it, lets it try
things, and reads back through a pipe (JSON) what worked and what was refused.

The kernel is the real one; an older or poorer kernel is simulated by passing a smaller
:class:`KernelSupport`, which makes :func:`apply` use only what that kernel would have.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from laulima.errors import ConfigurationError, PolicyError
from laulima.site import sandbox
from laulima.site.sandbox import KernelSupport, SandboxPolicy, apply, explain_violation, policy_for_task

KERNEL = sandbox.probe_kernel() if sys.platform.startswith("linux") else KernelSupport(0, False)
pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the sandbox is applied in a forked child"),
    pytest.mark.skipif(KERNEL.landlock_abi < 1, reason="this kernel has no Landlock"),
]
WAIT_S = 60.0
PR_SET_DUMPABLE = 4
SECRET = "LAULIMA_TEST_SECRET_TOKEN"


@dataclass
class Site:
    home: Path
    key: Path
    dataset: Path
    other_dataset: Path
    task_dir: Path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A site home with a private key, two registered datasets and one task folder."""
    home = tmp_path / "home"
    (home / "tls").mkdir(parents=True)
    key = home / "tls" / "site.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    datasets = tmp_path / "datasets"
    for name in ("brain", "heart"):
        (datasets / name).mkdir(parents=True)
        (datasets / name / "case_001.txt").write_text(f"{name} case\n")
    task_dir = home / "tasks" / "t-1"
    task_dir.mkdir(parents=True)
    return Site(home, key, datasets / "brain", datasets / "heart", task_dir)


@pytest.fixture
def policy(site: Site) -> SandboxPolicy:
    return policy_for_task(site.task_dir, site.dataset)


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    """A TCP server of the parent's on 127.0.0.1 (the agent's side of the machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()


def confined(
    policy: SandboxPolicy,
    probe: Callable[[], dict[str, Any]],
    *,
    kernel: KernelSupport | None = None,
    as_user: int | None = None,
) -> dict[str, Any]:
    """Fork; in the child apply ``policy`` then run ``probe``; return what the child wrote back."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_fd)
            out: dict[str, Any]
            try:
                if as_user is not None:
                    os.setgroups([])
                    os.setgid(as_user)
                    os.setuid(as_user)
                    # As an agent started by that user would be (a uid change clears it).
                    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
                report = apply(policy, kernel=kernel)
                out = {"report": {"applied": report.applied, "unsupported": report.unsupported}, **probe()}
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                out = {"error": type(exc).__name__, "message": str(exc), "env": dict(os.environ)}
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(write_fd, data) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], WAIT_S)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the sandboxed child sent nothing for {WAIT_S:.0f} s")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    assert chunks, "the sandboxed child died without an answer"
    return json.loads(b"".join(chunks))


def attempt(action: Callable[[], object], policy: SandboxPolicy | None = None) -> str:
    """'ok', or the exception's type and errno, plus the sandbox's explanation of it."""
    try:
        action()
    except BaseException as exc:  # noqa: BLE001
        code = errno.errorcode.get(getattr(exc, "errno", None) or 0, "")
        reason = explain_violation(exc, policy) if policy is not None else None
        return f"{type(exc).__name__} {code} | {reason}"
    return "ok"


def connect(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5):
        pass


# -- what a confined task can and cannot do ------------------------------------------------
def test_a_confined_task_reads_only_its_dataset_and_writes_only_its_task_folder(
    site: Site, policy: SandboxPolicy
) -> None:
    def probe() -> dict[str, Any]:
        own = site.task_dir / "scratch" / "model.bin"

        def write_own() -> None:
            own.parent.mkdir()
            own.write_bytes(b"x" * 10)
            own.rename(site.task_dir / "model.2")  # into another folder: Landlock's "refer" right

        return {
            "dataset": (site.dataset / "case_001.txt").read_text(),
            "write": attempt(write_own),
            "tmp": attempt(lambda: tempfile.NamedTemporaryFile(dir=None).close()),
            "key": attempt(site.key.read_bytes, policy),
            "home": attempt(lambda: os.listdir(site.home), policy),
            "passwd": attempt(Path("/etc/passwd").read_text, policy),
            "passwd_via_proc": attempt(Path("/proc/self/root/etc/passwd").read_text, policy),
            "other_dataset": attempt((site.other_dataset / "case_001.txt").read_text, policy),
            "parent_environ": attempt(Path(f"/proc/{os.getppid()}/environ").read_bytes, policy),
            "write_dataset": attempt(lambda: (site.dataset / "new.txt").write_text("x"), policy),
            "write_tmp": attempt(lambda: Path("/tmp/laulima-sandbox-escape").write_text("x"), policy),
        }

    out = confined(policy, probe)
    assert "error" not in out, out
    assert out["dataset"] == "brain case\n"
    assert out["write"] == "ok" and out["tmp"] == "ok"
    assert (site.task_dir / "model.2").read_bytes() == b"x" * 10
    outside = "PermissionError EACCES | sandbox: the algorithm tried to open a file outside its dataset and task folder"
    for name in ("key", "home", "passwd", "passwd_via_proc", "other_dataset", "parent_environ", "write_tmp"):
        assert out[name] == outside, name
    assert out["write_dataset"] == (
        "PermissionError EACCES | sandbox: the algorithm tried to write outside its task folder"
    )
    assert not (site.dataset / "new.txt").exists()
    assert not Path("/tmp/laulima-sandbox-escape").exists()


def test_a_confined_task_cannot_connect_to_the_site_machine(policy: SandboxPolicy, listener: tuple[str, int]) -> None:
    assert attempt(lambda: connect(listener)) == "ok"  # reachable from outside the sandbox

    def probe() -> dict[str, Any]:
        return {
            "tcp": attempt(lambda: connect(listener), policy),
            "interfaces": [name for _, name in socket.if_nameindex()],
        }

    # Both layers refuse on their own: the namespace (no route; Landlock without network
    # rules, as before ABI 4) and Landlock's TCP rules (which answer first when present).
    namespace_only = confined(policy, probe, kernel=KernelSupport(landlock_abi=3, network_namespace=True))
    assert namespace_only["tcp"] == (
        "OSError ENETUNREACH | sandbox: the algorithm tried to open a network connection; it has no network"
    )
    assert namespace_only["interfaces"] == ["lo"]
    assert any(line.startswith("network: a namespace of its own") for line in namespace_only["report"]["applied"])
    both = confined(policy, probe)
    assert both["tcp"].endswith("| sandbox: the algorithm tried to open a network connection; it has no network")


def test_a_confined_task_cannot_reach_the_sites_local_sockets(tmp_path: Path, policy: SandboxPolicy) -> None:
    """A Unix socket by path (a proxy, a container runtime) is outside any network namespace."""
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)

        def probe() -> dict[str, Any]:
            def pipe_roundtrip() -> None:
                left, right = socket.socketpair()
                left.sendall(b"ok")
                assert right.recv(2) == b"ok"

            return {
                "unix": attempt(lambda: socket.socket(socket.AF_UNIX).connect(path), policy),
                "socketpair": attempt(pipe_roundtrip),
            }

        out = confined(policy, probe)
        poorer = confined(
            replace(policy, on_unsupported="warn"),
            probe,
            kernel=KernelSupport(landlock_abi=KERNEL.landlock_abi, network_namespace=True, socket_filter=False),
        )
    assert out["unix"] == (
        "PermissionError EACCES | sandbox: the algorithm tried to open a network connection; it has no network"
    )
    assert out["socketpair"] == "ok"  # multiprocessing's pipes still work
    assert poorer["unix"] == "ok"  # without the filter it connects, and the report says so
    assert any("local sockets" in line for line in poorer["report"]["unsupported"])


def test_the_agents_environment_is_gone_and_home_is_the_task_folder(
    site: Site, policy: SandboxPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET, "hunter2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")

    def probe() -> dict[str, Any]:
        show = "import os; print(sorted(os.environ.items()))"
        child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=False)
        return {
            "env": dict(os.environ),
            "proc_environ": Path("/proc/self/environ").read_bytes().decode(errors="replace"),
            "child_env": child.stdout,
            "tempdir": tempfile.gettempdir(),
        }

    out = confined(policy, probe)
    assert "error" not in out, out
    assert SECRET not in out["env"]
    assert "hunter2" not in out["proc_environ"] and SECRET not in out["proc_environ"]
    assert "TMPDIR" in out["child_env"] and SECRET not in out["child_env"]
    assert out["env"]["HOME"] == str(site.task_dir)
    assert out["env"]["OMP_NUM_THREADS"] == "3"
    assert out["tempdir"] == str(site.task_dir / "tmp")
    assert set(out["env"]) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "USER", "LOGNAME", *sandbox.THREAD_VARIABLES}


def test_the_environment_the_process_started_with_is_erased_too(site: Site) -> None:
    """The zygote's own start-up environment stays visible in /proc/self/environ unless erased."""
    code = (
        "import json, os, sys; from pathlib import Path; from laulima.site import sandbox; "
        "sandbox.apply(sandbox.policy_for_task(Path(sys.argv[1]), Path(sys.argv[2]))); "
        "print(json.dumps([Path('/proc/self/environ').read_bytes().decode(errors='replace'), dict(os.environ)]))"
    )
    # One BLAS thread: numpy's import otherwise starts a pool, and apply() needs a single thread
    # (in the agent the task is a fork of the zygote, which has just the one).
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "OPENBLAS_NUM_THREADS": "1", SECRET: "hunter2"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(site.task_dir), str(site.dataset)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT_S,
    )
    assert proc.returncode == 0, proc.stderr
    proc_environ, environ = json.loads(proc.stdout)
    assert SECRET not in environ
    assert "hunter2" not in proc_environ and SECRET not in proc_environ


def test_numpy_imports_and_computes_in_a_fresh_confined_interpreter(policy: SandboxPolicy) -> None:
    code = "import numpy, laulima.core.weights; print(int((numpy.arange(10.0) @ numpy.eye(10)).sum()))"

    def probe() -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=WAIT_S)
        inside = float(np.linalg.inv(np.eye(3) * 2.0).sum())
        return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-2000:], "inside": inside}

    out = confined(policy, probe)
    assert out["rc"] == 0, out["stderr"]
    assert out["stdout"].strip() == "45"
    assert out["inside"] == 1.5


def test_allocating_past_the_memory_limit_raises_memory_error_with_a_reason(policy: SandboxPolicy) -> None:
    used = int(sandbox._status_field("VmSize").split()[0]) * 1024
    limited = replace(policy, memory_bytes=used + (512 << 20) - used % (1 << 20))

    def probe() -> dict[str, Any]:
        small = attempt(lambda: np.ones(1 << 20))  # 8 MiB: within the limit
        large = attempt(lambda: np.ones(1 << 28), limited)  # 2 GiB: past it
        return {"small": small, "large": large}

    out = confined(limited, probe)
    assert out["small"] == "ok"
    limit_mib = limited.memory_bytes // (1 << 20)  # type: ignore[operator]
    assert out["large"].endswith(f"| sandbox: the algorithm exceeded its memory limit of {limit_mib} MiB")
    assert out["large"].startswith("_ArrayMemoryError") or out["large"].startswith("MemoryError")


def test_root_in_the_sandbox_loses_its_powers_and_keeps_its_limits(site: Site, policy: SandboxPolicy) -> None:
    if os.geteuid() != 0:
        pytest.skip("an agent run as root is what this is about")
    import resource

    limited = replace(policy, cpu_seconds=600, open_files=256)
    limits_asked = (resource.RLIMIT_NOFILE, resource.RLIMIT_CORE, resource.RLIMIT_CPU)
    own = site.task_dir / "own.txt"
    own.write_text("x")

    def probe() -> dict[str, Any]:
        return {
            "chown": attempt(lambda: os.chown(own, 12345, 12345)),  # CAP_CHOWN, in its own folder
            "raw_socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
            "bounding": sandbox._status_field("CapBnd"),
            "nofile": attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))),
            "limits": [resource.getrlimit(r) for r in limits_asked],
        }

    out = confined(limited, probe)
    assert out["chown"] == "PermissionError EPERM | None"
    assert out["raw_socket"] == "PermissionError EPERM | None"
    assert int(out["bounding"], 16) == (1 << 1) | (1 << 2)  # only CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    assert out["nofile"].startswith("ValueError")
    assert out["limits"] == [[256, 256], [0, 0], [600, 605]]


def test_an_unprivileged_agent_gets_the_same_confinement_through_a_user_namespace(
    tmp_path: Path, listener: tuple[str, int]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the test drops to 'nobody' from root")
    base = Path(tempfile.mkdtemp(prefix="laulima-sandbox-"))
    try:
        for sub in ("data", "other", "task"):
            (base / sub).mkdir()
            (base / sub / "f.txt").write_text(sub)
        for path in (base, *base.iterdir(), *base.glob("*/*")):
            path.chmod(0o777 if path.is_dir() else 0o666)
        policy = SandboxPolicy(task_dir=base / "task", readable=(base / "data",))

        def probe() -> dict[str, Any]:
            return {
                "uid": os.geteuid(),
                "data": (base / "data" / "f.txt").read_text(),
                "write": attempt(lambda: (base / "task" / "out.txt").write_text("y")),
                "other": attempt((base / "other" / "f.txt").read_text, policy),
                "tcp": attempt(lambda: connect(listener), policy),
                "udp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(listener)),
                "interfaces": [name for _, name in socket.if_nameindex()],
            }

        out = confined(policy, probe, as_user=65534)
        assert "error" not in out, out
        assert out["uid"] == 65534 and out["data"] == "data" and out["write"] == "ok"
        assert out["other"].startswith("PermissionError EACCES | sandbox:")
        assert out["tcp"].endswith("| sandbox: the algorithm tried to open a network connection; it has no network")
        assert out["udp"].startswith("OSError ENETUNREACH") and out["interfaces"] == ["lo"]  # its own namespace
        assert out["report"]["unsupported"] == []
    finally:
        for path in sorted(base.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        base.rmdir()


# -- a kernel without some of it -----------------------------------------------------------
def test_a_kernel_without_landlock_or_namespaces_is_refused_before_anything_changes(
    policy: SandboxPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET, "hunter2")
    out = confined(policy, dict, kernel=KernelSupport(landlock_abi=0, network_namespace=False))
    assert out["error"] == "PolicyError"
    assert "no Landlock" in out["message"] and "no network namespaces" in out["message"]
    assert "'warn'" in out["message"]  # says what the site admin can do
    assert out["env"][SECRET] == "hunter2"  # refused before the environment was touched


def test_warn_runs_without_what_the_kernel_lacks_and_says_so(site: Site, policy: SandboxPolicy) -> None:
    warn = replace(policy, on_unsupported="warn")

    def probe() -> dict[str, Any]:
        return {"passwd": attempt(Path("/etc/passwd").read_text), "key": attempt(site.key.read_bytes)}

    out = confined(warn, probe, kernel=KernelSupport(landlock_abi=0, network_namespace=False))
    assert out["passwd"] == "ok" and out["key"] == "ok"  # nothing pretends to confine it
    unsupported = " ".join(out["report"]["unsupported"])
    assert "no Landlock" in unsupported and "no network namespaces" in unsupported


def test_without_network_namespaces_landlock_still_blocks_tcp(
    site: Site, policy: SandboxPolicy, listener: tuple[str, int]
) -> None:
    if KERNEL.landlock_abi < 4:
        pytest.skip("Landlock network rules need ABI 4")
    warn = replace(policy, on_unsupported="warn")

    def probe() -> dict[str, Any]:
        return {"tcp": attempt(lambda: connect(listener), warn), "key": attempt(site.key.read_bytes)}

    out = confined(warn, probe, kernel=KernelSupport(landlock_abi=KERNEL.landlock_abi, network_namespace=False))
    assert out["tcp"] == (
        "PermissionError EACCES | sandbox: the algorithm tried to open a network connection; it has no network"
    )
    assert out["key"].startswith("PermissionError")
    assert any("TCP is blocked by Landlock" in line for line in out["report"]["unsupported"])


def test_the_first_landlock_abi_still_confines_files(site: Site, policy: SandboxPolicy) -> None:
    def probe() -> dict[str, Any]:
        return {
            "key": attempt(site.key.read_bytes),
            "write": attempt(lambda: (site.task_dir / "a.txt").write_text("a")),
            "dataset": (site.dataset / "case_001.txt").read_text(),
        }

    out = confined(policy, probe, kernel=KernelSupport(landlock_abi=1, network_namespace=True))
    assert out["key"].startswith("PermissionError") and out["write"] == "ok" and out["dataset"] == "brain case\n"
    assert "file system: Landlock ABI 1" in out["report"]["applied"]


def test_the_sandbox_refuses_a_process_that_already_runs_threads(policy: SandboxPolicy) -> None:
    import threading

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()
            try:
                apply(policy)
                message = "applied"
            except PolicyError as exc:
                message = str(exc)
            stop.set()
            os.write(write_fd, message.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], WAIT_S)
    message = os.read(read_fd, 4096).decode() if ready else "no answer"
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert "threads are running" in message and "before any thread starts" in message


# -- the policy itself, and reasons -----------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"memory_bytes": -1}, "memory_bytes"),
        ({"memory_bytes": float("inf")}, "memory_bytes"),
        ({"cpu_seconds": 0}, "cpu_seconds"),
        ({"open_files": 10**9}, "open_files"),
        ({"on_unsupported": "ignore"}, "on_unsupported"),
        ({"readable": (Path("/"),)}, "readable"),
        ({"readable": (Path("relative/data"),)}, "readable"),
        ({"readable": "/data"}, "readable"),
        ({"task_dir": ""}, "task_dir"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(site: Site, change: dict[str, Any], field: str) -> None:
    fields: dict[str, Any] = {"task_dir": site.task_dir, "readable": (site.dataset,), **change}
    with pytest.raises(ConfigurationError) as caught:
        SandboxPolicy(**fields)
    assert caught.value.context["field"] == field
    assert field in str(caught.value)


def test_a_missing_dataset_is_a_configuration_error_without_its_path(site: Site, policy: SandboxPolicy) -> None:
    gone = replace(policy, readable=(site.dataset / "missing", *policy.readable[1:]))
    out = confined(gone, dict)
    assert out["error"] == "ConfigurationError"
    assert "readable" in out["message"] and str(site.dataset) not in out["message"]


def test_reasons_name_the_violation_and_never_the_path(site: Site, policy: SandboxPolicy) -> None:
    limited = replace(policy, memory_bytes=512 << 20, cpu_seconds=30)
    key_error = PermissionError(errno.EACCES, "Permission denied", str(site.key))
    wrapped = RuntimeError("could not load case")
    wrapped.__cause__ = key_error
    cases = {
        "read": key_error,
        "wrapped": wrapped,
        "dns": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        "unreachable": OSError(errno.ENETUNREACH, "Network is unreachable"),
        "memory": MemoryError(),
        "torch_memory": RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    }
    reasons = {name: explain_violation(exc, limited) for name, exc in cases.items()}
    assert (
        reasons["read"]
        == reasons["wrapped"]
        == ("sandbox: the algorithm tried to open a file outside its dataset and task folder")
    )
    assert reasons["dns"] is not None and "network" in reasons["dns"]
    assert reasons["unreachable"] == "sandbox: the algorithm tried to open a network connection; it has no network"
    assert reasons["memory"] == reasons["torch_memory"] == "sandbox: the algorithm exceeded its memory limit of 512 MiB"
    assert all(str(site.home) not in (r or "") and "site.key" not in (r or "") for r in reasons.values())
    # Not the sandbox: an ordinary error, a permission problem in its own folder, a network it was allowed.
    assert explain_violation(ValueError("bad input"), limited) is None
    own = PermissionError(errno.EACCES, "Permission denied", str(site.task_dir / "x"))
    assert explain_violation(own, limited) is None
    assert explain_violation(cases["unreachable"], replace(limited, network=True)) is None
    assert sandbox.explain_exit(-signal.SIGXCPU, limited) == "sandbox: the algorithm used up its CPU time limit of 30 s"
    assert sandbox.explain_exit(1, limited) is None
