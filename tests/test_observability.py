"""Metrics in Prometheus format, request ids, and JSON logs that carry them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker.metrics import WorkerMetrics
from stepcast import liveness, logs
from stepcast.cli.processes import free_port
from stepcast.settings import Settings
from tests.conftest import Stack, assert_problem, model_queue


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


async def test_metrics_count_jobs_requests_sockets_and_events(stack: Stack) -> None:
    ws_url = str(stack.client.base_url).replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(ws_url) as ws:
        await ws.send(json.dumps({"type": "submit", "params": {"prompt": "a fox", "steps": 3}}))
        while json.loads(await ws.recv())["type"] != "completed":
            pass
        await stack.submit(prompt="waits", steps=3, width=512, height=512)  # may still be pending
        response = await stack.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        metrics = samples(response.text)
        assert metrics[("stepcast_websocket_connections", ())] == 1
    assert metrics[("stepcast_events_sent_total", (("transport", "websocket"),))] == 6  # queued…completed
    assert metrics[("stepcast_jobs_submitted_total", ())] == 2
    statuses = {labels[0][1]: value for (name, labels), value in metrics.items() if name == "stepcast_jobs"}
    assert set(statuses) == {"pending", "processing", "completed", "failed", "canceled"}
    assert statuses["completed"] >= 1 and sum(statuses.values()) == 2
    route = (("method", "POST"), ("route", "/v1/jobs"), ("status", "202"))
    assert metrics[("stepcast_http_requests_total", route)] == 1
    assert ("stepcast_http_request_duration_seconds_count", route[:2]) in metrics


async def test_every_response_carries_a_request_id(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    made = await stack.client.get("/healthz")
    assert len(made.headers["x-request-id"]) == 32
    caplog.set_level(logging.INFO, logger="server.job_service")
    given = await stack.client.post(
        "/v1/jobs", json={"prompt": "traced", "steps": 2}, headers={"X-Request-ID": "trace-42"}
    )
    assert given.headers["x-request-id"] == "trace-42"
    accepted = next(r for r in caplog.records if r.getMessage() == "job accepted")
    line = json.loads(logs.JsonFormatter().format(accepted))
    assert line["request_id"] == "trace-42" and line["job_id"] == given.json()["id"]
    bogus = await stack.client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert bogus.headers["x-request-id"] != "x" * 500


async def test_worker_metrics_are_served_on_their_port(settings: Settings) -> None:
    metrics = WorkerMetrics()
    metrics.steps.inc(20)
    metrics.run_seconds.observe(0.2)
    port = free_port()
    stop = metrics.serve(settings.model_copy(update={"worker_metrics_port": port}))
    try:
        async with httpx.AsyncClient() as client:
            parsed = samples((await client.get(f"http://127.0.0.1:{port}/metrics")).text)
    finally:
        await asyncio.to_thread(stop)
    assert parsed[("stepcast_worker_steps_total", ())] == 20
    assert parsed[("stepcast_job_run_seconds_count", ())] == 1


def test_worker_liveness_follows_its_heartbeat_file(tmp_path: Path) -> None:
    path = tmp_path / "worker.alive"
    env = {**os.environ, "STEPCAST_WORKER_ALIVE_FILE": str(path)}

    def probe() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "stepcast.cli", "worker-alive", "--max-age", "5"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    assert probe().returncode == 1  # never touched
    path.touch()
    assert probe().returncode == 0
    stale = time.time() - 60
    os.utime(path, (stale, stale))
    refused = probe()
    assert refused.returncode == 1 and "no heartbeat" in refused.stderr


@pytest.mark.parametrize("settings", [{"heartbeat_s": 0.1}], indirect=True)
async def test_a_running_worker_keeps_its_file_fresh(
    settings: Settings, run_worker: Callable[..., Awaitable[None]], tmp_path: Path
) -> None:
    path = tmp_path / "alive"
    await run_worker(settings.model_copy(update={"worker_alive_file": path}))
    await asyncio.sleep(1.0)
    assert liveness.alive(path, 0.5)
    first = path.stat().st_mtime
    await asyncio.sleep(0.3)
    assert path.stat().st_mtime > first


async def test_metrics_read_queue_depth_from_postgres(client: httpx.AsyncClient, settings: Settings) -> None:
    for _ in range(2):
        await client.post("/v1/jobs", json={"prompt": "nobody runs me"})
    metrics = samples((await client.get("/metrics")).text)
    assert metrics[("stepcast_queue_depth", (("queue", model_queue(settings)),))] == 2
    assert metrics[("stepcast_jobs", (("status", "pending"),))] == 2


@pytest.mark.parametrize("settings", [{"metrics_cache_s": 60}], indirect=True)
async def test_a_scrape_reads_kept_counts_not_the_jobs_table_and_caches_them(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Before: every scrape counted the whole jobs table (a scrape waited for this lock)."""
    for _ in range(2):
        await client.post("/v1/jobs", json={"prompt": "nobody runs me"})
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")  # no reader gets in
            first = samples((await client.get("/metrics", timeout=5)).text)
            await conn.execute("LOCK TABLE job_counts IN ACCESS EXCLUSIVE MODE")
            again = samples((await client.get("/metrics", timeout=5)).text)  # from the cache
    finally:
        await conn.close()
    for metrics in (first, again):
        assert metrics[("stepcast_queue_depth", (("queue", model_queue(settings)),))] == 2
        statuses = {labels[0][1]: v for (name, labels), v in metrics.items() if name == "stepcast_jobs"}
        assert statuses == {"pending": 2, "processing": 0, "completed": 0, "failed": 0, "canceled": 0}


@pytest.mark.parametrize("settings", [{"metrics_token": "scrape-me"}], indirect=True)
async def test_metrics_can_ask_for_a_token(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me"}):
        refused = assert_problem(await client.get("/metrics", headers=headers), 401)
        assert "STEPCAST_METRICS_TOKEN" in refused["detail"]
    allowed = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert allowed.status_code == 200 and "stepcast_jobs" in allowed.text
