"""TensorBoard event files for an experiment: per-site and global metrics per round.

Written on the data scientist's side from the hub's metric records, so the hub needs no
training libraries and any past experiment can be exported again.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from laulima.core.crosssite import round_records
from laulima.core.protocol import MetricRecord, TaskKind
from laulima.terminal import weighted_mean

__all__ = ["write_tensorboard"]


def write_tensorboard(logdir: Path, metrics: list[MetricRecord], *, extra: dict[str, float] | None = None) -> Path:
    """Write scalars under ``logdir``: ``<kind>/<site>/<metric>`` for every site and
    ``<kind>/global/<metric>`` (sample-weighted over sites) per round; ``extra`` values are
    logged once at step 0 (e.g. baseline Dice for comparison)."""
    from torch.utils.tensorboard import SummaryWriter

    logdir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        by_round: dict[tuple[TaskKind, int], list[MetricRecord]] = defaultdict(list)
        for m in round_records(metrics):
            by_round[(m.kind, m.round)].append(m)
            for key, value in m.metrics.items():
                writer.add_scalar(f"{m.kind}/{m.site}/{key}", value, global_step=m.round)
        for (kind, rnd), records in sorted(by_round.items()):
            for key, value in weighted_mean(records).items():
                writer.add_scalar(f"{kind}/global/{key}", value, global_step=rnd)
        for key, value in (extra or {}).items():
            writer.add_scalar(key, value, global_step=0)
        writer.flush()
    finally:
        writer.close()
    return logdir
