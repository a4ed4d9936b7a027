"""Query parameters of the API and their 422 answers, worded as pydantic v1 / FastAPI word them.

Clients of the original service parse these bodies, so messages, types and ctx are exact:
one entry per problem, in the order the parameters are declared here, body problems last.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

IDEMPOTENCY_HEADER = "Idempotency-Key"
# Printable ASCII without spaces, as idempotency keys (UUIDs, hashes) are.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$"
# A job poll may ask to be held until the job ends (RFC 7240 `Prefer: wait=N`), for at most this
# long: half the ingress's default graceful shutdown (20 s), so a rolling update lets held polls
# answer rather than cutting them.
PREFER_HEADER = "Prefer"
MAX_POLL_WAIT_S = 10


@dataclass(frozen=True)
class QueryParam:
    name: str  # as in the URL
    field: str  # the ConversionParams field (or handler argument) it sets
    kind: str  # "string" | "number" | "integer" | "enum"
    default: Any = None  # None: required
    ge: float | None = None
    le: float | None = None
    description: str = ""


CREATE_PARAMS = (
    QueryParam("modelId", "model_id", "string", description="Voice model to convert to (see GET /v1/models-vc)."),
    QueryParam("indexRate", "index_rate", "number", 0.76, 0, 1,
               "Weight of the retrieval-index features (0: off)."),
    QueryParam("rmsMixRate", "rms_mix_rate", "number", 1, 0, 1,
               "1 keeps the output's own loudness envelope, 0 imposes the input's."),
    QueryParam("filterRadius", "filter_radius", "integer", 3, 0, 7,
               "Pitch-track median filter: 0-2 none; r >= 3 kernel 2r-3."),
    QueryParam("f0UpKey", "f0_up_key", "integer", 0, -24, 24, "Transpose in semitones."),
    QueryParam("protect", "protect", "number", 0.33, 0, 0.5,
               "Protection of voiceless consonants from the index (0.5: off)."),
    QueryParam("f0Method", "f0_method", "enum", "crepe", description="Pitch estimator."),
)
PAGE_PARAMS = (
    QueryParam("page", "page", "integer", 1, 1, None, "Page number, from 1."),
    QueryParam("perPage", "per_page", "integer", 20, 1, 100, "Models per page."),
)


def missing(loc: list[str]) -> dict:
    return {"loc": loc, "msg": "field required", "type": "value_error.missing"}


def audio_too_long(max_seconds: float, f0_method: str | None = None) -> dict:
    """The 422 entry for an upload holding more audio than the service converts (with
    `f0_method`: than it converts with that pitch method)."""
    limit = _limit(max_seconds)
    method = "" if f0_method is None else f" with f0Method {f0_method}"
    return {"loc": ["body", "audioInfer"], "msg": f"ensure this audio is at most {limit} seconds long{method}",
            "type": "value_error.audio.too_long", "ctx": {"limit_value": limit}}


def check_idempotency_key(value: str | None) -> dict | None:
    """The 422 entry for a malformed Idempotency-Key header; None when it is absent or valid."""
    if value is None or re.fullmatch(IDEMPOTENCY_KEY_PATTERN, value):
        return None
    return {"loc": ["header", IDEMPOTENCY_HEADER], "msg": f'string does not match regex "{IDEMPOTENCY_KEY_PATTERN}"',
            "type": "value_error.str.regex", "ctx": {"pattern": IDEMPOTENCY_KEY_PATTERN}}


def requested_wait_s(prefer: str | None) -> int | None:
    """The seconds a `Prefer` header's `wait=N` asks for, at most MAX_POLL_WAIT_S; None when it
    asks for none. A malformed preference is ignored, as RFC 7240 has servers do, never a 422."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.partition(";")[0].partition("=")
        value = value.strip().strip('"')
        if name.strip().lower() == "wait" and value.isascii() and value.isdigit() and len(value) <= 9:
            return min(int(value), MAX_POLL_WAIT_S) or None
    return None


def _limit(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _check(param: QueryParam, raw: str, choices: tuple[str, ...]) -> tuple[Any, dict | None]:
    loc = ["query", param.name]
    if param.kind == "string":
        return raw, None
    if param.kind == "enum":
        if raw in choices:
            return raw, None
        permitted = ", ".join(repr(c) for c in choices)
        return None, {"loc": loc, "msg": f"value is not a valid enumeration member; permitted: {permitted}",
                      "type": "type_error.enum", "ctx": {"enum_values": list(choices)}}
    try:
        value = float(raw) if param.kind == "number" else int(raw)
    except ValueError:
        if param.kind == "number":
            return None, {"loc": loc, "msg": "value is not a valid float", "type": "type_error.float"}
        return None, {"loc": loc, "msg": "value is not a valid integer", "type": "type_error.integer"}
    if param.kind == "number" and not math.isfinite(value):
        return None, {"loc": loc, "msg": "ensure this value is a finite number",
                      "type": "value_error.number.not_finite_number"}
    if param.ge is not None and not value >= param.ge:
        limit = _limit(param.ge)
        return None, {"loc": loc, "msg": f"ensure this value is greater than or equal to {limit}",
                      "type": "value_error.number.not_ge", "ctx": {"limit_value": limit}}
    if param.le is not None and not value <= param.le:
        limit = _limit(param.le)
        return None, {"loc": loc, "msg": f"ensure this value is less than or equal to {limit}",
                      "type": "value_error.number.not_le", "ctx": {"limit_value": limit}}
    return value, None


def parse_query(params: tuple[QueryParam, ...], query: dict[str, str],
                choices: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[dict]]:
    """Values by field name (defaults filled in) and the 422 entries for the problems found.
    `choices` are the allowed values of the enum parameter."""
    values, errors = {}, []
    for param in params:
        raw = query.get(param.name)
        if raw is None:
            if param.default is None:
                errors.append(missing(["query", param.name]))
            else:
                values[param.field] = param.default
            continue
        value, error = _check(param, raw, choices)
        if error is None:
            values[param.field] = value
        else:
            errors.append(error)
    return values, errors
