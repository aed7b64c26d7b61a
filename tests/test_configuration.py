"""Every setting is documented with its real default, and a bad one is named at start-up."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stepcast import settings as settings_module
from stepcast.errors import ConfigError
from stepcast.settings import DATA_DIR, ServerSettings, Settings, SharedSettings, WorkerSettings
from tests.conftest import ROOT

ROW = re.compile(r"^\| `STEPCAST_(?P<name>[A-Z0-9_]+)` \| (?P<default>[^|]+) \|")
# docs/configuration.md's section for each role's own settings.
SECTIONS = {
    "Server and worker": SharedSettings,
    "Server": ServerSettings,
    "Worker": WorkerSettings,
    "The `stepcast` command": Settings,
}


def documented() -> dict[str, dict[str, str]]:
    """Each section's rows: the settings it names and their defaults."""
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("## "):
            section = line.removeprefix("## ")
        elif match := ROW.match(line):
            sections.setdefault(section, {})[match["name"].lower()] = match["default"].strip()
    return sections


def own_fields(role: type[SharedSettings]) -> set[str]:
    """The settings a role's class adds to those of the classes it extends."""
    return set(role.model_fields).difference(*(base.model_fields for base in role.__bases__))


def shown(value: object) -> str:
    """A default as the table shows it."""
    if value is None:
        return "–"
    if isinstance(value, str) and Path(value).is_absolute():  # STEPCAST_MODEL_DIR: a path or a model id
        value = Path(value)
    if isinstance(value, Path):
        return f"`{value.relative_to(ROOT)}`" if value.is_relative_to(DATA_DIR) else f"`{value}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def test_every_setting_is_in_its_roles_table_with_its_default() -> None:
    sections = documented()
    assert set(sections) == set(SECTIONS)
    for section, role in SECTIONS.items():
        assert set(sections[section]) == own_fields(role), section
    table = {name: default for rows in sections.values() for name, default in rows.items()}
    assert set(table) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert table[name] == shown(field.default), name


def test_a_process_checks_its_own_roles_settings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """One config holds both roles' variables (deploy/k8s/base/config.env): a server neither reads
    nor checks a worker's, nor a worker a server's; a shared one and the command check them all."""
    monkeypatch.setenv("STEPCAST_BATCH_SIZE", "0")  # a worker's, out of range
    assert isinstance(settings_module.load(ServerSettings), ServerSettings)
    with pytest.raises(ConfigError, match="STEPCAST_BATCH_SIZE"):
        settings_module.load(WorkerSettings)
    monkeypatch.setenv("STEPCAST_BATCH_SIZE", "4")
    monkeypatch.setenv("STEPCAST_MAX_IMAGES", "0")  # a server's
    assert isinstance(settings_module.load(WorkerSettings), WorkerSettings)
    for role in (ServerSettings, Settings):
        with pytest.raises(ConfigError, match="STEPCAST_MAX_IMAGES"):
            settings_module.load(role)
    monkeypatch.setenv("STEPCAST_MAX_IMAGES", "4")
    monkeypatch.setenv("STEPCAST_LOG_FORMAT", "xml")  # both roles'
    for role in (ServerSettings, WorkerSettings):
        with pytest.raises(ConfigError, match="STEPCAST_LOG_FORMAT"):
            settings_module.load(role)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("STEPCAST_PORT", "70000"), ("STEPCAST_STORAGE", "ftp"), ("STEPCAST_DEFAULT_SIZE_PX", "65")],
)
def test_a_bad_setting_stops_the_process_naming_it(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        settings_module.load(**{variable.removeprefix("STEPCAST_").lower(): value})
    run = subprocess.run(
        [sys.executable, "-m", "stepcast.cli", "migrate"],
        env={"PATH": "/usr/bin:/bin", variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and variable in run.stderr and "Traceback" not in run.stderr


def test_a_blank_optional_setting_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A template's ``STEPCAST_S3_ENDPOINT_URL=`` (AWS S3) reads as not set, not as an empty URL."""
    monkeypatch.setenv("STEPCAST_S3_ENDPOINT_URL", "")
    monkeypatch.setenv("STEPCAST_WORKER_ALIVE_FILE", "")
    loaded = settings_module.load()
    assert loaded.s3_endpoint_url is None and loaded.worker_alive_file is None


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        ("REPLACE_ME", "placeholder"),  # deploy/k8s/base/secret.yaml as shipped
        ("changeme-changeme-changeme-changeme", "placeholder"),
        ("secret", "is 6 bytes, fewer than 32"),
        ("s3cret-s3cret-s3cret-s3cret-s3cret", "distinct characters"),
    ],
)
def test_a_weak_or_placeholder_session_secret_stops_the_process(secret: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=rf"STEPCAST_SESSION_SECRET: .*{complaint}"):
        settings_module.load(session_secret=secret)
    run = subprocess.run(
        [sys.executable, "-m", "server.app"],
        env={"PATH": "/usr/bin:/bin", "STEPCAST_SESSION_SECRET": secret},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode != 0 and "STEPCAST_SESSION_SECRET" in run.stderr and complaint in run.stderr
    assert "Traceback" not in run.stderr and secret not in run.stderr  # the secret itself is never shown
    strong = settings_module.load(session_secret="9c1f4e7a2b8d06f3" * 4)
    assert strong.session_secret is not None
