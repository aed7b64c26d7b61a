"""API keys and signed browser sessions: who is asking.

A key is ``sk_`` + 43 random URL-safe characters (256 bits); Postgres keeps
only its SHA-256 (``api_keys``), so a leaked database leaks no key. A browser
gets an anonymous owner of its own in a cookie signed with HMAC-SHA256
(``STEPCAST_SESSION_SECRET``); nothing about sessions is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

KEY_PREFIX = "sk_"
SHOWN_PREFIX_CHARS = 10


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


def _signature(secret: bytes, owner: str) -> str:
    digest = hmac.new(secret, owner.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign_session(secret: bytes, owner: str) -> str:
    return f"{owner}.{_signature(secret, owner)}"


def session_owner(secret: bytes, cookie: str) -> str | None:
    """The owner a session cookie vouches for, or None if it was not signed here."""
    owner, _, signature = cookie.rpartition(".")
    if not owner.startswith("anon_") or not hmac.compare_digest(signature, _signature(secret, owner)):
        return None
    return owner
