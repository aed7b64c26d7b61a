"""The job record and its wire shape (docs/design.md, "Wire shapes")."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stepcast.params import JobParams, Preview
from stepcast.status import Status
from stepcast.storage.local import URL_PREFIX


@dataclass(frozen=True)
class Job:
    id: uuid.UUID
    owner: str
    params: JobParams
    preview: Preview | None
    status: Status
    attempt: int
    queue: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress_step: int
    progress_total: int
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    queue_s: float | None
    run_s: float | None
    worker: str | None
    cancel_requested: bool
    last_seq: int
    model_name: str
    model_revision: str | None
    stepcast_version: str
    webhook: dict[str, Any] | None
    handoffs: int
    queue_expires_at: datetime | None
    idempotency_key: str | None
    request_hash: str | None
    images_expired_at: datetime | None
    pipeline_s: float | None
    batch_size: int | None
    seq_ceiling: int
    claim_token: uuid.UUID | None
    worker_session: int | None
    resumed_from_step: int | None
    fair_tag: float | None  # its place in its queue's turns (None: submitted before 0007)
    work: float | None  # megapixel-steps
    cost_ms: int | None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Job:
        fields = {name: record[name] for name in cls.__dataclass_fields__}
        fields["status"] = Status(fields["status"])
        fields["params"] = JobParams.from_json(fields["params"])
        fields["preview"] = Preview.from_json(fields["preview"])
        return cls(**fields)

    def timings(self) -> dict[str, Any] | None:
        """Where the time went: waiting, the whole run, and the model call (shared by its batch)."""
        if self.queue_s is None and self.run_s is None:
            return None
        return {
            "queue_s": self.queue_s,
            "run_s": self.run_s,
            "pipeline_s": self.pipeline_s,
            "batch_size": self.batch_size,
        }

    @property
    def image_keys(self) -> list[str]:
        return [image["key"] for image in (self.result or {}).get("images", [])]


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with millisecond precision and a ``Z``."""
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


ImageUrl = Callable[[str], Awaitable[str]]


async def to_wire(
    job: Job, image_url: ImageUrl, *, queue_position: int | None = None, estimated_start_at: str | None = None
) -> dict[str, Any]:
    """The job as REST returns it, inside ``snapshot`` and in history.

    Image URLs are made per request (presigned URLs expire), from the stored keys.
    Once retention deleted the images, their URLs point at the server, which
    answers 410 Gone whatever the storage backend.
    """
    result = None
    if job.result is not None:
        images = []
        for image in job.result["images"]:
            rendered = {k: v for k, v in image.items() if k != "key"}
            url = URL_PREFIX + image["key"] if job.images_expired_at else await image_url(image["key"])
            images.append({"url": url, **rendered})
        result = {"images": images}
    error = None
    if job.error_code is not None:
        error = {"code": job.error_code, "message": job.error_message or ""}
    return {
        "id": str(job.id),
        "status": job.status.value,
        "attempt": job.attempt,
        "owner": job.owner,
        "params": job.params.to_json(),  # in their declared order (jsonb forgets key order)
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "queue_position": queue_position if job.status is Status.PENDING else None,
        # While pending: when it should start (null: not known, or no worker runs its model).
        "estimated_start_at": estimated_start_at if job.status is Status.PENDING else None,
        "created_at": timestamp(job.created_at),
        "started_at": timestamp(job.started_at),
        "finished_at": timestamp(job.finished_at),
        "result": result,
        "error": error,
        "timings": job.timings(),
        "last_seq": job.last_seq,
        "resumed_from_step": job.resumed_from_step,
        "images_expired_at": timestamp(job.images_expired_at),
        "preview": job.preview.to_json() if job.preview else None,
        "webhook": job.webhook,
        "cancel_requested": job.cancel_requested,
        "provenance": {
            "model": job.model_name,
            "model_revision": job.model_revision,
            "stepcast_version": job.stepcast_version,
        },
    }
