"""The child process that runs one algorithm on one task: ``python -m laulima.site.worker DIR``.

Usually the agent's zygote (``--zygote``, :mod:`laulima.site.zygote`) forks the task's
process from itself instead, and the fork runs the same code. A crash, a hang or a
memory blow-up here costs one task, never the agent. It reads ``DIR/task.json`` and
``DIR/weights.safetensors`` and writes ``DIR/result.json`` (plus ``DIR/result.safetensors``
for training) or ``DIR/error.json``. Start-up time counts in every round, so this module
imports only numpy, safetensors and the algorithm API — no httpx, pydantic, fastapi or
rich.

What runs: a built-in (``laulima.algorithms.*``), or the entry point of the bundle the
agent unpacked and verified (``bundle_dir`` in task.json), loaded from that folder only.
Any other entry point is refused before anything is imported: an installed package or a
module on ``sys.path`` has not been through the site's policy.

Confinement: with a ``sandbox`` policy in task.json, :func:`run_task` applies it
(:func:`laulima.site.sandbox.apply`) after reading the task and before the algorithm is
imported, so even the algorithm's import-time code runs confined. The sandbox binds only
the thread that applies it and refuses a process that already runs threads, so it is
applied in a single-threaded process: the zygote's fresh fork, or, for ``worker DIR``
(whose numpy import started OpenBLAS's threads), a child this worker forks for the task.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import numbers
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from laulima.algorithms.base import Algorithm, DpSgd, Evaluation, SiteContext, TrainConfig, Update, load_algorithm
from laulima.core.weights import Weights, check_finite, check_matches, safetensors_chunks, schema_of
from laulima.errors import AlgorithmError, LaulimaError, PolicyError, WeightsError
from laulima.private_files import PRIVATE_DIR, open_private, write_atomic
from laulima.site import sandbox

__all__ = [
    "ERROR_FILE",
    "PARENT_ENV",
    "RESULT_FILE",
    "RESULT_WEIGHTS_FILE",
    "SCRATCH_DIR",
    "STDERR_LOG",
    "STDOUT_LOG",
    "TASK_FILE",
    "WEIGHTS_FILE",
    "agent_pid",
    "check_entry_point",
    "exit_child",
    "fingerprint_result",
    "load_task_algorithm",
    "main",
    "orphaned",
    "run_task",
    "validate_evaluation",
    "validate_update",
    "write_safetensors",
]

TASK_FILE = "task.json"
WEIGHTS_FILE = "weights.safetensors"
RESULT_WEIGHTS_FILE = "result.safetensors"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
SCRATCH_DIR = "scratch"
"""The algorithm's private work folder inside the task folder."""


PARENT_ENV = "LAULIMA_WORKER_PARENT"
"""Pid of the agent that started this worker; the worker exits when that process is gone."""
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"


