"""Dynamic batching: compatible waiting jobs share one pipeline call.

Compatible means the same size, steps, scheduler and guidance. The oldest waiting job goes first
and takes compatible jobs from behind it, up to ``batch_size`` images. Each job keeps its own
seeds, events, result and failure: a batch call that raises is run again job by job
(docs/design.md, "Inside the worker").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from gpu_worker.pipeline import Generation, Pipeline, Request
from stepcast.params import JobParams

logger = logging.getLogger(__name__)

BatchKey = tuple[int, int, int, str | None, float]
T = TypeVar("T")


def batch_key(params: JobParams) -> BatchKey:
    return (params.width, params.height, params.steps, params.scheduler, params.guidance_scale)


def take_batch(waiting: list[T], params_of: Callable[[T], JobParams | None], batch_size: int) -> list[T]:
    """Remove and return the next batch: the oldest job and the compatible ones behind it.

    ``batch_size`` counts images; the oldest job always goes, even when it
    alone asks for more images than that. Jobs whose params are not known yet
    (None) wait for a later batch.
    """
    if not waiting:
        return []
    head = waiting[0]
    first = params_of(head)
    if first is None:
        raise ValueError("the oldest job's params must be known to form a batch")
    key = batch_key(first)
    batch, images = [head], first.num_images
    for item in waiting[1:]:
        params = params_of(item)
        if params is not None and batch_key(params) == key and images + params.num_images <= batch_size:
            batch.append(item)
            images += params.num_images
    for item in batch:
        waiting.remove(item)
    return batch


def compatible_images(waiting: Sequence[T], params_of: Callable[[T], JobParams | None]) -> int:
    """How many images the oldest waiting job could be batched with, itself included."""
    first = params_of(waiting[0]) if waiting else None
    if first is None:
        return 0
    key = batch_key(first)
    known = [p for p in map(params_of, waiting) if p is not None]
    return sum(p.num_images for p in known if batch_key(p) == key)


def generate(pipeline: Pipeline, requests: Sequence[Request]) -> list[Generation | Exception]:
    """Run a batch on the pipeline thread; each job's images, or the error that was its own."""
    try:
        return list(pipeline.generate(requests))
    except Exception as exc:
        if len(requests) == 1:
            return [exc]
        logger.warning("batch of %d failed (%s); running each job alone", len(requests), exc)
    outcomes: list[Generation | Exception] = []
    for request in requests:
        try:
            outcomes.extend(pipeline.generate([request]))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
