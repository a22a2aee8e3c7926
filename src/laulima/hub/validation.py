"""Checks a site's result must pass before the hub counts it: right task, right time, sane weights.

Cheap checks on the task (:func:`check_result_allowed`) run before a body is read and again
inside the transaction that records the result; the file checks
(:func:`validate_update_file`) read an uploaded safetensors file in small pieces through
reused buffers, so a 76 MB update costs a few MiB of memory, not its size.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import select

from laulima.core.metrics import checked_metrics
from laulima.core.privacy.messages import MASKED_TENSOR
from laulima.core.protocol import N_SAMPLES_MAX, MetaKey, RoundStatus, TaskKind, TaskStatus
from laulima.core.rounds import NO_APPROVAL
from laulima.core.spec import APPROVAL_TIMEOUT_S
from laulima.core.weights import (
    SAFETENSORS_HEADER_MAX,
    TensorSpec,
    WeightsSchema,
    check_finite,
    check_matches,
    read_safetensors_header,
    safetensors_header_length,
)
from laulima.errors import Conflict, Forbidden, NotFound, WeightsError
from laulima.hub.db import Experiment, Round, Session, Site, Task, Update

__all__ = [
    "CHUNK_BYTES",
    "IndexedFile",
    "Source",
    "UPDATE_HEADER_SLACK_BYTES",
    "UPLOAD_SLACK_BYTES",
    "TensorIndex",
    "TensorLocation",
    "ValidUpdate",
    "approval_deadline",
    "check_result_allowed",
    "check_weights_file",
    "index_file",
    "model_length",
    "open_source",
    "read_into",
    "schema_from",
    "tensor_index",
    "upload_limit",
    "validate_masked_update_file",
    "validate_update_file",
]

UPLOAD_SLACK_BYTES = 1024 * 1024
"""An update may exceed the global model's file by this much (its header metadata differs)."""

UPDATE_HEADER_SLACK_BYTES = 64 * 1024
"""An update's safetensors header may exceed the global model's by this much: same tensors,
plus its metadata (sample count, task id, at most 64 metrics)."""

CHUNK_BYTES = 4 * 1024 * 1024
"""Validation reads tensors in pieces of this size."""

Source = Path | str | Callable[[], io.RawIOBase | BinaryIO]
"""A weights file: a plaintext path, or a function opening a seekable reader (a sealed blob)."""


def open_source(source: Source) -> io.RawIOBase | BinaryIO:
    if isinstance(source, str | Path):
        return open(source, "rb", buffering=0)
    return source()


_POSITIVE_INT = re.compile(r"^[0-9]{1,40}$")  # long enough that 10**30 is refused as too many, not as text


def approval_deadline(exp: Experiment) -> float:
    """When the sites' administrators must have decided on ``exp``: its submission plus the
    spec's ``approval_timeout_s`` (read from the stored spec; older rows take the default)."""
    try:
        value = json.loads(exp.spec_json).get("approval_timeout_s", APPROVAL_TIMEOUT_S)
    except (ValueError, AttributeError):
        value = APPROVAL_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        value = APPROVAL_TIMEOUT_S
    return exp.created_at + float(value)


