"""A job's newest checkpoint, kept in Redis beside its events: what a retried attempt resumes from.

The data is the worker's business (:mod:`gpu_worker.checkpoints`); here it is bytes with the
attempt and step that made it and the model revision it is valid for. A save is fenced like a
progress event: refused once a newer attempt is heard of or the job's log has ended, and the
terminal event's script deletes the checkpoint. It lives ``ttl_s`` after its last save.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from stepcast.events import STATE
from stepcast.redis_keys import checkpoint_key, event_keys
from stepcast.round_trips import Arg, GatheredCommands, GatheredScripts, RedisClient, script

logger = logging.getLogger(__name__)

# KEYS: counter, stream, checkpoint. ARGV: attempt, ttl, step, revision, data.
_SAVE = (
    STATE
    + """
if attempt < att then return -3 end
if tonumber(redis.call('HGET', KEYS[3], 'attempt') or '0') > attempt then return -3 end
redis.call('HSET', KEYS[3], 'attempt', attempt, 'step', ARGV[3], 'revision', ARGV[4], 'data', ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 1
"""
)


@dataclass(frozen=True)
class Checkpoint:
    step: int  # the steps it holds done
    revision: str  # the model revision it is valid for
    data: bytes


class Checkpoints:
    def __init__(self, redis: RedisClient, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._save = script(redis, _SAVE)
        self._scripts = GatheredScripts(redis)
        self._reads = GatheredCommands(redis)

    async def save(self, job_id: str, *, attempt: int, step: int, revision: str, data: bytes) -> bool:
        """Keep this as the job's newest checkpoint; False if ``attempt`` is no longer the job's."""
        counter, stream = event_keys(job_id)
        args: list[Arg] = [attempt, self.ttl_s, step, revision, data]
        answer = await self._scripts.call(self._save, [counter, stream, checkpoint_key(job_id)], args)
        return int(answer) == 1

    async def load(self, job_id: str) -> Checkpoint | None:
        """The job's newest checkpoint, or None. Loads of the same loop pass share a round trip."""
        (fields,) = await self._reads(lambda pipe: pipe.hgetall(checkpoint_key(job_id)))
        return _parsed(fields)

    async def step_of(self, job_id: str) -> int:
        """The step the job's newest checkpoint holds; 0 if it has none or Redis cannot say."""
        try:
            (step,) = await self._reads(lambda pipe: pipe.hget(checkpoint_key(job_id), "step"))
        except RedisError as exc:
            logger.warning("could not read the checkpoint (%s): resuming from the start", exc)
            return 0
        return int(step) if step is not None else 0


def _parsed(fields: dict[bytes, bytes]) -> Checkpoint | None:
    try:
        return Checkpoint(
            step=int(fields[b"step"]),
            revision=fields[b"revision"].decode(),
            data=fields[b"data"],
        )
    except (KeyError, ValueError):  # none, or not whole
        return None
