"""A generated tabular data set, non-IID across sites, for demos, tests and benchmarks.

Every site shares one true rule, ``P(y | x) = softmax(W x + b)`` with ``W, b`` fixed by
the seed, but sees its own part of feature space: each site's features are shifted toward
a different class and scaled differently (its "scanner": some features barely vary at one
site and widely at another), so feature distributions and label balance differ between
sites. A model trained on one site alone extrapolates badly
to the others; the federation sees all regions and learns the shared rule.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from laulima.errors import ConfigurationError, DataError

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_FEATURES",
    "LABEL_COLUMN",
    "read_tabular",
    "site_sample",
    "true_rule",
    "write_tabular_site",
]

DEFAULT_FEATURES = 8
DEFAULT_CLASSES = 3
LABEL_COLUMN = "label"
_RULE_SCALE = 5.0
"""Size of the true weights: large enough that the best possible accuracy is ~85-95 %."""
_SHIFT = 2.0
"""How far each site's feature cloud sits from the origin, toward its favoured class."""


def true_rule(
    seed: int, n_features: int = DEFAULT_FEATURES, n_classes: int = DEFAULT_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """The shared ``(W, b)`` of a federation with ``seed``: the same at every site."""
    rng = np.random.default_rng([seed, 0x7AB])
    w = rng.normal(0.0, _RULE_SCALE / math.sqrt(n_features), size=(n_classes, n_features))
    b = rng.normal(0.0, 0.25, size=n_classes)
    return w, b


def site_sample(
    site_index: int,
    n: int,
    *,
    seed: int,
    n_features: int = DEFAULT_FEATURES,
    n_classes: int = DEFAULT_CLASSES,
    split: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of site ``site_index`` (``split`` 0 = train, 1 = validation)."""
    w, b = true_rule(seed, n_features, n_classes)
    site_rng = np.random.default_rng([seed, 1, site_index])
    favoured = site_index % n_classes
    direction = w[favoured] - w.mean(axis=0) + site_rng.normal(0.0, 0.3, size=n_features)
    shift = _SHIFT * direction / np.linalg.norm(direction)
    scale = site_rng.uniform(0.1, 1.5, size=n_features)
    rng = np.random.default_rng([seed, 2, site_index, split])
    x = shift + scale * rng.normal(size=(n, n_features))
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return x.astype(np.float32), np.minimum(y, n_classes - 1).astype(np.int64)


def write_tabular_site(
    dest: str | Path,
    site_index: int,
    n_sites: int,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 200,
    n_features: int = DEFAULT_FEATURES,
    n_classes: int = DEFAULT_CLASSES,
) -> Path:
    """Write ``dest/train.csv`` and ``dest/val.csv`` (plus ``dataset.json``) for one site.

    Deterministic in (seed, site_index). Written into a temporary folder that is renamed
    to ``dest`` at the end, so a crash never leaves half a dataset behind.
    """
    dest = Path(dest)
    if not 0 <= site_index < n_sites:
        raise ConfigurationError(f"site_index {site_index} must be in 0..{n_sites - 1} (n_sites = {n_sites})")
    if n_train < 1 or n_val < 1 or n_features < 1 or n_classes < 2:
        raise ConfigurationError("need n_train >= 1, n_val >= 1, n_features >= 1 and n_classes >= 2")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} already exists and is not empty; delete it or choose another folder", file=str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for split, (name, n) in enumerate((("train.csv", n_train), ("val.csv", n_val))):
            x, y = site_sample(site_index, n, seed=seed, n_features=n_features, n_classes=n_classes, split=split)
            _write_csv(tmp / name, x, y)
        info = {
            "generator": "laulima.algorithms.tabular_data",
            "seed": seed,
            "site_index": site_index,
            "n_sites": n_sites,
            "n_train": n_train,
            "n_val": n_val,
            "n_features": n_features,
            "n_classes": n_classes,
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"x{i}" for i in range(x.shape[1])] + [LABEL_COLUMN])
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(header + "\n")
        for row, label in zip(x.tolist(), y.tolist(), strict=True):
            fh.write(",".join(f"{v:.6g}" for v in row) + f",{label}\n")


def read_tabular(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CSV with a header row, numeric features and an integer ``label`` column last.

    Returns ``(X float32 [n, d], y int64 [n])``. A bad file raises ``DataError`` naming
    the file, the line and the column, and what to fix.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: no such file; the dataset folder must hold train.csv and val.csv", file=str(path)
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})", file=str(path)) from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: the file is empty; expected a header row such as 'x0,x1,...,label'", file=str(path))
    columns = [c.strip() for c in lines[0].split(",")]
    if columns[-1] != LABEL_COLUMN or len(columns) < 2:
        raise DataError(
            f"{path}: line 1: the last column must be '{LABEL_COLUMN}' after at least one feature column, "
            f"found {columns[-1]!r}",
            file=str(path),
            line=1,
        )
    rows = [(i + 1, ln) for i, ln in enumerate(lines[1:], start=1) if ln.strip()]
    if not rows:
        raise DataError(f"{path}: has a header but no data rows", file=str(path))
    width = len(columns)
    try:  # fast path; on any problem, the scan below finds and names the bad value
        table = np.loadtxt([ln for _, ln in rows], delimiter=",", dtype=np.float64, ndmin=2)
        ok = table.shape == (len(rows), width) and bool(np.isfinite(table).all())
    except ValueError:
        ok = False
    if not ok:
        table = _scan(path, columns, rows)
    labels = table[:, -1]
    bad = np.flatnonzero((labels < 0) | (labels != np.round(labels)))
    if bad.size:
        lineno = rows[int(bad[0])][0]
        raise DataError(
            f"{path}: line {lineno}, column '{LABEL_COLUMN}': {labels[bad[0]]:g} is not a class index "
            "(labels must be 0, 1, 2, ...)",
            file=str(path),
            line=lineno,
            column=LABEL_COLUMN,
        )
    return table[:, :-1].astype(np.float32), labels.astype(np.int64)


def _scan(path: Path, columns: list[str], rows: list[tuple[int, str]]) -> np.ndarray:
    """Parse value by value, raising at the first bad one with its line and column."""
    width = len(columns)
    table = np.empty((len(rows), width), dtype=np.float64)
    for r, (lineno, line) in enumerate(rows):
        values = line.split(",")
        if len(values) != width:
            raise DataError(
                f"{path}: line {lineno}: expected {width} values ({width - 1} features and '{LABEL_COLUMN}'), "
                f"found {len(values)}",
                file=str(path),
                line=lineno,
            )
        for c, value in enumerate(values):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise DataError(
                    f"{path}: line {lineno}, column {columns[c]!r}: {value.strip()!r} is not a finite number; "
                    "fill in or drop that row",
                    file=str(path),
                    line=lineno,
                    column=columns[c],
                )
            table[r, c] = number
    return table
