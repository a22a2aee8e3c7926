"""Hypothesis strategies for what a hostile or broken client sends the hub: safetensors
bodies with damaged headers, updates with odd metadata, specs and JSON bodies carrying
NaN, Infinity, huge or deeply nested values written as raw JSON text.

Python's ``json`` writes NaN and Infinity and parses them back, and so may a careless
client: these strategies build the JSON text themselves (:func:`to_json`), so a test can
send exactly the tokens it means to, valid JSON or not.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from laulima.core.protocol import N_SAMPLES_MAX, MetaKey
from laulima.core.weights import Weights, to_safetensors

__all__ = [
    "Raw",
    "failure_texts",
    "hostile_evaluations",
    "UpdateRecipe",
    "MODEL_RECIPES",
    "Payload",
    "make_model",
    "site_reports",
    "spec_texts",
    "to_json",
    "valid_evaluations",
    "update_recipes",
    "hostile_weights",
    "valid_weights",
    "weights_bodies",
]


class Raw(str):
    """JSON text inserted verbatim by :func:`to_json` (NaN, 1e400, a 5000-deep array...)."""


def to_json(value: Any) -> str:
    """``value`` as JSON text; :class:`Raw` parts verbatim, non-finite floats as NaN/Infinity."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)


def _deep(depth: int, opener: str = "[") -> Raw:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return Raw('{"a":' * depth + "1" + closer * depth)
    return Raw(opener * depth + closer * depth)


DEEP = st.sampled_from([64, 1_000, 5_000, 100_000]).flatmap(lambda n: st.sampled_from([_deep(n, "["), _deep(n, "{")]))
"""Nested arrays or objects, from harmless to far past any parser's recursion limit."""

ODD_NUMBERS = st.one_of(
    st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400")]),
    st.sampled_from([10**30, -(10**30), 2**63, 2**64, Raw("1" + "0" * 400), 1e308, -1e308, 10**9 + 1]),
    st.sampled_from([-1, 0, Raw("-0.0"), 5e-324, Raw("1e-400"), 0.5, Raw("1E3"), Raw("-" + "9" * 40)]),
    st.integers(),
    st.floats(),
)
"""What a numeric field may be sent instead of a sensible number: NaN and Infinity as raw
tokens (Python's json writes and reads them), numbers beyond every machine type,
negative, zero, subnormal; each family about as likely as the others."""

ODD_VALUES = st.one_of(
    ODD_NUMBERS,
    st.sampled_from([True, None, "", "x" * 5000, [], {}, "NaN", "1", "\u0000", "é" * 100]),
    st.text(max_size=20),
    DEEP,
)
"""Anything a field of a JSON body might be given instead of what it expects."""

# -- weights ------------------------------------------------------------------------

_SCHEMAS: list[dict[str, tuple[tuple[int, ...], str]]] = [
    {"w": ((4,), "float32")},
    {"layer.weight": ((2, 3), "float32"), "layer.bias": ((3,), "float16"), "steps": ((1,), "int64")},
    {"big": ((64, 64), "float32")},
    # Valid but unusual: every dtype the hub must average or carry, scalars, empty tensors.
    {"flag": ((3,), "bool"), "count": ((), "int64"), "w": ((2, 2), "float64")},
    {"empty": ((0,), "float32"), "w": ((1, 1, 1, 1), "float16")},
    {"u": ((5,), "uint8"), "i": ((2,), "int8"), "w": ((3,), "float32")},
]


class Payload:
    """A request body and what kind it is; its repr stays short in Hypothesis' reports."""

    def __init__(self, label: str, data: bytes) -> None:
        self.label, self.data = label, data

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.data).hexdigest()[:12]
        return f"Payload({self.label!r}, {len(self.data)} bytes, sha256 {digest}..., starts {self.data[:160]!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


MODEL_SCHEMAS = len(_SCHEMAS)


def make_model(schema: int, seed: int) -> Weights:
    """A small valid model of schema number ``schema``, with finite values from ``seed``."""
    rng = np.random.default_rng(seed)
    schema_ = _SCHEMAS[schema]
    return {name: np.asarray(rng.uniform(-4, 4, size=shape)).astype(dtype) for name, (shape, dtype) in schema_.items()}


MODEL_RECIPES = st.tuples(st.integers(0, MODEL_SCHEMAS - 1), st.integers(0, 2**32 - 1))
"""``(schema, seed)`` for :func:`make_model`: short in a report, unlike the arrays."""


def _frame(header: str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    head = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(head) if length is None else length) + head + data


_DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "X9", ""]
_SHAPE_ITEMS = st.one_of(
    st.integers(-3, 10),
    st.sampled_from([2**31, 2**40, 2**62, 2**63, 2**64, -(2**63)]),
    st.sampled_from([1.5, "2", None, [], Raw("NaN"), Raw("1e400")]),
)


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    """A safetensors file whose header is generated: odd dtypes, shapes and offsets,
    metadata of the wrong type, duplicate keys, non-JSON, a length that lies."""
    kind = draw(st.sampled_from(["entries", "framing", "text"]))
    if kind == "framing":
        header = draw(st.sampled_from(['{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "{}", ""]))
        length = draw(st.sampled_from([0, 1, 7, 2**20, 2**32, 2**63, 2**64 - 1]))
        data = draw(st.binary(max_size=16))
        return _frame(header, data, length=length)[: draw(st.sampled_from([None, 3, 8, 12]))]
    if kind == "text":
        text = draw(
            st.one_of(
                st.sampled_from(
                    [
                        "[]",
                        "1",
                        "null",
                        '"x"',
                        "{",
                        '{"w": NaN}',
                        '{"__metadata__": [1, 2]}',
                        '{"__metadata__": {"laulima.n_samples": 5}}',
                        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                        '"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                    ]
                ),
                st.text(max_size=64),
                DEEP.map(str),
            )
        )
        return _frame(text.encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"", b"\xff\xfe"])))
    entries: dict[str, Any] = {}
    for i in range(draw(st.integers(1, 3))):
        entry = {
            "dtype": draw(st.one_of(st.sampled_from(_DTYPES), st.integers(), st.none())),
            "shape": draw(st.one_of(st.lists(_SHAPE_ITEMS, max_size=4), _SHAPE_ITEMS)),
            "data_offsets": draw(st.one_of(st.lists(_SHAPE_ITEMS, max_size=3), _SHAPE_ITEMS)),
        }
        if draw(st.booleans()):
            del entry[draw(st.sampled_from(sorted(entry)))]
        entries[draw(st.sampled_from(["w", f"t{i}", "", "__metadata__", "a" * 300]))] = entry
    if draw(st.booleans()):
        entries["__metadata__"] = draw(
            st.one_of(
                st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=20), st.integers()), max_size=4),
                ODD_VALUES,
            )
        )
    data = draw(st.sampled_from([b"", b"\0" * 4, b"\0" * 16, b"\x7f\xc0\x00\x00" * 4]))
    return _frame(to_json(entries), data)


def hostile_weights() -> st.SearchStrategy[Payload]:
    """Broken weights files: generated headers (twice as likely), random bytes."""
    header = hostile_headers().map(lambda b: Payload("hostile header", b))
    return st.one_of(header, header, st.binary(max_size=64).map(lambda b: Payload("random bytes", b)))


def valid_weights() -> st.SearchStrategy[Payload]:
    return MODEL_RECIPES.map(lambda r: Payload(f"valid model {r}", to_safetensors(make_model(*r))))


def weights_bodies() -> st.SearchStrategy[Payload]:
    """What a scientist might upload as initial weights: valid models and broken files."""
    return st.one_of(valid_weights(), hostile_weights())


# -- updates ------------------------------------------------------------------------

N_SAMPLES = st.one_of(
    st.integers(1, 1000).map(str),
    st.sampled_from(
        ["0", "-1", "", " 7", "7 ", "1e3", "1.0", "0x10", "abc", "NaN", "\u0663", str(10**9 + 1), "9" * 18, "9" * 19]
    ),
    st.sampled_from([str(10**30), str(2**63), str(2**64)]),
)
METRICS = st.one_of(
    st.dictionaries(st.sampled_from(["loss", "dice", "a" * 500]), st.floats(-10, 10), max_size=3).map(json.dumps),
    st.sampled_from(["{}", "[]", "NaN", "null", '{"loss": "x"}', '{"loss": true}', '{"loss": {"a": 1}}']),
    st.dictionaries(st.sampled_from(["loss", "dice"]), ODD_VALUES, min_size=1, max_size=2).map(to_json),
    DEEP.map(str),
    st.just(json.dumps({f"m{i}": float(i) for i in range(5000)})),
)


