"""What leaves a data scientist's machine when an experiment is submitted.

Sites run only the algorithms shipped with Laulima and content-addressed bundles, so a
scientist's own algorithm travels as a bundle: a spec naming a local ``source`` (a package
folder or one ``.py`` file, relative to the spec file) is packed here, and the hub receives
the spec with ``bundle = <digest>`` instead of the path. A spec naming a ``bundle`` digest
directly needs that bundle's file (``laulima algorithm pack`` writes ``<digest>.bundle``).
The first global model is built here too, from the algorithm's own ``initial_weights``,
imported from the bundle exactly as a site will import it. A fingerprint-mode experiment has
no model: it carries the empty one (:data:`EMPTY_MODEL`), and ``initial_weights`` is not called.
"""

from __future__ import annotations

import re
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laulima.algorithms.base import Algorithm, load_algorithm
from laulima.algorithms.bundle import PackedBundle, is_builtin, load_entry_point, pack, sign, unpack, verify
from laulima.core.spec import TRAINING_ONLY_FIELDS, ExperimentSpec, fingerprint_data, parse_spec
from laulima.core.weights import check_matches, from_safetensors, schema_of, to_safetensors
from laulima.errors import ConfigurationError, DataError, SpecError
from laulima.nnunet.workflow import read_plan_files  # (light: no nnU-Net code)

__all__ = ["CLIENT_ONLY_FIELDS", "EMPTY_MODEL", "Submission", "prepare", "prepare_evaluation", "prepare_fingerprint"]

CLIENT_ONLY_FIELDS = ("source", "requirements")
"""Spec fields that describe the scientist's machine; they never reach the hub."""

EMPTY_MODEL = to_safetensors({})
"""The weights of a fingerprint-mode experiment: none. Every task points at a weights blob in
this protocol, so the experiment's is the empty safetensors file (16 bytes), which the hub
validates as any other (a well-formed file of no tensors) and requires for this mode."""


@dataclass(frozen=True)
class Submission:
    """A spec ready for the hub, the algorithm's bundle (None for a built-in) and the first model."""

    spec: dict[str, Any]
    bundle: PackedBundle | None
    initial_weights: bytes

    @property
    def algorithm_digest(self) -> str | None:
        return self.bundle.digest if self.bundle is not None else None


def prepare(
    spec: ExperimentSpec,
    *,
    base_dir: str | Path | None = None,
    bundle_file: str | Path | None = None,
    signing_keys: Sequence[str | Path] = (),
) -> Submission:
    """Pack (or read) the algorithm, sign it, build the first model; nothing is sent yet.

    ``base_dir``: where a relative ``source`` is resolved (the spec file's folder; default the
    working directory). ``bundle_file``: the file of a spec's ``bundle`` digest (default
    ``<digest>.bundle`` in ``base_dir``). ``signing_keys``: Ed25519 private keys
    (``laulima algorithm keygen``) whose signatures of the bundle go with the spec, so that
    sites admitting those signers run it without asking.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    spec = read_plan_files(spec, base)
    bundle = _bundle_of(spec, base, bundle_file)
    # A fingerprint is computed before there is any model (nnU-Net plans its network from it).
    weights = EMPTY_MODEL if spec.mode == "fingerprint" else initial_weights_bytes(spec, bundle)
    return Submission(spec=_hub_spec(spec, bundle, signing_keys), bundle=bundle, initial_weights=weights)


def _hub_spec(spec: ExperimentSpec, bundle: PackedBundle | None, signing_keys: Sequence[str | Path]) -> dict[str, Any]:
    """The spec as the hub receives it: no local paths, the bundle's digest and signatures."""
    data = spec.model_dump(mode="json", exclude=set(CLIENT_ONLY_FIELDS))
    if bundle is not None:
        data["bundle"] = bundle.digest
        signatures = list(data.get("signatures") or [])
        for key_path in signing_keys:
            signature = sign(bundle.digest, _read_key(Path(key_path)))
            if signature not in signatures:
                signatures.append(signature)
        data["signatures"] = signatures
    elif signing_keys:
        raise ConfigurationError(
            f"algorithm {spec.algorithm!r} is a built-in; only bundles are signed (drop --sign)", field="signatures"
        )
    return data


