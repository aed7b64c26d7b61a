"""The models a deployment serves, and what a job for each may ask for.

A worker announces its model's :class:`ModelCard` (the schema's ``models`` and ``workers``
tables, :mod:`stepcast.db.models`); a server validates a job against the card's
:class:`ModelLimits`, capped by its own settings, and queues it on the model's own queue
(:func:`queue_of`), so positions, paces and batches are per model. The server's default model
has limits before any worker announced it: the server's settings. docs/models.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from stepcast.settings import ServerSettings

# Scheduler names on the wire -> the diffusers class a worker builds; each runs exactly ``steps``
# steps. A worker announces those its model takes.
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Model families, as their latents differ (channels, scale, packing): each has its own preview.
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "other")
# The default size of the server's default model while no worker of it has announced one.
FALLBACK_SIZE_PX = 64


def queue_of(prefix: str, model: str) -> str:
    """The Redis queue (arq's sorted set) of one model's jobs: ``STEPCAST_QUEUE_NAME:<model>``."""
    return f"{prefix}:{model}"


@dataclass(frozen=True)
class Bounds:
    """What a job for a model may ask for: a scheduler among these, a size in pixels (multiples
    of 8) and steps, and their defaults."""

    schedulers: tuple[str, ...]
    min_size_px: int
    max_size_px: int
    default_size_px: int
    max_steps: int
    default_steps: int


@dataclass(frozen=True)
class ModelCard(Bounds):
    """What a worker serves, as it announces it (one per worker; the model's newest in the
    catalog): its bounds, and ``previews``, how its previews are made: "latent" (a linear
    projection of the latents), "taesd" (a tiny decoder), or None."""

    name: str
    revision: str
    family: str
    device: str
    dtype: str
    batch_size: int
    previews: str | None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "schedulers": list(self.schedulers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        """A stored card; one written by a newer version may have more fields (ignored)."""
        values = {f.name: data[f.name] for f in fields(cls)}
        return cls(**{**values, "schedulers": tuple(values["schedulers"])})


@dataclass(frozen=True)
class ModelLimits(Bounds):
    """What a job for one model may ask for here: its card's bounds within the server's."""

    name: str
    max_images: int
    problem: str | None = None  # why no job for it is taken here (its sizes and the server's do not meet)

    @classmethod
    def of(cls, card: ModelCard | None, settings: ServerSettings, name: str) -> ModelLimits:
        """``card``'s limits within the server's (which alone hold while no card is known)."""
        low, high = settings.min_size_px, settings.max_size_px
        max_steps, default_steps = settings.max_steps, settings.default_steps
        default_size, schedulers = settings.default_size_px or FALLBACK_SIZE_PX, tuple(SCHEDULERS)
        problem = None
        if card is not None:
            if card.min_size_px > high or card.max_size_px < low:
                problem = (
                    f"model {name} makes {card.min_size_px}-{card.max_size_px} px images, and this server "
                    f"takes {low}-{high} px: ask its operator"
                )
            low, high = (
                max(low, card.min_size_px),
                max(min(high, card.max_size_px), max(low, card.min_size_px)),
            )
            max_steps = min(max_steps, card.max_steps)
            default_steps, default_size = card.default_steps, card.default_size_px
            schedulers = tuple(s for s in card.schedulers if s in SCHEDULERS)
        return cls(
            name=name,
            schedulers=schedulers,
            min_size_px=low,
            max_size_px=high,
            default_size_px=min(max(default_size, low), high),
            max_steps=max_steps,
            default_steps=min(default_steps, max_steps),
            max_images=settings.max_images,
            problem=problem,
        )


@dataclass(frozen=True)
class Catalog:
    """The models a job may name, at one moment: each one's limits, and the default."""

    default: str
    limits: dict[str, ModelLimits]

    @classmethod
    def of(cls, cards: dict[str, ModelCard], settings: ServerSettings) -> Catalog:
        """The models with a card, the server's default and those it is told of (STEPCAST_MODELS)."""
        names = sorted({*cards, settings.model_name, *settings.models})
        return cls(
            settings.model_name, {name: ModelLimits.of(cards.get(name), settings, name) for name in names}
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.limits)
