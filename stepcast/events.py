"""Job events: their typed constructors, their encoding, and the per-job log in Redis.

Each event is one flat JSON object: ``type``, ``job_id``, ``seq``, then its own fields. One Lua
script gives an event its seq (within a block Postgres reserved), appends it to the job's capped
stream and publishes it, atomically; it refuses an older attempt's events and anything after the
terminal one. Callers go through :mod:`stepcast.lifecycle`. The rules: docs/events.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from stepcast.redis_keys import PLAIN, Channels, checkpoint_key, event_keys
from stepcast.round_trips import AnyPipeline, Arg, GatheredCommands, GatheredScripts, RedisClient, script
from stepcast.status import TERMINAL

logger = logging.getLogger(__name__)

TERMINAL_TYPES = frozenset(status.value for status in TERMINAL)

# What the scripts answer besides a seq.
UNCHANGED = 0  # a position update with nothing new to say, or the job no longer waits
BEHIND = -1  # a reserved seq the stream is already past
NEED_BLOCK = -2  # no counter (Redis lost it) or its block is used up: offer a fresh block
FENCED = -3  # a newer attempt exists, or the log has ended

# Shared head of the scripts (here and stepcast.checkpoints): KEYS[1] counter hash, KEYS[2]
# stream. Sets cur/ceil (nil when there is no counter), top (the stream's newest seq),
# newest (its text).
STATE = """
local state = redis.call('HMGET', KEYS[1], 'cur', 'ceil', 'att', 'rid')
local cur, ceil, att = tonumber(state[1]), tonumber(state[2]), tonumber(state[3] or '0')
local attempt = tonumber(ARGV[1])
-- A counter is trusted only in the history that wrote it. A replica promoted in a failover, a
-- restart from an AOF or a restored snapshot starts a new replication id, and may have lost
-- the newest seqs (replication and fsync lag): such a counter takes a fresh block. (One
-- written before counters named their history is taken as this one's; a Redis whose scripts
-- have no INFO, such as the model checker's fake, is one history.)
local info_ok, info = pcall(redis.call, 'INFO', 'replication')
local rid = info_ok and string.match(info, 'master_replid:(%w+)') or '-'
if state[4] and state[4] ~= rid then cur = nil end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
local top, newest = 0, nil
if last then
    top = tonumber(string.match(last[1], '^(%d+)'))
    newest = last[2][2]
    local kind = string.match(newest, '^{"type":"(%a+)",')
    if kind == 'completed' or kind == 'failed' or kind == 'canceled' then return -3 end
end
-- The stream is ahead of the counter: someone else counted (an older stepcast during a
-- rolling upgrade) or the counter came back older. Its block cannot be trusted: a fresh one.
if cur ~= nil and cur < top then cur = nil end
local function next_seq(lo, hi)
    if cur == nil or cur >= ceil then
        if hi == 0 or lo <= top or (cur ~= nil and lo <= cur) then return nil end
        cur, ceil = lo - 1, hi
    end
    cur = cur + 1
    return cur
end
local function keep(seq, heard)
    if cur == nil or seq > cur then cur = seq end
    if ceil == nil or ceil < cur then ceil = cur end
    if heard then att = math.max(att, attempt) end
    redis.call('HSET', KEYS[1], 'cur', cur, 'ceil', ceil, 'att', att, 'rid', rid)
    redis.call('EXPIRE', KEYS[1], ARGV[2])
end
"""

# KEYS: counter, stream, checkpoint, then the channels to publish to (the job's; on a plain
# Redis the owner's too). ARGV: attempt, ttl, seq (0 = the next), head, tail, stream max,
# position update (1/0), block lo, block hi (0 = none), the publish command.
_EMIT = (
    STATE
    + """
local seq = tonumber(ARGV[3])
if ARGV[7] == '1' then
    -- A position update only while the job waits (its newest event is 'queued' or
    -- 'requeued'), with no seq reserved for an event on its way (a cancel), and only
    -- if it says something new.
    if cur == nil or newest == nil or cur > top then return 0 end
    local waiting = string.match(newest, '^{"type":"(%a+)",')
    if waiting ~= 'queued' and waiting ~= 'requeued' then return 0 end
    if string.match(newest, '"seq":%d+(.*)$') == ARGV[5] then return 0 end
end
if seq == 0 then
    -- An event that records nothing in Postgres: refused from an attempt older than
    -- one heard of. (A reserved seq is a terminal event's: its fenced write decided.)
    if attempt < att then return -3 end
    seq = next_seq(tonumber(ARGV[8]), tonumber(ARGV[9]))
    if seq == nil then return -2 end
elseif seq <= top then
    return -1
end
keep(seq, true)
local data = ARGV[4] .. seq .. ARGV[5]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], seq .. '-0', 'e', data)
redis.call('EXPIRE', KEYS[2], ARGV[2])
for channel = 4, #KEYS do
    redis.call(ARGV[10], KEYS[channel], data)
