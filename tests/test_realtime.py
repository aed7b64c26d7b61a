"""WebSocket and SSE against a real uvicorn server, with a real WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from server.feed import Outbox, Outgoing, SlowConsumer
from server.positions import EVERY_CHANGE_UP_TO, period
from stepcast.redis_keys import event_keys
from stepcast.settings import Settings
from tests.conftest import Stack, assert_problem, eventually
from tests.test_auth import SESSION_SECRET, bearer, make_key

TERMINAL = {"completed", "failed", "canceled"}


def ws_url(stack: Stack) -> str:
    return str(stack.client.base_url).replace("http://", "ws://") + "/v1/ws"


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def recv(ws: ClientConnection, timeout_s: float = 10) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
    return message


async def until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every message up to and including the first one ``done`` accepts."""
    seen = []
    while True:
        message = await recv(ws)
        seen.append(message)
        if done(message):
            return seen


def is_terminal(message: dict[str, Any]) -> bool:
    if message["type"] == "snapshot":
        return bool(message["job"]["status"] in TERMINAL)
    return message["type"] in TERMINAL


async def test_submit_streams_every_step_in_order(stack: Stack) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "submit", "request_id": "r1", "params": {"prompt": "a red fox", "steps": 8}})
        accepted = await recv(ws)
        assert accepted["type"] == "accepted" and accepted["request_id"] == "r1"
        events = await until(ws, is_terminal)
    assert [e["type"] for e in events] == ["queued", "started"] + ["progress"] * 8 + ["completed"]
    assert [e["seq"] for e in events] == list(range(1, 12))
    assert all(e["job_id"] == accepted["job_id"] for e in events)
    assert [e["step"] for e in events if e["type"] == "progress"] == list(range(1, 9))
    job = (await stack.client.get(f"/v1/jobs/{accepted['job_id']}")).json()
    assert events[-1]["images"] == job["result"]["images"] and job["last_seq"] == 11


async def test_resume_after_a_drop_misses_nothing_and_repeats_nothing(stack: Stack) -> None:
    job_id = (await stack.submit(steps=60))["id"]
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
        first = await until(ws, lambda m: m["type"] == "progress" and m["step"] >= 5)
    await asyncio.sleep(0.1)  # the job runs on while nobody watches
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": first[-1]["seq"]})
        second = await until(ws, is_terminal)
    seqs = [e["seq"] for e in first + second]
    assert seqs == list(range(1, seqs[-1] + 1))
    assert second[-1]["type"] == "completed"


async def test_many_watchers_and_many_jobs_on_one_connection(stack: Stack) -> None:
    ids = [(await stack.submit(steps=3))["id"] for _ in range(3)]
    async with websockets.connect(ws_url(stack)) as a, websockets.connect(ws_url(stack)) as b:
        for ws in (a, b):
            for job_id in ids:
                await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
        for ws in (a, b):
            finished: set[str] = set()
            per_job: dict[str, list[int]] = {job_id: [] for job_id in ids}
            while finished != set(ids):
                message = await recv(ws)
                per_job[message["job_id"]].append(message["seq"])
                if is_terminal(message):
                    finished.add(message["job_id"])
            assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_job.values())


async def test_finished_job_answers_with_its_final_snapshot(stack: Stack) -> None:
    job = await stack.wait((await stack.submit(steps=2))["id"])
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": job["id"]})
        snapshot = await recv(ws)
        assert snapshot["type"] == "snapshot" and snapshot["job_id"] == job["id"]
        assert snapshot["job"]["status"] == "completed" and snapshot["job"]["last_seq"] == job["last_seq"]
        await send(ws, {"type": "subscribe", "job_id": job["id"], "after_seq": job["last_seq"] - 1})
        assert (await recv(ws))["type"] == "completed"
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}  # nothing else followed


