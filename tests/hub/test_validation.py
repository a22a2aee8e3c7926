"""validate_update_file on files: header bounds, sample-count bounds and metric rules."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

import laulima.hub.validation as validation
from laulima.core.protocol import N_SAMPLES_MAX, MetaKey
from laulima.core.weights import SAFETENSORS_HEADER_MAX, to_safetensors
from laulima.errors import WeightsError
from laulima.hub.validation import UPDATE_HEADER_SLACK_BYTES, index_file, validate_update_file

from .conftest import make_weights, update_bytes

TASK = "0" * 32


@pytest.fixture()
def global_file(tmp_path: Path) -> Path:
    path = tmp_path / "global.safetensors"
    path.write_bytes(to_safetensors(make_weights(0)))
    return path


def validate(tmp_path: Path, global_file: Path, body: bytes, **kwargs: Any) -> validation.ValidUpdate:
    path = tmp_path / "update.safetensors"
    path.write_bytes(body)
    return validate_update_file(path, global_path=global_file, task_id=TASK, **kwargs)


def header_length(path: Path) -> int:
    return int(struct.unpack("<Q", path.read_bytes()[:8])[0])


def test_a_good_update_passes_with_its_count_and_metrics(tmp_path: Path, global_file: Path) -> None:
    valid = validate(tmp_path, global_file, update_bytes(make_weights(1), n_samples=7, metrics={"loss": 0.5}))
    assert (valid.n_samples, valid.metrics) == (7, {"loss": 0.5})


def test_each_header_is_parsed_once(tmp_path: Path, global_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    headers: list[bytes] = []
    real = json.loads

    def counting(text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, bytes | bytearray):  # headers are parsed from bytes, metrics from str
            headers.append(bytes(text))
        return real(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    validate(tmp_path, global_file, update_bytes(make_weights(1)))
    assert len(headers) == 2  # the global model's and the update's, once each


def test_update_header_is_bounded_by_the_global_models_before_it_is_read(tmp_path: Path, global_file: Path) -> None:
    limit = header_length(global_file) + UPDATE_HEADER_SLACK_BYTES
    # Only the 8-byte length: a header this long would have to be read to be parsed.
    with pytest.raises(WeightsError) as info:
        validate(tmp_path, global_file, struct.pack("<Q", limit + 1) + b"{}")
    message = str(info.value)
    assert message.startswith(f"update for task {TASK}: safetensors header of {limit + 1} bytes is above the limit")
    assert f"the global model's header is {header_length(global_file)} bytes" in message
    # Metadata up to the slack is fine.
    padded = update_bytes(make_weights(1), pad="x" * (UPDATE_HEADER_SLACK_BYTES - 1000))
    assert validate(tmp_path, global_file, padded).n_samples == 10
    too_much = update_bytes(make_weights(1), pad="x" * UPDATE_HEADER_SLACK_BYTES)
    with pytest.raises(WeightsError, match="is above the limit"):
        validate(tmp_path, global_file, too_much)


def test_any_header_is_capped_in_core(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", SAFETENSORS_HEADER_MAX + 1) + b"{}")
    with pytest.raises(WeightsError, match=f"header of {SAFETENSORS_HEADER_MAX + 1} bytes is above the limit"):
        index_file(path, where="initial_weights")


def test_a_header_longer_than_the_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 4096) + b"{}")
    with pytest.raises(WeightsError, match="header of 4096 bytes is longer than the 10-byte file"):
        index_file(path, where="initial_weights")


def test_n_samples_above_the_callers_bound_names_it_and_its_reason(tmp_path: Path, global_file: Path) -> None:
    body = update_bytes(make_weights(1), n_samples=41)
    reason = "the 40 cases site 'site-a' reported for dataset 'brains'"
    with pytest.raises(WeightsError) as info:
        validate(tmp_path, global_file, body, max_n_samples=40, bound_reason=reason)
    assert f"'{MetaKey.N_SAMPLES.value}' is 41, above 40 ({reason})" in str(info.value)
    assert validate(tmp_path, global_file, body, max_n_samples=41).n_samples == 41


def test_n_samples_above_the_hub_limit_is_always_refused(tmp_path: Path, global_file: Path) -> None:
    body = update_bytes(make_weights(1), n_samples=N_SAMPLES_MAX + 1)
    with pytest.raises(WeightsError, match=rf"is {N_SAMPLES_MAX + 1}, above {N_SAMPLES_MAX} \(the hub's limit"):
        validate(tmp_path, global_file, body)
    with pytest.raises(WeightsError, match=rf"above {N_SAMPLES_MAX}"):
        validate(tmp_path, global_file, body, max_n_samples=10**12, bound_reason="a generous caller")
    assert validate(tmp_path, global_file, update_bytes(make_weights(1), n_samples=N_SAMPLES_MAX)).n_samples
    with pytest.raises(WeightsError, match=rf"is {10**30}, above {N_SAMPLES_MAX}"):
        validate(tmp_path, global_file, update_bytes(make_weights(1), n_samples=10**30))


@pytest.mark.parametrize(
    ("metrics_json", "message"),
    [
        ('{"loss": NaN}', "metric 'loss' is nan"),
        ('{"loss": -Infinity}', "metric 'loss' is -inf"),
        ('{"loss": 1e16}', "above 1e+15 in magnitude"),
        (json.dumps({f"m{i}": 1 for i in range(65)}), "65 metrics reported; at most 64"),
        (json.dumps({"x" * 129: 1}), "names are 1 to 128 printable characters"),
        ('{"a": ' + "[" * 3000 + "]" * 3000 + "}", "nested too deeply"),
        ("[1, 2]", "metrics must be an object"),
    ],
)
def test_update_metrics_follow_the_shared_rules(
    tmp_path: Path, global_file: Path, metrics_json: str, message: str
) -> None:
    meta = {MetaKey.N_SAMPLES.value: "3", MetaKey.METRICS.value: metrics_json}
    with pytest.raises(WeightsError, match="must be a JSON object of finite numbers") as info:
        validate(tmp_path, global_file, to_safetensors(make_weights(1), meta))
    assert message in str(info.value)