@dataclass(frozen=True)
class UpdateRecipe:
    """How to build an update from its task's model: valid, or broken in one way.

    Pure data, drawn without looking at the hub: the hub's answers (which tasks exist,
    which model they point to) vary from run to run, and Hypothesis needs each run's draws
    to depend only on earlier draws. :meth:`build` applies the recipe to the real model."""

    label: str
    """valid, values, schema, meta, truncated, padded (from a valid update), header, bytes."""
    delta: float = 0.0
    n_samples: int = 1
    loss: float = 0.5
    bind_task: bool = False
    pick: int = 0
    """Chooses the tensor, element, cut point or other task the label needs."""
    bad_value: float = math.nan
    change: str = ""
    meta_key: str = ""
    meta_value: str = ""
    drop_meta: bool = False
    padding: int = 0
    """Bytes after the file: 1, 40, 300 000 (more than a request head may be, less than the
    upload limit) or over the limit of global size + 1 MiB."""
    raw: bytes = b""

    def build(self, model: Mapping[str, np.ndarray] | None, task_id: str, other_ids: list[str]) -> Payload:
        if self.label in ("header", "bytes"):
            return Payload(self.label, self.raw)
        if model is None:  # the task's model is no valid safetensors file: nothing valid fits it
            return Payload("no model to start from", b"")
        weights = _moved(model, self.delta)
        meta = {MetaKey.N_SAMPLES.value: str(self.n_samples), MetaKey.METRICS.value: json.dumps({"loss": self.loss})}
        if self.bind_task:
            meta[MetaKey.TASK.value] = task_id
        names = sorted(weights)
        name = names[self.pick % len(names)]
        if self.label == "values":
            floats = [k for k in names if weights[k].dtype.kind == "f" and weights[k].size]
            flat = weights[floats[self.pick % len(floats)]].reshape(-1)
            with np.errstate(over="ignore"):  # 1e300 becomes inf in float32 and float16, as intended
                flat[self.pick % flat.size] = self.bad_value
        elif self.label == "schema":
            _change_schema(weights, name, self.change)
        elif self.label == "meta":
            value = self.meta_value
            if self.meta_key == MetaKey.TASK and value == "another task":
                value = other_ids[self.pick % len(other_ids)] if other_ids else "0" * 32
            meta[self.meta_key] = value
            if self.drop_meta:
                del meta[sorted(meta)[self.pick % len(meta)]]
        body = to_safetensors(weights, meta)
        if self.label == "truncated":
            body = body[: self.pick % len(body)]
        elif self.label == "padded":
            body += [b"\0", b"junk" * 10, b"\0" * 300_000, b"\0" * (1024 * 1024 + 4096)][self.padding]
        return Payload(self.label, body)


def _moved(model: Mapping[str, np.ndarray], delta: float) -> Weights:
    """``model`` with ``delta`` added to its float tensors: what a training step returns."""
    out: Weights = {}
    for name, array in model.items():
        out[name] = (array.astype(np.float64) + delta).astype(array.dtype) if array.dtype.kind == "f" else array.copy()
    return out


def _change_schema(weights: Weights, name: str, change: str) -> None:
    if change == "shape":
        flat = weights[name].reshape(-1)
        weights[name] = np.concatenate([flat, np.zeros(1, flat.dtype)])
    elif change.startswith("dtype:"):
        dtype = change.split(":", 1)[1]
        weights[name] = weights[name].astype(dtype if dtype != weights[name].dtype.name else "float64")
    elif change == "drop" and len(weights) > 1:
        del weights[name]
    elif change == "rename":
        weights[name + ".x"] = weights.pop(name)
    else:
        weights["extra"] = np.zeros(2, np.float32)


@st.composite
def update_recipes(draw: st.DrawFn, *, hostile: bool) -> UpdateRecipe:
    """A valid update's recipe, or (``hostile``) one broken in one way."""
    labels = ["values", "schema", "meta", "truncated", "padded", "header", "bytes"]
    label = draw(st.sampled_from(labels)) if hostile else "valid"
    fields: dict[str, Any] = {
        "delta": draw(st.sampled_from([0.0, 0.01, -0.5])),
        "n_samples": draw(st.one_of(st.integers(1, 1000), st.just(N_SAMPLES_MAX))),
        "loss": draw(st.floats(0, 10)),
        "bind_task": draw(st.booleans()),
        "pick": draw(st.integers(0, 2**20)),
    }
    if label == "values":
        fields["bad_value"] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, 3.0e38, -6.5e4]))
    elif label == "schema":
        dtypes = ["dtype:float64", "dtype:float16", "dtype:int32", "dtype:uint8", "dtype:bool"]
        fields["change"] = draw(st.sampled_from(["shape", "drop", "extra", "rename", *dtypes]))
    elif label == "meta":
        key = draw(st.sampled_from([MetaKey.N_SAMPLES, MetaKey.METRICS, MetaKey.TASK]))
        values = {
            MetaKey.N_SAMPLES: N_SAMPLES,
            MetaKey.METRICS: METRICS,
            MetaKey.TASK: st.sampled_from(["another task", "", "x" * 100, "../task"]),
        }
        fields["meta_key"], fields["meta_value"] = key.value, draw(values[key])
        fields["drop_meta"] = draw(st.booleans())
    elif label == "padded":
        fields["padding"] = draw(st.integers(0, 3))
    elif label == "header":
        fields["raw"] = draw(hostile_headers())
    elif label == "bytes":
        fields["raw"] = draw(st.binary(max_size=64))
    return UpdateRecipe(label, **fields)


