"""Structured logs: one JSON object per line, with the request id and the operation id of
whatever the line is about, for API and worker alike. A line's own fields, if any, are
passed as `extra={"fields": {...}}` and come out beside the message.

Nothing secret goes into a line: no header, query string, token, password or URL with
credentials (Settings' repr masks those)."""

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
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "INFO") -> None:
    """JSON lines on standard error, `level` (LOG_LEVEL) and up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
