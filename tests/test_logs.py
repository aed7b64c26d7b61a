"""Logs read well on a terminal, stay JSON for a pipeline, and model loading adds no noise."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator

import pytest

from server.app import Server, create_app
from stepcast import logs
from stepcast import settings as settings_module
from tests.conftest import ROOT

JOB_ID = "1a2b3c4d-0000-4000-8000-00000000abcd"
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (INFO |WARN |ERROR|DEBUG|CRIT ) \S+: ")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, as it was before the test configured it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def record(msg: str = "job finished", **extra: object) -> logging.LogRecord:
    made = logging.getLogger("gpu_worker.runner").makeRecord(
        "gpu_worker.runner", logging.INFO, __file__, 1, msg, (), None, extra=extra
    )
    return made


def failed_record() -> logging.LogRecord:
    try:
        raise RuntimeError("the pipeline broke")
    except RuntimeError:
        made = logging.getLogger("gpu_worker.runner").makeRecord(
            "gpu_worker.runner",
            logging.ERROR,
            __file__,
            1,
            "job failed",
            (),
            sys.exc_info(),
            extra={"job_id": JOB_ID},
        )
    return made


def test_text_is_one_short_line_with_the_job() -> None:
    line = logs.TextFormatter().format(record(job_id=JOB_ID, attempt=2, request_id="r" * 32))
    assert TEXT_LINE.match(line), line
    assert line.endswith(" INFO  gpu_worker.runner: [1a2b3c4d] job finished attempt=2"), line
    assert "\n" not in line and "rrrr" not in line  # the request id stays in the JSON


def test_text_shows_the_traceback_under_the_line() -> None:
    first, *rest = logs.TextFormatter().format(failed_record()).splitlines()
    assert TEXT_LINE.match(first) and first.endswith("ERROR gpu_worker.runner: [1a2b3c4d] job failed"), first
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: the pipeline broke"


def test_json_is_unchanged() -> None:
    formatter = logs.formatter_for("json", io.StringIO())
    line = json.loads(formatter.format(record(job_id=JOB_ID, attempt=2)))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("ts"))
    assert line == {
        "level": "info",
        "logger": "gpu_worker.runner",
        "msg": "job finished",
        "job_id": JOB_ID,
        "attempt": 2,
    }
    failed = json.loads(formatter.format(failed_record()))
    assert failed["level"] == "error" and failed["exc"].endswith("RuntimeError: the pipeline broke")


def run_on_stderr(code: str, *, tty: bool, log_format: str | None = None) -> list[str]:
    """Run ``code`` in a fresh process, its stderr a terminal or a pipe; the lines it wrote there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPCAST_")}
    if log_format is not None:
        env["STEPCAST_LOG_FORMAT"] = log_format
    command = [sys.executable, "-c", code]
    if not tty:
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stderr.splitlines()
    reader, writer = pty.openpty()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=writer) as process:
        os.close(writer)
        chunks = []
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # EIO: every writer closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(reader)
        assert process.wait(60) == 0, b"".join(chunks).decode()
    return b"".join(chunks).decode().replace("\r\n", "\n").splitlines()


CONFIGURE = """
import logging
from stepcast import logs, settings
loaded = settings.load()
logs.configure(loaded.log_level, loaded.log_format)
"""


@pytest.mark.parametrize(
    ("tty", "log_format", "text"),
    [(True, None, True), (False, None, False), (True, "json", False), (False, "text", True)],
)
def test_auto_is_text_on_a_terminal_and_the_setting_overrides(
    tty: bool, log_format: str | None, text: bool
) -> None:
    code = CONFIGURE + f"logging.getLogger('gpu_worker.runner').info('hello', extra={{'job_id': {JOB_ID!r}}})"
    [line] = run_on_stderr(code, tty=tty, log_format=log_format)
    if text:
        assert TEXT_LINE.match(line) and line.endswith("[1a2b3c4d] hello"), line
    else:
        assert json.loads(line)["job_id"] == JOB_ID


def test_uvicorn_logs_through_the_same_handler(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure("INFO", "text", stream=out)
    settings = settings_module.load()
    Server(create_app(settings), settings)  # uvicorn configures its logging here
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42, extra={"color_message": "x"})
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/healthz", "1.1", 200
    )
    lines = out.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "Started server process [42]",
        '127.0.0.1:5 - "GET /healthz HTTP/1.1" 200',
    ]
    assert all(TEXT_LINE.match(line) for line in lines), lines


def test_warnings_become_log_lines(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("legacy option", UserWarning, stacklevel=1)
    line = json.loads(out.getvalue())
    assert line["logger"] == "py.warnings" and "UserWarning: legacy option" in line["msg"]


def test_loading_the_model_says_only_that_it_loaded() -> None:
    """The worker's start-up on a terminal: no library advice, no progress bars."""
    code = CONFIGURE + textwrap.dedent("""
        logs.quiet_libraries()
        from gpu_worker.pipeline import DiffusersPipeline
        from gpu_worker.tiny_model import ensure
        from stepcast.settings import DATA_DIR
        DiffusersPipeline.load(ensure(DATA_DIR / "models" / "tiny"), name="tiny")
    """)
    # "model written" too, the first time: the tiny model is built on demand.
    lines = [line for line in run_on_stderr(code, tty=True) if "model written" not in line]
    assert len(lines) == 1 and TEXT_LINE.match(lines[0]), lines
    assert " gpu_worker.pipeline: model loaded model=tiny " in lines[0]
