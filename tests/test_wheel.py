"""stepcast installs like a library: its wheel carries the migrations and the page.

The wheel is built from a copy of the sources (what the Dockerfile's builder copies), installed
into a fresh venv outside the checkout, and run from there with no PYTHONPATH: `stepcast migrate`
applies every migration to an empty database, `stepcast serve` serves the page and answers
/readyz. The venv reuses this interpreter's installed dependencies through a .pth file (offline,
in seconds); its own site-packages comes first, so stepcast is imported from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import uuid
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stepcast.cli.processes import LocalPostgres, free_port, wait_for_port
from tests.conftest import ROOT

SOURCES = ["pyproject.toml", "README.md", "stepcast", "server", "gpu_worker"]
PROBE = """
import json, server, server.app, stepcast
from stepcast.settings import DATA_DIR
print(json.dumps({"stepcast": stepcast.__file__, "server": server.__file__,
                  "page": str(server.app._page_directory()), "data_dir": str(DATA_DIR)}))
"""


def build_wheel(out: Path) -> Path:
    source = out / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    build = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out)]
    subprocess.run([sys.executable, *build, source], env=bare_env(), timeout=120, check=True)
    (wheel,) = out.glob("stepcast-*.whl")
    return wheel


def bare_env(**settings: str) -> dict[str, str]:
    """PATH and these STEPCAST_* settings: no PYTHONPATH, nothing of the developer's."""
    return {"PATH": os.environ["PATH"], **{f"STEPCAST_{k.upper()}": v for k, v in settings.items()}}


def make_venv(where: Path, wheel: Path) -> Path:
    """A venv with the wheel installed, seeing this interpreter's dependencies; its bin/."""
    venv.EnvBuilder(with_pip=False).create(where)
    (purelib,) = where.glob("lib/python*/site-packages")
    (purelib / "_stepcast_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = ["-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)]
    subprocess.run([where / "bin" / "python", *install], env=bare_env(), timeout=120, check=True)
    return where / "bin"


@pytest.fixture
def empty_database(postgres: LocalPostgres) -> Iterator[str]:
    """A database with no schema at all (not a clone of the migrated template)."""
    name = f"wheel_{uuid.uuid4().hex[:8]}"
    postgres.create_database(name)
    yield postgres.dsn(name)
    subprocess.run(["psql", postgres.dsn(), "-qc", f'DROP DATABASE "{name}" WITH (FORCE)'], check=True)


def test_the_wheel_installed_outside_the_checkout_migrates_and_serves(
    tmp_path: Path, empty_database: str, redis_url: str
) -> None:
    wheel = build_wheel(tmp_path / "dist")
    bin_dir = make_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    probe = subprocess.run(
        [bin_dir / "python", "-c", PROBE], cwd=elsewhere, env=bare_env(), capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    venv_dir = (tmp_path / "venv").resolve()
    for name in ("stepcast", "server", "page"):  # the wheel's files, not the checkout's
        assert Path(found[name]).is_relative_to(venv_dir), found
    assert Path(found["data_dir"]) == elsewhere.resolve() / ".data"  # not inside site-packages

    migrate = subprocess.run(
        [bin_dir / "stepcast", "migrate"],
        cwd=elsewhere, env=bare_env(database_url=empty_database), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr
    shipped = sorted(path.stem for path in (ROOT / "stepcast" / "migrations").glob("*.sql"))
    assert shipped and [line for line in migrate.stderr.splitlines() if line.startswith("applied ")] == [
        f"applied {name}" for name in shipped
    ]

    port = free_port()
    log = tmp_path / "serve.log"
    env = bare_env(database_url=empty_database, redis_url=redis_url, port=str(port))
    with open(log, "wb") as out:
        serve = [bin_dir / "stepcast", "serve"]
        server = subprocess.Popen(serve, cwd=elsewhere, env=env, stdout=out, stderr=out)
    try:
        wait_for_port(port, server, 30, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            page = client.get("/")
            assert page.status_code == 200, log.read_text()
            assert page.text == (ROOT / "server" / "web" / "index.html").read_text()
            assert client.get("/app.js").text == (ROOT / "server" / "web" / "app.js").read_text()
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
    finally:
        server.terminate()
        server.wait(15)
    # A clean stop (its exit status is SIGTERM again: uvicorn re-raises it once it has shut down).
    assert "Application shutdown complete." in log.read_text()


def test_the_image_builds_the_same_wheel_and_installs_it() -> None:
    """The Dockerfile's builder stage copies what this test builds from; the image installs the wheel."""
    stages = (ROOT / "Dockerfile").read_text().split("\nFROM ")
    builder, final = stages[1], stages[2]
    assert builder.startswith("python:3.11-slim AS wheel") and final.startswith("python:3.11-slim\n")
    copies = [line.split()[1:-1] for line in builder.splitlines() if line.startswith("COPY ")]
    copied = [source for sources in copies for source in sources]
    assert copied == SOURCES
    assert "RUN pip wheel --no-deps --wheel-dir /dist ." in builder
    assert "COPY --from=wheel /dist /dist" in final and "pip install /dist/stepcast-*.whl" in final
    assert "pip install -e" not in final and "COPY stepcast" not in final
