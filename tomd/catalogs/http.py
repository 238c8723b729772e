"""HTTP plumbing shared by the catalog clients: bounded time, errors by service."""

from __future__ import annotations

from collections.abc import Mapping

import requests

from tomd.catalogs.base import CatalogError, CatalogUnavailable


class TimeoutSession(requests.Session):
    """A requests session whose every call is bounded (astroquery and pyvo often pass no timeout)."""

    def __init__(self, timeout: float, headers: Mapping[str, str] | None = None):
        super().__init__()
        self._timeout = timeout
        if headers:
            self.headers.update(headers)

    def request(self, method, url, *args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().request(method, url, *args, **kwargs)


def retry_after(headers: Mapping[str, str], *names: str) -> float | None:
    """Seconds to wait from the first of ``names`` present (Retry-After, x-rate-limit-reset, …)."""
    for n in names:
        v = headers.get(n)
        if v is None:
            continue
        try:
            return max(0.0, float(v))
        except ValueError:
            continue
    return None


def requests_failure(service: str, exc: Exception) -> Exception:
    """The tomd error for a requests exception (connection, timeout, HTTP status)."""
    if isinstance(exc, requests.Timeout):
        return CatalogUnavailable(service, "timed out")
    if isinstance(exc, requests.ConnectionError):
        return CatalogUnavailable(service, "connection failed")
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code >= 500 or code == 429:
            return CatalogUnavailable(service, f"HTTP {code}",
                                      retry_after(exc.response.headers, "Retry-After"))
        return CatalogError(service, f"HTTP {code}")
    return CatalogUnavailable(service, type(exc).__name__)
