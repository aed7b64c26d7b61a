"""Every setting of a stepcast process, read once from ``STEPCAST_*`` variables.

One frozen object per process, built at start-up by :func:`load` and passed
down; nothing below reads the environment. Units are in the names.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal, TypeVar, overload

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stepcast.errors import ConfigError
from stepcast.redis_keys import DEFAULT_QUEUE

# A model's name is part of its queue's Redis key and of metric labels: kept plain.
MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
PRIORITY_CLASS = r"^[a-z0-9][a-z0-9_-]{0,31}$"
MAX_WEIGHT = 1000.0

# The default home of images, the tiny model and the embedded Postgres and Redis: .data in the
# checkout this code runs from (tests, `make run`); for an installed package, .data in the
# directory the process starts in.
_CHECKOUT = Path(__file__).resolve().parent.parent
DATA_DIR = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()) / ".data"

# A session secret is refused at start-up when it is shorter than this, has
# fewer distinct characters than that (`aaaa…`, `secretsecret…`), or carries a
# template's placeholder: `openssl rand -hex 32` passes all three.
MIN_SECRET_BYTES = 32
MIN_SECRET_DISTINCT_CHARS = 10
PLACEHOLDERS = ("replaceme", "changeme", "placeholder", "yoursecret", "example")


class SharedSettings(BaseSettings):
    """What the server and the worker both read, and the background passes (recovery,
    retention) that run in either. A process loads its own role's class: the variables of
    another role (one config for all) are not read, so neither checked."""

    model_config = SettingsConfigDict(env_prefix="STEPCAST_", frozen=True, extra="forbid")

    database_url: str = "postgresql://stepcast@127.0.0.1:54329/stepcast"
    # A server or worker only checks that the schema migrations it needs are
    # applied (docs/migrations.md), waiting up to schema_wait_s for them.
    schema_wait_s: float = Field(60.0, ge=0)
    redis_url: str = "redis://127.0.0.1:63790/0"
    # The event plane (each job's event log, seq counter, checkpoint and pub/sub channel):
    # on redis_url unless event_redis_url is set. event_redis_cluster: that URL names a node
    # of a Redis Cluster (7+), which holds each job's keys in one slot and fans its events out
    # with sharded pub/sub (docs/scaling.md, "The event plane on Redis Cluster").
    event_redis_url: str | None = None
    event_redis_cluster: bool = False
    # The queues' common prefix: model M's jobs wait in "<queue_name>:M".
    queue_name: str = DEFAULT_QUEUE

    # Object storage: "local" keeps images under storage_dir and serves them at
    # /v1/images/…; "s3" talks to any S3-compatible endpoint and hands out
    # presigned GET URLs.
    storage: Literal["local", "s3"] = "local"
    storage_dir: Path = DATA_DIR / "images"
    s3_bucket: str = "stepcast"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_presign_s: int = Field(3600, ge=1, le=7 * 24 * 3600)

    # A worker: the name of the model it serves (its jobs wait in the queue
    # "<queue_name>:<model_name>"). A server: the model of a job that names none.
    model_name: str = Field("tiny", pattern=MODEL_NAME)
    # A model's limits. A worker announces its own (default_size_px unset: the
    # model's native size, 512 for SD 1.5, 1024 for SDXL); a server holds every
    # model to its own as well, and uses them for its default model until a
    # worker of it has announced itself (default_size_px unset there: 64).
    max_steps: int = Field(150, ge=1)
    min_size_px: int = Field(64, ge=8)
    max_size_px: int = Field(1024, ge=8)
    default_size_px: int | None = Field(None, ge=8)
    default_steps: int = Field(20, ge=1)

    event_stream_max: int = Field(1000, ge=10)
    event_ttl_s: int = Field(24 * 3600, ge=60)
    # A finished job's events leave Redis this long after its terminal one; a client
    # resuming later gets a snapshot from Postgres.
    event_finished_ttl_s: int = Field(600, ge=10)

    # Recovery: jobs of dead workers go back to the queue, at most max_attempts
    # claims in all; pending jobs the queue lost are enqueued again.
    max_attempts: int = Field(3, ge=1)
    recovery_interval_s: float = Field(2.0, gt=0)
    enqueue_grace_s: float = Field(5.0, ge=0)
    # A worker holds a Postgres session (an advisory lock) while it lives and checks
    # it this often; one process at a time looks this often for jobs whose worker's
    # session is gone, and takes them back once it has stayed gone session_confirm_s
    # (a Postgres restart ends every session: the workers open theirs again first).
    session_check_s: float = Field(0.25, gt=0)
    session_confirm_s: float = Field(1.0, ge=0)
    # Retention: images of finished jobs are deleted after this many days
    # (0: kept forever); the job row stays and records when.
    retention_days: float = Field(7.0, ge=0)
    retention_interval_s: float = Field(300.0, gt=0)
    # Rows, in the same pass: finished jobs (their webhook deliveries with them)
    # after job_retention_days, once their images are gone; delivered or failed
    # webhook deliveries after webhook_retention_days (0: kept forever); the
    # webhook secrets of browser sessions' owners with no job left, once their
    # session (session_max_age_s) is over. Each delete statement takes at most
    # retention_batch_rows rows (short locks), a pass at most retention_pass_rows
    # of each kind (a backlog goes over several passes).
    job_retention_days: float = Field(30.0, ge=0)
    webhook_retention_days: float = Field(7.0, ge=0)
    retention_batch_rows: int = Field(1000, ge=1)
    retention_pass_rows: int = Field(20000, ge=1)
    session_max_age_s: int = Field(30 * 24 * 3600, ge=60)

    log_level: str = "INFO"
    # auto: short lines for a person when stderr is a terminal, JSON otherwise.
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        """A blank optional setting (``STEPCAST_S3_ENDPOINT_URL=``, a template's empty line) means not set."""
        if value == "" and info.field_name and cls.model_fields[info.field_name].default is None:
            return None
        return value

    @model_validator(mode="after")
    def _check_event_plane(self) -> SharedSettings:
        if self.event_redis_cluster and self.event_redis_url is None:
            raise ValueError(
                "STEPCAST_EVENT_REDIS_CLUSTER=true needs STEPCAST_EVENT_REDIS_URL (a node of the "
                "cluster): the queue (STEPCAST_REDIS_URL) stays on a plain Redis"
            )
        return self

    @model_validator(mode="after")
    def _check_storage(self) -> SharedSettings:
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("STEPCAST_S3_BUCKET is required when STEPCAST_STORAGE=s3")
        return self

    @model_validator(mode="after")
    def _check_sizes(self) -> SharedSettings:
        for name in ("min_size_px", "max_size_px", "default_size_px"):
            if (getattr(self, name) or 0) % 8:
                raise ValueError(f"STEPCAST_{name.upper()} must be a multiple of 8")
        if not self.min_size_px <= (self.default_size_px or self.min_size_px) <= self.max_size_px:
            raise ValueError(
                "STEPCAST_DEFAULT_SIZE_PX must lie between STEPCAST_MIN_SIZE_PX and STEPCAST_MAX_SIZE_PX"
            )
        if self.min_size_px > self.max_size_px:
            raise ValueError("STEPCAST_MIN_SIZE_PX must not exceed STEPCAST_MAX_SIZE_PX")
        if self.default_steps > self.max_steps:
            raise ValueError("STEPCAST_DEFAULT_STEPS must not exceed STEPCAST_MAX_STEPS")
        return self


class ServerSettings(SharedSettings):
    """The API server's: listening, admission, limits, sockets, auth, webhook delivery, metrics."""

    # Where the server listens (the embedded run prints http://host:port).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    database_pool_max: int = Field(10, ge=1)

    # Limits every job is validated against (with its model's: the shared settings above).
    max_prompt_chars: int = Field(2000, ge=1)
    default_guidance_scale: float = 7.5
    max_images: int = Field(4, ge=1)
    # A model's card (its limits) stays known this long after its last worker went:
    # its jobs are still taken, to wait for a worker (a pool scaled to zero).
    model_keep_days: float = Field(30.0, gt=0)
    # Models a job may name before any worker of theirs has announced itself, and
    # for ever after (a JSON list): the pools that start at zero and wait for their
    # first job. Their limits are this server's until a worker announces its own.
    models: tuple[str, ...] = ()
    # Each server reads the models and their live workers at most this often.
    catalog_cache_s: float = Field(1.0, ge=0)

    # A job still waiting in the queue after this long fails with code
    # "expired" (0: wait forever).
    queue_ttl_s: float = Field(3600.0, ge=0)
    # Backpressure: submits beyond this many pending jobs on the queue, or this
    # many unfinished (pending or processing) jobs of one owner, are answered
    # 429 with Retry-After.
    max_queue_depth: int = Field(1000, ge=1)
    max_jobs_per_owner: int = Field(100, ge=1)
    # Admission by cost (docs/scheduling.md). A job's cost is what it asks of a GPU: its
    # megapixel-steps (width × height × steps × images / 1e6) times its model's measured
    # seconds per megapixel-step (default_megapixel_step_s until one is measured). A submit
    # whose cost would take its queue's pending work past max_queue_cost_s, or its owner's
    # unfinished work past max_cost_per_owner_s (a browser session's: ..._anonymous_owner_s),
    # is answered 429 over_budget, saying which budget and when to retry.
    max_queue_cost_s: float = Field(36000.0, gt=0)
    max_cost_per_owner_s: float = Field(3600.0, gt=0)
    max_cost_per_anonymous_owner_s: float = Field(300.0, gt=0)
    default_megapixel_step_s: float = Field(0.25, gt=0)
    # Fair shares: within a queue, owners take turns, each getting GPU time in proportion to
    # its priority class's weight (a JSON object of class: weight). A key has the class it was
    # made with (`stepcast keys create --class`), else key_priority_class; browser sessions and
    # the single_user owner have session_priority_class.
    priority_classes: dict[str, float] = {"interactive": 10.0, "batch": 1.0}
    key_priority_class: str = "interactive"
    session_priority_class: str = "interactive"
    # REST requests per second per owner (all servers together, counted in
    # Redis); beyond it: 429 rate_limited.
    requests_per_s_per_owner: int = Field(50, ge=1)
    # Anonymous owners (the page's browser sessions, auth "keys") cost nothing
    # to make, so they are also limited per client address: new sessions and
    # their submits a minute (all servers together, counted in Redis), and
    # unfinished jobs per anonymous owner and of all anonymous owners of one
    # address together (Postgres). Key holders keep the limits above.
    sessions_per_min_per_address: int = Field(30, ge=1)
    anonymous_submits_per_min_per_address: int = Field(60, ge=1)
    max_jobs_per_anonymous_owner: int = Field(5, ge=1)
    max_anonymous_jobs_per_address: int = Field(20, ge=1)
    # Open sockets (WebSocket /v1/ws and SSE streams), counted in each server
    # process: in all; per owner and, of anonymous owners, per client address
    # (these two with auth "keys" only).
    max_sockets_per_process: int = Field(10000, ge=1)
    max_sockets_per_owner: int = Field(32, ge=1)
    max_anonymous_sockets_per_address: int = Field(64, ge=1)

    # Real-time delivery (WebSocket and SSE).
    queue_update_s: float = Field(1.0, gt=0)
    # On a Redis Cluster event plane: how often a server reads the cluster's shards (besides
    # at once after losing a node's connection), to follow slots that moved.
    event_topology_check_s: float = Field(10.0, gt=0)
    # A client that reads slower than events come: what waits for it, at most (previews
    # then progress are dropped to stay under; then it is closed with 1013 to resume).
    feed_buffer_max: int = Field(256, ge=8)
    feed_buffer_max_bytes: int = Field(512 * 1024, ge=64 * 1024)
    ws_max_message_bytes: int = Field(64 * 1024, ge=1024)
    ws_messages_per_s: float = Field(20.0, gt=0)
    ws_burst: int = Field(60, ge=1)
    sse_keepalive_s: float = Field(15.0, gt=0)
    # How often a server asks Postgres whether the API keys its open WebSockets
    # and SSE streams were opened with are still active: a revoked key's
    # streams end within about this long.
    key_check_s: float = Field(2.0, gt=0)
    # A server process collects all its garbage this often (server/collector.py): the one
    # pause that grows with its sockets (about 90 ms per 1,000), in exchange for none
    # between. Cyclic garbage among long-lived objects waits this long to be freed.
    gc_sweep_s: float = Field(600.0, gt=0)
    # SIGTERM: sockets are closed at once with 1012 (reconnect elsewhere), then
    # requests still running get this long before the server stops.
    server_shutdown_s: float = Field(10.0, ge=0)
    # Browser origins besides the server's own that may open /v1/ws (a JSON
    # list, e.g. '["https://app.example.com"]'); guards against cross-site
    # WebSocket hijacking.
    allowed_origins: tuple[str, ...] = ()
    # Host names the server answers to (a JSON list; "*.example.com" matches its
    # subdomains, "*" any name): closes DNS rebinding. Unset: loopback names
    # only with auth single_user, any name with keys. /healthz, /readyz and
    # /metrics answer any name (probes and scrapers use a pod's IP).
    allowed_hosts: tuple[str, ...] | None = None
    # Proxies (addresses or networks, "*": any) whose X-Forwarded-For and
    # X-Forwarded-Proto are believed: from them the client (per-address limits)
    # is the nearest untrusted address in X-Forwarded-For, and behind a
    # TLS-terminating one the scheme is https and the session cookie Secure.
    # From any other peer these headers are ignored and the peer is the client.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")

    # Who may do what. "keys": programmatic clients send `Authorization: Bearer
    # <key>` (`stepcast keys create`), the page gets an anonymous session of its
    # own in a signed cookie, and nobody sees anyone else's jobs. "single_user":
    # no credentials, every request is anonymous_owner — for a one-person
    # install on a trusted machine (`make run` on loopback uses it).
    auth: Literal["keys", "single_user"] = "keys"
    anonymous_owner: str = "anonymous"
    # Signs browser session cookies (valid session_max_age_s); every server of a
    # deployment needs the same one. Unset: a random one per process (sessions
    # end on restart). A weak or placeholder one stops the process
    # (MIN_SECRET_BYTES above).
    session_secret: SecretStr | None = None
    # Webhooks (Standard Webhooks): never to private, loopback or link-local
    # addresses unless allowed; retried on network errors, time-outs, 5xx and
    # 429 after each of these delays (+-20% jitter; about a day in all). One
    # deadline bounds a whole attempt (resolve, connect, send, answer); of the
    # answer's body at most max_response_bytes are read; each server sends at
    # most max_concurrent at once, each as its own task.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_max_response_bytes: int = Field(4096, ge=0)
    webhook_max_concurrent: int = Field(32, ge=1)
    webhook_backoff_s: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    webhook_poll_s: float = Field(1.0, gt=0)
    # GET /metrics: with a token, only `Authorization: Bearer <token>` may read
    # it (unset: anyone who reaches the server's port). The job figures in it
    # are read from Postgres at most once per metrics_cache_s per process.
    metrics_token: SecretStr | None = None
    metrics_cache_s: float = Field(1.0, ge=0)

    @field_validator("models")
    @classmethod
    def _plain_model_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not re.fullmatch(MODEL_NAME, name):
                raise ValueError(f"{name!r} is not a model name (a-z, 0-9, '.', '_', '-'; at most 63)")
        return names

    @field_validator("priority_classes")
    @classmethod
    def _plain_classes(cls, classes: dict[str, float]) -> dict[str, float]:
        if not classes:
            raise ValueError("name at least one priority class")
        for name, weight in classes.items():
            if not re.fullmatch(PRIORITY_CLASS, name):
                raise ValueError(f"{name!r} is not a class name (a-z, 0-9, '_', '-'; at most 32)")
            # Tags are about 1.7e12 ms: a double still tells 1 ms / 1000 apart (an owner's order).
            if not 0 < weight <= MAX_WEIGHT:
                raise ValueError(
                    f"the weight of {name!r} must be above 0 and at most {MAX_WEIGHT:g}, not {weight}"
                )
        return classes

    @model_validator(mode="after")
    def _known_classes(self) -> ServerSettings:
        for setting in ("key_priority_class", "session_priority_class"):
            if (name := getattr(self, setting)) not in self.priority_classes:
                known = ", ".join(sorted(self.priority_classes))
                raise ValueError(f"{setting} {name!r} is not one of priority_classes ({known})")
        return self

    def weight_of(self, priority_class: str | None) -> float:
        """A class's weight; a key's class that is no longer configured has the default's."""
        classes = self.priority_classes
        return classes.get(priority_class or self.key_priority_class, classes[self.key_priority_class])

    @field_validator("session_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        folded = "".join(char for char in text.lower() if char.isalnum())
        make = "use `openssl rand -hex 32`"
        if marker := next((word for word in PLACEHOLDERS if word in folded), None):
            raise ValueError(f"holds a placeholder ({marker!r}); {make}")
        if (size := len(text.encode())) < MIN_SECRET_BYTES:
            raise ValueError(f"is {size} bytes, fewer than {MIN_SECRET_BYTES}; {make}")
        if (distinct := len(set(text))) < MIN_SECRET_DISTINCT_CHARS:
            raise ValueError(f"has only {distinct} distinct characters, not random; {make}")
        return value


class WorkerSettings(SharedSettings):
    """A GPU worker's: its model and device, batching, its lease and heartbeat, its metrics."""

    # The model's weights: a local diffusers directory, or a Hugging Face model
    # id (org/name, org/name@revision) found in the Hugging Face cache
    # (HF_HOME / HF_HUB_CACHE; downloaded into it unless HF_HUB_OFFLINE=1). The
    # embedded default is the tiny random-weight pipeline built on demand.
    model_dir: str = str(DATA_DIR / "models" / "tiny")
    # "simulated" is for benchmarks of the control plane only: it sleeps
    # simulated_step_s per step and emits the same events; never the default.
    backend: Literal["diffusers", "simulated"] = "diffusers"
    simulated_step_s: float = Field(0.0, ge=0)
    # "auto": CUDA, else Apple MPS, else the CPU; the dtype that suits the
    # device (float16 on CUDA, float32 elsewhere). Set either to pin it.
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # GPU speed-ups: channels-last memory format for the UNet and VAE, and
    # torch.compile of the UNet (a slow first job, faster steps after it).
    channels_last: bool = False
    torch_compile: bool = False
    # Dynamic batching: compatible waiting jobs (same size, steps, scheduler,
    # guidance) share one pipeline call of up to batch_size images. A worker
    # with fewer waiting waits up to batch_wait_s for more (0: never waits,
    # so batches form only when jobs queue up anyway).
    batch_size: int = Field(4, ge=1, le=64)
    batch_wait_s: float = Field(0.0, ge=0, le=10)
    # Previews: a diffusers AutoencoderTiny directory (TAESD: taesd, taesdxl,
    # taesd3, taef1 for its model's family) decodes them, beside the pipeline
    # on CUDA; unset: the family's linear latent -> RGB projection.
    preview_decoder: Path | None = None

    worker_id: str | None = None
    lease_s: float = Field(30.0, gt=0)
    heartbeat_s: float = Field(1.0, gt=0)
    # Steps that come faster than this go out together, at most one send per
    # interval (each send costs the model CPU); a step after a quiet interval
    # goes at once. 0: every step at once.
    progress_interval_s: float = Field(0.05, ge=0, le=1)
    # A running job's state (latents, scheduler, generators) is kept in Redis this
    # often, so that a retried attempt continues from it, not from step 0 (0: never).
    checkpoint_every_s: float = Field(1.0, ge=0)
    job_timeout_s: float = Field(600.0, gt=0)
    # A submit wakes idle workers at once (Redis pub/sub); without a wake-up
    # (one lost in a reconnect) they look at the queue this often anyway.
    poll_delay_s: float = Field(0.5, gt=0)
    # SIGTERM: a worker stops taking jobs and lets the running one finish for
    # this long; then it stops it at the next step and hands it back to the
    # queue (not counted as a failed attempt).
    shutdown_grace_s: float = Field(30.0, ge=0)
    # How long a worker keeps retrying a Postgres write (a restart, a failover)
    # before leaving the job to its lease and the recovery pass.
    db_retry_s: float = Field(60.0, ge=0)
    # A file the worker touches on every heartbeat from its event loop;
    # `stepcast worker-alive` (a container liveness probe) checks its age.
    worker_alive_file: Path | None = None
    # Prometheus metrics of a worker (0: not served).
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(0, ge=0, le=65535)


class Settings(ServerSettings, WorkerSettings):
    """Every setting: the ``stepcast`` command's, which starts both roles (``run``), migrates
    the schema and talks to a server, plus the few only it reads."""

    # Where the CLI's client commands (generate, jobs, cancel) find a server,
    # and the key they send.
    url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None
    # Worker processes `stepcast run` starts (`--workers` wins; not set and
    # device "cuda": one per GPU).
    workers: int = Field(1, ge=1)
    # `stepcast migrate` (docs/migrations.md) lets a statement wait at most
    # migrate_lock_timeout_s for a table lock (the queries behind it wait no
    # longer), gives way and tries again, for up to migrate_timeout_s.
    migrate_lock_timeout_s: float = Field(2.0, gt=0)
    migrate_timeout_s: float = Field(300.0, gt=0)


AnySettings = TypeVar("AnySettings", bound=SharedSettings)


@overload
def load(**overrides: object) -> Settings: ...
@overload
def load(kind: type[AnySettings], /, **overrides: object) -> AnySettings: ...
def load(kind: type[SharedSettings] = Settings, /, **overrides: object) -> SharedSettings:
    """One role's settings (every setting by default), read from the environment plus explicit
    overrides; fail naming the variable."""
    try:
        return kind(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            name = f"STEPCAST_{loc[0].upper()}" if loc else "configuration"
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def load_or_exit(kind: type[AnySettings]) -> AnySettings:
    """:func:`load` for a process entry point: a bad setting ends it with its name."""
    try:
        return load(kind)
    except ConfigError as exc:
        sys.exit(f"stepcast: {exc}")
