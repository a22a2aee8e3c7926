"""Algorithms that misbehave on purpose, for the runner and agent tests.

This folder is put on ``sys.path`` by a fixture only (not on PYTHONPATH), so the task
worker can import it only if the runner hands the parent's ``sys.path`` down.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.random  # noqa: F401 - imported at import time, as torch and MONAI do

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.core.weights import Weights

CALLS = 0
"""Bumped by Counter: a task must never see what an earlier task did to it."""


class _Base(Algorithm):
    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        return {"w": np.zeros(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}

    def setup(self, ctx: SiteContext) -> None:
        self.ctx = ctx

    def evaluate(self, weights: Weights) -> Evaluation:
        return Evaluation(n_samples=5, metrics={"acc": 0.5, "mean_w": float(weights["w"].mean())})

    def finalize(self) -> None:
        (self.ctx.work_dir / "finalized").write_text("yes")


class Echo(_Base):
    """Adds 1 to every weight; remembers what it was given."""

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        (self.ctx.work_dir / "seen.txt").write_text(
            f"{config.round} {config.local_epochs} {config.proximal_mu} {dict(self.ctx.params)}"
        )
        return Update({k: v + 1 for k, v in weights.items()}, n_samples=3, metrics={"m": 1.5})


class Crash(_Base):
    def train(self, weights: Weights, config: TrainConfig) -> Update:
        raise ValueError("boom at the site")


class Sleeper(_Base):
    def train(self, weights: Weights, config: TrainConfig) -> Update:
        time.sleep(float(self.ctx.params.get("sleep_s", 30)))
        return Update(dict(weights), n_samples=1)


class Stubborn(_Base):
    """Ignores SIGTERM: only SIGKILL stops it."""

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(30)
        return Update(dict(weights), n_samples=1)


class MakesNaN(_Base):
    def train(self, weights: Weights, config: TrainConfig) -> Update:
        out = {k: v.copy() for k, v in weights.items()}
        out["b"][1] = np.nan
        return Update(out, n_samples=2)


class WrongShape(_Base):
    def train(self, weights: Weights, config: TrainConfig) -> Update:
        return Update({"w": np.zeros(5, dtype=np.float32), "b": weights["b"]}, n_samples=2)


class ZeroSamples(_Base):
    def train(self, weights: Weights, config: TrainConfig) -> Update:
        return Update(dict(weights), n_samples=0)


class Counter(_Base):
    """Counts its runs in a module global; reports them, its pid, its parent's, and a random draw."""

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        global CALLS
        CALLS += 1
        metrics = {"calls": CALLS, "pid": os.getpid(), "ppid": os.getppid(), "draw": float(np.random.random())}
        return Update(dict(weights), n_samples=1, metrics=metrics)


class SpawnsSleep(_Base):
    """Starts ``sleep 60``, writes both pids to pids.txt in its work folder, then sleeps."""

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        child = subprocess.Popen(["sleep", "60"])
        (self.ctx.work_dir / "pids.txt").write_text(f"{os.getpid()} {child.pid}")
        time.sleep(30)
        return Update(dict(weights), n_samples=1)


class AtExit(Echo):
    """Leaves work for the interpreter's exit: an atexit handler writes ``atexit.txt``."""

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        atexit.register((self.ctx.work_dir / "atexit.txt").write_text, "ran")
        return super().train(weights, config)