def prepare_evaluation(
    model: str | Path,
    *,
    spec_file: str | Path | None = None,
    sites: Sequence[str] | None = None,
    dataset: str | None = None,
    name: str | None = None,
    bundle_file: str | Path | None = None,
    signing_keys: Sequence[str | Path] = (),
) -> Submission:
    """An evaluate-mode experiment for ``model``: the weights to score and a spec saying how.

    ``model`` is an exported model folder (``model.safetensors`` and its ``model.json`` card,
    from ``laulima experiment export`` or the demo; the card gives the algorithm's parameters
    and, for a hub's experiment, its algorithm and dataset) or a ``.safetensors`` file, which
    needs ``spec_file``: a TOML spec with the algorithm, dataset and config (``mode`` is set to
    ``evaluate``; ``rounds`` and training settings must be left out). ``sites``, ``dataset`` and
    ``name`` override the spec's. The weights must have the tensors, shapes and dtypes of the
    algorithm's own initial model, checked here before anything is uploaded; a bundled
    algorithm is packed (or read) and signed exactly as for training.
    """
    path = Path(model).expanduser()
    card: dict[str, Any] | None = None
    if path.is_dir():
        from laulima.export import WEIGHTS_FILE, read_card  # torch: only for model folders

        card = read_card(path)
        weights_path = path / WEIGHTS_FILE
    elif path.is_file():
        weights_path = path
        if spec_file is None:
            raise ConfigurationError(
                f"{path}: bare weights do not say which algorithm and config they are for; give --spec SPEC.toml "
                "(algorithm, dataset, [config]) or an exported model folder",
                field="spec",
            )
    else:
        raise ConfigurationError(
            f"{path}: no such model; give an exported model folder (model.safetensors + model.json) or a "
            ".safetensors file with --spec",
            file=str(path),
        )
    base = Path(spec_file).parent if spec_file is not None else Path.cwd()
    data = _read_toml(Path(spec_file)) if spec_file is not None else _spec_from_card(card or {}, path, dataset)
    data["mode"] = "evaluate"
    if sites is not None:
        data["sites"] = list(sites)
    if dataset is not None:
        data["dataset"] = dataset
    if name is not None:
        data["name"] = name
    data.setdefault("name", _evaluation_name(path))
    spec = parse_spec(data, source=str(spec_file) if spec_file is not None else str(path / "model.json"))
    bundle = _bundle_of(spec, base, bundle_file)
    try:
        weights = weights_path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"{weights_path}: cannot read the weights ({exc.strerror or exc})", file=str(weights_path)
        ) from exc
    expected = schema_of(from_safetensors(initial_weights_bytes(spec, bundle), where="the algorithm's initial model"))
    check_matches(expected, schema_of(from_safetensors(weights, where=str(weights_path))), where=str(weights_path))
    return Submission(spec=_hub_spec(spec, bundle, signing_keys), bundle=bundle, initial_weights=weights)


def prepare_fingerprint(
    spec_file: str | Path,
    *,
    sites: Sequence[str] | None = None,
    name: str | None = None,
    bundle_file: str | Path | None = None,
    signing_keys: Sequence[str | Path] = (),
) -> tuple[Submission, list[str]]:
    """A fingerprint-mode experiment from ``spec_file``: the sites summarise their cohorts of
    the spec's dataset for its algorithm, nothing is trained. Returns the submission and the
    training fields that were left out.

    The spec may be the one used for training: ``mode`` becomes ``fingerprint`` and what
    only training reads (``rounds``, ``local_epochs``, ``local_steps``, ``strategy``,
    ``evaluation``, ``max_update_norm``, ``max_samples_per_site``) is dropped, so the
    fingerprint describes exactly the cohort the training will use. ``name`` defaults to the
    spec's with ``-fingerprint`` appended; ``sites`` overrides the spec's (and lowers its
    ``min_sites`` to their number, if it was higher). The algorithm's
    bundle is packed (or read) and signed as for training; no initial model is built.
    """
    path = Path(spec_file)
    raw = _read_toml(path)
    dropped = [key for key in TRAINING_ONLY_FIELDS if key in raw]
    data = fingerprint_data(raw, name=name)
    if sites is not None:
        data["sites"] = list(sites)
        minimum = data.get("min_sites")
        if sites and isinstance(minimum, int) and not isinstance(minimum, bool) and minimum > len(sites):
            data["min_sites"] = len(sites)  # the sites asked for are the quorum the user wants
    spec = parse_spec(data, source=str(path))
    return prepare(spec, base_dir=path.parent, bundle_file=bundle_file, signing_keys=signing_keys), dropped


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return dict(tomllib.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: no such spec file", file=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec file ({exc})", file=str(path)) from exc
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}", file=str(path)) from exc


SEGMENTATION_ENTRY_POINT = "laulima.algorithms.segmentation:UNetSegmentation"
"""The algorithm of exported model folders (``laulima.export`` writes U-Nets only)."""