def main(argv: list[str] | None = None) -> int:
    """``worker TASK_DIR`` runs one task; ``worker --zygote`` is the agent's fork server
    (:mod:`laulima.site.zygote`), which runs each task in a forked child instead."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--zygote"]:
        from laulima.site.zygote import serve

        return serve()
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m laulima.site.worker TASK_DIR | --zygote", file=sys.stderr)
        return 2
    task_dir = Path(args[0])
    signal.signal(signal.SIGTERM, _terminate)
    if _wants_sandbox(task_dir):
        return _run_in_fork(task_dir, agent_pid())
    return run_task(task_dir, watch_parent=agent_pid())


def run_task(task_dir: Path, *, watch_parent: int | None = None) -> int:
    """Run the task in ``task_dir`` (this process's cwd from now on); 0, or 1 with error.json.

    In this order: read task.json; refuse an entry point that is neither a built-in nor in
    the task's bundle (nothing imported yet); apply the task's sandbox, if it has one (this
    process must not run threads yet); then start watching ``watch_parent`` (a thread: this
    process exits once that process is gone); then import and run the algorithm.
    """
    task_dir = task_dir.resolve()
    confined: sandbox.SandboxPolicy | None = None
    try:
        os.chdir(task_dir)
        spec = json.loads((task_dir / TASK_FILE).read_text(encoding="utf-8"))
        policy = sandbox.SandboxPolicy.from_json(spec["sandbox"]) if spec.get("sandbox") is not None else None
        check_entry_point(spec["algorithm"], spec.get("bundle_dir"))
        if policy is not None:
            print(_confine(policy).summary(), file=sys.stderr, flush=True)
            confined = policy
        _watch_parent(watch_parent)
        run(task_dir, spec)
        return 0
    except BaseException as exc:  # noqa: BLE001 - everything becomes a short reason for the hub
        traceback.print_exc()
        _write_error(task_dir, exc, confined)
        return 1


def check_entry_point(entry: str, bundle_dir: str | None) -> None:
    """Refuse, before anything is imported, an entry point this site may not run.

    With a bundle, :func:`load_entry_point` refuses whatever is not in the bundle; without
    one, only a built-in may run: an importable module (``os:system``, an installed package,
    a file on ``sys.path``) has not been checked against the site's policy.
    """
    if bundle_dir:
        return
    from laulima.algorithms.bundle import is_builtin  # imported by the zygote already

    if not is_builtin(entry):
        raise PolicyError(
            f"algorithm {entry!r} cannot be imported: it is neither a built-in (laulima.algorithms.*) nor run "
            "from a bundle; this site runs only built-in algorithms and the bundles its agent verified",
            field="algorithm",
        )


def load_task_algorithm(entry: str, bundle_dir: str | None) -> type[Algorithm]:
    """The algorithm class: from the unpacked bundle ``bundle_dir`` only, or a built-in."""
    if bundle_dir:
        from laulima.algorithms.bundle import load_entry_point

        return load_entry_point(Path(bundle_dir), entry)
    check_entry_point(entry, None)
    return load_algorithm(entry)


def _confine(policy: sandbox.SandboxPolicy) -> sandbox.SandboxReport:
    """Apply ``policy`` to this process; anything but the sandbox's own refusal is a PolicyError too."""
    try:
        return sandbox.apply(policy)
    except LaulimaError:
        raise
    except Exception as exc:
        raise PolicyError(f"sandbox: the task's sandbox could not be set up ({type(exc).__name__}: {exc})") from exc


def _wants_sandbox(task_dir: Path) -> bool:
    """Whether task.json asks for a sandbox (an unreadable one is reported by run_task)."""
    try:
        spec = json.loads((task_dir / TASK_FILE).read_text(encoding="utf-8"))
        return isinstance(spec, dict) and spec.get("sandbox") is not None
    except (OSError, ValueError):
        return False


def _run_in_fork(task_dir: Path, parent: int | None) -> int:
    """Run the task in a forked child, which is single-threaded, and return its exit code.

    ``import numpy`` started OpenBLAS's threads in this process, and the sandbox must be
    applied before any thread runs; a fork copies only the calling thread. This process
    stays unconfined and only waits: it passes SIGTERM and SIGINT on, ends the child if
    the agent dies, and dies of the signal that killed the child (SIGXCPU at the CPU
    limit), so the runner sees the same exit code as from a zygote's child.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    me = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            code = run_task(task_dir, watch_parent=me)
        finally:
            exit_child(code)

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _watch_parent(parent)  # orphaned: SIGTERM to this process, which passes it on
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        _die_of(-code)
    return code


def _die_of(signum: int) -> None:
    """End this process by signal ``signum``, without a core dump; returns if it survives that."""
    sys.stdout.flush()
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)


def exit_child(code: int) -> NoReturn:
    """End a forked task process as an interpreter's exit would, without returning to the
    caller's loop: atexit handlers (logging's flush, finalizers removing temporary folders),
    flushed output, then ``os._exit``."""
    try:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os._exit(code)


def run(task_dir: Path, spec: dict[str, Any]) -> None:
    """Set up the algorithm, train or evaluate once (or, without setup, compute the dataset
    fingerprint), write the result, always finalize."""
    entry = spec["algorithm"]
    fingerprinting = spec["kind"] == "fingerprint"
    weights = {} if fingerprinting else _load_weights(task_dir / WEIGHTS_FILE)  # a fingerprint has no model
    algorithm: Algorithm = load_task_algorithm(entry, spec.get("bundle_dir"))()
    scratch = task_dir / SCRATCH_DIR
    scratch.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    cache = spec.get("cache_dir")
    ctx = SiteContext(
        site=spec["site"],
        dataset=spec["dataset"],
        dataset_path=Path(spec["dataset_path"]),
        work_dir=scratch,
        params=spec.get("params") or {},
        seed=int(spec.get("seed", 0)),
        cache_dir=Path(cache) if cache else None,
    )
    started = time.perf_counter()
    try:
        if fingerprinting:
            result = fingerprint_result(algorithm.fingerprint(ctx), where=f"algorithm {entry}")
            result["seconds"] = time.perf_counter() - started
            write_atomic(task_dir / RESULT_FILE, json.dumps(result))
            return
        dp = _dp_sgd(spec, algorithm, entry) if spec["kind"] == "train" else None  # refused before any data is read
        algorithm.setup(ctx)
        if spec["kind"] == "train":
            config = TrainConfig(
                round=int(spec["round"]),
                local_epochs=int(spec.get("local_epochs", 1)),
                local_steps=int(spec.get("local_steps", 0)),
                proximal_mu=float(spec.get("proximal_mu", 0.0)),
                seed=int(spec.get("seed", 0)),
                progress=_progress(spec.get("progress")),
                dp_sgd=dp,
            )
            update = algorithm.train(weights, config)
            n_samples, metrics = validate_update(update, weights, where=f"algorithm {entry}")
            keys = spec["meta_keys"]
            metadata = {
                keys["n_samples"]: str(n_samples),
                keys["metrics"]: json.dumps(metrics),
                keys["task"]: str(spec["task_id"]),
            }
            digest, size = write_safetensors(task_dir / RESULT_WEIGHTS_FILE, update.weights, metadata)
            result = {"n_samples": n_samples, "metrics": metrics, "sha256": digest, "size": size}
        else:
            evaluation = algorithm.evaluate(weights)
            n_samples, metrics = validate_evaluation(evaluation, where=f"algorithm {entry}")
            result = {"n_samples": n_samples, "metrics": metrics}
        result["seconds"] = time.perf_counter() - started
        write_atomic(task_dir / RESULT_FILE, json.dumps(result))
    finally:
        algorithm.finalize()


def validate_update(update: object, weights: Weights, *, where: str) -> tuple[int, dict[str, float]]:
    """Refuse an update the hub would refuse, with a message naming the tensor; return (n, metrics)."""
    if not isinstance(update, Update):
        raise AlgorithmError(
            f"{where}: train() returned {type(update).__name__}; return laulima.Update(weights, n_samples, metrics)"
        )
    if not isinstance(update.weights, dict):
        raise AlgorithmError(f"{where}: Update.weights is {type(update.weights).__name__}, expected a dict of arrays")
    for name, array in update.weights.items():
        if not isinstance(array, np.ndarray):
            raise WeightsError(
                f"{where}: update tensor {name!r} is a {type(array).__name__}, not a numpy array; "
                "convert it (tensor.detach().cpu().numpy())",
                where=where,
            )
    check_matches(schema_of(weights), schema_of(update.weights), where=f"{where}: update")
    for name, array in update.weights.items():
        check_finite(name, array, where=f"{where}: update")
    n = _count(update.n_samples, where=f"{where}: Update.n_samples", minimum=1)
    return n, _metrics(update.metrics, where=f"{where}: Update.metrics")


def fingerprint_result(fingerprint: object, *, where: str) -> dict[str, Any]:
    """``result.json`` of a fingerprint task: the fingerprint, validated again from its JSON
    (so what is sent is what the hub will accept), with ``n_samples`` its cases."""
    from pydantic import ValidationError

    from laulima.core.fingerprint import MAX_FINGERPRINT_BYTES, SiteFingerprint  # pydantic: this kind only

    if not isinstance(fingerprint, SiteFingerprint):
        raise AlgorithmError(
            f"{where}: fingerprint() returned {type(fingerprint).__name__}; return a "
            "laulima.core.fingerprint.SiteFingerprint"
        )
    text = fingerprint.model_dump_json()
    if len(text.encode()) > MAX_FINGERPRINT_BYTES:
        raise AlgorithmError(
            f"{where}: the fingerprint is {len(text.encode())} bytes of JSON, more than the "
            f"{MAX_FINGERPRINT_BYTES} the hub accepts"
        )
    try:
        checked = SiteFingerprint.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "fingerprint"
        raise AlgorithmError(f"{where}: the fingerprint is invalid: field '{field}': {err['msg']}") from None
    return {"n_samples": checked.n_cases, "metrics": {}, "fingerprint": json.loads(text)}


def validate_evaluation(evaluation: object, *, where: str) -> tuple[int, dict[str, float]]:
    if not isinstance(evaluation, Evaluation):
        raise AlgorithmError(
            f"{where}: evaluate() returned {type(evaluation).__name__}; return laulima.Evaluation(n_samples, metrics)"
        )
    n = _count(evaluation.n_samples, where=f"{where}: Evaluation.n_samples", minimum=0)
    return n, _metrics(evaluation.metrics, where=f"{where}: Evaluation.metrics")


def _count(value: object, *, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise AlgorithmError(f"{where} is {value!r}; it must be an integer of at least {minimum}")
    return int(value)


def _metrics(metrics: object, *, where: str) -> dict[str, float]:
    if not isinstance(metrics, dict):
        raise AlgorithmError(f"{where} is a {type(metrics).__name__}; return a dict of name -> number")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise AlgorithmError(f"{where}[{name!r}] is {value!r}; metrics must be numbers")
        if not math.isfinite(float(value)):
            print(f"warning: {where}[{name!r}] = {value} is not finite; dropped", file=sys.stderr)
            continue
        out[str(name)] = float(value)
    return out


def write_safetensors(path: Path, weights: Weights, metadata: dict[str, str]) -> tuple[str, int]:
    """Write ``weights`` as safetensors straight from the arrays' memory, hashing as it goes;
    return (sha256, size). Written to a temporary file, then renamed, so ``path`` is complete
    or absent."""
    digest = hashlib.sha256()
    size = 0
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with os.fdopen(open_private(tmp), "wb") as fh:  # owner-only from its first byte
            for chunk in safetensors_chunks(weights, metadata):
                digest.update(chunk)
                fh.write(chunk)
                size += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def _load_weights(path: Path) -> Weights:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise WeightsError(f"{path}: the global weights cannot be read ({exc})", where=str(path)) from exc


def _write_error(task_dir: Path, exc: BaseException, confined: sandbox.SandboxPolicy | None = None) -> None:
    """Leave the short reason where the runner looks for it (best effort).

    In a sandbox (``confined``: the policy applied), an error that is the sandbox saying no
    becomes that violation (its kind, never the path or address), plus where the
    algorithm was; it is also recorded apart, so the agent can audit it.
    """
    violation = sandbox.explain_violation(exc, confined) if confined is not None else None
    if violation:
        frame = _blame_frame(_innermost(exc))
        reason = f"{violation} (at {frame})" if frame else violation
    else:
        reason = short_reason(exc)
    try:
        write_atomic(task_dir / ERROR_FILE, json.dumps({"reason": reason, "sandbox_violation": violation}))
    except Exception:  # noqa: BLE001 - the runner falls back to stderr
        pass


def short_reason(exc: BaseException) -> str:
    """``Type: message (at file.py:12 in fn)``, or just the message for Laulima's own checks."""
    if isinstance(exc, LaulimaError):
        return str(exc)
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frame = _blame_frame(exc)
    return f"{text} (at {frame})" if frame else text