# -- JSON bodies: a valid body with one thing wrong, so the fault is what the hub meets ------

_NUMERIC_SPEC_FIELDS = [
    "rounds",
    "local_epochs",
    "local_steps",
    "min_sites",
    "round_timeout_s",
    "task_timeout_s",
    "max_update_norm",
    "max_samples_per_site",
    "seed",
    "strategy.proximal_mu",
    "strategy.server_lr",
    "strategy.beta_1",
    "strategy.beta_2",
    "strategy.tau",
    "strategy.trim_fraction",
    "evaluation.every",
    "config.lr",
]
_OTHER_SPEC_FIELDS = [
    "name",
    "algorithm",
    "dataset",
    "sites",
    "strategy",
    "strategy.name",
    "evaluation",
    "evaluation.final",
    "config",
    "config.nested",
    "unknown",
]


@st.composite
def _spec_fault(draw: st.DrawFn) -> tuple[str, Any]:
    if draw(st.booleans()):
        return draw(st.sampled_from(_NUMERIC_SPEC_FIELDS)), draw(ODD_NUMBERS)
    return draw(st.sampled_from(_OTHER_SPEC_FIELDS)), draw(ODD_VALUES)


@st.composite
def spec_texts(draw: st.DrawFn, digest: str, sites: list[str], *, faulty: bool) -> Payload:
    """An ``ExperimentCreate`` body: a valid spec for ``sites`` that finishes quickly, or
    (``faulty``) one with one or two fields replaced by odd values, or a broken envelope."""
    chosen = draw(st.lists(st.sampled_from(sites), unique=True, max_size=len(sites)))
    spec: dict[str, Any] = {
        "name": draw(st.sampled_from(["fuzz", "fuzz-2.b", "x" * 64])),
        "algorithm": "laulima.algorithms.identity:Identity",
        "dataset": "d",
        "sites": chosen,
        "rounds": draw(st.integers(1, 3)),
        "min_sites": draw(st.integers(1, max(1, len(chosen)))),
        "round_timeout_s": draw(st.sampled_from([1.0, 30.0])),
        "evaluation": {"every": draw(st.integers(0, 1)), "final": draw(st.booleans())},
        "strategy": {
            "name": draw(st.sampled_from(["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean"]))
        },
    }
    if draw(st.booleans()):
        spec["max_update_norm"] = draw(st.sampled_from([1e-6, 100.0]))
    envelope: Any = {"spec": spec, "initial_weights": digest}
    fault = draw(st.sampled_from(["field", "field", "field", "two fields", "envelope"])) if faulty else "none"
    if fault in ("field", "two fields"):
        for path, value in draw(st.lists(_spec_fault(), min_size=1, max_size=1 if fault == "field" else 2)):
            parent, _, leaf = path.rpartition(".")
            target = spec
            if parent:
                if not isinstance(spec.get(parent), dict):
                    spec[parent] = {}
                target = spec[parent]
            target[leaf] = value
    elif fault == "envelope":
        broken = draw(st.sampled_from(["no spec", "spec list", "extra", "digest"]))
        if broken == "no spec":
            del envelope["spec"]
        elif broken == "spec list":
            envelope["spec"] = [spec]
        elif broken == "extra":
            envelope["owner"] = "someone-else"
        else:
            envelope["initial_weights"] = draw(ODD_VALUES)
    return Payload(f"experiment, {fault}", to_json(envelope).encode("utf-8", "surrogatepass"))


_METRIC_NAMES = st.sampled_from(["dice", "loss", "dice.class_1"])


def valid_evaluations() -> st.SearchStrategy[Payload]:
    """An ``EvaluationResult`` a correct site could send, as JSON text."""
    metrics = st.dictionaries(_METRIC_NAMES, st.floats(0, 1), max_size=3)
    return st.builds(
        lambda n, m: Payload("valid evaluation", json.dumps({"n_samples": n, "metrics": m}).encode()),
        st.integers(0, 1000),
        metrics,
    )


