"""The one exception hierarchy of Laulima.

    LaulimaError
    ├── ConfigurationError      settings, spec files, CLI arguments
    │   └── SpecError           an experiment spec field is invalid (names file and field)
    ├── DataError               a dataset, a weights file or an image is unusable
    │   ├── WeightsError        keys, shapes, dtypes or values of a weight set are wrong
    │   └── SecureAggregationError  a secure-aggregation round cannot be completed (too few sites)
    ├── ProtocolError           a peer broke the hub/site contract (maps to HTTP 4xx)
    │   ├── NotFound            404: the task, blob, site or experiment does not exist
    │   ├── Forbidden           403: it exists, but not for this caller
    │   ├── Conflict            409: duplicate result, closed round, wrong state
    │   ├── RequestTimeout      408: the client stopped sending its body
    │   ├── PayloadTooLarge     413: the body exceeds its limit
    │   └── TooManyRequests     429: a per-site limit; ``retry_after`` says when to retry
    ├── TransportError          the network failed (retryable)
    ├── AlgorithmError          an algorithm crashed or ran past its time limit
    ├── PrivacyError            a privacy budget or parameter forbids the job
    └── PolicyError             a site policy forbids the job

Every message says what was wrong, where (file, field, site, task) and what to do.
Foreign exceptions are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlgorithmError",
    "ConfigurationError",
    "Conflict",
    "DataError",
    "Forbidden",
    "LaulimaError",
    "NotFound",
    "PayloadTooLarge",
    "PolicyError",
    "PrivacyError",
    "ProtocolError",
    "RequestTimeout",
    "SecureAggregationError",
    "SpecError",
    "TooManyRequests",
    "TransportError",
    "WeightsError",
]


class LaulimaError(Exception):
    """Root of every error Laulima raises on purpose."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        return self.message


class ConfigurationError(LaulimaError):
    """A setting, file or argument given to Laulima is invalid."""


class SpecError(ConfigurationError):
    """An experiment spec is invalid; ``context`` holds ``file`` and ``field``."""


class DataError(LaulimaError):
    """A dataset, weights file or image cannot be used as it is."""


class WeightsError(DataError):
    """A weight set does not match what was expected."""


class SecureAggregationError(DataError):
    """A secure-aggregation round cannot be completed: too few sites shared, survived or answered."""


class ProtocolError(LaulimaError):
    """A request broke the hub/site contract. ``status`` is its HTTP status code."""

    status: int = 400
    code: str = "bad_request"


class NotFound(ProtocolError):
    status = 404
    code = "not_found"


class Forbidden(ProtocolError):
    status = 403
    code = "forbidden"


class Conflict(ProtocolError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ProtocolError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(ProtocolError):
    status = 408
    code = "request_timeout"


class TooManyRequests(ProtocolError):
    status = 429
    code = "too_many_requests"


class TransportError(LaulimaError):
    """The network or the peer failed in a way worth retrying."""


class AlgorithmError(LaulimaError):
    """An algorithm crashed, returned garbage or ran past its time limit."""


class PrivacyError(LaulimaError):
    """A privacy parameter or budget forbids the job."""


class PolicyError(LaulimaError):
    """A site policy forbids the job."""
