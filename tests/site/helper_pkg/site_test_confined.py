"""Algorithms for the confinement tests: one that behaves, one that tries what it must not.

Both run from a bundle, in the sandbox the site's policy gives them. ``Behaves`` does what
a real algorithm does: it reads every file of its dataset, writes its scratch folder and
a temporary file, and computes with numpy. ``Tries`` first does ``params["action"]`` with
``params["target"]`` (read or write a path, connect to a port of 127.0.0.1, allocate that
many bytes, burn CPU, sleep, or write down its environment), then behaves.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from laulima.algorithms.base import Algorithm, Evaluation, SiteContext, TrainConfig, Update
from laulima.core.weights import Weights


class Behaves(Algorithm):
    """Adds the number of dataset files to every weight; ``n_samples`` is that number."""

    def initial_weights(self, params: Mapping[str, Any], seed: int) -> Weights:
        return {"w": np.zeros(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}

    def setup(self, ctx: SiteContext) -> None:
        self.ctx = ctx

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        root = self.ctx.dataset_path
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        size = sum(len(p.read_bytes()) for p in files)
        (self.ctx.work_dir / "notes.txt").write_text(f"{len(files)} files, {size} bytes")
        with tempfile.TemporaryFile() as tmp:  # in the task folder's tmp/ under the sandbox
            tmp.write(b"scratch")
        product = float((np.arange(16.0).reshape(4, 4) @ np.eye(4)).sum())
        return Update(
            {k: v + len(files) for k, v in weights.items()},
            n_samples=len(files),
            metrics={"bytes": float(size), "product": product},
        )

    def evaluate(self, weights: Weights) -> Evaluation:
        return Evaluation(n_samples=1, metrics={})


class Tries(Behaves):
    """Does ``params["action"]`` to ``params["target"]``, then behaves (if it still can)."""

    def train(self, weights: Weights, config: TrainConfig) -> Update:
        action, target = self.ctx.params["action"], self.ctx.params.get("target")
        if action == "read":
            Path(target).read_bytes()
        elif action == "write":
            Path(target).write_text("tampered")
        elif action == "connect":
            with socket.create_connection(("127.0.0.1", int(target)), timeout=5):
                pass
        elif action == "allocate":
            np.ones(int(target) // 8)
        elif action == "burn":
            while True:
                pass
        elif action == "sleep":
            (self.ctx.work_dir / "pids.txt").write_text(f"{os.getpid()} {os.getppid()}")
            time.sleep(30)
        elif action == "environment":
            seen = {"environ": dict(os.environ), "initial": Path("/proc/self/environ").read_bytes().decode("latin-1")}
            (self.ctx.work_dir / "environment.json").write_text(json.dumps(seen))
        else:
            raise ValueError(f"unknown action {action!r}")
        return super().train(weights, config)
