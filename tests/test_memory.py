"""A server process holds thousands of sockets: each open WebSocket keeps little, a
closed one leaves no cyclic garbage behind, and the process's garbage collection
never rescans the long-lived objects between its rare sweeps (server/collector.py,
server/protocols.py; bench.fanout measures the figures at 10,000 sockets)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest
import websockets
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from server.collector import Collector
from tests.conftest import Stack
from tests.test_realtime import is_terminal, recv, send, ws_url


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_websocket_keeps_no_handshake_and_leaves_no_cyclic_garbage(
    stack: Stack, no_automatic_collection: None
) -> None:
    job_id = (await stack.submit(steps=2))["id"]
    await stack.wait(job_id)
    for _ in range(5):
        async with websockets.connect(ws_url(stack)) as ws:
            await send(ws, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
            while not is_terminal(await recv(ws)):
                pass
            open_sockets = [o for o in gc.get_objects() if issubclass(type(o), WebSocketsSansIOProtocol)]
            assert open_sockets and all(s.request is None and s.response is None for s in open_sockets)
        await asyncio.sleep(0.05)  # the server sees the close
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        left = [o for o in gc.garbage if issubclass(type(o), (HttpToolsProtocol, WebSocketsSansIOProtocol))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


class Cycle:
    def __init__(self) -> None:
        self.me = self


def cycle() -> weakref.ref[Cycle]:
    """A reference cycle nothing else refers to: only a collection frees it."""
    return weakref.ref(Cycle())


def test_a_tick_frees_young_garbage_and_freezes_what_lives_then_only_a_sweep_scans_it() -> None:
    collector = Collector(sweep_every_s=600)
    try:
        young_garbage = cycle()
        alive = Cycle()
        collector.tick()
        assert young_garbage() is None
        assert gc.get_freeze_count() > 0 and not any(o is alive for o in gc.get_objects())
        # It dies once frozen: the automatic collections no longer see it, a sweep does.
        dead_while_frozen = weakref.ref(alive)
        del alive
        gc.collect()
        assert dead_while_frozen() is not None
        assert collector.sweep() >= 1 and dead_while_frozen() is None
    finally:
        gc.unfreeze()


async def test_the_collector_freezes_on_its_clock_and_sweeps_on_its_own() -> None:
    collector = Collector(freeze_every_s=0.01, sweep_every_s=0.2)
    running = asyncio.create_task(collector.run())
    try:
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() > 0
        garbage = cycle()
        dies_frozen = Cycle()
        await asyncio.sleep(0.05)  # a tick: what lives is frozen
        assert garbage() is None
        dead = weakref.ref(dies_frozen)
        del dies_frozen
        await asyncio.sleep(0.3)  # a sweep
        assert dead() is None
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert gc.get_freeze_count() == 0 and collector._after_collection not in gc.callbacks
