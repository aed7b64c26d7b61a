"""Job events (DESIGN §3): encoding and the per-job log in Redis.

Each event is one flat JSON object: ``type``, ``job_id``, ``seq``, then the
type's own fields. One Lua script gives an event its ``seq``, appends it to the
job's capped stream under the stream id ``<seq>-0`` and publishes it, all
atomically, so the stream order, the pub/sub order and the seq order are the
same order. The per-job counter never goes below the ``floor`` the caller read
from Postgres, so seqs keep increasing even after Redis lost its data.

Terminal events take two steps: :meth:`EventLog.reserve` a seq, record the
terminal state with it in Postgres, then :meth:`EventLog.emit` with that seq.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from stepcast.batched import Arg, BatchedScripts, Pipelined

logger = logging.getLogger(__name__)

TERMINAL_TYPES = frozenset({"completed", "failed", "canceled"})
CANCEL_CHANNEL = "stepcast:cancel"

_EMIT = """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
local top = 0
if last then top = tonumber(string.match(last[1], '^(%d+)')) end
local cur = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[2]), top)
if ARGV[7] == '1' then
    -- A position update only while the job waits: after its first 'queued'
    -- (the submit's own, never before it) or a 'requeued', and with no seq
    -- reserved for an event on its way (a cancel); never after 'started'. And
    -- only if it says something new.
    if not last or cur > top then return 0 end
    local newest = last[2][2]
    local waiting = string.match(newest, '^{"type":"(%a+)",')
    if waiting ~= 'queued' and waiting ~= 'requeued' then return 0 end
    if string.match(newest, '"seq":%d+(.*)$') == ARGV[4] then return 0 end
end
local seq = tonumber(ARGV[1])
if seq == 0 then
    seq = cur + 1
elseif seq <= top then
    return -1
end
redis.call('SET', KEYS[1], math.max(cur, seq), 'EX', ARGV[6])
local data = ARGV[3] .. seq .. ARGV[4]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], seq .. '-0', 'e', data)
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', KEYS[3], data)
redis.call('PUBLISH', KEYS[4], data)
return seq
"""

_RESERVE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then cur = floor end
cur = cur + 1
redis.call('SET', KEYS[1], cur, 'EX', ARGV[2])
return cur
"""


def job_channel(job_id: str) -> str:
    return f"stepcast:job:{job_id}"


def owner_channel(owner: str) -> str:
    return f"stepcast:owner:{owner}"


def _keys(job_id: str) -> tuple[str, str]:
    # The hash tag keeps a job's keys in one slot on Redis Cluster.
    return f"stepcast:{{{job_id}}}:seq", f"stepcast:{{{job_id}}}:events"


def encode(event_type: str, job_id: str, fields: dict[str, Any]) -> tuple[str, str]:
    """The JSON text around the seq: ``head + str(seq) + tail`` is the event."""
    head = f'{{"type":{json.dumps(event_type)},"job_id":{json.dumps(job_id)},"seq":'
    body = json.dumps(fields, separators=(",", ":"))
    tail = "," + body[1:] if fields else "}"
    return head, tail


class EventLog:
    def __init__(self, redis: Redis, *, stream_max: int, ttl_s: int) -> None:
        self.redis = redis
        self.stream_max = stream_max
        self.ttl_s = ttl_s
        self._emit = redis.register_script(_EMIT)
        self._reserve = redis.register_script(_RESERVE)
        self._scripts = BatchedScripts(redis)  # a batch's events of one step: one round trip
        self._reads = Pipelined(redis)  # the jobs a server starts watching together: one round trip

    async def emit(
        self,
        job_id: str,
        owner: str,
        event_type: str,
        fields: dict[str, Any] | None = None,
        *,
        floor: int = 0,
        seq: int = 0,
        position_update: bool = False,
    ) -> int:
        """Append and publish one event; returns its seq (``seq`` given, or the next one).

        A ``position_update`` is appended (else 0 is returned) only while the job
        waits: its newest event is ``queued`` or ``requeued`` (so never before the
        submit's own ``queued``, never after ``started``), no seq is reserved, and
        the event differs from the newest. A given ``seq`` the stream is already
        past is not appended (-1 is returned): streams only grow in seq order.
        """
        keys, args = self._emit_call(job_id, owner, event_type, fields, floor, seq, position_update)
        return int(await self._scripts.call(self._emit, keys, args))

    def emit_in(
        self,
        pipe: Pipeline,
        job_id: str,
        owner: str,
        event_type: str,
        fields: dict[str, Any] | None = None,
        *,
        floor: int = 0,
    ) -> None:
        """:meth:`emit` queued on ``pipe``, to share its round trip (the seq comes back from
        ``pipe.execute()``). The script's text goes along: Redis may have lost its copy."""
        keys, args = self._emit_call(job_id, owner, event_type, fields, floor, 0, False)
        pipe.execute_command("EVAL", _EMIT, len(keys), *keys, *args)

    def _emit_call(
        self,
        job_id: str,
        owner: str,
        event_type: str,
        fields: dict[str, Any] | None,
        floor: int,
        seq: int,
        position_update: bool,
    ) -> tuple[list[str], list[Arg]]:
        head, tail = encode(event_type, job_id, fields or {})
        counter, stream = _keys(job_id)
        keys = [counter, stream, job_channel(job_id), owner_channel(owner)]
        return keys, [seq, floor, head, tail, self.stream_max, self.ttl_s, int(position_update)]

    async def reserve(self, job_id: str, *, floor: int) -> int:
        counter, _ = _keys(job_id)
        return int(await self._scripts.call(self._reserve, [counter], [floor, self.ttl_s]))

    async def read(self, job_id: str, *, after_seq: int = 0) -> list[dict[str, Any]]:
        """Events still held in the job's stream with seq > after_seq, in order."""
        _, stream = _keys(job_id)
        (entries,) = await self._reads(lambda pipe: pipe.xrange(stream, min=f"{after_seq + 1}-0", max="+"))
        return [json.loads(fields[b"e"]) for _, fields in entries]
