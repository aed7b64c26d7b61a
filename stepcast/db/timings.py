"""The SET items that stamp a job's times as it reaches a terminal state.

Every terminal write of a job that ran (the worker's, :mod:`stepcast.db.runs`;
recovery's, :mod:`stepcast.db.recovery`) ends its lease and records when the
run began and ended, and its queue and run seconds, the same way.
"""

from __future__ import annotations


def finish_times(started: str = "started_at") -> str:
    """The SET items of a terminal write; ``started``: when the run began."""
    return f"""
    started_at = {started},
    finished_at = now(),
    lease_expires_at = NULL,
    queue_s = extract(epoch FROM {started} - created_at),
    run_s = extract(epoch FROM now() - {started})
"""


FINISH_TIMES = finish_times()