def _spec_from_card(card: dict[str, Any], path: Path, dataset: str | None) -> dict[str, Any]:
    """What an exported model's card says about the algorithm: its parameters always; its
    algorithm, dataset and seed when it came from a hub's experiment (``training.spec``)."""
    raw = card.get("training")
    training: dict[str, Any] = raw if isinstance(raw, dict) else {}
    raw = training.get("spec")
    trained: dict[str, Any] = raw if isinstance(raw, dict) else {}
    data: dict[str, Any] = {
        "algorithm": trained.get("algorithm") or SEGMENTATION_ENTRY_POINT,
        "config": card.get("params") or trained.get("config") or {},
    }
    for key in ("dataset", "seed", "cohort"):
        if trained.get(key) is not None:
            data[key] = trained[key]
    if "dataset" not in data and dataset is None:
        raise ConfigurationError(
            f"{path}: the model's card does not say which dataset it evaluates on; give --dataset NAME",
            field="dataset",
        )
    return data


def _evaluation_name(path: Path) -> str:
    """A spec name from the model's file or folder name (letters, digits, ``._-``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem if path.is_file() else path.name).strip("-._") or "model"
    return f"{stem[:50]}-evaluation"


def _bundle_of(spec: ExperimentSpec, base: Path, bundle_file: str | Path | None) -> PackedBundle | None:
    if spec.source is not None:
        source = Path(spec.source).expanduser()
        source = source if source.is_absolute() else base / source
        if not source.exists():
            raise ConfigurationError(
                f"field 'source': {source} does not exist; name the folder of the algorithm's package or its .py file "
                "(relative to the spec file)",
                field="source",
            )
        bundle = pack(source, spec.algorithm, requirements=spec.requirements)
        if spec.bundle is not None and spec.bundle != bundle.digest:
            raise ConfigurationError(
                f"field 'bundle': {spec.bundle[:12]}… but packing 'source' gives {bundle.digest[:12]}…; the source "
                "changed since the bundle was made - drop one of the two fields",
                field="bundle",
            )
        return bundle
    if spec.bundle is None:
        return None
    path = Path(bundle_file) if bundle_file is not None else base / f"{spec.bundle}.bundle"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"field 'bundle': the spec names bundle {spec.bundle[:12]}… but its file {path} cannot be read "
            f"({exc.strerror or exc}); give it with --bundle FILE (`laulima algorithm pack` writes it)",
            field="bundle",
        ) from exc
    try:
        manifest = verify(data, spec.bundle)
    except DataError as exc:
        raise ConfigurationError(f"field 'bundle': {path}: {exc}", field="bundle") from exc
    if manifest.entry_point != spec.algorithm:
        raise ConfigurationError(
            f"field 'algorithm': {spec.algorithm!r} but bundle {spec.bundle[:12]}… runs {manifest.entry_point!r}; "
            "name the bundle's entry point",
            field="algorithm",
        )
    return PackedBundle(data=data, digest=spec.bundle, manifest=manifest)


def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot read the signing key ({exc.strerror or exc}); create one with `laulima algorithm keygen`",
            file=str(path),
        ) from exc


def initial_weights_bytes(spec: ExperimentSpec, bundle: PackedBundle | None = None) -> bytes:
    """The first global model, from the algorithm's ``initial_weights`` (no data needed)."""
    with _algorithm_class(spec.algorithm, bundle) as cls:
        return to_safetensors(cls().initial_weights(spec.config, spec.seed))


@contextmanager
def _algorithm_class(entry_point: str, bundle: PackedBundle | None) -> Iterator[type[Algorithm]]:
    """The algorithm's class: a built-in imported by name, a bundle from a private unpack.

    A bundle's modules are removed from ``sys.modules`` afterwards (and whatever they
    displaced put back): one process may submit several bundles whose top-level package has
    the same name, each of which must run its own code.
    """
    if bundle is None:
        if not is_builtin(entry_point):
            raise ConfigurationError(
                f"algorithm {entry_point!r} is neither a built-in (laulima.algorithms.*) nor packed; name its "
                "`source` in the spec",
                field="algorithm",
            )
        yield load_algorithm(entry_point)
        return
    top = bundle.manifest.top_level
    displaced = {name: module for name, module in sys.modules.items() if name == top or name.startswith(top + ".")}
    for name in displaced:
        del sys.modules[name]
    with tempfile.TemporaryDirectory(prefix="laulima-submit-") as cache:
        try:
            yield load_entry_point(unpack(bundle.data, bundle.digest, cache), entry_point)
        finally:
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]
            sys.modules.update(displaced)
