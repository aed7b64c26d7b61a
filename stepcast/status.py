"""A job's status, and the one terminal set every module and the client share."""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


# A job in one of these never changes again; each is also the type of the job's last event.
TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELED})