end
local kind = string.match(ARGV[4], '^{"type":"(%a+)",')
if kind == 'completed' or kind == 'failed' or kind == 'canceled' then
    redis.call('DEL', KEYS[3])  -- nothing resumes from it any more
end
return seq
"""
)

# KEYS: counter, stream. ARGV: attempt, ttl, block lo, block hi (0 = none).
_RESERVE = (
    STATE
    + """
local seq = next_seq(tonumber(ARGV[3]), tonumber(ARGV[4]))
if seq == nil then return -2 end
keep(seq, false)  -- a reservation fences no one: its write may fail
return seq
"""
)


# -- the events -----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event's own fields; ``type`` names it on the wire."""

    type: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies, and a progress event is made every step.
        values = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: value for name, value in values if value is not None}


@dataclass(frozen=True)
class Queued(Event):
    type: ClassVar[str] = "queued"
    position: int
    eta_s: float | None
    reason: str | None = None  # "no_worker": no worker of its model runs now (eta_s null)
    estimated_start_at: str | None = None  # when it should start (null while eta_s is)

    def fields(self) -> dict[str, Any]:
        # eta_s and estimated_start_at null until known
        waiting = {
            "position": self.position,
            "eta_s": self.eta_s,
            "estimated_start_at": self.estimated_start_at,
        }
        return waiting if self.reason is None else {**waiting, "reason": self.reason}


@dataclass(frozen=True)
class Started(Event):
    type: ClassVar[str] = "started"
    attempt: int
    worker: str
    resumed_from_step: int | None = None  # a retried attempt's: where it continues (0: the start)
    checkpoint_lost: bool | None = None  # True: it was to resume, but its checkpoint was gone


@dataclass(frozen=True)
class Progress(Event):
    type: ClassVar[str] = "progress"
    step: int
    total: int
    eta_s: float
    preview: str | None = None  # a data: URL on the steps that carry one


@dataclass(frozen=True)
class Requeued(Event):
    type: ClassVar[str] = "requeued"
    attempt: int  # the next one
    reason: str  # worker_lost, lease_expired, worker_shutdown
    resumed_from_step: int = 0  # the newest checkpoint's step: where the next attempt continues


@dataclass(frozen=True)
class Completed(Event):
    type: ClassVar[str] = "completed"
    images: list[dict[str, Any]]
    timings: dict[str, Any] | None

    def fields(self) -> dict[str, Any]:
        return {"images": self.images, "timings": self.timings}


