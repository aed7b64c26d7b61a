"""A model named by Hugging Face id loads from the standard cache, offline, and its jobs
record the id and the commit; a model missing from an offline cache says how to fetch it."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from gpu_worker import model_source
from gpu_worker.pipeline import DiffusersPipeline
from gpu_worker.tiny_model import ensure
from stepcast.db import Database
from stepcast.errors import ConfigError
from stepcast.settings import DATA_DIR, Settings
from tests.conftest import Stack, StepcastProcess

REPO_ID = "stepcast/tiny-sd"
COMMIT = hashlib.sha1(b"stepcast tiny").hexdigest()


def cache_entry(cache: Path, model_dir: Path, repo_id: str, commit: str) -> Path:
    """The layout the Hub's client writes: files in blobs/, the snapshot links to them, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache_entry(cache, ensure(DATA_DIR / "models" / "tiny"), REPO_ID, COMMIT)
    return cache


def test_an_org_name_that_is_no_existing_path_is_a_model_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert model_source.parse("org/name") == model_source.ModelId("org/name")
    assert model_source.parse("org/name@v1.0") == model_source.ModelId("org/name", "v1.0")
    assert model_source.parse(f"org/name@{COMMIT}") == model_source.ModelId("org/name", COMMIT)
    for path in ("./org/name", "/models/sd15", "models/sd/15", "org/name@", "name", "../org/name"):
        assert model_source.parse(path) == Path(path), path
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert model_source.parse("org/name") == Path("org/name")  # a directory that exists stays one


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_an_id_resolves_to_its_snapshot_offline(hub_cache: Path, revision: str | None) -> None:
    snapshot = model_source.fetch(model_source.ModelId(REPO_ID, revision), cache_dir=hub_cache, offline=True)
    assert snapshot.path == hub_cache / "models--stepcast--tiny-sd" / "snapshots" / COMMIT
    assert snapshot.commit == COMMIT and snapshot.revision == f"{REPO_ID}@{COMMIT}"


def test_the_snapshot_loads_with_its_id_and_commit(hub_cache: Path) -> None:
    snapshot = model_source.fetch(model_source.ModelId(REPO_ID), cache_dir=hub_cache, offline=True)
    pipeline = DiffusersPipeline.load(snapshot.path, name="tiny", revision=snapshot.revision)
    assert pipeline.revision == f"{REPO_ID}@{COMMIT}"


def test_an_id_missing_from_an_offline_cache_says_how_to_fetch_it(hub_cache: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        model_source.fetch(model_source.ModelId("nobody/absent", "v2"), cache_dir=hub_cache, offline=True)
    message = str(raised.value)
    assert "nobody/absent@v2" in message and str(hub_cache) in message
    assert "`hf download nobody/absent --revision v2`" in message and "HF_HUB_OFFLINE=0" in message


async def test_a_job_records_the_model_id_and_commit(
    hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
) -> None:
    # The worker process: the same variables a user sets, read by huggingface_hub itself.
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = make_settings(model_dir=REPO_ID)
    base_url = await serve(settings)
    worker = await spawn("gpu_worker.worker", settings)
    db = await Database.connect(settings.database_url, max_size=2)
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            stack = Stack(settings, client, db)
            job = await stack.wait((await stack.submit(steps=2))["id"], timeout_s=90)
    finally:
        await db.close()
    assert job["status"] == "completed", job
    assert job["provenance"]["model"] == "tiny"
    assert job["provenance"]["model_revision"] == f"{REPO_ID}@{COMMIT}"
    log = worker.log.read_text()
    assert "the model runs on cpu in float32 (no CUDA or MPS; float32 suits cpu)" in log
