"""What a submit may put in a queue: a job's cost, the budgets it must fit, the start it must
make, and the refusals that say which limit and when to come back. docs/scheduling.md.

:class:`Admission` decides before and after the insert (whose one statement applies the limits
and budgets: stepcast.db.jobs); :class:`server.job_service.JobService` calls it.
"""

from __future__ import annotations

import math
from typing import NoReturn

from server.positions import Estimate, EtaEstimator
from stepcast.db import Insertion, Pace
from stepcast.errors import InvalidParams, OverBudget, StartTooLate, TooManyRequests
from stepcast.params import JobParams
from stepcast.settings import ServerSettings


class Admission:
    def __init__(self, settings: ServerSettings, eta: EtaEstimator) -> None:
        self.settings = settings
        self.eta = eta

    def budget_s(self, *, anonymous: bool) -> float:
        """An owner's budget of unfinished work, in GPU-seconds."""
        settings = self.settings
        return settings.max_cost_per_anonymous_owner_s if anonymous else settings.max_cost_per_owner_s

    def cost_ms(self, params: JobParams, pace: Pace) -> int:
        """What the job asks of a GPU: its work at its queue's measured pace (until one is
        measured, ``default_megapixel_step_s``), in ms; at least 1."""
        seconds = pace.seconds(params.megapixel_steps)
        if seconds is None:
            seconds = params.megapixel_steps * self.settings.default_megapixel_step_s
        return max(1, round(seconds * 1000))

    def check_cost(self, cost_ms: int, budget_s: float, *, anonymous: bool) -> None:
        """A job larger than a whole budget is refused as invalid: waiting would not help."""
        owner_budget = "your budget" + (
            " (a browser session's; an API key may have more)" if anonymous else ""
        )
        for what, limit_s in (
            (owner_budget, budget_s),
            ("the queue's budget", self.settings.max_queue_cost_s),
        ):
            if cost_ms > limit_s * 1000:
                # No one field: its size, steps and images together make its cost.
                raise InvalidParams(
                    f"this job would take about {cost_ms / 1000:.1f} GPU-seconds, more than {what} "
                    f"of {limit_s:g}: ask for fewer steps, images or pixels"
                )

    async def check_start(self, share: str, queue_name: str, model: str, within_s: float) -> None:
        """``start_within_s``: refuse, queueing nothing, a job that should start later."""
        start_in_s = await self.eta.would_start_in_s(queue_name, share, model)
        if start_in_s is not None and start_in_s <= within_s:
            return
        if start_in_s is None:
            raise StartTooLate(
                f"no start within {within_s:g} s can be promised: no worker of {model} runs now, "
                "or the pace of its queue is not measured yet; nothing was queued",
                retry_after_s=5,
                extensions={"estimated_start_s": None, "estimated_start_at": None},
            )
        start_at = Estimate(start_in_s, None).start_at()
        raise StartTooLate(
            f"this job should start in about {start_in_s:.1f} s ({start_at}), later than the "
            f"{within_s:g} s asked; nothing was queued",
            retry_after_s=_retry_after(start_in_s - within_s),
            extensions={"estimated_start_s": start_in_s, "estimated_start_at": start_at},
        )

    def refuse(
        self, insertion: Insertion, pace: Pace, cost_ms: int, budget_s: float, *, anonymous: bool
    ) -> NoReturn:
        """Backpressure: refuse work the queue cannot take, saying which limit and when to come
        back: when the work in the way should have drained, at the queue's pace."""
        settings = self.settings
        session = " (a browser session's limit; an API key may have more)" if anonymous else ""
        queue_budget_ms = settings.max_queue_cost_s * 1000
        if (queue_excess_ms := insertion.queue_cost_ms + cost_ms - queue_budget_ms) > 0:
            retry_after_s = _retry_after(queue_excess_ms / 1000 / pace.workers)
            raise OverBudget(
                f"the queue's waiting work is {insertion.queue_cost_ms / 1000:.0f} GPU-seconds, and this "
                f"job's {cost_ms / 1000:.1f} would take it past its budget of {settings.max_queue_cost_s:g}; "
                f"try again in {retry_after_s} s",
                retry_after_s=retry_after_s,
                extensions={"budget": "queue", "budget_s": settings.max_queue_cost_s},
            )
        if (owner_excess_ms := insertion.owner_cost_ms + cost_ms - budget_s * 1000) > 0:
            retry_after_s = _retry_after(owner_excess_ms / 1000)  # an owner's share may be one worker
            raise OverBudget(
                f"your unfinished jobs ask {insertion.owner_cost_ms / 1000:.1f} GPU-seconds, and this "
                f"job's {cost_ms / 1000:.1f} would take them past your budget of {budget_s:g}{session}; "
                f"try again in {retry_after_s} s",
                retry_after_s=retry_after_s,
                extensions={"budget": "owner", "budget_s": budget_s},
            )
        total, mine, theirs = insertion.pending, insertion.unfinished, insertion.address_unfinished
        per_owner = settings.max_jobs_per_anonymous_owner if anonymous else settings.max_jobs_per_owner
        if total >= settings.max_queue_depth:
            excess, what = total - settings.max_queue_depth + 1, f"the queue holds {total} jobs"
        elif mine >= per_owner:
            excess, what = mine - per_owner + 1, f"you have {mine} unfinished jobs{session}"
        else:
            assert theirs is not None
            excess = theirs - settings.max_anonymous_jobs_per_address + 1
            what = f"browser sessions from your address have {theirs} unfinished jobs"
        # Jobs like this one: a measured pace prices them; without one, 5 s each.
        drain_s = excess * cost_ms / 1000 / pace.workers if pace.megapixel_step_s is not None else 5 * excess
        retry_after_s = _retry_after(drain_s)
        raise TooManyRequests(
            f"{what}, the most accepted; try again in {retry_after_s} s", retry_after_s=retry_after_s
        )


def _retry_after(seconds: float) -> int:
    return min(3600, max(1, math.ceil(seconds)))
