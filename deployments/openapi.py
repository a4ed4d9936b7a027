"""The OpenAPI 3.1 document served at /openapi.json, written for what the ingress does.

Parameter schemas come from the same tables the ingress validates with (`params.py`), so the
ranges and defaults cannot drift apart; everything else is written out here.
"""
from __future__ import annotations

from .params import (CREATE_PARAMS, IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_PATTERN, MAX_POLL_WAIT_S, PAGE_PARAMS,
                     PREFER_HEADER, QueryParam)
from .ratelimit import WINDOW_S
from .results import RESULT_ROUTE, URL_LIFETIME_S
from .uploads import MAX_FILE_BYTES


def _parameter(param: QueryParam, f0_methods: tuple[str, ...]) -> dict:
    schema: dict = {"type": "string" if param.kind == "enum" else param.kind}
    if param.kind == "enum":
        schema["enum"] = list(f0_methods)
    if param.ge is not None:
        schema["minimum"] = param.ge
    if param.le is not None:
        schema["maximum"] = param.le
    if param.default is not None:
        schema["default"] = param.default
    return {"name": param.name, "in": "query", "required": param.default is None,
            "description": param.description, "schema": schema}


def _message(text: str) -> dict:
    return {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Message"},
                                                                   "example": {"message": text}}}}


_RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": f"Calls allowed per key in any {WINDOW_S:g} s.",
                          "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "Calls left in the current window.", "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"description": "Unix time (s) when the oldest call in the window leaves it.",
                          "schema": {"type": "integer"}},
}
_AUTH_ERRORS = {
    "403": _message("Forbidden"),
    "429": {"description": "Rate limit exceeded.",
            "headers": {**_RATE_HEADERS, "Retry-After": {"description": "Seconds to wait.",
                                                         "schema": {"type": "integer"}}},
            "content": {"application/json": {"example": {"error": "Rate limit exceeded."}}}},
}
_VALIDATION = {"description": "Missing or malformed parameters (one entry per problem).",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ValidationError"}}}}


def _job_response(text: str) -> dict:
    return {"description": text, "headers": _RATE_HEADERS,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}


def _held_job_response() -> dict:
    response = _job_response("The job (once it ended, or N s passed, when held by `Prefer: wait=N`).")
    applied = {"description": "`wait=N` when the answer was held (up to N s) for the job to end.",
               "schema": {"type": "string"}}
    return {**response, "headers": {**response["headers"], "Preference-Applied": applied}}


_IDEMPOTENCY_KEY = {
    "name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
    "description": "Makes a retried create safe: a create with a key this API key used before answers the job "
                   "made then (the retry's upload is dropped, nothing runs twice). Keys are per API key and "
                   "are forgotten when their job is deleted by the retention policy.",
}
_INFERENCE_ID = {"name": "inferenceId", "in": "path", "required": True, "schema": {"type": "string"}}
_PREFER_WAIT = {
    "name": PREFER_HEADER, "in": "header", "required": False, "schema": {"type": "string", "example": "wait=10"},
    "description": f"`wait=N` (RFC 7240): hold the answer until the job ends, at most N s (capped at "
                   f"{MAX_POLL_WAIT_S}); a held answer carries `Preference-Applied: wait=N`. One held poll "
                   f"replaces many short ones (each of which counts against the rate limit). Without it, or "
                   f"when the service is holding many polls already, the job is answered at once.",
}


def openapi_document(f0_methods: tuple[str, ...], max_audio_seconds: float, harvest_audio_seconds: float) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "rvc-serve voice conversion API", "version": "1.0.0",
                 "description": "Asynchronous RVC voice-conversion jobs: create, poll, download."},
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {
                "Message": {"type": "object", "properties": {"message": {"type": "string"}},
                            "required": ["message"]},
                "Job": {
                    "type": "object",
                    "required": ["inferenceId", "modelId", "status", "type", "inferenceUrl", "jobStartTime",
                                 "jobEndTime"],
                    "properties": {
                        "inferenceId": {"type": "string"},
                        "modelId": {"type": "string"},
                        "status": {"type": "string", "enum": ["RUNNING", "SUCCESS", "FAILED"]},
                        "type": {"type": "string", "const": "VC"},
                        "inferenceUrl": {"type": ["string", "null"], "format": "uri",
                                         "description": f"On SUCCESS: signed URL of the MP3 output, valid "
                                                        f"{URL_LIFETIME_S // 3600} h from when it was issued."},
                        "jobStartTime": {"type": "string", "example": "2024-01-01 20:15:50.428000 +00:00",
                                         "description": "UTC, YYYY-MM-DD HH:MM:SS.ffffff +00:00"},
                        "jobEndTime": {"type": ["string", "null"]},
                        "error": {"type": "string", "description": "On FAILED only: why, in one line."},
                    },
                },
                "ValidationError": {
                    "type": "object",
                    "properties": {"detail": {"type": "array", "items": {
                        "type": "object", "required": ["loc", "msg", "type"],
                        "properties": {"loc": {"type": "array", "items": {"type": "string"}},
                                       "msg": {"type": "string"}, "type": {"type": "string"},
                                       "ctx": {"type": "object"}}}}},
                },
                "Model": {
                    "type": "object",
                    "required": ["modelId", "name", "version", "sampleRate", "f0", "hasIndex", "createdAt"],
                    "properties": {"modelId": {"type": "string"}, "name": {"type": "string"},
                                   "version": {"type": "string", "enum": ["v1", "v2"]},
                                   "sampleRate": {"type": "integer"}, "f0": {"type": "boolean"},
                                   "hasIndex": {"type": "boolean"}, "createdAt": {"type": "string"}},
                },
            },
        },
        "paths": {
            "/v1/inferences-vc": {"post": {
                "summary": "Create a voice-conversion job",
                "security": [{"apiKey": []}],
                "parameters": [_parameter(p, f0_methods) for p in CREATE_PARAMS] + [_IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["audioInfer"],
                    "properties": {"audioInfer": {
                        "type": "string", "format": "binary",
                        "description": f"wav, mp3 or flac (decided by content), at most {MAX_FILE_BYTES} bytes "
                                       f"and {max_audio_seconds:g} s of audio ({harvest_audio_seconds:g} s with "
                                       f"f0Method harvest; longer: 422 value_error.audio.too_long)"}},
                }}}},
                "responses": {
                    "200": _job_response("Accepted; status RUNNING. With an Idempotency-Key used before: "
                                         "that job, as it stands now."),
                    "402": _message("Invalid file type, use: ['audio/x-wav', 'audio/mpeg', 'audio/flac']"),
                    **_AUTH_ERRORS,
                    "404": _message("Model not found"),
                    "413": _message("Payload Too Large"),
                    "422": _VALIDATION,
                    "503": {**_message("Service Unavailable"),
                            "description": "Not accepted now (the data disk is nearly full, or the job actor is "
                                           "restarting); nothing was stored. Send it again after Retry-After "
                                           "(when given).",
                            "headers": {"Retry-After": {"description": "Seconds to wait.",
                                                        "schema": {"type": "integer"}}}},
                },
            }},
            "/v1/inferences-vc/{inferenceId}": {
                "get": {
                    "summary": "Get a job of this key",
                    "security": [{"apiKey": []}],
                    "parameters": [_INFERENCE_ID, _PREFER_WAIT],
                    "responses": {"200": _held_job_response(), **_AUTH_ERRORS, "404": _message("Not found")},
                },
                "delete": {
                    "summary": "Cancel a job of this key",
                    "description": "A RUNNING job ends FAILED with error \"cancelled\"; its conversion is stopped "
                                   "and its output never becomes available. A job that had already ended is "
                                   "left as it was. Either way the answer is the job as it stands now, so a "
                                   "repeated DELETE is harmless.",
                    "security": [{"apiKey": []}],
                    "parameters": [_INFERENCE_ID],
                    "responses": {"200": _job_response("The job after the cancel (status FAILED, error "
                                                       "\"cancelled\", unless it had ended before)."),
                                  **_AUTH_ERRORS, "404": _message("Not found")},
                },
            },
            "/v1/models-vc": {"get": {
                "summary": "List the voice models this key may use",
                "description": "The public voices plus those owned by this key, ordered by modelId. A voice "
                               "of another key is neither listed nor usable (a create naming it is 404 "
                               "\"Model not found\", as for a missing one).",
                "security": [{"apiKey": []}],
                "parameters": [_parameter(p, f0_methods) for p in PAGE_PARAMS],
                "responses": {
                    "200": {"description": "One page of models.", "headers": _RATE_HEADERS,
                            "content": {"application/json": {"schema": {
                                "type": "object", "required": ["meta", "data"],
                                "properties": {
                                    "meta": {"type": "object", "required": [
                                        "total", "perPage", "currentPage", "lastPage", "firstPage", "firstPageUrl",
                                        "lastPageUrl", "nextPageUrl", "previousPageUrl"]},
                                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
                            }}}},
                    **_AUTH_ERRORS,
                    "422": _VALIDATION,
                },
            }},
            RESULT_ROUTE + "/{inferenceId}/{name}": {"get": {
                "summary": "Download a result (the signed inferenceUrl; no API key)",
                "parameters": [
                    _INFERENCE_ID,
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
                    {"name": "signature", "in": "query", "required": True, "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "The audio file.",
                                      "content": {"audio/mpeg": {}, "audio/flac": {}}},
                              "403": _message("Forbidden"), "404": _message("Not found")},
            }},
            "/healthz": {"get": {"summary": "Process up", "responses": {"200": {"description": "Up."}}}},
            "/readyz": {"get": {"summary": "Job actor, stages and a voice ready",
                                "responses": {"200": {"description": "Ready."},
                                              "503": {"description": "Not ready (with a reason)."}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text format.",
                                                       "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OpenAPI 3.1."}}}},
        },
    }
