"""Structured logs: one JSON object per line, with the request id and the operation id of
whatever the line is about, for API and worker alike."""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
OPERATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "operation_id", default=None
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (("request_id", REQUEST_ID), ("operation_id", OPERATION_ID)):
            value = getattr(record, key, None) or var.get()
            if value:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure() -> None:
    """JSON lines on standard error, INFO and up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