@dataclass(frozen=True)
class Failed(Event):
    type: ClassVar[str] = "failed"
    code: str
    message: str

    def fields(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Canceled(Event):
    type: ClassVar[str] = "canceled"


Terminal = Completed | Failed | Canceled


# -- the log in Redis ---------------------------------------------------------------


def encode(event_type: str, job_id: str, fields: dict[str, Any]) -> tuple[str, str]:
    """The JSON text around the seq: ``head + str(seq) + tail`` is the event."""
    head = f'{{"type":{json.dumps(event_type)},"job_id":{json.dumps(job_id)},"seq":'
    body = json.dumps(fields, separators=(",", ":"))
    tail = "," + body[1:] if fields else "}"
    return head, tail


@dataclass(frozen=True)
class Block:
    """Seqs ``lo..hi`` that Postgres reserved for one job, to offer its Redis counter."""

    lo: int
    hi: int

    @classmethod
    def ending_at(cls, hi: int, size: int) -> Block:
        return cls(hi - size + 1, hi)


NO_BLOCK = Block(0, 0)


@dataclass(frozen=True)
class Stream:
    """What a job's stream holds after a seq, and the newest seq it holds at all (0: none)."""

    events: list[dict[str, Any]]
    top: int


class EventLog:
    def __init__(
        self,
        redis: RedisClient,
        *,
        stream_max: int,
        ttl_s: int,
        finished_ttl_s: int | None = None,
        channels: Channels = PLAIN,
    ) -> None:
        """A job's stream and counter live ``ttl_s`` after its latest event, and only
        ``finished_ttl_s`` after its terminal one: a client resuming later gets a snapshot,
        as after Redis lost them. ``redis``: the event plane (stepcast.event_plane), whose
        ``channels`` the events are published on."""
        self.redis = redis
        self.channels = channels
        self.stream_max = stream_max
        self.ttl_s = ttl_s
        self.finished_ttl_s = ttl_s if finished_ttl_s is None else min(finished_ttl_s, ttl_s)
        self._emit = script(redis, _EMIT)
        self._reserve = script(redis, _RESERVE)
        self._scripts = GatheredScripts(redis)  # a batch's events of one step: one round trip
        self._reads = GatheredCommands(redis)  # the jobs a server starts watching together: one round trip
        self._publishes = GatheredCommands(redis)  # on a cluster: the owners' channels, in their own slots

    async def emit(
        self,
        job_id: str,
        owner: str,
        event: Event,
        *,
        attempt: int,
        seq: int = 0,
        block: Block = NO_BLOCK,
        position_update: bool = False,
    ) -> int:
        """Append and publish one event of ``attempt``; its seq (``seq`` given, or the next
        one), or :data:`UNCHANGED`, :data:`BEHIND`, :data:`NEED_BLOCK` or :data:`FENCED`.

        ``block`` is used only if the counter needs one. A ``position_update`` is appended
        only while the job waits and it says something new.
        """
        (answer,) = await self.emit_all(
            job_id, owner, [event], attempt=attempt, seq=seq, block=block, position_update=position_update
        )
        return answer

    async def emit_all(
        self,
        job_id: str,
        owner: str,
        events: Sequence[Event],
        *,
        attempt: int,
        seq: int = 0,
        block: Block = NO_BLOCK,
        position_update: bool = False,
    ) -> list[int]:
        """:meth:`emit` for each of ``events``, in this order and one round trip; what each
        got. (A reserved ``seq`` is one event's.)"""
        if not events:
            return []
        texts = [encode(event.type, job_id, event.fields()) for event in events]
        calls = [
            self._emit_call(job_id, owner, event.type, text, attempt, seq, block, position_update)
            for event, text in zip(events, texts, strict=True)
        ]
        answers = [int(answer) for answer in await self._scripts.call_all(self._emit, calls)]
        if self.channels.sharded:
            published = [
                f"{head}{seq}{tail}" for (head, tail), seq in zip(texts, answers, strict=True) if seq > 0
            ]
            await self._publish_to_owner(owner, published)
        return answers

    async def _publish_to_owner(self, owner: str, texts: list[str]) -> None:
        """On a cluster a script reaches only its job's slot: the owner's channel, in a slot
        of its own, hears each published event from here, after the job's channel. At most
        once, like all pub/sub: a lost one is a gap its watchers fill from the stream (or the
        re-sync after their own connection to that shard came back)."""
        if not texts:
            return
        channel, publish = self.channels.owner(owner), self.channels.publish

        def commands(pipe: AnyPipeline) -> None:
            for text in texts:
                pipe.execute_command(publish, channel, text)

        try:
            await self._publishes(commands)
        except RedisError:
            logger.warning("an owner's channel missed %d events", len(texts), extra={"owner": owner})

    def shares(self, redis: RedisClient) -> bool:
        """Is ``redis`` (the queue's) the event plane's own client, so that :meth:`emit_in` may
        join its round trips?"""
        return self.redis is redis

    def emit_in(
        self, pipe: Pipeline, job_id: str, owner: str, event: Event, *, attempt: int, block: Block
    ) -> None:
        """:meth:`emit` queued on ``pipe`` (of the same Redis), to share its round trip (the
        answer comes back from ``pipe.execute()``). The script's text goes along: Redis may
        have lost its copy."""
        text = encode(event.type, job_id, event.fields())
        keys, args = self._emit_call(job_id, owner, event.type, text, attempt, 0, block, False)
        pipe.execute_command("EVAL", _EMIT, len(keys), *keys, *args)

    def _emit_call(
        self,
        job_id: str,
        owner: str,
        event_type: str,
        text: tuple[str, str],
        attempt: int,
        seq: int,
        block: Block,
        position_update: bool,
    ) -> tuple[list[str], list[Arg]]:
        head, tail = text
        counter, stream = event_keys(job_id)
        keys = [counter, stream, checkpoint_key(job_id), self.channels.job(job_id)]
        if not self.channels.sharded:  # one Redis: the owner's channel hears it in the same script
            keys.append(self.channels.owner(owner))
        ttl_s = self.finished_ttl_s if event_type in TERMINAL_TYPES else self.ttl_s
        args: list[Arg] = [attempt, ttl_s, seq, head, tail, self.stream_max, int(position_update)]
        return keys, [*args, block.lo, block.hi, self.channels.publish]

    async def reserve(self, job_id: str, *, attempt: int, block: Block = NO_BLOCK) -> int:
        """The next seq, for an event recorded in Postgres (fenced) before it is emitted; or
        :data:`NEED_BLOCK`, or :data:`FENCED` once the log has ended. It fences no attempt:
        the write it is for may fail."""
        counter, stream = event_keys(job_id)
        args: list[Arg] = [attempt, self.ttl_s, block.lo, block.hi]
        return int(await self._scripts.call(self._reserve, [counter, stream], args))

    async def read(self, job_id: str, *, after_seq: int = 0) -> Stream:
        """The events still held in the job's stream with seq > after_seq, in order."""
        _, stream = event_keys(job_id)

        def commands(pipe: AnyPipeline) -> None:
            pipe.xrange(stream, min=f"{after_seq + 1}-0", max="+")
            pipe.xrevrange(stream, max="+", min="-", count=1)

        entries, newest = await self._reads(commands)
        top = int(newest[0][0].split(b"-")[0]) if newest else 0
        return Stream([json.loads(fields[b"e"]) for _, fields in entries], top)