def check_result_allowed(
    s: Session, task_id: str, site: Site, *, kind: TaskKind | None, nonce: str | None, now: float, lock: bool = False
) -> tuple[Task, Experiment]:
    """The task exists, is this site's, of this ``kind``, bound to ``nonce`` and still open.

    A task its site holds for approval (``waiting_since`` set) is not late while the
    experiment's approval deadline lies ahead, whatever its own deadline: the site may still
    report the administrator's refusal, wait again, or resume it."""
    q = select(Task).where(Task.id == task_id)
    task = s.scalar(q.with_for_update() if lock else q)
    if task is None:
        raise NotFound(f"no task with id {task_id!r}; fetch tasks with GET /api/v1/tasks/next", task=task_id)
    exp = s.get(Experiment, task.experiment_id)
    assert exp is not None  # foreign key
    if task.site_id != site.id:
        owner = s.get(Site, task.site_id)
        raise Forbidden(
            f"task {task_id} is assigned to site {owner.name if owner else '?'!r}, not {site.name!r}; "
            "a site may only send results for its own tasks",
            task=task_id,
            site=site.name,
        )
    if kind is not None and task.kind != kind:
        hint = {
            TaskKind.TRAIN: "PUT /tasks/{id}/update",
            TaskKind.FINGERPRINT: "POST /tasks/{id}/fingerprint",
        }.get(TaskKind(task.kind), "POST /tasks/{id}/evaluation")
        raise Conflict(f"task {task_id} is a {task.kind} task; send its result with {hint}", task=task_id)
    if nonce is not None and not hmac.compare_digest(nonce.encode(), task.upload_nonce.encode()):
        raise Forbidden(
            f"upload nonce does not match task {task_id}; send the {task.kind} result with the "
            "upload_nonce of the task as fetched from GET /api/v1/tasks/next",
            task=task_id,
        )
    where = f"round {task.round} of experiment '{exp.name}'"
    if task.status == TaskStatus.COMPLETED:
        accepted = s.scalar(select(Update.digest).where(Update.task_id == task.id))
        raise Conflict(
            f"task {task_id} already has an accepted result; a second result is not counted",
            task=task_id,
            accepted_digest=accepted,
        )
    if task.status == TaskStatus.FAILED:
        how = f"ended ({task.failure_kind}): {task.failure_reason}" if task.failure_reason else "reported as failed"
        raise Conflict(f"task {task_id} has {how[:600]}; its result is not counted", task=task_id)
    if task.status == TaskStatus.CANCELLED:
        raise Conflict(
            f"task {task_id} was cancelled ({task.failure_reason or 'experiment stopped'}); its result is not counted",
            task=task_id,
        )
    too_late = f"{where} is closed; this result arrived too late and was not counted"
    approval_ends = approval_deadline(exp) if task.waiting_since is not None else None
    if approval_ends is not None and task.status != TaskStatus.EXPIRED and now >= max(task.deadline, approval_ends):
        raise Conflict(
            f"task {task_id} waited for approval at the site past the deadline: {NO_APPROVAL}; "
            f"{where} no longer waits for it",
            task=task_id,
            round=task.round,
        )
    if task.status == TaskStatus.EXPIRED or now >= max(task.deadline, approval_ends or 0.0):
        raise Conflict(
            too_late if task.kind == TaskKind.TRAIN else f"task {task_id} expired; result not counted",
            task=task_id,
            round=task.round,
        )
    if task.kind == TaskKind.TRAIN and task.model is None:  # a local-only model (``model``) belongs to no round
        q2 = select(Round).where(Round.experiment_id == task.experiment_id, Round.index == task.round)
        rnd = s.scalar(q2.with_for_update() if lock else q2)
        if rnd is None or rnd.status != RoundStatus.OPEN or now >= max(rnd.deadline, approval_ends or 0.0):
            raise Conflict(too_late, task=task_id, round=task.round)
    return task, exp


def upload_limit(global_size: int, max_upload_bytes: int) -> int:
    """Largest acceptable update body: the global model's size plus slack, capped."""
    return min(global_size + UPLOAD_SLACK_BYTES, max_upload_bytes)


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file."""

    offset: int
    """Absolute file offset of its first byte."""
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


TensorIndex = dict[str, TensorLocation]


@dataclass(frozen=True)
class IndexedFile:
    """What one read of a safetensors file's header gives: tensor locations, metadata, and the
    header's length (an update's header is bounded by the global model's)."""

    index: TensorIndex
    metadata: dict[str, str]
    header_bytes: int


def index_file(
    source: Source, *, where: str, max_header: int = SAFETENSORS_HEADER_MAX, max_header_reason: str | None = None
) -> IndexedFile:
    """Locations of every tensor and the metadata, from one parse of the header only.

    The header's length is checked against ``max_header`` and the file's size before it is
    read; offsets are checked against the file's size, so later reads never run past it.
    """
    with open_source(source) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = _read_exactly(f, 8)
        n = safetensors_header_length(head, where=where, limit=max_header, limit_reason=max_header_reason)
        if n > size - 8:
            raise WeightsError(
                f"{where}: safetensors header of {n} bytes is longer than the {size}-byte file; "
                "not a valid safetensors file",
                where=where,
            )
        head += _read_exactly(f, n)
    header = read_safetensors_header(head, where=where, limit=max_header, limit_reason=max_header_reason)
    start = header.data_start
    index: TensorIndex = {}
    spans: list[tuple[int, int, str]] = []
    for name, spec in header.schema.items():
        begin, end = header.offsets[name]
        if end > size - start:
            raise WeightsError(
                f"{where}: tensor {name!r} has offsets [{begin}, {end}) beyond the file's {size} bytes; "
                "not a valid safetensors file",
                where=where,
            )
        index[name] = TensorLocation(start + begin, np.dtype(spec.dtype), spec.shape)
        spans.append((begin, end, name))
    _check_contiguous(spans, size - start, where)
    return IndexedFile(index, header.metadata, n)