def _innermost(exc: BaseException) -> BaseException:
    """The exception at the root of ``exc``'s chain (what it was raised from or during):
    where the algorithm met the sandbox, not where Laulima wrapped that up."""
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def _blame_frame(exc: BaseException) -> str | None:
    """The deepest frame outside the standard library, site-packages and this module."""
    import sysconfig

    skip = tuple(p for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} if p)
    frames = traceback.extract_tb(exc.__traceback__)
    for fs in reversed(frames):
        if fs.filename == __file__ or fs.filename.startswith(skip) or fs.filename.startswith("<"):
            continue
        return f"{os.path.basename(fs.filename)}:{fs.lineno} in {fs.name}"
    return None


def _terminate(signum: int, frame: object) -> None:
    # Once is enough: a second SIGTERM (the runner signals the whole process group, and a
    # forking worker passes it on too) would interrupt the clean-up the first one started.
    # The runner's SIGKILL still follows if the clean-up takes too long.
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(f"terminated by signal {signum} (time limit or agent shutdown)")


def agent_pid() -> int | None:
    """The agent's pid from ``LAULIMA_WORKER_PARENT``, if set."""
    try:
        return int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        return None


def orphaned(parent: int | None) -> bool:
    """True once ``parent`` is no longer this process's parent (POSIX; never if None)."""
    return parent is not None and os.name == "posix" and os.getppid() != parent


