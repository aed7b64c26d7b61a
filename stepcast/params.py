"""Job parameters: what a client may ask for, checked against the server's limits.

Validation collects every problem in one pass, names each field, and rejects
any field it does not know, so a typo (``step`` for ``steps``) is an error
rather than a silently ignored default.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from stepcast import netguard
from stepcast.errors import FieldError, InvalidParams
from stepcast.models import Catalog, ModelLimits
from stepcast.settings import ServerSettings

MAX_SEED = 2**53 - 1  # the largest integer every JSON client represents exactly
MAX_GUIDANCE = 50.0
PREVIEW_MAX_PX = 256
MAX_IDEMPOTENCY_KEY_CHARS = 255
WEBHOOK_EVENTS = ("started", "completed", "failed", "canceled")
DEFAULT_WEBHOOK_EVENTS = ("completed", "failed", "canceled")
MAX_URL_CHARS = 2048
MAX_SEQ = 2**63 - 1  # seqs are Postgres bigints; Redis stream ids hold no more
MAX_FIELD_ERRORS = 20  # a body of a thousand bad strings is answered with the first few


@dataclass(frozen=True)
class JobParams:
    prompt: str
    negative_prompt: str | None
    model: str
    steps: int
    width: int
    height: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobParams:
        """Parse a stored form (a row's jsonb, a queue ticket). Optional fields a row written by an
        older version lacks are None; a missing required field raises TypeError."""
        values: dict[str, Any] = {
            name: data.get(name) for name in PARAM_FIELDS if name in data or name in _OPTIONAL
        }
        return cls(**values)

    @property
    def megapixel_steps(self) -> float:
        """The work it asks (width × height × steps × images, in millions): what its cost and
        the queue's pace are measured in (docs/scheduling.md)."""
        return self.width * self.height * self.steps * self.num_images / 1e6

    def image_seeds(self) -> list[int]:
        """One seed per image, so an image never depends on its batch-mates."""
        return [self.seed + i for i in range(self.num_images)]


@dataclass(frozen=True)
class Preview:
    every: int
    max_px: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Preview | None:
        return cls(every=int(data["every"]), max_px=int(data["max_px"])) if data else None


@dataclass(frozen=True)
class Webhook:
    url: str
    events: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events)}


@dataclass(frozen=True)
class Submission:
    params: JobParams
    preview: Preview | None = None
    webhook: Webhook | None = None
    # Queue it only if it should start within this many seconds (else 429 start_too_late).
    start_within_s: float | None = field(default=None, compare=False)
    # What the client asked for, defaults filled in but a random seed left out:
    # a repeat with the same idempotency key must ask for the same thing.
    fingerprint: str = field(default="", compare=False)


PARAM_FIELDS = tuple(f.name for f in fields(JobParams))
# A submit's fields besides the params (on REST, beside them in the body).
SUBMISSION_FIELDS = frozenset({"preview", "webhook", "start_within_s"})
MAX_START_WITHIN_S = 86_400.0
_OPTIONAL = frozenset({"negative_prompt", "scheduler"})


class _Checker:
    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix
        self.errors: list[FieldError] = []

    def fail(self, name: str, message: str) -> None:
        self.errors.append(FieldError(self.prefix + name, message))

    def label(self, name: str) -> str:
        return self.prefix + name

    def text(self, name: str, *, max_chars: int, required: bool) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                self.fail(name, f"{self.label(name)} is required")
            return None
        if not isinstance(value, str):
            self.fail(name, f"{self.label(name)} must be a string")
        elif required and not value.strip():
            self.fail(name, f"{self.label(name)} must not be empty")
        elif len(value) > max_chars:
            self.fail(name, f"{self.label(name)} must be at most {max_chars} characters")
        else:
            return value
        return None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"{self.label(name)} must be an integer")
        elif not low <= value <= high:
            self.fail(name, f"{self.label(name)} must be between {low} and {high}")
        else:
            return value
        return default

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(name, f"{self.label(name)} must be a number")
        elif not low <= value <= high:
            self.fail(name, f"{self.label(name)} must be between {low:g} and {high:g}")
        else:
            return float(value)
        return default

    def size(self, name: str, limits: ModelLimits) -> int:
        value = self.integer(name, limits.default_size_px, limits.min_size_px, limits.max_size_px)
        if value % 8:
            self.fail(name, f"{self.label(name)} must be a multiple of 8")
        return value

    def choice(self, name: str, options: Iterable[str]) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or value not in options:
            self.fail(name, f"{self.label(name)} must be one of: {', '.join(options)}")
            return None
        return str(value)

    def unknown(self, known: set[str]) -> None:
        for name in sorted(set(self.data) - known):
            self.fail(name, f"unknown field {self.label(name)!r}")