@st.composite
def hostile_evaluations(draw: st.DrawFn) -> Payload:
    """An ``EvaluationResult`` with one thing wrong: its count, a metric's value or name,
    the metrics as a whole, an extra field, or the body's shape."""
    body: Any = {"n_samples": draw(st.integers(0, 1000)), "metrics": {"dice": draw(st.floats(0, 1))}}
    fault = draw(st.sampled_from(["n_samples", "metric value", "metric value", "metric name", "metrics", "shape"]))
    if fault == "n_samples":
        body["n_samples"] = draw(st.one_of(ODD_NUMBERS, ODD_VALUES))
    elif fault == "metric value":
        body["metrics"][draw(_METRIC_NAMES)] = draw(st.one_of(ODD_NUMBERS, ODD_VALUES))
    elif fault == "metric name":
        names = st.one_of(st.sampled_from(["", "a" * 1000, "\u0000", "é" * 64, "__proto__"]), st.text(max_size=80))
        body["metrics"][draw(names)] = 0.5
    elif fault == "metrics":
        body["metrics"] = draw(
            st.one_of(
                ODD_VALUES,
                st.just({f"m{i}": 0.5 for i in range(3000)}),
                st.dictionaries(st.text(max_size=20), ODD_VALUES, max_size=3),
            )
        )
    else:
        body = draw(st.sampled_from([[], {}, {"n_samples": 1}, {"n_samples": 1, "metrics": {}, "x": 1}, None, 1]))
    return Payload(f"evaluation, {fault}", to_json(body).encode("utf-8", "surrogatepass"))


@st.composite
def failure_texts(draw: st.DrawFn) -> Payload:
    """A ``TaskFailure``: valid (kinds, reasons of every length and character), or with
    its kind or reason odd, a lone surrogate escape (valid JSON, not encodable text), or
    of the wrong shape."""
    body: Any = {
        "kind": draw(st.sampled_from(["error", "timeout", "rejected"])),
        "reason": draw(st.one_of(st.text(max_size=50), st.sampled_from(["x" * 4000, "é" * 2000, "\x00 \t\n"]))),
    }
    fault = draw(st.sampled_from(["none", "none", "no kind", "kind", "reason", "shape"]))
    if fault == "no kind":
        del body["kind"]
    elif fault == "kind":
        body["kind"] = draw(st.one_of(st.sampled_from(["refused", "ERROR", "error "]), ODD_VALUES))
    elif fault == "reason":
        body["reason"] = draw(
            st.one_of(st.sampled_from(["x" * 4001, Raw('"\\ud800"'), Raw('"\\udfff x"')]), ODD_VALUES)
        )
    elif fault == "shape":
        body = draw(st.sampled_from([[], {}, {"reason": "x", "extra": 1}, None, "error"]))
    return Payload(f"failure, {fault}", to_json(body).encode("utf-8", "surrogatepass"))


@st.composite
def site_reports(draw: st.DrawFn, dataset: str) -> Payload:
    """A ``SiteReport``: the agent's version and its datasets' case counts (``dataset``
    among them, with a count or none), or with one thing wrong."""
    datasets: dict[str, Any] = {dataset: draw(st.one_of(st.none(), st.integers(0, 2000)))}
    if draw(st.booleans()):
        datasets["other.set"] = draw(st.integers(0, 50))
    body: Any = {"version": draw(st.sampled_from(["0.1.0", "1.2.3+local", ""])), "datasets": datasets}
    fault = draw(st.sampled_from(["none", "none", "version", "count", "name", "many", "shape"]))
    if fault == "version":
        body["version"] = draw(st.one_of(st.sampled_from(["v" * 65, "1.0 beta", "../../x", "\u0000"]), ODD_VALUES))
    elif fault == "count":
        datasets[dataset] = draw(st.one_of(ODD_NUMBERS, ODD_VALUES))
    elif fault == "name":
        datasets[draw(st.one_of(st.sampled_from(["", "a" * 65, "../d", "-d"]), st.text(max_size=10)))] = 1
    elif fault == "many":
        body["datasets"] = {f"set{i}": i for i in range(300)}
    elif fault == "shape":
        body = draw(st.sampled_from([[], {}, {"version": "1"}, None, {"version": "1", "datasets": [], "x": 1}]))
    return Payload(f"site report, {fault}", to_json(body).encode("utf-8", "surrogatepass"))
