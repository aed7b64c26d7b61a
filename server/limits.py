"""What one client may take: per-address rates and open sockets.

Browser sessions' anonymous owners cost nothing to make, so their new sessions and submits are
also counted per client address over any 60 s, in Redis, across all servers (Redis down: nothing
is refused). Open sockets are counted in this process: in all, per owner, and per address of
anonymous owners. Why, and the figures: docs/configuration.md, "Limits per client".
"""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import HTTPConnection

from stepcast import credentials
from stepcast.errors import RateLimited, ServerBusy, TooManySockets
from stepcast.redis_keys import address_rate
from stepcast.settings import ServerSettings

WINDOW_S = 60
SOCKET_RETRY_AFTER_S = 5


def client_address(connection: HTTPConnection) -> str | None:
    """The client's address (None over a Unix socket)."""
    return connection.client.host if connection.client is not None else None


# A sliding minute, one sorted set per (what, address) of the times of the
# attempts let in (so at most ``limit`` entries), in Redis's clock (servers'
# clocks may differ): let one more in, or answer the seconds until there is room.
_LET_IN = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
    redis.call('ZADD', KEYS[1], now, ARGV[3])
    redis.call('EXPIRE', KEYS[1], window)
    return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, math.ceil(tonumber(oldest[2]) + window - now))
"""


async def count_per_minute(redis: Any, what: str, address: str | None, limit: int) -> None:
    """Let one more ``what`` (e.g. "new sessions") of this address in, or raise
    RateLimited: at most ``limit`` in any 60 s, all servers together."""
    if address is None:
        return
    key = address_rate(what, address)
    try:
        retry_after_s = int(await redis.eval(_LET_IN, 1, key, WINDOW_S, limit, secrets.token_hex(8)))
    except RedisError:
        return  # Redis is down: do not refuse work over a counter
    if retry_after_s:
        raise RateLimited(
            f"more than {limit} {what} a minute from your address; try again in {retry_after_s} s",
            retry_after_s=retry_after_s,
        )


class Socket:
    """One open socket's place in the counts; :meth:`close` gives it back (once)."""

    def __init__(self, sockets: Sockets, owner: str, address: str | None) -> None:
        self._sockets, self.owner, self.address = sockets, owner, address
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._sockets._release(self)


class Sockets:
    """The sockets this process holds open, in all, per owner and per anonymous address."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.total = 0
        self.by_owner: Counter[str] = Counter()
        self.by_address: Counter[str] = Counter()

    def open(self, owner: str, address: str | None) -> Socket:
        """Room for one more socket of this owner from this address, or why not:
        ServerBusy (503 / close 1013) or TooManySockets (429 / close 4029)."""
        settings = self.settings
        if self.total >= settings.max_sockets_per_process:
            raise ServerBusy(
                f"this server holds {self.total} sockets, the most it takes; "
                f"try again in {SOCKET_RETRY_AFTER_S} s",
                retry_after_s=SOCKET_RETRY_AFTER_S,
            )
        if settings.auth == "keys":
            if self.by_owner[owner] >= settings.max_sockets_per_owner:
                raise TooManySockets(
                    f"you have {self.by_owner[owner]} sockets open on this server, the most accepted; "
                    "close one first (one WebSocket can watch many jobs)",
                    retry_after_s=SOCKET_RETRY_AFTER_S,
                )
            if not credentials.is_anonymous(owner):
                address = None  # key holders are counted as owners only
            elif (
                address is not None and self.by_address[address] >= settings.max_anonymous_sockets_per_address
            ):
                raise TooManySockets(
                    f"browser sessions from your address have {self.by_address[address]} sockets open "
                    "on this server, the most accepted; close one first",
                    retry_after_s=SOCKET_RETRY_AFTER_S,
                )
        else:
            address = None
        self.total += 1
        self.by_owner[owner] += 1
        if address is not None:
            self.by_address[address] += 1
        return Socket(self, owner, address)

    def _release(self, socket: Socket) -> None:
        self.total -= 1
        _decrement(self.by_owner, socket.owner)
        if socket.address is not None:
            _decrement(self.by_address, socket.address)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # no entry kept per owner or address that has gone
