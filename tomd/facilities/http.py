"""One HTTP exchange with a facility, bounded and retried: shared by the LCO, Gemini and Swift clients.

Every facility call is bounded (invariant 5): a timeout per exchange (the
client's ``httpx.Client``), a limited number of attempts with exponential
backoff and full jitter, a per-facility rate limit (a token bucket shared by
every thread using the client), and Retry-After honoured. What is certainly
never sent (a connect failure, a 429) is always retried; what may have reached
the server and got no answer is retried only when the caller says it is safe.

The clients differ only in what an answer means (``answer``), in what a call
that may have reached the server becomes (``sent``) and in their words; the
loop that every one of them needs is ``send``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Protocol, TypeVar

import httpx

from tomd.errors import RetryableError, redact
from tomd.facilities.base import TokenRefused

MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After goes back to the caller as RetryableError

# observer(facility, operation, code, seconds): code is the HTTP status or "timeout" / "error".
# The daemon plugs tomd.metrics.Metrics.observe_facility_call in here.
Observer = Callable[[str, str, int | str, float], None]

T = TypeVar("T")


class RateLimiter:
    """A token bucket: at most ``rate`` calls per second on average, bursts of ``burst``.

    Thread-safe; one per facility client, shared by every thread using it.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self._tokens = self.burst
        self._clock, self._sleep = clock, sleep
        self._last = clock()
        self._lock = threading.Lock()
        self.paused_until = 0.0  # set from a 429's Retry-After: nobody calls before

    def acquire(self, deadline: float | None = None) -> None:
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                wait = max(self.paused_until - now, 0.0)
                if wait == 0.0 and self._tokens >= 1.0 - 1e-9:  # float dust must not spin
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                if wait == 0.0:
                    wait = (1.0 - self._tokens) / self.rate
            if deadline is not None and self._clock() + wait > deadline:
                raise RetryableError("rate limit: no slot before the call's deadline", retry_after=wait)
            self._sleep(wait)

    def pause(self, seconds: float) -> None:
        with self._lock:
            self.paused_until = max(self.paused_until, self._clock() + seconds)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·2^attempt)]."""
    r = rng or random
    return r.uniform(0.0, min(cap, base * (2 ** attempt)))


def retry_after_s(resp: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds (a number or an HTTP date), None when absent or unreadable."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def scrub(text: str, secret: str | None) -> str:
    """``text`` from a facility, for an error message: without what looks like a credential
    (``redact``) nor the client's own secret, which a server may quote back in any words."""
    out = redact(text)
    return out.replace(secret, "***") if secret else out


def lost_words(exc: Exception, lost: str = "connection lost") -> str:
    """What happened to a call that may have reached the server, for an error message."""
    if isinstance(exc, httpx.TimeoutException):
        return "no answer within the timeout"
    return f"{lost} ({type(exc).__name__})"


class Caller(Protocol):
    """What ``send`` reads of a facility client, on every call (a test or the daemon may change them)."""

    name: str
    limiter: RateLimiter
    timeout: float
    max_attempts: int
    backoff_base: float
    backoff_cap: float
    observer: Observer | None


def observed(client: Caller, operation: str, call: Callable[[], httpx.Response]) -> httpx.Response:
    """One HTTP exchange, reported to ``client.observer`` (each retry is an exchange of its own)."""
    if client.observer is None:
        return call()
    t0, code = time.monotonic(), "error"
    try:
        resp = call()
        code = resp.status_code
        return resp
    except httpx.TimeoutException:
        code = "timeout"
        raise
    finally:
        client.observer(client.name, operation, code, time.monotonic() - t0)


def send(client: Caller, operation: str, call: Callable[[], httpx.Response], *, what: str,
         answer: Callable[[httpx.Response], T | RetryableError],
         sent: Callable[[Exception], Exception] | None,
         refused: Callable[[int], TokenRefused], throttled: str = "rate limited",
         sleep: Callable[[float], None] | None = None) -> T:
    """``call`` (one exchange, ``operation`` its metric label) until ``answer`` takes its response.

    - ``what`` begins every message ("lab: POST /api/requestgroups/"); it must hold no secret.
    - A connect failure is retried (the call never reached the server).
    - A timeout or lost connection after sending: ``sent(exc)`` is raised (the
      call may have had its effect: the caller decides what that means), or,
      with ``sent`` None (a call safe to repeat), it is retried.
    - HTTP 401/403 raise ``refused(status)``; a 429 pauses the client's rate
      limiter for its Retry-After (1 s without one) and retries, unless the
      wait is over ``MAX_RETRY_AFTER_S`` or past the call's deadline
      (``throttled`` words the error).
    - Any other response goes to ``answer``, which returns the result, returns
      a ``RetryableError`` to try again (its ``retry_after`` lengthens the
      backoff), or raises.

    Between attempts: exponential backoff with full jitter, ``sleep`` (default
    ``time.sleep``). The whole call ends within about
    ``max_attempts × (timeout + backoff_cap) + MAX_RETRY_AFTER_S``; when the
    attempts or that deadline run out, the last retryable error is raised.
    """
    deadline = time.monotonic() + client.max_attempts * (client.timeout + client.backoff_cap) + MAX_RETRY_AFTER_S
    last: RetryableError | None = None
    for attempt in range(client.max_attempts):
        client.limiter.acquire(deadline)
        try:
            resp = observed(client, operation, call)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never reached the server: safe to retry whatever the call.
            last = RetryableError(f"{what}: cannot connect ({type(exc).__name__})")
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            if sent is not None:
                raise sent(exc) from None
            last = RetryableError(f"{what}: {lost_words(exc)}")
        else:
            status = resp.status_code
            if status in (401, 403):
                raise refused(status)
            if status == 429:
                wait = retry_after_s(resp)
                wait = 1.0 if wait is None else wait
                client.limiter.pause(wait)
                last = RetryableError(f"{what}: {throttled} (HTTP 429, Retry-After {wait:g}s)", retry_after=wait)
                if wait > MAX_RETRY_AFTER_S or time.monotonic() + wait > deadline:
                    raise last
                continue  # the limiter waits out Retry-After before the next attempt
            result = answer(resp)
            if not isinstance(result, RetryableError):
                return result
            last = result
        if attempt + 1 < client.max_attempts:
            delay = backoff_delay(attempt, client.backoff_base, client.backoff_cap)
            if last.retry_after:
                delay = max(delay, last.retry_after)
            if time.monotonic() + delay > deadline:
                break
            (sleep or time.sleep)(delay)
    assert last is not None
    raise last
