"""Every Redis key, stream and pub/sub channel stepcast names, in one place.

Ours begin with ``stepcast:``; a job's event keys carry its id in a hash tag (``{id}``) so
that they share one Redis Cluster slot. The queue is a sorted set named by
STEPCAST_QUEUE_NAME; the keys arq keeps beside it (each job's job, in-progress, result and
retry keys, and a worker's health check) are arq's layout, named in
:mod:`stepcast.arq_bridge`.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- the queue -----------------------------------------------------------------------------

# Sorted set of queued job ids by due time (arq's queue): servers and recovery enqueue, workers take.
DEFAULT_QUEUE = "stepcast:queue"

# Pub/sub: a server publishes the id of a job to cancel; every worker listens.
CANCEL_CHANNEL = "stepcast:cancel"


def wake_channel(queue_name: str) -> str:
    """Pub/sub: an enqueue publishes the job id here; the queue's idle workers take it at once."""
    return f"stepcast:wake:{queue_name}"


# -- a job's events --------------------------------------------------------------------------


def event_keys(job_id: str) -> tuple[str, str]:
    """A job's event log: its seq counter (a hash) and its stream of events. The event scripts
    (stepcast.events) write both, for workers, servers and recovery; feeds read the stream."""
    return f"stepcast:{{{job_id}}}:seqs", f"stepcast:{{{job_id}}}:events"


def checkpoint_key(job_id: str) -> str:
    """Hash: the job's newest checkpoint (attempt, step, model revision, data). A running
    worker writes it (stepcast.checkpoints, fenced like its events); the worker that runs the
    next attempt and the recovery pass read it; the terminal event's script deletes it."""
    return f"stepcast:{{{job_id}}}:checkpoint"


@dataclass(frozen=True)
class Channels:
    """The pub/sub channels of jobs' events. On a plain Redis they are PUBLISHed and SUBSCRIBEd;
    ``sharded`` (a Redis Cluster), SPUBLISHed and SSUBSCRIBEd, a job's in its job's slot (its
    event script publishes to it) and an owner's in a slot of its own."""

    sharded: bool = False

    @property
    def publish(self) -> str:
        """The command that publishes on these channels."""
        return "SPUBLISH" if self.sharded else "PUBLISH"

    def job(self, job_id: str) -> str:
        """Each event of the job; a server's hub subscribes while a feed of its watches the job."""
        return f"stepcast:{{{job_id}}}:job" if self.sharded else f"stepcast:job:{job_id}"

    def owner(self, owner: str) -> str:
        """Each event of the owner's jobs; a server's hub subscribes while a feed of its
        watches all of the owner's jobs."""
        return f"stepcast:{{owner:{owner}}}" if self.sharded else f"stepcast:owner:{owner}"


PLAIN = Channels()


# A pattern (PSUBSCRIBE): every job's events; benchmarks and tests listen to them all.
ALL_JOB_CHANNELS = PLAIN.job("*")

# Pub/sub: a server's hub always subscribes on a plain Redis, so its connection is never left
# with no channel; nobody publishes.
HUB_CHANNEL = "stepcast:hub"


# -- limits ------------------------------------------------------------------------------------


def address_rate(what: str, address: str) -> str:
    """Sorted set: the times of the attempts at ``what`` (e.g. "new sessions") let in from an
    address in the last minute; server.limits counts and reads them, all servers together."""
    return f"stepcast:rate:{what.replace(' ', '_')}:{address}"


def owner_rate(owner: str, window: int) -> str:
    """Counter: an owner's requests in the second ``window`` (Unix time); server.auth counts
    and reads it, all servers together."""
    return f"stepcast:rate:{owner}:{window}"