def parse_params(
    data: dict[str, Any], settings: ServerSettings, catalog: Catalog, *, prefix: str = ""
) -> JobParams:
    """Validate client-supplied params against the limits of the model they name (the
    catalog's default if none); raise InvalidParams naming every bad field."""
    check = _Checker(data, prefix)
    check.unknown(set(PARAM_FIELDS))
    prompt = check.text("prompt", max_chars=settings.max_prompt_chars, required=True)
    negative = check.text("negative_prompt", max_chars=settings.max_prompt_chars, required=False)
    model = check.choice("model", catalog.names) or catalog.default
    limits = catalog.limits[model]
    if limits.problem is not None:
        raise InvalidParams.one(f"{prefix}model", limits.problem)
    steps = check.integer("steps", limits.default_steps, 1, limits.max_steps)
    width = check.size("width", limits)
    height = check.size("height", limits)
    guidance = check.number("guidance_scale", settings.default_guidance_scale, 0.0, MAX_GUIDANCE)
    seed = check.integer("seed", -1, 0, MAX_SEED)
    num_images = check.integer("num_images", 1, 1, limits.max_images)
    if limits.schedulers or data.get("scheduler") is None:
        scheduler = check.choice("scheduler", limits.schedulers)
    else:
        check.fail("scheduler", f"model {model} runs its own scheduler: leave {check.label('scheduler')} out")
        scheduler = None
    if check.errors or prompt is None:
        raise InvalidParams.from_errors(check.errors)
    return JobParams(
        prompt=prompt,
        negative_prompt=negative,
        model=model,
        steps=steps,
        width=width,
        height=height,
        guidance_scale=guidance,
        seed=seed if seed >= 0 else secrets.randbelow(2**32),
        num_images=num_images,
        scheduler=scheduler,
    )


def parse_preview(data: Any, settings: ServerSettings) -> Preview | None:
    if data is None or data is False:
        return None
    if data is True:
        data = {}
    if not isinstance(data, dict):
        raise InvalidParams.one("preview", "preview must be an object")
    check = _Checker(data, "preview.")
    check.unknown({"every", "max_px"})
    every = check.integer("every", 1, 1, settings.max_steps)
    max_px = check.integer("max_px", 128, 16, PREVIEW_MAX_PX)
    if check.errors:
        raise InvalidParams.from_errors(check.errors)
    return Preview(every=every, max_px=max_px)