async def test_lost_stream_falls_back_to_a_snapshot(stack: Stack) -> None:
    job_id = (await stack.submit(steps=150))["id"]
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
        seen = await until(ws, lambda m: m["type"] == "progress" and m["step"] >= 3)
    redis = Redis.from_url(stack.settings.redis_url)
    stream = event_keys(job_id)[1]
    for _ in range(500):  # events the client has not seen pile up in the stream (ids are seq-0)…
        newest = await redis.xrevrange(stream, count=1)
        if newest and int(newest[0][0].split(b"-")[0]) > seen[-1]["seq"] + 1:
            break
        await asyncio.sleep(0.01)
    await redis.delete(stream)  # …and are lost: expired, capped or wiped
    await redis.aclose()
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": seen[-1]["seq"]})
        snapshot = await recv(ws)
        assert snapshot["type"] == "snapshot" and snapshot["job"]["status"] == "processing"
        rest = await until(ws, is_terminal)
    assert not [e for e in rest if e["type"] == "error"], rest
    # A later gap may bring another snapshot; events never go back or repeat.
    seqs = [e["seq"] for e in rest if e["type"] != "snapshot"]
    assert seqs == sorted(set(seqs)) and seqs[0] > snapshot["job"]["last_seq"]
    assert rest[-1]["type"] == "completed"


async def test_cancel_over_the_socket_stops_within_a_step(stack: Stack) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "submit", "params": {"prompt": "p", "steps": 150}})
        job_id = (await recv(ws))["job_id"]
        before = await until(ws, lambda m: m["type"] == "progress" and m["step"] >= 2)
        await send(ws, {"type": "cancel", "job_id": job_id})
        after = await until(ws, is_terminal)
    assert after[-1]["type"] == "canceled"
    steps = [e["step"] for e in before + after if e["type"] == "progress"]
    assert steps[-1] < 150
    job = (await stack.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "canceled" and job["result"] is None and job["progress"]["step"] == steps[-1]


async def test_owner_feed_sees_jobs_from_elsewhere_and_finished_ones(stack: Stack) -> None:
    done = await stack.wait((await stack.submit(steps=2))["id"])
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "scope": "mine"})
        snapshot = await recv(ws)
        assert snapshot["type"] == "snapshot" and snapshot["job"]["id"] == done["id"]
        new = await stack.submit(steps=3)  # submitted over REST, not on this socket
        events = await until(ws, lambda m: m["type"] == "completed")
    assert [e["type"] for e in events] == [
        "queued",
        "started",
        "progress",
        "progress",
        "progress",
        "completed",
    ]
    assert {e["job_id"] for e in events} == {new["id"]}


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_message", None),
        ('{"type": "launch"}', "invalid_request", None),
        ('{"type": "ping", "colour": 1}', "invalid_params", "colour"),
        ('{"type": "subscribe", "job_id": "nope"}', "invalid_params", "job_id"),
        ('{"type": "subscribe", "job_id": "00000000-0000-4000-8000-000000000000"}', "not_found", None),
        ('{"type": "subscribe", "scope": "everyone"}', "invalid_params", "scope"),
        ('{"type": "submit", "params": {"prompt": "p", "steps": 0}}', "invalid_params", "steps"),
        ('{"type": "submit", "params": "a fox"}', "invalid_params", "params"),
        ('{"type": "submit", "request_id": 5, "params": {"prompt": "p"}}', "invalid_params", "request_id"),
        ('{"type": "cancel", "job_id": "00000000-0000-4000-8000-000000000000"}', "not_found", None),
        ('{"type": "subscribe", "job_id": "00000000-0000-4000-8000-000000000000", "after_seq": -1}',
         "invalid_params", "after_seq"),
        ('{"type": "subscribe", "job_id": "00000000-0000-4000-8000-000000000000",'
         ' "after_seq": 9223372036854775808}', "invalid_params", "after_seq"),
        ('{"type": "subscribe", "job_id": "00000000-0000-4000-8000-000000000000", "after_seq": "7"}',
         "invalid_params", "after_seq"),
    ],
)  # fmt: skip
async def test_bad_frames_get_errors_and_the_connection_stays_usable(
    stack: Stack, frame: str, code: str, field: str | None
) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        await ws.send(frame)
        error = await recv(ws)
        assert error["type"] == "error" and error["code"] == code, error
        assert error.get("field") == field and error["message"]
        await send(ws, {"type": "ping", "request_id": "still-there"})
        assert await recv(ws) == {"type": "pong", "request_id": "still-there"}


