"""Logs on stderr: JSON for a log pipeline, short lines for a person.

:func:`configure` installs one handler on the root logger: one JSON object per line with the
``extra`` fields (job_id, …) and the request id, or one short line per record for a terminal
(``STEPCAST_LOG_FORMAT``; ``auto`` picks text on a TTY). :func:`quiet_libraries` keeps the model
libraries to what needs acting on.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from contextvars import ContextVar
from typing import Any, Literal, TextIO

LogFormat = Literal["auto", "json", "text"]

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


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC), level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extra(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Shown elsewhere on a text line (job_id), or noise to a person reading a
# terminal: request ids (in the JSON), uvicorn's ANSI copy of its message.
_TEXT_HIDDEN = {"job_id", "request_id", "color_message"}
_SHORT_LEVELS = {"WARNING": "WARN", "CRITICAL": "CRIT"}


class TextFormatter(logging.Formatter):
    """``12:04:31.207 INFO  gpu_worker.runner: [1a2b3c4d] message key=value`` (local time)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            self.formatTime(record, "%H:%M:%S") + f".{int(record.msecs):03d}",
            f"{_SHORT_LEVELS.get(record.levelname, record.levelname):<5}",
            f"{record.name}:",
        ]
        if (job_id := getattr(record, "job_id", None)) is not None:
            parts.append(f"[{str(job_id)[:8]}]")
        parts.append(record.getMessage())
        parts.extend(f"{k}={v}" for k, v in _extra(record).items() if k not in _TEXT_HIDDEN)
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def formatter_for(log_format: LogFormat, stream: TextIO) -> logging.Formatter:
    """Text for ``text``, or ``auto`` on a terminal; JSON otherwise."""
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        log_format = "text" if isatty is not None and isatty() else "json"
    if log_format == "text":
        return TextFormatter()
    formatter = JsonFormatter()
    formatter.converter = time.gmtime
    return formatter


def configure(level: str = "INFO", log_format: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Every record, Python warnings included, through one handler on ``stream`` (stderr)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(log_format, stream))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # A warning printed raw would break a JSON stream: it becomes a record (py.warnings).
    logging.captureWarnings(True)


def quiet_libraries() -> None:
    """Model libraries speak only of errors, through our handler, without progress bars.

    Imports diffusers and transformers (seconds, torch with them): for the
    processes that load a model, not the server.
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()
    for library in (diffusers_logging, transformers_logging):
        # Their warnings at load are advice for model authors (e.g. "requires
        # torchvision; falling back to the PIL image processor"), nothing an
        # operator acts on; their errors still reach the log, in its format.
        library.set_verbosity_error()
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()
    # torch's Tensor.__array__ predates numpy 2's copy keyword; diffusers'
    # schedulers trip it on every step. Harmless, and not ours to fix.
    warnings.filterwarnings(
        "ignore",
        message="__array__ implementation doesn't accept a copy keyword",
        category=DeprecationWarning,
    )
