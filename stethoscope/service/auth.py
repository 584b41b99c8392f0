"""Access tokens with scopes, kept only as hashes.

A token reads ``stk_<id>_<secret>``: the id finds the row, the secret is checked against
its SHA-256 with a constant-time compare. The secret is 32 random bytes, so a plain
SHA-256 is enough (a slow password hash guards guessable secrets; these are not).
The token itself is shown once, when it is made, and stored nowhere.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from stethoscope.service.errors import ServiceError

SCOPES = ("score", "read", "admin")
PREFIX = "stk_"
CACHE_SECONDS = 5.0  # a revoked token stops working within this on other processes


@dataclass(frozen=True)
class TokenInfo:
    """Who a verified token is: its id, name and scopes (never the secret)."""

    id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """``admin`` may do everything; the others only what they name."""
        return scope in self.scopes or "admin" in self.scopes


def parse_scopes(values: list[str] | str) -> list[str]:
    """``["read", "score"]`` from ``"read,score"``, ``["read score"]`` and the like."""
    items = [values] if isinstance(values, str) else list(values)
    scopes = sorted({s for item in items for s in item.replace(",", " ").split() if s})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        problem = f"unknown scope {unknown[0]!r}" if unknown else "no scope given"
        raise ServiceError(f"{problem}; choose from {', '.join(SCOPES)}")
    return scopes


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, else None."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    token_id, sep, secret = token[len(PREFIX):].partition("_")
    if not sep or not token_id.isalnum() or len(token_id) > 16 or not secret:
        return None
    return token_id, secret


def new_token() -> tuple[str, str, str]:
    """A fresh ``(token, id, secret hash)``."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{PREFIX}{token_id}_{secret}", token_id, hash_secret(secret)


class TokenAuthority:
    """Creates, lists, revokes and verifies tokens in a store; verified tokens are cached
    for a few seconds (by their hash, never in clear) so a busy uploader costs no query
    per request."""

    def __init__(self, store) -> None:
        self.store = store
        self._cache: dict[str, tuple[TokenInfo, float]] = {}
        self._lock = threading.Lock()

    def create(self, name: str, scopes: list[str] | str) -> tuple[str, dict]:
        """Make a token; returns ``(token, its row without the hash)``. Show the token
        once: it cannot be recovered."""
        name = (name or "").strip() or "token"
        if len(name) > 100:
            raise ServiceError("token name is longer than 100 characters")
        chosen = " ".join(parse_scopes(scopes))
        token, token_id, digest = new_token()
        now = int(time.time() * 1000)
        self.store.add_token(token_id, name, chosen, digest, now)
        return token, public_row({"id": token_id, "name": name, "scopes": chosen,
                                  "created_ms": now, "revoked_ms": None})

    def list(self) -> list[dict]:
        return [public_row(r) for r in self.store.list_tokens()]

    def revoke(self, token_id: str) -> bool:
        done = self.store.revoke_token(token_id, int(time.time() * 1000))
        with self._lock:
            self._cache.clear()
        return done

    def verify(self, token: str | None) -> TokenInfo | None:
        """The token's identity, or None for a missing, malformed, unknown, wrong or
        revoked token (the caller answers 401 without saying which)."""
        parts = split_token(token or "")
        if parts is None:
            return None
        token_id, secret = parts
        digest = hash_secret(secret)
        key = f"{token_id}:{digest}"
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = self.store.token(token_id)
        if row is None or row["revoked_ms"] is not None:
            return None
        if not hmac.compare_digest(row["secret_hash"], digest):
            return None
        info = TokenInfo(row["id"], row["name"], frozenset(row["scopes"].split()))
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (info, now + CACHE_SECONDS)
        return info


def public_row(row: dict) -> dict:
    """A token's row as shown to people and the API: no hash."""
    return {"id": row["id"], "name": row["name"], "scopes": row["scopes"].split(),
            "created_ms": row["created_ms"], "revoked_ms": row["revoked_ms"]}
