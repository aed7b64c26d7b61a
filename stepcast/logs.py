"""Structured logs: one JSON object per line, with the ``extra`` fields (job_id, …)
and the id of the request being served, if any."""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

# Set by the server for the duration of each request (X-Request-ID).
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_make_record = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Every record made while a request is served carries its id (as ``extra`` would)."""
    record = _make_record(*args, **kwargs)
    if (current := request_id.get()) is not None:
        record.request_id = current
    return record


logging.setLogRecordFactory(_record_with_request_id)

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    formatter = JsonFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
