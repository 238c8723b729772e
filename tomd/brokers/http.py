"""Bounded HTTP calls to a broker's REST API (Invariant 5).

Every call has a timeout; 429, 5xx, timeouts and dropped connections are
retried a few times with exponential backoff and jitter, waiting at least
what the service asked for (``Retry-After``, or TNS's ``x-rate-limit-reset`` /
``x-cone-rate-limit-reset`` in seconds). When a response says the quota is
used up (a ``...-remaining: 0`` header) the next call waits for the reset
instead of earning a 429. Waits end early when ``stop`` is set.

Outcomes, in the one exception tree: the parsed JSON; ``RetryableError``
(the service is down or busy: try again at the next poll); ``PermanentError``
(a 4xx other than 429: bad credentials or query, with the service's words).
Messages never contain the API key (it travels in the form body or a header,
never in the URL, and messages are redacted anyway).
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Mapping
from datetime import timezone
from typing import Any

import httpx

from tomd.errors import PermanentError, RetryableError, redact

log = logging.getLogger(__name__)

_RESET_HEADERS = ("retry-after", "x-rate-limit-reset", "x-cone-rate-limit-reset", "x-ratelimit-reset")
MAX_WAIT_S = 900.0  # never sleep longer than this on a service's word


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the response asks us to wait, from any header that says so (the longest)."""
    waits = []
    for name in _RESET_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        seconds = _seconds(value.strip(), now)
        if seconds is not None:
            waits.append(seconds)
    return min(max(waits), MAX_WAIT_S) if waits else None


def _seconds(value: str, now: float | None) -> float | None:
    try:
        n = float(value)
    except ValueError:
        try:  # Retry-After may be an HTTP date
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, when.timestamp() - (now if now is not None else time.time()))
    if n > 1e9:  # an epoch timestamp rather than a delay
        return max(0.0, n - (now if now is not None else time.time()))
    return max(0.0, n)


def quota_exhausted(headers: Mapping[str, str]) -> float | None:
    """Seconds until the quota resets when a ``...-remaining`` header says 0 (TNS sends these)."""
    for name, value in headers.items():
        if name.lower().endswith("-remaining") and value.strip() == "0":
            reset = headers.get(name[: -len("remaining")] + "reset")
            if reset is not None:
                return _seconds(reset.strip(), None)
    return None


class BrokerHttp:
    """One service's HTTP client: timeouts, retries, rate-limit waits."""

    def __init__(self, service: str, *, client: httpx.Client | None = None, timeout_s: float = 30.0,
                 attempts: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 headers: Mapping[str, str] | None = None):
        self.service = service
        self._own = client is None
        self.client = client or httpx.Client(timeout=timeout_s, follow_redirects=True)
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = dict(headers or {})
        self._not_before = 0.0  # monotonic time before which no call is made (quota used up)
        self.requests = 0  # calls sent, for tests and metrics
        self.waited_s = 0.0

    def close(self) -> None:
        if self._own:
            self.client.close()

    def call(self, method: str, url: str, stop: threading.Event, *, params: Any = None,
             data: Mapping[str, str] | None = None, json: Any = None) -> Any:
        """The parsed JSON body of a 2xx answer; RetryableError or PermanentError otherwise."""
        last: RetryableError | None = None
        for attempt in range(1, self.attempts + 1):
            self._wait(self._not_before - time.monotonic(), stop)
            if stop.is_set():
                raise RetryableError(f"{self.service}: stopping") from last
            try:
                return self._once(method, url, params=params, data=data, json=json)
            except RetryableError as exc:
                last = exc
                if attempt == self.attempts:
                    break
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                delay = max(delay, exc.retry_after or 0.0)
                log.warning("%s (attempt %d of %d); retrying in %.1f s", exc, attempt, self.attempts, delay)
                self._wait(delay, stop)
        assert last is not None
        raise last

    def _once(self, method: str, url: str, **kw: Any) -> Any:
        where = f"{self.service}: {method} {_path(url)}"
        self.requests += 1
        try:
            r = self.client.request(method, url, headers=self.headers, timeout=self.timeout_s, **kw)
        except httpx.TimeoutException:
            raise RetryableError(f"{where}: no answer within {self.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise RetryableError(redact(f"{where}: connection failed ({exc.__class__.__name__}: {exc})")) from None
        wait = quota_exhausted(r.headers)
        if wait is not None:
            # The next call waits for the reset rather than earning a 429 (TNS bans repeat offenders).
            self._not_before = max(self._not_before, time.monotonic() + wait)
        if r.status_code == 429 or r.status_code >= 500:
            after = retry_after(r.headers)
            raise RetryableError(f"{where}: HTTP {r.status_code} {_snippet(r)}".rstrip(), retry_after=after)
        if r.status_code >= 400:
            raise PermanentError(f"{where}: HTTP {r.status_code} {_snippet(r)}".rstrip())
        try:
            return r.json()
        except ValueError:
            # A proxy's HTML error page with a 200: the service is not itself.
            raise RetryableError(f"{where}: answer is not JSON ({_snippet(r)})") from None

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        if seconds > 0:
            self.waited_s += seconds
            stop.wait(min(seconds, MAX_WAIT_S))


def _path(url: str) -> str:
    return redact(httpx.URL(url).copy_with(query=None).path or "/")


def _snippet(r: httpx.Response) -> str:
    text = " ".join(r.text.split())[:300]
    return redact(text)
