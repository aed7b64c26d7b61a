"""Models named by Hugging Face id, found through the standard Hugging Face cache.

``STEPCAST_MODEL_DIR`` is a local diffusers directory (any path that exists) or an id, ``org/name``
or ``org/name@revision``, fetched by ``huggingface_hub.snapshot_download`` (which reads
``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``). Provenance records ``org/name@<commit>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stepcast.errors import ConfigError

# The Hub's repo names: letters, digits, '-', '_', '.'; one '/' between owner and name.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class ModelId:
    repo_id: str
    revision: str | None = None  # None: the default branch

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class Snapshot:
    """A model id resolved to a folder of the cache and the commit it holds."""

    model: ModelId
    path: Path
    commit: str

    @property
    def revision(self) -> str:
        """What the job's provenance records (``model_revision``): the id and the commit."""
        return f"{self.model.repo_id}@{self.commit}"


def parse(spec: str) -> Path | ModelId:
    """A local directory, or a model id when ``spec`` is shaped like one and is no existing path."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    repo_id, at, revision = spec.partition("@")
    if _REPO_ID.fullmatch(repo_id) and (revision or not at):
        return ModelId(repo_id, revision or None)
    return path


def fetch(model: ModelId, *, cache_dir: Path | None = None, offline: bool | None = None) -> Snapshot:
    """The model's snapshot in the cache, downloaded first when missing and the Hub may be used.

    ``cache_dir`` and ``offline`` default to what huggingface_hub read from
    ``HF_HUB_CACHE`` (or ``HF_HOME``) and ``HF_HUB_OFFLINE``.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    try:
        folder = snapshot_download(
            model.repo_id, revision=model.revision, cache_dir=cache, local_files_only=offline
        )
    except LocalEntryNotFoundError as exc:
        pinned = f" --revision {model.revision}" if model.revision else ""
        fetch_it = f"`hf download {model.repo_id}{pinned}`"
        if offline:
            why = "and HF_HUB_OFFLINE=1 forbids downloading it"
            remedy = f"fetch it with {fetch_it} (same HF_HOME / HF_HUB_CACHE), or set HF_HUB_OFFLINE=0"
        else:
            why = f"and it could not be downloaded ({exc})"
            remedy = f"fetch it with {fetch_it} where the Hub is reachable, into this cache"
        raise ConfigError(
            f"model {model} is not in the Hugging Face cache at {cache} {why}: {remedy}. "
            f"(STEPCAST_MODEL_DIR={model} names no local directory, so it was taken for a model id.)"
        ) from exc
    except HfHubHTTPError as exc:  # no such repo or revision, gated, unauthorised
        raise ConfigError(f"model {model}: {exc}") from exc
    path = Path(folder)
    return Snapshot(model, path, commit=path.name)  # the cache names each snapshot by its commit