def parse_webhook(data: Any, settings: ServerSettings) -> Webhook | None:
    """``{url, events}``: an absolute http(s) URL, events among WEBHOOK_EVENTS."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InvalidParams.one("webhook", "webhook must be an object {url, events}")
    check = _Checker(data, "webhook.")
    check.unknown({"url", "events"})
    url = data.get("url")
    if not isinstance(url, str) or not url:
        check.fail("url", "url is required: the http(s) URL to POST events to")
    else:
        problem = _webhook_url_problem(url, settings)
        if problem:
            check.fail("url", problem)
    events = data.get("events", list(DEFAULT_WEBHOOK_EVENTS))
    if (
        not isinstance(events, list)
        or not events
        or not all(isinstance(e, str) and e in WEBHOOK_EVENTS for e in events)
    ):
        check.fail("events", f"events must be a non-empty list of: {', '.join(WEBHOOK_EVENTS)}")
    if check.errors:
        raise InvalidParams.from_errors(check.errors)
    return Webhook(url=str(url), events=tuple(dict.fromkeys(events)))


def _webhook_url_problem(url: str, settings: ServerSettings) -> str | None:
    if len(url) > MAX_URL_CHARS:
        return f"url must be at most {MAX_URL_CHARS} characters"
    if not all(c.isprintable() and not c.isspace() for c in url):
        return "url must not contain spaces or control characters"
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return "url must be an absolute http:// or https:// URL"
    if parts.username or parts.password:
        return "url must not carry credentials; verify the webhook-signature header instead"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "url has an invalid port"
    if netguard.is_ip_literal(parts.hostname):
        reason = netguard.refused(parts.hostname, allow_private=settings.webhook_allow_private)
        if reason:
            return f"url may not point at {reason.split(' is ', 1)[1]}: {parts.hostname}"
    return None


def _unstorable(text: str) -> str | None:
    """Why Postgres (text or jsonb) would refuse ``text``, if it would."""
    if "\x00" in text:
        return "must not contain NUL characters"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            return f"must be valid Unicode: {ascii(text[exc.start])[1:-1]} is half of a surrogate pair"
    return None


def unstorable_strings(value: Any, field: str) -> list[FieldError]:
    """Every string in a parsed JSON ``value``, keys included, that Postgres cannot store, named
    by its path from ``field`` ("" for the top level of an object). JSON's ``\\u`` escapes can
    spell NUL and lone surrogates (``\\ud800``), which ``json.loads`` admits and no UTF-8 text
    holds: refused here, as they are parsed, they never reach a store or an answer."""
    errors: list[FieldError] = []
    pending: deque[tuple[str, Any]] = deque([(field, value)])
    while pending and len(errors) < MAX_FIELD_ERRORS:
        path, item = pending.popleft()
        if isinstance(item, str):
            if problem := _unstorable(item):
                errors.append(FieldError(path, f"{path} {problem}"))
        elif isinstance(item, dict):
            for key, child in item.items():
                if problem := _unstorable(key):
                    name = f"{path}.{ascii(key)[1:-1]}" if path else ascii(key)[1:-1]
                    errors.append(FieldError(name, f"the field name {name} {problem}"))
                else:
                    pending.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return errors


def parse_submission(
    params: Any,
    preview: Any,
    settings: ServerSettings,
    catalog: Catalog,
    *,
    params_field: str = "body",
    webhook: Any = None,
    start_within_s: Any = None,
) -> Submission:
    """Validate the params and the preview request together, reporting every problem at once."""
    unstorable = [
        *(unstorable_strings(params, "") if isinstance(params, dict) else []),
        *unstorable_strings(preview, "preview"),
        *unstorable_strings(webhook, "webhook"),
    ]
    if unstorable:
        raise InvalidParams.from_errors(unstorable)
    errors: list[FieldError] = []
    parsed = None
    if not isinstance(params, dict):
        errors.append(FieldError(params_field, f"{params_field} must be a JSON object"))
    else:
        try:
            parsed = parse_params(params, settings, catalog)
        except InvalidParams as exc:
            errors += exc.errors
    try:
        wanted = parse_preview(preview, settings)
    except InvalidParams as exc:
        errors += exc.errors
    hook = None
    try:
        hook = parse_webhook(webhook, settings)
    except InvalidParams as exc:
        errors += exc.errors
    within = _Checker({"start_within_s": start_within_s})
    start_within = (
        within.number("start_within_s", 0.0, 0.0, MAX_START_WITHIN_S) if start_within_s is not None else None
    )
    errors += within.errors
    if errors or parsed is None:
        raise InvalidParams.from_errors(errors)
    asked = parsed if params.get("seed") is not None else replace(parsed, seed=-1)
    canonical = json.dumps(
        {
            "params": asked.to_json(),
            "preview": asdict(wanted) if wanted else None,
            "webhook": hook.to_json() if hook else None,
        },
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
    return Submission(
        params=parsed, preview=wanted, webhook=hook, start_within_s=start_within, fingerprint=fingerprint
    )


def parse_idempotency_key(value: Any, field: str) -> str | None:
    """An optional client key: 1..255 visible characters."""
    if value is None:
        return None
    limit = MAX_IDEMPOTENCY_KEY_CHARS
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= limit
        or not all(c.isprintable() and not c.isspace() for c in value)
    ):
        raise InvalidParams.one(field, f"{field} must be 1 to {limit} visible characters without spaces")
    return value


def parse_after_seq(value: Any, field: str, *, text: bool = False) -> int | None:
    """An optional resume point, the last seq the client saw: a JSON integer from 0 to
    2**63-1, or (``text``: from a header or a query string) one written in ASCII digits."""
    if value is None:
        return None
    if text and isinstance(value, str):
        value = whole_number(value, 0, MAX_SEQ)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise InvalidParams.one(field, f"{field} must be an integer from 0 to {MAX_SEQ}")
    return value


def whole_number(text: str, low: int, high: int) -> int | None:
    """``text`` as an integer from ``low`` to ``high`` (``low`` >= 0) when it is one written in
    ASCII digits, else None. ``str.isdigit`` alone admits "²", which ``int`` refuses, and
    ``int`` refuses more than 4300 digits: both would be server errors, not answers."""
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(high)):
        return None
    value = int(text)
    return value if low <= value <= high else None


def parse_body(body: Any, settings: ServerSettings, catalog: Catalog) -> Submission:
    """A REST body: the params object itself plus the optional ``preview``."""
    if not isinstance(body, dict):
        raise InvalidParams.one("body", "request body must be a JSON object")
    params = {k: v for k, v in body.items() if k not in SUBMISSION_FIELDS}
    return parse_submission(
        params,
        body.get("preview"),
        settings,
        catalog,
        webhook=body.get("webhook"),
        start_within_s=body.get("start_within_s"),
    )
