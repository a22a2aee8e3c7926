"""The child process that runs one algorithm on one task: ``python -m laulima.site.worker DIR``.

Usually the agent's zygote (``--zygote``, :mod:`laulima.site.zygote`) forks the task's
process from itself instead, and the fork runs the same code. A crash, a hang or a
memory blow-up here costs one task, never the agent. It reads ``DIR/task.json`` and
``DIR/weights.safetensors`` and writes ``DIR/result.json`` (plus ``DIR/result.safetensors``
for training) or ``DIR/error.json``. Start-up time counts in every round, so this module
imports only numpy, safetensors and the algorithm API — no httpx, pydantic, fastapi or
rich.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update, load_algorithm
from laulima.core.weights import Weights, check_finite, check_matches, safetensors_chunks, schema_of
from laulima.errors import AlgorithmError, LaulimaError, WeightsError
from laulima.site._fs import PRIVATE_DIR, open_private, write_atomic

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
    signal.signal(signal.SIGTERM, _terminate)
    _watch_parent(agent_pid())
    return run_task(Path(args[0]))


def run_task(task_dir: Path) -> int:
    """Run the task in ``task_dir`` (this process's cwd from now on); 0, or 1 with error.json."""
    task_dir = task_dir.resolve()
    try:
        os.chdir(task_dir)
        spec = json.loads((task_dir / TASK_FILE).read_text(encoding="utf-8"))
        run(task_dir, spec)
        return 0
    except BaseException as exc:  # noqa: BLE001 - everything becomes a short reason for the hub
        traceback.print_exc()
        _write_error(task_dir, exc)
        return 1


def run(task_dir: Path, spec: dict[str, Any]) -> None:
    """Set up the algorithm, train or evaluate once, write the result, always finalize."""
    entry = spec["algorithm"]
    weights = _load_weights(task_dir / WEIGHTS_FILE)
    algorithm: Algorithm = load_algorithm(entry)()
    scratch = task_dir / SCRATCH_DIR
    scratch.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    ctx = SiteContext(
        site=spec["site"],
        dataset=spec["dataset"],
        dataset_path=Path(spec["dataset_path"]),
        work_dir=scratch,
        params=spec.get("params") or {},
        seed=int(spec.get("seed", 0)),
    )
    started = time.perf_counter()
    try:
        algorithm.setup(ctx)
        if spec["kind"] == "train":
            config = TrainConfig(
                round=int(spec["round"]),
                local_epochs=int(spec.get("local_epochs", 1)),
                local_steps=int(spec.get("local_steps", 0)),
                proximal_mu=float(spec.get("proximal_mu", 0.0)),
                seed=int(spec.get("seed", 0)),
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
        with open(tmp, "wb") as fh:
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


def _write_error(task_dir: Path, exc: BaseException) -> None:
    """Leave the short reason where the runner looks for it (best effort)."""
    try:
        write_atomic(task_dir / ERROR_FILE, json.dumps({"reason": short_reason(exc)}))
    except Exception:  # noqa: BLE001 - the runner falls back to stderr
        pass


def short_reason(exc: BaseException) -> str:
    """``Type: message (at file.py:12 in fn)``, or just the message for Laulima's own checks."""
    if isinstance(exc, LaulimaError):
        return str(exc)
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frame = _blame_frame(exc)
    return f"{text} (at {frame})" if frame else text


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


if __name__ == "__main__":
    sys.exit(main())
