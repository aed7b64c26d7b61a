"""arq as stepcast uses it: every fact of arq's Redis layout and every hook into arq's worker
beyond its public surface, in one module, for the one arq version pinned below.

The layout (arq's keys, its job format, how long a job key lives) is what the queue's
scripts here write and arq's own code reads. :class:`ArqWorker` is arq's Worker with the
hooks stepcast's worker needs, under names of ours. :data:`RELIED_ON` holds a hash of the
source of each arq function this module mirrors or leans on: tests/test_arq_bridge.py
fails, naming the function and what to re-check, when an arq upgrade changes one.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Coroutine
from signal import Signals
from typing import Any, Literal

from arq.constants import (
    expires_extra_ms,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import deserialize_job, serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from arq.worker import Worker

from stepcast.round_trips import Arg

ARQ_VERSION = "0.28.0"  # pyproject.toml pins exactly this

# -- the layout: arq's keys beside the queue's sorted set (scored by due time, in ms) -----------


def job_key(job_id: str) -> str:
    """The serialized job; while it (or the result key) lives, an enqueue of the id is refused."""
    return job_key_prefix + job_id


def in_progress_key(job_id: str) -> str:
    """A worker holds the job while this lives; a take skips it."""
    return in_progress_key_prefix + job_id


def result_key(job_id: str) -> str:
    """arq's result (stepcast keeps none); while it lives, an enqueue of the id is refused."""
    return result_key_prefix + job_id


def run_keys(job_id: str) -> tuple[str, ...]:
    """Every key arq may keep for one run of a job (its tries counted in the retry key)."""
    return job_key(job_id), result_key(job_id), in_progress_key(job_id), retry_key_prefix + job_id


def health_check_key(queue_name: str) -> str:
    """Where arq's worker writes its health line (its default: one per queue)."""
    return queue_name + health_check_key_suffix


JOB_EXPIRY_MS = expires_extra_ms  # how long a job key lives: arq's default for a job due now
now_ms = timestamp_ms  # a queue score: milliseconds since the epoch, as arq compares them
score_of = to_unix_ms  # a datetime's queue score


# -- the job format: arq's job dict, as JSON rather than arq's default pickle ---------------------


