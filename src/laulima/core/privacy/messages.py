"""What a task tells a site about privacy, and the messages of secure aggregation's phases.

The hub fills :class:`TaskPrivacy` and :class:`TaskSecureAggregation` from the spec; the site
agent applies them itself (clipping, noise, masking happen in Laulima's own code at the site,
never in the algorithm), checks them against its policy and accounts ε from what it applied.
Every number is bounded, and keys and ciphertexts are base64 with fixed or capped sizes, so a
hostile peer cannot make the hub or a site store or parse more than a round needs.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "EPSILON_METRIC",
    "INFINITE_EPSILON",
    "MASKED_TENSOR",
    "MAX_CIPHERTEXT_B64",
    "MAX_ROSTER",
    "Advertisement",
    "Roster",
    "SecAggPhase",
    "ShareInbox",
    "ShareOutbox",
    "TaskDpSgd",
    "TaskPrivacy",
    "TaskSecureAggregation",
    "Unmasking",
    "UnmaskingAnswer",
]

EPSILON_METRIC = "privacy_epsilon"
"""The train metric in which each site reports the site-level ε the experiment has cost it so
far (its own accounting, site/update_privacy.py)."""

INFINITE_EPSILON = 1e15
"""What a site reports as ε when its updates carried no noise (metrics are finite; JSON has no infinity)."""

MASKED_TENSOR = "secagg.masked"
"""The one tensor of a masked update: the site's weighted, clipped update (model minus the
model it was given, keys in sorted order, flattened) quantised and masked: integers modulo
2^32, carried as int32 (the same bits; Laulima's safetensors files hold no unsigned types)."""

MAX_ROSTER = 1000
"""Most sites in one secure-aggregation round (the spec's MAX_SITES)."""

MAX_CIPHERTEXT_B64 = 1024
"""Longest base64 ciphertext of one site's shares for another (two 66-byte Shamir shares,
two site names, the AES-GCM nonce and tag fit in well under half of it)."""

_KEY_B64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""A 32-byte X25519 public key, base64."""
_CIPHERTEXT = Annotated[str, Field(min_length=4, max_length=MAX_CIPHERTEXT_B64, pattern=r"^[A-Za-z0-9+/]+={0,2}$")]
_SITE = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
_SHARE_B64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{88}$")]
"""A 66-byte Shamir share (core/privacy/shamir.py), base64: anything else is refused on arrival."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TaskDpSgd(_Msg):
    noise_multiplier: Annotated[float, Field(ge=0.1, le=100)]
    max_grad_norm: Annotated[float, Field(gt=0, le=1e6)]


class TaskPrivacy(_Msg):
    """Site-level DP for one training task (see ``core.spec.PrivacySpec``), noise calibrated."""

    mode: Literal["local", "distributed"]
    clip: Annotated[float, Field(gt=0, le=1e6)]
    noise_multiplier: Annotated[float, Field(ge=0, le=1000)]
    delta: Annotated[float, Field(gt=0, le=0.01)]
    dp_sgd: TaskDpSgd | None = None


class TaskSecureAggregation(_Msg):
    """How this round's updates are masked. ``threshold`` sites must mask and answer the
    unmasking (and, with a sparse graph, a strict majority of each site's neighbourhood);
    ``max_weight`` bounds the weight a site applies (its sample count, or 1 under DP), so every
    site quantises with the same scale and the sum cannot wrap."""

    clip: Annotated[float, Field(gt=0, le=1e6)]
    sites: Annotated[int, Field(ge=2, le=MAX_ROSTER)]
    threshold: Annotated[int, Field(ge=2, le=MAX_ROSTER)]
    max_weight: Annotated[int, Field(ge=1, le=10**9)]
    bound: Annotated[float, Field(gt=0, le=1e15)]
    """Per-coordinate bound of one site's weighted (and, with distributed DP, noised)
    contribution: values are clamped to it and the quantisation scale is derived from it."""
    phase_timeout_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600.0)]
    """How long the hub waits for the sites at the key and share phases before it goes on without the missing."""
    neighbours: Annotated[int, Field(ge=0, le=MAX_ROSTER)] = 0
    """Degree k of the round's communication graph (SecAgg+, :mod:`laulima.core.privacy.graph`):
    each site masks with and shares among only its k neighbours; 0 is the complete graph."""

    @field_validator("neighbours")
    @classmethod
    def _even(cls, k: int) -> int:
        if k != 0 and (k < 2 or k % 2):
            raise ValueError(f"neighbours must be 0 (the complete graph) or an even number >= 2, got {k}")
        return k


class SecAggPhase(BaseModel):
    """Where a round's secure aggregation stands, as the hub reports it to a site."""

    model_config = ConfigDict(extra="forbid")
    phase: Literal["keys", "shares", "masking", "unmasking", "done", "aborted"]
    reason: str = ""


class Advertisement(_Msg):
    """Phase 1, site -> hub: the site's two public keys for this round."""

    encryption_key: _KEY_B64
    masking_key: _KEY_B64


class Roster(_Msg):
    """Phase 1 closed, hub -> site: every site that advertised, in name order."""

    sites: Annotated[dict[_SITE, Advertisement], Field(max_length=MAX_ROSTER)]


class ShareOutbox(_Msg):
    """Phase 2, site -> hub: one ciphertext per roster member (itself included)."""

    ciphertexts: Annotated[dict[_SITE, _CIPHERTEXT], Field(max_length=MAX_ROSTER)]


class ShareInbox(_Msg):
    """Phase 2 closed, hub -> site: the ciphertexts addressed to it, by sender."""

    ciphertexts: Annotated[dict[_SITE, _CIPHERTEXT], Field(max_length=MAX_ROSTER)]


class Unmasking(_Msg):
    """Phase 4, hub -> site: whose masked update arrived (survivors) and whose did not."""

    survivors: Annotated[list[_SITE], Field(max_length=MAX_ROSTER)]
    dropped: Annotated[list[_SITE], Field(max_length=MAX_ROSTER)]


class UnmaskingAnswer(_Msg):
    """Phase 4, site -> hub: shares of the survivors' self-mask seeds and the dropped sites'
    masking keys (never both for one site: the site refuses such a request)."""

    self_mask: Annotated[dict[_SITE, _SHARE_B64], Field(max_length=MAX_ROSTER)]
    masking_key: Annotated[dict[_SITE, _SHARE_B64], Field(max_length=MAX_ROSTER)]
