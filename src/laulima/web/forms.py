"""A submitted HTML form (``application/x-www-form-urlencoded``), bounded and strict.

Parsed here rather than with python-multipart: the dashboards' forms are a handful of short
text fields, and a body that is anything else is refused with what was wrong.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

from laulima.errors import ProtocolError

__all__ = ["FormError", "read_form"]

MAX_FORM_BYTES = 64 * 1024
MAX_FIELDS = 16


class FormError(ProtocolError):
    status = 400
    code = "invalid_form"


async def read_form(request: Request) -> dict[str, str]:
    """The form's fields (the last value of a repeated one); 400 naming the problem otherwise."""
    body = await request.body()
    if not body:
        return {}  # no fields: the checks that need one (the CSRF token first) say what is missing
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise FormError(f"expected an HTML form (application/x-www-form-urlencoded), got {kind or 'no content type'!r}")
    if len(body) > MAX_FORM_BYTES:
        raise FormError(f"form of {len(body)} bytes exceeds {MAX_FORM_BYTES} bytes")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(f"the form could not be read: {exc}") from exc
    return dict(pairs)
