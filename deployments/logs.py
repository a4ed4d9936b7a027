"""Structured logs: one JSON object per line, with the inference id on every job line.

Every process of the service (ingress, stages, job actor) logs through `get_logger()`, so the
lines look the same wherever they were written; pass context as `extra={"inference_id": ...}`.
"""
from __future__ import annotations

import json
import logging
import sys
import time

LOGGER_NAME = "rvc"
# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        # Extras, minus private attributes that frameworks (Ray) attach to every record.
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def get_logger() -> logging.Logger:
    """The service logger, configured once per process (stderr, JSON lines, INFO)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