def serialize(data: dict[str, Any]) -> bytes:
    """arq's job or result as JSON (its ``job_serializer``): data only."""
    return json.dumps(data, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    """arq's ``job_deserializer``: a JSON object, or an error. A pickle (arq's default
    format, which runs code as it loads) is not JSON, so it is refused, never loaded."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("an arq job is a JSON object")
    return value


def encode_job(function: str, args: tuple[Any, ...], kwargs: dict[str, Any], enqueue_time_ms: int) -> bytes:
    """A job as arq's enqueue_job writes it (no try count)."""
    return serialize_job(function, args, kwargs, None, enqueue_time_ms, serializer=serialize)


def job_kwargs(raw: bytes) -> dict[str, Any]:
    """The keyword arguments of a serialized job; raises arq's DeserializationError."""
    kwargs: dict[str, Any] = deserialize_job(raw, deserializer=deserialize).kwargs
    return kwargs


# -- the queue's scripts: arq's layout, one round trip each ----------------------------------------

# arq's enqueue_job, plus the wake-up. KEYS: job key, result key, queue.
# ARGV: serialized job, expiry ms, score, job id, wake channel.
ENQUEUE_SCRIPT = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"""


def enqueue_call(
    queue_name: str, job_id: str, job: bytes, score: float, wake_channel: str
) -> tuple[list[str], list[Arg]]:
    keys = [job_key(job_id), result_key(job_id), queue_name]
    return keys, [job, JOB_EXPIRY_MS, score, job_id, wake_channel]


# arq's start_jobs for many jobs: the first jobs in score order that no worker holds, now held.
# Unlike arq's, it takes a job whatever its score: stepcast's scores are places in the queue's
# turns (fair tags, docs/scheduling.md), not due times, and stepcast defers no job. KEYS: queue.
# ARGV: hold (ms), how many, in-progress key prefix, most entries to look at, job key prefix.
# Returns {id, score, job, id, score, job, ...}, where job is the serialized job (false if it is
# gone). The in-progress and job keys are not in KEYS: like arq, this needs one Redis, not a
# cluster.
TAKE_SCRIPT = """
local want, limit = tonumber(ARGV[2]), tonumber(ARGV[4])
local taken, seen = {}, 0
while seen < limit do
    local page = redis.call('ZRANGE', KEYS[1], seen, seen + 99, 'WITHSCORES')
    if #page == 0 then break end
    for i = 1, #page, 2 do
        local key = ARGV[3] .. page[i]
        if redis.call('EXISTS', key) == 0 then
            redis.call('PSETEX', key, ARGV[1], '1')
            taken[#taken + 1] = page[i]
            taken[#taken + 1] = page[i + 1]
            taken[#taken + 1] = redis.call('GET', ARGV[5] .. page[i])
            if #taken == 3 * want then return taken end
        end
    end
    seen = seen + #page / 2
end
return taken
"""


def take_call(queue_name: str, *, hold_ms: int, count: int, scan_limit: int) -> tuple[list[str], list[Arg]]:
    return [queue_name], [hold_ms, count, in_progress_key_prefix, scan_limit, job_key_prefix]


# arq's finish_job with no result kept. KEYS: queue, job key, in-progress key. ARGV: job id.
DONE_SCRIPT = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""


def done_call(queue_name: str, job_id: str) -> tuple[list[str], list[Arg]]:
    return [queue_name, job_key(job_id), in_progress_key(job_id)], [job_id]


# -- the worker: arq's Worker, its private hooks under names of ours ----------------------------

# The arq methods ArqWorker overrides, with the parameters it expects of them.
OVERRIDDEN: dict[str, tuple[str, ...]] = {
    "_add_signal_handler": ("self", "signum", "handler"),
    "_poll_iteration": ("self",),
    "_release_sem_dec_counter_on_complete": ("self",),
    "handle_sig": ("self", "signum"),
    "handle_sig_wait_for_completion": ("self", "signum"),
    "close": ("self",),
}
# The attributes of arq's Worker that ArqWorker reads or writes.
ATTRIBUTES = (
    "sem",
    "job_counter",
    "max_jobs",
    "tasks",
    "allow_pick_jobs",
    "functions",
    "ctx",
    "loop",
    "jobs_complete",
    "jobs_failed",
    "jobs_retried",
    "health_check_key",
    "on_shutdown",
    "_pool",
    "_handle_signals",
)

Outcome = Literal["complete", "failed", "retried"]


class ArqWorker(Worker):
    """arq's Worker, its poll and shutdown hooks open to a subclass under names of ours.

    arq's poll loop calls :meth:`poll_once` back to back; a subclass takes its jobs there
    and starts each with :meth:`start_job_task`, which counts it as arq's own take does
    (arq's semaphore, job counter and task table: arq's shutdown waits for and cancels
    these tasks)."""

    # -- to override --

    def install_signal_handler(self, signum: Signals, handler: Callable[[Signals], None]) -> None:
        """How arq's ``__init__`` installs its SIGINT and SIGTERM handlers (before a subclass's
        ``__init__`` goes on): by default, as arq does, on the event loop."""
        Worker._add_signal_handler(self, signum, handler)

    async def poll_once(self) -> None:
        """One pass of arq's poll loop, in place of arq's own (which reads a page of the queue
        and spends round trips on each job in it)."""
        raise NotImplementedError

    def job_task_ended(self) -> None:
        """A job task has ended; its place in :attr:`jobs_in_hand` is free again."""

    def stopping(self) -> None:
        """A stop was asked (a signal, or :meth:`close` with signals not handled); arq then stops
        taking jobs and cancels the job tasks, at once or after its ``job_completion_wait``."""

    async def before_pool_closes(self) -> None:
        """In :meth:`close`, once every job task has ended: before ``on_shutdown`` and the pool."""

    # -- to use --

    @property
    def taking_jobs(self) -> bool:
        """False once a stop was asked (arq's ``allow_pick_jobs``)."""
        return self.allow_pick_jobs

    @property
    def jobs_in_hand(self) -> int:
        """Job tasks started and not yet ended (arq's job counter; it bounds it by ``max_jobs``)."""
        return self.job_counter

    def held_job_ids(self) -> list[str]:
        """The jobs of the job tasks arq still lists (ended ones until :meth:`end_poll`)."""
        return list(self.tasks)

    async def start_job_task(self, job_id: str, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``job`` in a task counted as arq counts the jobs it starts."""
        try:
            await self.sem.acquire()  # free while jobs_in_hand < max_jobs
        except BaseException:
            job.close()
            raise
        self.job_counter += 1
        task = self.loop.create_task(job)
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task
        return task

    async def end_poll(self) -> None:
        """The end of arq's poll: ended job tasks forgotten (an error in one ends the worker, as
        in arq), the health check written when due."""
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()
        await self.heart_beat()

    async def call_function(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The function registered as ``name``, called as arq calls it (its context first),
        within its time-out."""
        function = self.functions[name]
        async with asyncio.timeout(function.timeout_s):
            return await function.coroutine(self.ctx, *args, **kwargs)

    def count(self, outcome: Outcome) -> None:
        """One more job complete, failed or retried, in arq's counts (its logs and health line)."""
        if outcome == "complete":
            self.jobs_complete += 1
        elif outcome == "failed":
            self.jobs_failed += 1
        else:
            self.jobs_retried += 1

    # -- arq's private hooks, routed to the above --

    def _add_signal_handler(self, signum: Signals, handler: Callable[[Signals], None]) -> None:
        self.install_signal_handler(signum, handler)

    async def _poll_iteration(self) -> None:
        await self.poll_once()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self.job_task_ended()

    def handle_sig(self, signum: Signals) -> None:
        self.stopping()
        super().handle_sig(signum)

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self.stopping()
        super().handle_sig_wait_for_completion(signum)

    async def close(self) -> None:
        """arq's close, except that a job task cancelled before its function started does not
        end the close before ``on_shutdown`` and the pool: arq's gathers the tasks its
        handle_sig has just cancelled, and stops at the first CancelledError."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.before_pool_closes()
        await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None


# -- what an arq upgrade must not change unseen ------------------------------------------------------

# The source of each arq object this module mirrors or leans on: its hash (sha256 of
# inspect.getsource, first 16 hex digits) in ARQ_VERSION, and what to re-check if it changes.
RELIED_ON: dict[str, tuple[str, str]] = {
    "arq.constants": (
        "ee9c72492437fc8f",
        "the key prefixes and JOB_EXPIRY_MS (the scripts and run_keys name arq's keys)",
    ),
    "arq.worker.Worker.__init__": (
        "edfb0cd7e05e77cf",
        "ATTRIBUTES; the signal handlers it installs through _add_signal_handler",
    ),
    "arq.worker.Worker.run": ("e683c7f402930145", "close still ends every run (the worker's main)"),
    "arq.worker.Worker.main": (
        "45ca1591c9717466",
        "it opens the pool, sets ctx['redis'], runs on_startup, then calls _poll_iteration in a loop",
    ),
    "arq.worker.Worker._poll_iteration": (
        "f8d39d823a0a59f2",
        "poll_once replaces it: end_poll must still do what its end does",
    ),
    "arq.worker.Worker.start_jobs": (
        "b45797cfa40bed7f",
        "start_job_task counts a job as it does; TAKE_SCRIPT holds a job as it does",
    ),
    "arq.worker.Worker._release_sem_dec_counter_on_complete": (
        "0ed101482e942c33",
        "start_job_task's done callback; job_task_ended runs after it",
    ),
    "arq.worker.Worker.run_job": (
        "589a19059ff84ee7",
        "the worker's run_taken replaces it: count() and call_function as it counts and calls",
    ),
    "arq.worker.Worker.finish_job": (
        "903f09c92830d3fd",
        "DONE_SCRIPT removes what it removes (no result kept)",
    ),
    "arq.worker.Worker.finish_failed_job": (
        "3e16087f318a7acf",
        "DONE_SCRIPT removes what it removes (no result kept)",
    ),
    "arq.worker.Worker.heart_beat": ("2e9959bea66dc551", "end_poll calls it"),
    "arq.worker.Worker.record_health": (
        "108f4b8686c9402d",
        "it writes health_check_key, which close deletes",
    ),
    "arq.worker.Worker._add_signal_handler": (
        "7efddf3cba88b9d7",
        "install_signal_handler's default calls it",
    ),
    "arq.worker.Worker.handle_sig": (
        "985ff7ba01aa8f04",
        "it cancels the job tasks and the main task; stopping runs before it",
    ),
    "arq.worker.Worker.handle_sig_wait_for_completion": (
        "8f161d86834cc74e",
        "it clears allow_pick_jobs (taking_jobs) and waits; stopping runs before it",
    ),
    "arq.worker.Worker._wait_for_tasks_to_complete": (
        "c186389a00b11500",
        "the shutdown grace: it waits for tasks (which end_poll empties), then cancels them",
    ),
    "arq.worker.Worker._sleep_until_tasks_complete": (
        "0acab214e9c111cb",
        "the shutdown grace ends once tasks is empty",
    ),
    "arq.worker.Worker.close": ("5bcc9cb356680829", "ArqWorker.close replaces it"),
    "arq.connections.ArqRedis.enqueue_job": (
        "7da8706a747c1171",
        "ENQUEUE_SCRIPT writes what it writes and refuses what it refuses",
    ),
    "arq.jobs.serialize_job": ("1fc854cc50e16e5c", "encode_job and the job dict's fields"),
    "arq.jobs.deserialize_job": ("b7b9f8342da03106", "job_kwargs"),
    "arq.utils.poll": ("d8cc8542a1ab2bc3", "with poll_delay 0 main calls _poll_iteration back to back"),
    "arq.utils.timestamp_ms": ("fb714827206ab4ab", "now_ms: queue scores in ms, as arq compares them"),
    "arq.utils.to_unix_ms": ("306796b7c17c82c3", "score_of"),
}
