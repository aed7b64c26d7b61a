"""Hostile input: a property-based fuzz of the REST API from its own OpenAPI
document (schemathesis) finds no 5xx and no status or content type the document
does not give; random WebSocket frames never crash the server or another
client's connection; text Postgres cannot store is refused by name; a per-owner
request rate limit."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from stepcast.settings import Settings
from tests.conftest import Stack, StepcastProcess, assert_problem
from tests.test_auth import bearer, make_key


# A caller that goes over its request rate meets the 429 every owned route documents.
@pytest.mark.parametrize("settings", [{"auth": "keys", "requests_per_s_per_owner": 20}], indirect=True)
async def test_fuzzing_the_rest_api_from_its_openapi_document_finds_no_5xx_and_no_undocumented_answer(
    settings: Settings, spawn: Callable[[str, Settings], Awaitable[StepcastProcess]], tmp_path: Path
) -> None:
    server = await spawn("server.app", settings)
    _, key = await make_key(settings, "fuzzer")
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.base_url}/openapi.json",
        "--header", f"Authorization: Bearer {key}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
        "--phases", "coverage,fuzzing", "--max-examples", "5", "--max-time", "10", "--workers", "2",
        "--seed", "7",
    ]  # fmt: skip
    run = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )  # its example cache goes to the test's own folder
    assert run.returncode == 0, run.stdout[-4000:]
    assert "passed" in run.stdout


def hostile_frames(rng: random.Random) -> list[str | bytes]:
    """Random JSON, wrong types, huge numbers, odd unicode, deep nesting, binary."""

    def value(depth: int = 0) -> Any:
        kind = rng.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind == 1:
            return rng.choice([0, -1, 2**31, 2**63, 10**400, -(10**30)])
        if kind == 2:
            return rng.choice([1e308, -1e-308, 3.5, float("inf")])
        if kind == 3:
            return "".join(
                chr(rng.choice([0x41, 0x0, 0x202E, 0x1F98A, 0xFFFF, 0x10FFFF, 0xD800])) for _ in range(8)
            )
        if kind == 4:
            return rng.choice(["submit", "subscribe", "cancel", "ping", "unsubscribe", ""])
        if kind == 5:
            return "x" * rng.choice([0, 1, 5000])
        if kind == 6:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        keys = [
            "type",
            "params",
            "job_id",
            "after_seq",
            "scope",
            "request_id",
            "preview",
            "webhook",
            "prompt",
        ]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randrange(5))}

    frames: list[str | bytes] = []
    for _ in range(150):
        message = value()
        if rng.random() < 0.7:
            message = {
                "type": rng.choice(["submit", "subscribe", "cancel", "ping", "bogus"]),
                **(message if isinstance(message, dict) else {"params": message}),
            }
        frames.append(json.dumps(message, allow_nan=True))
    frames += [
        rng.randbytes(64),  # binary
        "{" * 100_000,  # deeper than any parser's recursion
        "[" * 5000 + "]" * 5000,
        '{"type": "submit", "params": ' + '{"a":' * 3000 + "1" + "}" * 3000 + "}",
        "not json at all \udcff".encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
        json.dumps({"type": "submit", "params": {"prompt": "p" * 60_000}}),  # near the size limit
        "",
        "null",
        '"just a string"',
    ]
    rng.shuffle(frames)
    return frames


@pytest.mark.parametrize("settings", [{"ws_messages_per_s": 100_000, "ws_burst": 100_000}], indirect=True)
async def test_random_websocket_frames_never_break_the_server_or_other_clients(stack: Stack) -> None:
    url = str(stack.client.base_url).replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url) as bystander, websockets.connect(url, max_size=2**24) as attacker:
        await bystander.send(json.dumps({"type": "submit", "params": {"prompt": "calm", "steps": 30}}))
        for frame in hostile_frames(random.Random(2026)):
            await attacker.send(frame)
        # After all that, the connection is still usable.
        await attacker.send(json.dumps({"type": "ping", "request_id": "still-there"}))
        while True:
            message = json.loads(await asyncio.wait_for(attacker.recv(), 30))
            if message.get("request_id") == "still-there":
                assert message["type"] == "pong"
                break
        # The bystander's job went on undisturbed, every step delivered.
        steps = []
        while True:
            message = json.loads(await asyncio.wait_for(bystander.recv(), 60))
            if message["type"] == "progress":
                steps.append(message["step"])
            if message["type"] in {"completed", "failed", "canceled"}:
                break
        assert message["type"] == "completed" and steps == list(range(1, 31))
    assert (await stack.client.get("/healthz")).status_code == 200


async def test_websocket_text_postgres_cannot_store_is_an_error_naming_the_field(
    client: httpx.AsyncClient,
) -> None:
    lone = "must be valid Unicode: \\ud800 is half of a surrogate pair"
    frames = {  # raw frames: the \\u escapes are JSON's, json.loads gives the lone surrogate
        '{"type": "submit", "params": {"prompt": "a \\ud800 fox"}}': ("prompt", f"prompt {lone}"),
        '{"type": "submit", "params": {"prompt": "p"}, "webhook": {"url": "https://a.example/\\u0000"}}': (
            "webhook.url",
            "webhook.url must not contain NUL characters",
        ),
        '{"type": "ping", "request_id": "\\ud800"}': ("request_id", f"request_id {lone}"),
        '{"type": "ping", "\\ud800": 1}': ("\\ud800", f"the field name \\ud800 {lone}"),
    }
    url = str(client.base_url).replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url) as socket:
        for frame, (field, message) in frames.items():
            await socket.send(frame)
            answer = json.loads(await asyncio.wait_for(socket.recv(), 10))
            assert (answer["type"], answer["code"]) == ("error", "invalid_params"), answer
            assert (answer["field"], answer["message"]) == (field, message)
        await socket.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(socket.recv(), 10)) == {"type": "pong"}
    assert (await client.get("/v1/jobs")).json()["items"] == []  # nothing was stored


@pytest.mark.parametrize("settings", [{"auth": "keys", "requests_per_s_per_owner": 5}], indirect=True)
async def test_each_owner_has_a_request_rate_limit(
    client: httpx.AsyncClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, busy = await make_key(settings, "busy")
    _, calm = await make_key(settings, "calm")
    answers = await asyncio.gather(*(client.get("/v1/jobs", headers=bearer(busy)) for _ in range(15)))
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(r.status_code in {200, 429} for r in answers)
    body = assert_problem(limited[0], 429)
    assert body["type"].endswith("rate_limited") and limited[0].headers["retry-after"] == "1"
    assert "Bearer" not in body["detail"] and busy not in limited[0].text  # no secret echoed
    assert (await client.get("/v1/jobs", headers=bearer(calm))).status_code == 200  # others unaffected
    await asyncio.sleep(1.1)
    assert (await client.get("/v1/jobs", headers=bearer(busy))).status_code == 200  # and it passes
    revoked = await client.get("/v1/jobs", headers=bearer(busy + "x"))
    assert revoked.status_code == 401
    assert not any(busy in record.getMessage() for record in caplog.records)  # no key in any log line