def tensor_index(source: Source, *, where: str) -> tuple[TensorIndex, dict[str, str]]:
    """Locations of every tensor and the metadata (see :func:`index_file`)."""
    indexed = index_file(source, where=where)
    return indexed.index, indexed.metadata


def _read_exactly(f: io.RawIOBase | BinaryIO, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = f.read(min(n - len(out), 1 << 20))
        if not piece:
            break
        out += piece
    return bytes(out)


def _check_contiguous(spans: list[tuple[int, int, str]], data_size: int, where: str) -> None:
    """safetensors' own layout rule: tensors tile the data section exactly, in offset order."""
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise WeightsError(
                f"{where}: tensor {name!r} starts at {begin}, expected {at}; not a valid safetensors file", where=where
            )
        at = end
    if at != data_size:
        raise WeightsError(
            f"{where}: {data_size - at} bytes after the last tensor; not a valid safetensors file", where=where
        )


def schema_from(index: TensorIndex) -> WeightsSchema:
    return {name: TensorSpec(loc.shape, loc.dtype.name) for name, loc in index.items()}


def read_into(f: io.RawIOBase | io.BufferedIOBase | BinaryIO, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes at ``offset`` (a short file is a broken file)."""
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])  # type: ignore[union-attr]  # binary files opened by us all have it
        if not n:
            raise WeightsError(f"{getattr(f, 'name', 'file')}: ends early; not a valid safetensors file")
        done += n


def _chunks(
    f: io.RawIOBase | io.BufferedIOBase | BinaryIO, loc: TensorLocation, buf: bytearray
) -> Iterator[np.ndarray]:
    """The tensor in pieces that fit ``buf`` (each piece valid until the next is read)."""
    step = max(len(buf) // loc.dtype.itemsize, 1) * loc.dtype.itemsize
    done = 0
    while done < loc.nbytes:
        view = memoryview(buf)[: min(step, loc.nbytes - done)]
        read_into(f, view, loc.offset + done)
        yield np.frombuffer(view, dtype=loc.dtype)
        done += len(view)


def check_weights_file(source: Source, *, where: str) -> WeightsSchema:
    """The file is well-formed safetensors; returns its schema (data is not read)."""
    index, _ = tensor_index(source, where=where)
    return schema_from(index)


@dataclass(frozen=True)
class ValidUpdate:
    """What an accepted update says about itself."""

    n_samples: int
    metrics: dict[str, float]


def validate_update_file(
    path: Source,
    *,
    global_path: Source,
    task_id: str,
    max_update_norm: float | None = None,
    max_n_samples: int | None = None,
    bound_reason: str | None = None,
) -> ValidUpdate:
    """Metadata, keys/shapes/dtypes against the global model, finite values, norm bound.

    ``global_path`` is the weights *this task* was given (``Task.weights_digest``): the
    round's global model, or for FedDC the model handed to the site, so ``max_update_norm``
    bounds the site's own training step, not the distance between two sites' models.

    The update's header may be at most the global model's plus UPDATE_HEADER_SLACK_BYTES,
    refused before it is read. ``n_samples`` must be at most ``max_n_samples`` (if given;
    ``bound_reason`` says where that bound comes from, for the message) and N_SAMPLES_MAX.
    Data is read in CHUNK_BYTES pieces into two reused buffers, so validating an update
    costs a few MiB of memory whatever the model's size.
    """
    where = f"update for task {task_id}"
    global_file = index_file(global_path, where="global model")
    global_index = global_file.index
    indexed = index_file(
        path,
        where=where,
        max_header=global_file.header_bytes + UPDATE_HEADER_SLACK_BYTES,
        max_header_reason=f"the global model's header is {global_file.header_bytes} bytes, "
        f"an update's may add {UPDATE_HEADER_SLACK_BYTES} bytes of metadata",
    )
    index, meta = indexed.index, indexed.metadata
    n_samples, metrics = _update_metadata(meta, where, task_id, max_n_samples, bound_reason)
    check_matches(schema_from(global_index), schema_from(index), where=where)
    total = 0.0
    buf, gbuf = bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)
    with open_source(path) as f, open_source(global_path) as g:
        for name in sorted(index, key=lambda k: index[k].offset):
            loc = index[name]
            pieces = _chunks(f, loc, buf)
            if max_update_norm is None:
                for piece in pieces:
                    check_finite(name, piece, where=where)
                continue
            for piece, ref in zip(pieces, _chunks(g, global_index[name], gbuf), strict=True):
                check_finite(name, piece, where=where)
                diff = piece.astype(np.float64) - ref.astype(np.float64)
                total += float(np.dot(diff, diff))
    if max_update_norm is not None:
        norm = math.sqrt(total)
        if norm > max_update_norm:
            raise WeightsError(
                f"{where}: L2 distance to the weights the task was given is {norm:.6g}, above the experiment's "
                f"max_update_norm = {max_update_norm:g}; clip the update before sending it",
                where=where,
                norm=norm,
            )
    return ValidUpdate(n_samples, metrics)


def model_length(path: Source) -> int:
    """How many numbers a model holds (its masked update is that long)."""
    index = index_file(path, where="global model").index
    return sum(math.prod(loc.shape) for loc in index.values())


def validate_masked_update_file(
    path: Source,
    *,
    length: int,
    task_id: str,
    max_n_samples: int | None = None,
    bound_reason: str | None = None,
) -> ValidUpdate:
    """A masked update (secure aggregation): one int32 tensor ``MASKED_TENSOR`` of ``length``
    elements, and the usual metadata. Its values are uniformly random to the hub by design:
    nothing about them can be checked here (no range proof; see core/privacy/secagg.py)."""
    where = f"masked update for task {task_id}"
    indexed = index_file(
        path,
        where=where,
        max_header=UPDATE_HEADER_SLACK_BYTES,
        max_header_reason="a masked update holds one tensor and its metadata",
    )
    index, meta = indexed.index, indexed.metadata
    n_samples, metrics = _update_metadata(meta, where, task_id, max_n_samples, bound_reason)
    expected = {MASKED_TENSOR: TensorSpec((length,), "int32")}  # uint32 bits (core/privacy/messages.py)
    check_matches(expected, schema_from(index), where=where)
    return ValidUpdate(n_samples, metrics)


def _update_metadata(
    meta: dict[str, str], where: str, task_id: str, max_n_samples: int | None, bound_reason: str | None
) -> tuple[int, dict[str, float]]:
    """An update's sample count and metrics, and that it was made for this task."""
    n_samples = _n_samples(meta, where, max_n_samples, bound_reason)
    metrics = _metrics(meta, where)
    bound = meta.get(MetaKey.TASK)
    if bound is not None and bound != task_id:
        raise WeightsError(
            f"{where}: the file says it was made for task {bound[:80]!r}; upload it to that task", where=where
        )
    return n_samples, metrics


def _n_samples(meta: dict[str, str], where: str, max_n_samples: int | None, bound_reason: str | None) -> int:
    raw = meta.get(MetaKey.N_SAMPLES)
    if raw is None or not _POSITIVE_INT.fullmatch(raw.strip()) or int(raw) <= 0:
        shown = "missing" if raw is None else f"{raw[:40]!r}"
        raise WeightsError(
            f"{where}: metadata {MetaKey.N_SAMPLES.value!r} is {shown}; it must be a positive integer "
            "(the number of training samples behind the update)",
            where=where,
        )
    n = int(raw)
    bounds = [(N_SAMPLES_MAX, "the hub's limit N_SAMPLES_MAX")]
    if max_n_samples is not None:
        bounds.append((max_n_samples, bound_reason or "the bound for this task"))
    for bound, reason in bounds:
        if n > bound:
            raise WeightsError(
                f"{where}: metadata {MetaKey.N_SAMPLES.value!r} is {n}, above {bound} ({reason}); "
                "report the number of training samples behind the update",
                where=where,
                n_samples=n,
                bound=bound,
            )
    return n


def _metrics(meta: dict[str, str], where: str) -> dict[str, float]:
    """The update's metrics, under the same rules as an evaluation's (core.metrics)."""
    raw = meta.get(MetaKey.METRICS)
    if raw is None:
        return {}
    try:
        return checked_metrics(json.loads(raw))
    except RecursionError:
        reason = "it is nested too deeply"
    except ValueError as exc:  # not JSON, or a rule of core.metrics
        reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else "it is not JSON"
    raise WeightsError(
        f"{where}: metadata {MetaKey.METRICS.value!r} must be a JSON object of finite numbers, got "
        f"{raw[:80]!r}: {reason}",
        where=where,
    )
