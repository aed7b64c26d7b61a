"""Calls made in the same pass of the event loop share one round trip.

A :class:`Gatherer` sends the calls of one loop pass together (a single call goes as a plain
call); :class:`GatheredScripts` gathers Redis script calls into a pipeline, and
:class:`GatheredCommands` any Redis commands, each caller's in its own order. Why and how:
docs/design.md, "Inside the worker".
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Arg = str | int | float | bytes
RedisClient = Redis | RedisCluster  # a plain Redis, or a Redis Cluster (the event plane's)
AnyPipeline = Pipeline | ClusterPipeline
I = TypeVar("I")  # noqa: E741 (one call's input)
R = TypeVar("R")


def _each(exc: BaseException) -> BaseException:
    """A copy of ``exc`` for one caller: an exception raised in several tasks would pile up
    all their tracebacks."""
    try:
        twin = copy.copy(exc)
    except Exception:
        return exc
    twin.__cause__ = exc.__cause__
    return twin


def _first_error_or(replies: list[Any]) -> list[Any] | BaseException:
    """One caller's replies, or the first of them that is an error."""
    return next((reply for reply in replies if isinstance(reply, BaseException)), replies)


class Gatherer(Generic[I, R]):
    """``await gatherer(item)``: ``many(items)`` with the calls made in the same loop pass (it
    returns a result or an exception per item, in order); alone, ``one(item)`` if given, else
    ``many([item])``."""

    def __init__(
        self,
        many: Callable[[list[I]], Awaitable[list[R | BaseException]]],
        *,
        one: Callable[[I], Awaitable[R]] | None = None,
    ) -> None:
        self.many = many
        self.one = one
        self._gathering: list[tuple[I, asyncio.Future[R]]] | None = None  # this pass, leader first
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if self._gathering is not None:  # another call of this pass leads: go with it
            self._gathering.append((item, future))
            return await future
        self._gathering = [(item, future)]
        try:
            await asyncio.sleep(0)  # the calls made in this pass of the loop join
        except asyncio.CancelledError:
            calls, self._gathering = self._gathering, None
            if len(calls) > 1:  # those that joined still go
                self._send_soon(calls[1:])
            raise
        calls, self._gathering = self._gathering, None
        if len(calls) == 1:  # alone: a plain call, no task
            return await self._alone(item)
        self._send_soon(calls)
        return await future

    async def _alone(self, item: I) -> R:
        if self.one is not None:
            return await self.one(item)
        (result,) = await self.many([item])
        if isinstance(result, BaseException):
            raise result
        return result

    def _send_soon(self, calls: list[tuple[I, asyncio.Future[R]]]) -> None:
        """In a task of its own: any caller may be cancelled, never the send the others wait for."""
        task = asyncio.create_task(self._send(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            results = await self.many([item for item, _ in calls])
        except asyncio.CancelledError:
            for _, future in calls:
                future.cancel()
            raise
        except Exception as exc:
            results = [_each(exc) for _ in calls]
        for (_, future), result in zip(calls, results, strict=True):
            if future.done():  # its caller gave up
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


@dataclass
class _Calls:
    """Calls of one script, to be made in this order."""

    script: AsyncScript
    each: list[tuple[list[str], list[Arg]]]


def script(redis: RedisClient, text: str) -> AsyncScript:
    """``redis.register_script(text)``, for a cluster client too (redis-py types it for a plain
    one; its cluster client routes the script by its keys)."""
    return AsyncScript(redis, text)  # type: ignore[arg-type]


class GatheredScripts:
    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._calls: Gatherer[_Calls, list[Any]] = Gatherer(self._pipelined, one=self._alone)

    async def call(self, script: AsyncScript, keys: list[str], args: list[Arg]) -> Any:
        """``script(keys, args)``, sent with the other calls of this loop pass."""
        (result,) = await self.call_all(script, [(keys, args)])
        return result

    async def call_all(self, script: AsyncScript, calls: list[tuple[list[str], list[Arg]]]) -> list[Any]:
        """``script(keys, args)`` for each of ``calls``, run by Redis in this order and sent with
        the other calls of this loop pass; their results. The first error is raised."""
        return await self._calls(_Calls(script, calls))

    async def _alone(self, calls: _Calls) -> list[Any]:
        if len(calls.each) == 1:  # a plain call: redis-py loads the script if Redis lost it
            keys, args = calls.each[0]
            return [await calls.script(keys=keys, args=args)]
        (results,) = await self._pipelined([calls])
        if isinstance(results, BaseException):
            raise results
        return results

    async def _pipelined(self, groups: list[_Calls]) -> list[list[Any] | BaseException]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in groups:
                for keys, args in group.each:
                    pipe.execute_command("EVALSHA", group.script.sha, len(keys), *keys, *args)
            replies = iter(await pipe.execute(raise_on_error=False))
        results: list[list[Any] | BaseException] = []
        for group in groups:
            mine = []
            for keys, args in group.each:
                reply = next(replies)
                if isinstance(reply, NoScriptError):  # Redis restarted: load the script, call again
                    try:
                        reply = await group.script(keys=keys, args=args)
                    except Exception as exc:
                        reply = exc
                mine.append(reply)
            results.append(_first_error_or(mine))
        return results


class GatheredCommands:
    """``await pipelined(fill)``: the commands ``fill`` queues on a pipeline, sent in one
    round trip with those of the other calls of this loop pass; their replies, in order.
    The first reply that is an error is raised."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._calls: Gatherer[Callable[[AnyPipeline], object], list[Any]] = Gatherer(self._many)

    async def __call__(self, fill: Callable[[AnyPipeline], object]) -> list[Any]:
        return await self._calls(fill)

    async def _many(self, fills: list[Callable[[AnyPipeline], object]]) -> list[list[Any] | BaseException]:
        async with self.redis.pipeline(transaction=False) as pipe:
            ends = []
            for fill in fills:
                fill(pipe)
                ends.append(len(pipe))
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        results: list[list[Any] | BaseException] = []
        start = 0
        for end in ends:
            mine = replies[start:end]
            start = end
            results.append(_first_error_or(mine))
        return results
