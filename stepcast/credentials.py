"""API keys and signed browser sessions: who is asking.

A key is ``sk_`` + 43 random URL-safe characters; Postgres keeps only its SHA-256 (``api_keys``).
A browser session is an anonymous owner in a cookie signed with HMAC-SHA256
(``STEPCAST_SESSION_SECRET``), its expiry inside the signed part; nothing about sessions is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

KEY_PREFIX = "sk_"
SHOWN_PREFIX_CHARS = 10
# Prefixed to what a session signature covers, so it can never be mistaken for
# another use of the secret (nor for the old expiry-less cookies).
SESSION_DOMAIN = "stepcast-session:"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_owner(kind: str) -> str:
    """A fresh owner id: ``user_…`` for key holders, ``anon_…`` for browser sessions."""
    return f"{kind}_{secrets.token_hex(8)}"


def is_anonymous(owner: str) -> bool:
    """A browser session's owner (made by :func:`new_owner` ``("anon")``), not a key holder."""
    return owner.startswith("anon_")


def _signature(secret: bytes, message: str) -> str:
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign_session(secret: bytes, owner: str, *, expires_at: int) -> str:
    """``<owner>.<expires_at>.<signature>``: the expiry (Unix seconds) is inside what is signed."""
    payload = f"{owner}.{expires_at}"
    return f"{payload}.{_signature(secret, SESSION_DOMAIN + payload)}"


def new_session(secret: bytes, max_age_s: int) -> str:
    """A signed cookie value for a new anonymous owner, good for ``max_age_s``."""
    return sign_session(secret, new_owner("anon"), expires_at=int(time.time()) + max_age_s)


def session_owner(secret: bytes, cookie: str) -> str | None:
    """The owner a session cookie vouches for, or None if it was not signed here, was
    altered, has expired, or is of the old form without an expiry."""
    parts = cookie.split(".")
    if len(parts) != 3:
        return None
    owner, expires_at, signature = parts
    if not owner.startswith("anon_") or not (expires_at.isascii() and expires_at.isdigit()):
        return None
    expected = _signature(secret, f"{SESSION_DOMAIN}{owner}.{expires_at}")
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    return owner if int(expires_at) > time.time() else None