async def test_binary_and_oversize_frames_are_refused_politely(stack: Stack) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        await ws.send(b"\x00\x01")
        assert (await recv(ws))["code"] == "invalid_frame"
        await send(ws, {"type": "ping", "request_id": "x" * 70_000})
        assert (await recv(ws))["code"] == "message_too_large"
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"


async def test_flooding_closes_the_connection_with_a_policy_code(stack: Stack) -> None:
    async with websockets.connect(ws_url(stack)) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            for _ in range(1000):
                await send(ws, {"type": "ping"})
            while True:
                await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008


async def test_a_stuck_client_does_not_hold_back_anyone(stack: Stack) -> None:
    job_id = (await stack.submit(steps=40, preview={"every": 1, "max_px": 256}))["id"]
    # This client never reads: its socket buffers fill and the server must cope.
    stuck = await websockets.connect(ws_url(stack), max_queue=1, close_timeout=0.2)
    await send(stuck, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
    started = time.monotonic()
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
        events = await until(ws, is_terminal)
    assert time.monotonic() - started < 15
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    await stuck.close()


def test_slow_feeds_coalesce_progress_but_keep_everything_else() -> None:
    feed = Outbox(max_buffer=4, max_bytes=10**6)
    for step in range(1, 10):
        feed.push(Outgoing("{}", "progress", "j", step))
    feed.push(Outgoing("{}", "completed", "j", 10, terminal=True))
    drained = []

    async def drain() -> None:
        while (item := await feed.next(timeout_s=0)) is not None:
            drained.append(item)

    asyncio.run(drain())
    assert [item.type for item in drained][-1] == "completed"
    assert len(drained) <= 5 and feed.dropped >= 5
    assert [item.seq for item in drained] == sorted(item.seq for item in drained)

    for index in range(6):  # nothing droppable left: the client is hopeless
        feed.push(Outgoing("{}", "started", f"j{index}", 1))
    with pytest.raises(SlowConsumer):
        asyncio.run(drain())


def test_a_slow_feed_is_bounded_in_bytes_previews_dropped_first() -> None:
    preview = '{"type":"progress","preview":"data:image/webp;base64,' + "A" * 30_000 + '"}'
    feed = Outbox(max_buffer=256, max_bytes=100_000)
    feed.push(Outgoing("{}", "started", "j", 1))
    for step in range(2, 40):  # 38 previews of 30 KB: 1.1 MB offered
        feed.push(Outgoing(preview, "progress", "j", step, preview=True))
        feed.push(Outgoing('{"type":"progress"}', "progress", "j", step))
    assert feed.bytes <= 100_000
    queued = []

    async def drain() -> None:
        while (item := await feed.next(timeout_s=0)) is not None:
            queued.append(item)

    asyncio.run(drain())
    assert queued[0].type == "started"
    assert sum(item.preview for item in queued) == 3  # the newest previews that fit
    assert sum(not item.preview for item in queued) == 39  # no plain progress had to go
    assert feed.bytes == 0

    for index in range(4):  # nothing droppable left and still over: the client is hopeless
        feed.push(Outgoing("x" * 30_000, "completed", f"j{index}", 9, terminal=True))
    with pytest.raises(SlowConsumer):
        asyncio.run(drain())


async def sse_events(
    response: httpx.Response, stop: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    events = []
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                event = {"id": fields.get("id"), "event": fields["event"], **json.loads(fields["data"])}
                events.append(event)
                if stop(event):
                    return events
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return events


async def test_sse_streams_and_resumes_with_last_event_id(stack: Stack) -> None:
    job_id = (await stack.submit(steps=40))["id"]
    url = f"/v1/jobs/{job_id}/events"
    async with stack.client.stream("GET", url) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        first = await sse_events(response, lambda e: e["event"] == "progress" and e["step"] >= 4)
    assert first[0]["event"] == "snapshot"
    last_id = first[-1]["id"]
    async with stack.client.stream("GET", url, headers={"Last-Event-ID": last_id}) as response:
        rest = await sse_events(response, lambda e: False)  # the server ends the stream
    assert rest[-1]["event"] == "completed"
    ids = [int(e["id"]) for e in first[1:] + rest]
    assert ids == list(range(ids[0], ids[-1] + 1))
    assert all(int(e["id"]) == e["seq"] for e in rest)
    # not a seq at all, beyond a bigint (and a Redis stream id), digits that are not ASCII
    seq_range = "must be an integer from 0 to 9223372036854775807"
    for bad_id in ("seven", "-1", "51188732970579781484544", "9223372036854775808"):
        bad = await stack.client.get(url, headers={"Last-Event-ID": bad_id})
        assert_problem(bad, 422, {"Last-Event-ID": f"Last-Event-ID {seq_range}"})
    for bad_seq in ("51188732970579781484544", "\u00b2"):  # "²" is a digit to str.isdigit, not to int()
        bad = await stack.client.get(url, params={"after_seq": bad_seq})
        assert_problem(bad, 422, {"after_seq": f"after_seq {seq_range}"})
    # a bad one is named even beside a good Last-Event-ID (which wins when both are fine)
    bad = await stack.client.get(
        url, params={"after_seq": "9223372036854775808"}, headers={"Last-Event-ID": "0"}
    )
    assert_problem(bad, 422, {"after_seq": f"after_seq {seq_range}"})


@pytest.fixture
async def second_server(settings: Settings, make_settings: Callable[..., Settings], spawn: Any) -> str:
    """Another server *process* on the same Postgres and Redis."""
    other = await spawn("server.app", make_settings(storage_dir=settings.storage_dir))
    return str(other.ws_url)


async def test_a_client_on_one_server_sees_a_job_submitted_through_another(
    stack: Stack, second_server: str
) -> None:
    async with websockets.connect(second_server) as other, websockets.connect(ws_url(stack)) as here:
        await send(other, {"type": "subscribe", "scope": "mine"})
        await send(other, {"type": "ping"})
        assert (await recv(other))["type"] == "pong"
        await send(here, {"type": "submit", "params": {"prompt": "p", "steps": 4}})
        job_id = (await recv(here))["job_id"]
        events = await until(other, lambda m: m["type"] == "completed")
    assert [e["seq"] for e in events] == list(range(1, 8)) and {e["job_id"] for e in events} == {job_id}


# One job per pipeline call: batched, the last two jobs would start together.
@pytest.mark.parametrize("settings", [{"queue_update_s": 0.05, "batch_size": 1}], indirect=True)
async def test_queue_positions_are_pushed_as_the_queue_moves(stack: Stack) -> None:
    ids = [(await stack.submit(steps=60))["id"] for _ in range(3)]
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": ids[2], "after_seq": 0})
        events = await until(ws, lambda m: m["type"] == "started")
    positions = [e["position"] for e in events if e["type"] == "queued"]
    assert positions[-1] == 1 and len(set(positions)) >= 2
    assert positions == sorted(positions, reverse=True)
    await asyncio.gather(*(stack.client.post(f"/v1/jobs/{i}/cancel") for i in ids))


async def test_hub_resyncs_after_losing_its_redis_connection(stack: Stack) -> None:
    job_id = (await stack.submit(steps=150))["id"]
    async with websockets.connect(ws_url(stack)) as ws:
        await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
        before = await until(ws, lambda m: m["type"] == "progress" and m["step"] >= 3)
        redis = Redis.from_url(stack.settings.redis_url)
        killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await redis.aclose()
        assert killed >= 1  # the server's one pub/sub connection (and the worker's cancel listener)
        after = await until(ws, is_terminal)
    seqs = [e["seq"] for e in before + after]
    assert seqs == list(range(1, seqs[-1] + 1))  # events published while it was gone were replayed
    assert after[-1]["type"] == "completed"


async def test_cross_site_pages_cannot_open_the_socket(stack: Stack) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(ws_url(stack), origin="http://evil.example")  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    own = str(stack.client.base_url)
    async with websockets.connect(ws_url(stack), origin=own) as ws:  # type: ignore[arg-type]
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"


def test_far_back_in_a_deep_queue_a_job_hears_of_its_position_less_often() -> None:
    assert [period(p) for p in (1, 10, 11, 20, 21, 40, 41, 500, 5_120, 5_121, 10_240)] == [
        1, 1, 2, 2, 4, 4, 8, 64, 512, 1_024, 1_024,
    ]  # fmt: skip
    assert all(period(p) * EVERY_CHANGE_UP_TO >= p for p in range(1, 100_000))  # never more often


SOCKET_CAPS = {
    "auth": "keys",
    "session_secret": SESSION_SECRET,
    "max_sockets_per_owner": 2,
    "max_anonymous_sockets_per_address": 3,
    "max_sockets_per_process": 6,
}


async def refused_socket(url: str, headers: dict[str, str]) -> tuple[int | None, dict[str, Any]]:
    """Open a socket the server refuses: its close code and the error frame before it."""
    async with websockets.connect(url, additional_headers=headers) as ws:
        frame = await recv(ws)
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
        return ws.close_code, frame


@pytest.mark.parametrize("settings", [SOCKET_CAPS], indirect=True)
async def test_sockets_over_each_cap_are_refused_and_the_others_keep_working(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = str(client.base_url).replace("http://", "ws://") + "/v1/ws"
    alice = bearer((await make_key(settings, "alice"))[1])
    bob = bearer((await make_key(settings, "bob"))[1])
    job_id = (await client.post("/v1/jobs", json={"prompt": "p"}, headers=alice)).json()["id"]

    async def session() -> dict[str, str]:
        async with httpx.AsyncClient(base_url=client.base_url) as browser:
            return {"Cookie": (await browser.get("/")).headers["set-cookie"].split(";")[0]}

    async with contextlib.AsyncExitStack() as held:
        # An SSE stream is a socket too: alice holds one stream and one WebSocket, her cap.
        stream = await held.enter_async_context(
            client.stream("GET", f"/v1/jobs/{job_id}/events", headers=alice)
        )
        assert stream.status_code == 200
        alices = await held.enter_async_context(websockets.connect(url, additional_headers=alice))
        code, frame = await refused_socket(url, alice)
        assert code == 4029 and frame["code"] == "too_many_sockets" and frame["retry_after_s"] >= 1
        over = await client.get(f"/v1/jobs/{job_id}/events", headers=alice)
        assert assert_problem(over, 429)["type"].endswith("too_many_sockets")
        assert int(over.headers["retry-after"]) >= 1

        # Browser sessions from one address share a cap, however many cookies they take.
        first, second = await session(), await session()
        for headers in (first, first, second):
            await held.enter_async_context(websockets.connect(url, additional_headers=headers))
        for headers in (second, await session()):
            code, frame = await refused_socket(url, headers)
            assert code == 4029 and "your address" in frame["message"]

        # The process is full (6 sockets): a newcomer is told to try again later.
        await held.enter_async_context(websockets.connect(url, additional_headers=bob))
        code, frame = await refused_socket(url, bob)
        assert code == 1013 and frame["code"] == "server_busy"
        busy = await client.get(f"/v1/jobs/{job_id}/events", headers=bob)
        assert assert_problem(busy, 503)["type"].endswith("server_busy")
        assert int(busy.headers["retry-after"]) >= 1

        await send(alices, {"type": "ping"})  # the sockets already open are not disturbed
        assert (await recv(alices))["type"] == "pong"
        await alices.close()

        async def bob_gets_in() -> bool:
            async with websockets.connect(url, additional_headers=bob) as ws:
                await send(ws, {"type": "ping"})
                try:
                    return (await recv(ws))["type"] == "pong"
                except websockets.ConnectionClosed:
                    return False  # refused: the closed one is not given back yet

        assert await eventually(bob_gets_in)  # a closed socket's place is given back
