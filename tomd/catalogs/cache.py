"""Catalog answers kept in the database (table ``catalog_cache``) for ``ttl`` seconds.

Shared by every process on the same database: a name looked up by the CLI
is not asked again by the daemon's hooks. Only answers are cached, not
failures ("not found" may change: TNS names appear every hour).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tomd.db import repository as repo

_MAX_KEY = 300


def cache_key(*parts: object) -> str:
    """A key column value; long ones end in a digest so they stay unique within 300 characters."""
    key = ":".join(str(p) for p in parts)
    if len(key) <= _MAX_KEY:
        return key
    return key[:_MAX_KEY - 41] + "#" + hashlib.sha1(key.encode()).hexdigest()


class Cache:
    def __init__(self, sessions: sessionmaker[Session], ttl_seconds: float):
        self.sessions = sessions
        self.ttl = timedelta(seconds=ttl_seconds)

    def get(self, service: str, key: str, *, now: datetime | None = None) -> dict[str, Any] | None:
        with self.sessions() as s:
            hit = repo.catalog_cache_get(s, service, key)
        if hit is None:
            return None
        payload, fetched_at = hit
        if fetched_at.tzinfo is None:
            fetched_at = fetched_at.replace(tzinfo=timezone.utc)
        if (now or datetime.now(timezone.utc)) - fetched_at > self.ttl:
            return None
        return payload

    def put(self, service: str, key: str, payload: dict[str, Any]) -> None:
        with self.sessions.begin() as s:
            repo.catalog_cache_put(s, service, key, payload)
