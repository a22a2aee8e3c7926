"""The experiment spec: what a data scientist submits, validated before anything runs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from laulima.errors import SpecError

__all__ = ["EvaluationSpec", "ExperimentSpec", "StrategySpec", "load_spec", "parse_spec"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategySpec(_Strict):
    """Which strategy aggregates the updates, and its parameters (see core.strategies)."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmed_mean"] = "fedavg"
    proximal_mu: Annotated[float, Field(ge=0)] = 0.01
    server_lr: Annotated[float, Field(gt=0)] = 0.1
    beta_1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta_2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    tau: Annotated[float, Field(gt=0)] = 1e-3
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.2


class EvaluationSpec(_Strict):
    """When the global model is evaluated on every site's validation split."""

    every: Annotated[int, Field(ge=0)] = 1
    """Evaluate after every N-th round; 0 evaluates only the final model."""
    final: bool = True


class ExperimentSpec(_Strict):
    """A federated experiment. Loaded from TOML; every error names the field."""

    name: Annotated[str, Field(pattern=_NAME)]
    algorithm: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]
    """Entry point ``package.module:Class`` of a ``laulima.Algorithm``."""
    dataset: Annotated[str, Field(pattern=_NAME)]
    """Name under which each site registered its local dataset."""
    sites: list[Annotated[str, Field(pattern=_NAME)]] = []
    """Sites that take part; empty means every site registered when the experiment starts."""
    rounds: Annotated[int, Field(ge=1, le=100_000)]
    local_epochs: Annotated[int, Field(ge=0)] = 1
    local_steps: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps per round; when > 0 it replaces local_epochs."""
    min_sites: Annotated[int, Field(ge=1)] = 1
    round_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    task_timeout_s: Annotated[float, Field(gt=0)] | None = None
    """Time limit for one algorithm run at a site; defaults to round_timeout_s."""
    max_update_norm: Annotated[float, Field(gt=0)] | None = None
    """Refuse updates whose L2 distance to the global model exceeds this."""
    seed: int = 0
    strategy: StrategySpec = StrategySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    config: dict[str, Any] = {}
    """Free-form parameters handed to the algorithm (learning rate, batch size, ...)."""

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, sites: list[str]) -> list[str]:
        dup = sorted({s for s in sites if sites.count(s) > 1})
        if dup:
            raise ValueError(f"site(s) listed twice: {', '.join(dup)}")
        return sites

    @model_validator(mode="after")
    def _quorum_possible(self) -> ExperimentSpec:
        if self.sites and self.min_sites > len(self.sites):
            raise ValueError(
                f"min_sites = {self.min_sites} but only {len(self.sites)} sites are listed; "
                "lower min_sites or list more sites"
            )
        return self

    @property
    def effective_task_timeout_s(self) -> float:
        return self.task_timeout_s if self.task_timeout_s is not None else self.round_timeout_s


def parse_spec(data: dict[str, Any], *, source: str = "<spec>") -> ExperimentSpec:
    """Validate a spec mapping; the first error names ``source`` and the field."""
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field; check its spelling against docs/architecture.md"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SpecError(f"{source}: field '{field}': {reason}{more}", file=source, field=field) from exc


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a TOML spec file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: no such spec file", file=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not UTF-8
        raise SpecError(f"{path}: cannot read the spec file ({exc})", file=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}", file=str(path)) from exc
    return parse_spec(data, source=str(path))
