"""Webhook delivery, per the Standard Webhooks spec (standardwebhooks.com).

A status change queues a delivery row (a trigger, in the same transaction). Every server runs a
:class:`WebhookSender`: it leases due rows, POSTs ``{"type": "job.<event>", "timestamp", "data"}``
signed with the owner's ``whsec_`` secret to the address it checked (``netguard``), and records
each outcome, fenced by attempt (docs/webhooks.md). ``resolver`` and ``transport`` are test seams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from stepcast import __version__, netguard
from stepcast.background import stop_if_cancelled
from stepcast.db import Database
from stepcast.jobs import timestamp, to_wire
from stepcast.settings import ServerSettings
from stepcast.storage import Storage

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]


class Refused(Exception):
    """The URL may not be called (it resolves to a private address, say)."""


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, sent_at: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{sent_at}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class WebhookSender:
    """Leases due deliveries into free slots and sends each as its own task.

    At most ``webhook_max_concurrent`` attempts run at once; each has one
    deadline (``webhook_timeout_s``) from resolving the host to the last byte
    read, and reads at most ``webhook_max_response_bytes`` of the answer's
    body, so a receiver that hangs, trickles or streams for ever costs one
    slot for one deadline and a few KiB, and others' deliveries keep flowing.
    """

    def __init__(
        self,
        db: Database,
        storage: Storage,
        settings: ServerSettings,
        *,
        resolver: Resolver = system_resolver,
        transport: httpx.AsyncBaseTransport | None = None,
        on_outcome: Callable[[str], object] | None = None,
    ) -> None:
        self.db = db
        self.storage = storage
        self.settings = settings
        self.resolver = resolver
        self.transport = transport
        self.on_outcome = on_outcome or (lambda outcome: None)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()

    async def run(self) -> None:
        """Start due deliveries every ``webhook_poll_s`` (and as slots free up), for ever."""
        try:
            while True:
                self._slot_freed.clear()
                try:
                    await self._start_due()
                except Exception as exc:
                    stop_if_cancelled(exc)
                    logger.exception("webhook pass failed; trying again")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.webhook_poll_s):
                        await self._slot_freed.wait()
        finally:
            for task in self._in_flight:
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def tick(self) -> int:
        """Send everything due and wait for the outcomes; the number of attempts begun."""
        begun = 0
        while True:
            begun += await self._start_due()
            if not self._in_flight:
                return begun
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)

    async def _start_due(self) -> int:
        free = self.settings.webhook_max_concurrent - len(self._in_flight)
        if free <= 0:
            return 0
        due = await self.db.deliveries.due(
            lease_s=self.settings.webhook_timeout_s + 30,
            limit=free,
            max_attempts=len(self.settings.webhook_backoff_s) + 1,
        )
        for delivery in due:
            if delivery["status"] == "failed":  # its attempts all ended without an outcome
                log = {"job_id": str(delivery["job_id"]), "webhook_id": str(delivery["id"])}
                logger.warning("webhook failed: %s", delivery["last_error"], extra=log)
                self.on_outcome("failed")
                continue
            task = asyncio.create_task(self._deliver(delivery))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        return len(due)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The row stays leased until its lease runs out, then is tried again.
            logger.error("webhook delivery failed to run", exc_info=exc)

    async def _deliver(self, delivery: Any) -> None:
        log = {"job_id": str(delivery["job_id"]), "webhook_id": str(delivery["id"])}
        job = await self.db.jobs.get(delivery["job_id"])
        if job is None:
            await self._record(delivery, "failed", None, "the job no longer exists")
            return
        payload = {
            "type": f"job.{delivery['event']}",
            "timestamp": timestamp(datetime.now(UTC)),
            "data": await to_wire(job, self.storage.url),
        }
        body = json.dumps(payload, separators=(",", ":"))
        msg_id, sent_at = str(delivery["id"]), int(time.time())
        secret = await self.db.owners.webhook_secret(delivery["owner"], new_secret())
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "user-agent": f"stepcast/{__version__}",
            "webhook-id": msg_id,
            "webhook-timestamp": str(sent_at),
            "webhook-signature": sign(secret, msg_id, sent_at, body),
        }
        deadline_s = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(deadline_s):
                status = await self._post(delivery["url"], body, headers)
        except Refused as exc:
            logger.warning("webhook refused: %s", exc, extra=log)
            await self._record(delivery, "failed", None, str(exc))
            return
        except TimeoutError:  # before OSError, of which it is a kind
            await self._record(delivery, "retry", None, f"no complete answer within {deadline_s:g} s")
            return
        except (httpx.HTTPError, OSError) as exc:
            await self._record(delivery, "retry", None, f"{type(exc).__name__}: {exc}".strip(": "))
            return
        if 200 <= status < 300:
            await self._record(delivery, "delivered", status, None)
        elif status in {408, 429} or status >= 500:
            await self._record(delivery, "retry", status, f"the receiver answered {status}")
        else:
            why = "redirects are not followed" if 300 <= status < 400 else "the receiver refused it"
            await self._record(delivery, "failed", status, f"the receiver answered {status}: {why}")

    async def _post(self, url: str, body: str, headers: dict[str, str]) -> int:
        """POST to the checked address; the status once the answer's body (or its first bytes) is in."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = [host] if netguard.is_ip_literal(host) else await self.resolver(host, port)
        if not addresses:
            raise Refused(f"{host} does not resolve")
        for address in addresses:
            reason = netguard.refused(address, allow_private=self.settings.webhook_allow_private)
            if reason:
                raise Refused(f"{host} resolves to {reason}" if address != host else reason)
        address = addresses[0]
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        target = parts._replace(netloc=netloc).geturl()
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        async with (
            httpx.AsyncClient(
                transport=self.transport, timeout=self.settings.webhook_timeout_s, follow_redirects=False
            ) as client,
            client.stream(
                "POST", target, content=body, headers={**headers, "host": parts.netloc}, extensions=extensions
            ) as response,
        ):
            # Raw bytes (no decompression bomb), read until the body ends or the
            # limit is reached; leaving the block closes the connection. (An
            # answer made in memory, as by httpx.MockTransport, is read already.)
            limit, read = self.settings.webhook_max_response_bytes, 0
            if limit > 0 and not response.is_stream_consumed:
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= limit:
                        break
        return response.status_code

    async def _record(self, delivery: Any, outcome: str, http_status: int | None, error: str | None) -> None:
        retry_in_s = None
        status = outcome
        attempt = delivery["attempts"]  # this one, counted when it was leased
        if outcome == "retry":
            backoff = self.settings.webhook_backoff_s
            if attempt <= len(backoff):
                status, retry_in_s = "pending", backoff[attempt - 1] * random.uniform(0.8, 1.2)
            else:
                status, error = "failed", f"{error}; gave up after {attempt} attempts"
        recorded = await self.db.deliveries.record(
            delivery["id"], attempt=attempt, status=status, retry_in_s=retry_in_s, http_status=http_status,
            error=error,
        )  # fmt: skip
        if not recorded:
            log = {"job_id": str(delivery["job_id"]), "webhook_id": str(delivery["id"])}
            logger.warning("webhook attempt %d outcome dropped: a later attempt holds it", attempt, extra=log)
            return
        self.on_outcome("retry" if status == "pending" else status)
