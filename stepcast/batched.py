"""Redis script calls made in the same pass of the event loop share one round trip.

A worker running a batch emits each step's event for every job of the batch at
the same moment, and each event is one script call. One by one, every call
costs a round trip (about 0.15 ms of the caller's CPU in redis-py, and a
wake-up of Redis); here the calls of one loop pass go out in one pipeline.

The first call of a pass leads: it yields to the loop once, and the calls made
meanwhile join it. Alone, it goes as a plain call (EVALSHA, loading the script
if Redis lost it); with company, a task sends the pipeline, so that a caller
cancelled meanwhile never holds back the others, and a call whose script Redis
lost is sent again as a plain call.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Arg = str | int | float | bytes


@dataclass
class _Call:
    script: AsyncScript
    keys: list[str]
    args: list[Arg]
    future: asyncio.Future[Any]

    async def alone(self) -> Any:
        try:
            return await self.script(keys=self.keys, args=self.args)
        except Exception as exc:
            return exc


def _each(exc: Exception) -> Exception:
    """A copy of ``exc`` for one caller: an exception raised in several tasks would pile up
    all their tracebacks."""
    try:
        twin = copy.copy(exc)
    except Exception:
        return exc
    twin.__cause__ = exc.__cause__
    return twin


class BatchedScripts:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._gathering: list[_Call] | None = None  # calls of this loop pass, the first one leading
        self._sending: set[asyncio.Task[None]] = set()

    async def call(self, script: AsyncScript, keys: list[str], args: list[Arg]) -> Any:
        """``script(keys, args)``, sent with the other calls of this loop pass."""
        call = _Call(script, keys, args, asyncio.get_running_loop().create_future())
        if self._gathering is not None:  # another call of this pass leads: go with it
            self._gathering.append(call)
            return await call.future
        self._gathering = [call]
        try:
            await asyncio.sleep(0)  # the calls made in this pass of the loop join
        except asyncio.CancelledError:
            calls, self._gathering = self._gathering, None
            if len(calls) > 1:  # those that joined still go
                self._send_soon(calls[1:])
            raise
        calls, self._gathering = self._gathering, None
        if len(calls) == 1:  # alone: as a plain call, no task, no pipeline
            return await script(keys=keys, args=args)
        self._send_soon(calls)
        return await call.future

    def _send_soon(self, calls: list[_Call]) -> None:
        """In a task of its own: any caller may be cancelled, never the send the others wait for."""
        task = asyncio.create_task(self._send(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            results = await self._pipelined(calls)
        except BaseException:
            for call in calls:
                call.future.cancel()
            raise
        for call, result in zip(calls, results, strict=True):
            if call.future.done():  # its caller gave up
                continue
            if isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    async def _pipelined(self, calls: list[_Call]) -> list[Any]:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
                results: list[Any] = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            return [_each(exc) for _ in calls]
        for index, (call, result) in enumerate(zip(calls, results, strict=True)):
            if isinstance(result, NoScriptError):  # Redis restarted: load the script, call again
                results[index] = await call.alone()
        return results