def _watch_parent(parent: int | None) -> None:
    """Exit if ``parent`` dies: an orphaned worker would compete with the restarted agent's."""
    if parent is None or os.name != "posix":
        return
    if orphaned(parent):
        os._exit(70)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if orphaned(parent):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5.0)
                os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _redirect_output(task_dir: Path) -> None:
    """Send this process's stdout and stderr (C-level too) into the task's log files."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, name in ((1, STDOUT_LOG), (2, STDERR_LOG)):
        target = open_private(task_dir / name)
        os.dup2(target, fd)
        os.close(target)


def _dp_sgd(spec: dict[str, Any], algorithm: Algorithm, entry: str) -> DpSgd | None:
    """``task.json``'s ``dp_sgd`` as the algorithm's :class:`DpSgd`; refused for an algorithm that does not
    implement it: training without the privacy the experiment promised must never pass for training with it."""
    value = spec.get("dp_sgd")
    if value is None:
        return None
    if not getattr(type(algorithm), "supports_dp_sgd", False):
        raise AlgorithmError(
            f"algorithm {entry}: the task asks for sample-level DP-SGD ([privacy.dp_sgd]), which "
            f"{type(algorithm).__qualname__} does not implement (its supports_dp_sgd is False), and training "
            "without it would not give the privacy the experiment promises; DP-SGD is only implemented by "
            "algorithms such as laulima.algorithms.segmentation:UNetSegmentation — use one, or remove "
            "[privacy.dp_sgd] from the experiment"
        )
    return DpSgd(
        noise_multiplier=float(value["noise_multiplier"]),
        max_grad_norm=float(value["max_grad_norm"]),
        delta=float(value["delta"]),
    )


def _progress(value: Any) -> tuple[float, float]:
    """``task.json``'s progress window (checked by taskdir.training_progress when it was written)."""
    if not isinstance(value, list) or len(value) != 2:
        return (0.0, 1.0)
    return (float(value[0]), float(value[1]))


if __name__ == "__main__":
    sys.exit(main())
