"""Data retrieval: the products of completed observations, brought home to storage.

When the status stage sees a request complete (or partly complete) it sets
``observation_requests.data_due_at``. The ``Retriever`` then, per due request::

    claim (lease) ──► list products at the facility's archive (every page)
         │                 └─ none yet, or the archive fails ─► retry later (backoff)
         ▼
    for each product not yet stored:
         claim the product ──► stream the download into storage (md5, size checked)
              │                    ├─ URL expired (403/400 "expired") ─► list again, fresh URL
              │                    ├─ cut midway, short, wrong md5 ─► restart (bounded), never recorded
              │                    └─ still failing ─► product "failed" with its error; request retried later
              ▼
         row "stored" + data.stored event, in one transaction
         │
    all listed products stored ─► data_due_at cleared (or, when this attempt stored new ones,
                                   set to one more look in recheck_s: archives add reduced frames later)
    else ─► data_due_at = now + backoff, data_attempts + 1; after max_attempts: give up,
            say so in the log and write a data.retrieval_failed event

- **Several daemons** share the work without a second download: a request
  is claimed by moving ``data_due_at`` forward to the lease's end
  (``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL), renewed before each
  product and checked (compare and set) by every later write, so a worker
  whose lease ran out, or a poll that re-armed the request meanwhile, is
  never overwritten; and each product is claimed under a row lock before
  its download (``tomd.products.claim_download``). ``data_due_at`` is the
  lease (rather than ``claimed_by``/``claimed_until``) so a poll that marks
  the request due again while it is being fetched is never lost: the
  fenced "all done" no longer matches and the request is looked at again.
- **Never the whole file in memory**: the HTTP body is read in chunks and
  handed to ``Store.put`` as a stream; the local store renames a complete
  temporary file, S3 completes its multipart upload only at the end, and a
  stream that ends early or differs from the archive's md5/size is refused
  before completion (``tomd.storage.IncompleteStream``).
- **Bounded**: connect and read timeouts per HTTP exchange, an overall
  deadline per download (``download_deadline``), a limited number of
  restarts and re-listings per attempt, exponential backoff with jitter
  between attempts, and a limit on attempts per request.
- **Presigned URLs**: archives (the LCO archive among them) hand out S3 URLs
  that carry their own signature and expire. Downloads go through a client of
  their own that sends no API token (S3 refuses a request with two kinds of
  authentication) and never logs a URL's query (the signature).
- Header metadata (DATE-OBS, FILTER, EXPTIME…) comes from the first bytes of
  each FITS file as it streams by, beside what the archive listed.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from tomd import products as prod
from tomd.db import repository as repo
from tomd.errors import NotFoundError, PermanentError, RetryableError, TomdError, redact
from tomd.events import DataRetrievalFailed
from tomd.facilities.base import DataProduct, Facility
from tomd.logs import FailureLog
from tomd.storage import CHUNK, Store, product_key
from tomd.submit import default_worker_id

log = logging.getLogger(__name__)

HEAD_BYTES = 64 * 1024  # bytes of each file kept for its FITS header (two headers of ~400 cards)
STOP_AFTER_FAILURES = 3  # products failing in a row end an attempt early
# Facilities whose data reach people outside this interface (the Gemini
# Observatory Archive; Swift's quick-look site and HEASARC): nothing to list,
# so their completions are settled at once instead of retried for days.
NO_ARCHIVE_KINDS = frozenset({"gemini", "swift"})


@dataclass(frozen=True)
class RetrieveSettings:
    interval_s: float = 60.0  # how often due requests are looked for
    batch: int = 10  # requests claimed per run
    lease_s: float = 900.0  # a request's claim; renewed before each product
    max_attempts: int = 12  # attempts per request before giving up (about 2 days with the backoff below)
    backoff_base_s: float = 60.0
    backoff_cap_s: float = 6 * 3600.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0  # silence allowed between two chunks
    min_rate_bps: float = 50_000.0  # a download slower than this on average (after 60 s) is cut
    max_download_s: float = 6 * 3600.0  # and none takes longer (a stream without a size or end)
    grace_s: float = 60.0  # a download's first seconds, before its average rate counts
    restarts: int = 2  # immediate restarts of one product's download within an attempt
    max_relists: int = 3  # fresh listings per attempt when download URLs expire
    # After an attempt that stored new products, look once more this much later: archives add
    # products after the first ones (LCO: reduced e91 frames follow the raw ones by minutes to
    # hours). A look that finds nothing new ends the retrieval. 0: no second look.
    recheck_s: float = 3600.0

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "RetrieveSettings":
        """From the ``[data]`` section (``tomd.config.Data``)."""
        values = dict(interval_s=cfg.interval, max_attempts=cfg.max_attempts, backoff_base_s=cfg.backoff,
                      backoff_cap_s=cfg.backoff_max, read_timeout_s=cfg.timeout,
                      min_rate_bps=cfg.min_rate_kbps * 1000.0)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class ProductOutcome:
    product_id: str
    filename: str
    state: str  # stored | already | skipped (another worker) | failed
    row_id: int | None = None
    size: int | None = None
    md5: str | None = None
    storage_key: str | None = None
    error: str = ""


@dataclass(frozen=True)
class RequestOutcome:
    """What one attempt on one request did."""

    request_id: int
    facility: str
    state: str  # done | retry | gave_up | lost (the lease went to someone else) | stopped (released)
    listed: int = 0
    stored: int = 0  # stored by this attempt
    already: int = 0  # stored before
    failed: int = 0
    message: str = ""
    products: tuple[ProductOutcome, ...] = ()


class UrlExpired(RetryableError):
    """The archive's download URL ran out (S3: 403 "Request has expired"): list the products again."""


class DownloadFailed(RetryableError):
    """One download did not complete (HTTP error, cut line, too slow)."""


@dataclass
class _Work:
    """A claimed request, detached from the session."""

    id: int
    facility: str
    facility_id: str | None
    target_id: int | None
    attempts: int
    lease: datetime | None  # None: not claimed (a manual fetch)
    label: str = ""
    tdir: str = "untargeted"
    products: dict[str, ProductOutcome] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _show(url: str) -> str:
    """A URL for logs and errors: host and path, never the query (a presigned URL's signature)."""
    u = urlsplit(url)
    return redact(f"{u.netloc}{u.path}")


def download_client(settings: RetrieveSettings = RetrieveSettings(),
                    transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The HTTP client for downloads: no API token, bytes as stored (no transfer compression)."""
    return httpx.Client(
        timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
        headers={"User-Agent": "tomd", "Accept-Encoding": "identity"},
        follow_redirects=True, transport=transport)


class _Body(io.RawIOBase):
    """An HTTP response body as a readable stream, chunk by chunk, within an overall deadline.

    ``allowed(received)`` gives the seconds the download may have taken
    when ``received`` bytes have arrived (it grows with them when the size
    is unknown). Keeps the first ``HEAD_BYTES`` for the FITS header. httpx
    raises when the connection drops or the body is shorter than its
    Content-Length.
    """

    def __init__(self, resp: httpx.Response, allowed: Callable[[int], float], what: str):
        self._it = resp.iter_raw(CHUNK)
        self._buf = bytearray()
        self._done = False
        self.started, self.allowed, self.what = time.monotonic(), allowed, what
        self.received = 0
        self.head = bytearray()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        want = CHUNK if n is None or n < 0 else n
        while len(self._buf) < want and not self._done:
            if time.monotonic() - self.started > self.allowed(self.received):
                raise DownloadFailed(f"{self.what}: too slow ({self.received} bytes in "
                                     f"{time.monotonic() - self.started:.0f} s), cut")
            try:
                chunk = next(self._it)
            except StopIteration:
                self._done = True
            else:
                self._buf += chunk
                self.received += len(chunk)
        out = bytes(self._buf[:want])
        del self._buf[:want]
        if len(self.head) < HEAD_BYTES:
            self.head += out[:HEAD_BYTES - len(self.head)]
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class Retriever:
    """Claims requests whose data is due and stores their products. Thread-safe beside others.

    ``facilities`` maps facility names (as in requests) to clients;
    ``observer(facility, nbytes, ok)`` is told of every download
    (``tomd.metrics.Metrics.observe_product``). A daemon component
    (``tomd.daemon.Daemon.add``): ``run(stop)``, ``wake()``, ``ready()``.
    """

    name = "retriever"

    def __init__(self, sessions: sessionmaker[Session], facilities: Mapping[str, Facility], storage: Store,
                 settings: RetrieveSettings = RetrieveSettings(), *, worker_id: str | None = None,
                 observer: Callable[[str, int | None, bool], None] | None = None,
                 http: httpx.Client | None = None, clock: Callable[[], datetime] = _now,
                 rng: random.Random | None = None):
        self.sessions = sessions
        self.facilities = facilities
        self.storage = storage
        self.settings = settings
        self.worker = worker_id or default_worker_id()
        self.observer = observer
        self._own_http = http is None
        self.http = http or download_client(settings)
        self.clock = clock
        self.rng = rng or random.Random()
        self.wake_event = threading.Event()
        self.stop_event = threading.Event()  # set: finish the product in hand, release the rest
        self.last_error: str | None = None
        # ``on_error(exc)``: told of every failed run (the daemon counts database errors in
        # tomd_database_errors_total{component="retriever"}); the log gets the first failure
        # with its traceback and repeats in one line now and then, not one traceback a second.
        self.on_error: Callable[[BaseException], None] | None = None
        self._failures = FailureLog(log, "data retrieval run", on_error=self._on_error)

    def _on_error(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(exc)

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def ready(self) -> bool | str:
        """For /readyz: not ready while runs fail (the database is unreachable)."""
        return True if self.last_error is None else f"last retrieval run failed: {self.last_error}"

    # -- driving -----------------------------------------------------------------

    def wake(self) -> None:
        """Look for due requests now (thread-safe; the status stage may call it after a completion)."""
        self.wake_event.set()

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set: every ``interval_s``, when woken, and when the next request falls due.

        At ``stop`` the download in hand finishes (bounded by its deadline)
        and the requests not done are released for another daemon at once.
        """
        self.stop_event = stop
        try:
            self._loop(stop)
        finally:
            self.close()
        log.info("retriever %s stopped", self.worker)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake_event.clear()
            try:
                outcomes = self.run_once()
                self.last_error = None
                self._failures.ok()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the thread
                self._failures.failed(exc)
                self.last_error = redact(f"{type(exc).__name__}: {exc}")[:300]
                outcomes = []
            if len(outcomes) >= self.settings.batch and not stop.is_set():
                continue  # more may be due
            wait = self.settings.interval_s
            try:
                with self.sessions() as s:
                    nxt = repo.next_data_due(s)
                if nxt is not None:
                    wait = min(wait, max(0.05, (nxt - self.clock()).total_seconds()))
            except Exception:  # noqa: BLE001
                pass
            if stop.wait(0) or self.wake_event.wait(wait):
                continue

    def run_once(self, ids: Sequence[int] | None = None) -> list[RequestOutcome]:
        """Claim the due requests (or just ``ids``, if due) and make one attempt on each."""
        if self.http.is_closed:  # run() closed it at its end; a later call gets a new one
            self.http = download_client(self.settings)
        return [self._process(w) for w in self._claim(ids)]

    def fetch_request(self, request_id: int) -> RequestOutcome:
        """Fetch a request's missing products now, due or not (``tomd data download --request``).

        Takes no request lease (a daemon may hold one): the product claims
        keep a product from being fetched twice. When everything listed was
        stored already, the request's pending retrieval (if any) is cleared.
        """
        with self.sessions() as s:
            r = repo.get_observation(s, request_id)
            if r is None:
                raise NotFoundError(f"no observation request #{request_id}")
            w = self._work(s, r, lease=None)
            due_seen = r.data_due_at
        out = self._attempt(w)
        if out.state == "done" and not out.stored and due_seen is not None:
            with self.sessions.begin() as s:  # compare and set: a newer claim or re-arm wins
                repo.update_data_lease(s, w.id, due_seen, {"data_due_at": None, "data_attempts": 0})
        return out

    def fetch_product(self, row_id: int) -> ProductOutcome:
        """Fetch one recorded product again (a failed one, or one missing from storage)."""
        with self.sessions() as s:
            row = repo.get_data_product_by_id(s, row_id)
            if row is None:
                raise NotFoundError(f"no data product #{row_id}")
            if row.request_id is None:
                raise NotFoundError(f"data product #{row_id} ({row.facility}) was not downloaded from a "
                                    "facility: nothing to fetch")
            if row.state == "stored" and row.storage_key and self.storage.exists(row.storage_key):
                return ProductOutcome(row.product_id, row.filename, "already", row.id, row.size, row.md5,
                                      row.storage_key)
            r = repo.get_observation(s, row.request_id)
            w = self._work(s, r, lease=None)
            product_id, stored_but_missing = row.product_id, row.state == "stored"
            if stored_but_missing:  # recorded but gone from storage: fetch it again
                repo.update_data_product(s, row.id, {"state": "failed", "error": "missing from storage"})
                s.commit()
        fac = self._facility(w.facility)
        listing = {p.product_id: p for p in fac.data_products(w.facility_id or "")}
        if product_id not in listing:
            raise NotFoundError(f"{w.facility} no longer lists product {product_id} of request {w.facility_id}")
        relist = _Relister(self, fac, w)
        return self._product(w, listing[product_id], relist)

    # -- one request ---------------------------------------------------------------

    def _claim(self, ids: Sequence[int] | None) -> list[_Work]:
        now = self.clock()
        lease = now + timedelta(seconds=self.settings.lease_s)
        with self.sessions.begin() as s:
            rows = repo.claim_data_requests(s, now=now, lease_until=lease, limit=self.settings.batch, ids=ids)
            return [self._work(s, r, lease=lease) for r in rows]

    def _work(self, s: Session, r: Any, *, lease: datetime | None) -> _Work:
        t = repo.get_target(s, r.target_id) if r.target_id is not None else None
        return _Work(r.id, r.facility, r.facility_id, r.target_id, r.data_attempts or 0, lease,
                     label=str(r.facility_id or r.id), tdir=prod.target_dir(t) if t is not None else "untargeted")

    def _process(self, w: _Work) -> RequestOutcome:
        try:
            out = self._attempt(w)
        except Exception as exc:  # noqa: BLE001 - a bug must not keep the lease until it runs out
            log.exception("data retrieval for request #%d failed unexpectedly", w.id)
            out = self._outcome(w, "retry", f"internal error: {type(exc).__name__}: {redact(str(exc))}")
        return self._settle(w, out)

    def _facility(self, name: str) -> Facility:
        if name not in self.facilities:
            raise PermanentError(f"no facility {name!r} is configured")
        return self.facilities[name]

    def _attempt(self, w: _Work) -> RequestOutcome:
        if not w.facility_id:
            return self._outcome(w, "retry", "the request has no facility id (never submitted)")
        try:
            fac = self._facility(w.facility)
            if getattr(fac, "kind", None) in NO_ARCHIVE_KINDS:
                return self._outcome(w, "done", f"{w.facility} has no archive tomd can list; nothing to fetch")
            listing = fac.data_products(w.facility_id)
        except (RetryableError, PermanentError, NotFoundError) as exc:
            return self._outcome(w, "retry", f"listing the products: {exc}")
        if not listing:
            return self._outcome(w, "retry", "the archive lists no products yet")
        have = self._known(w.facility, [p.product_id for p in listing])
        relist = _Relister(self, fac, w)
        failing = 0
        for p in listing:
            if have.get(p.product_id) == "stored":
                w.products[p.product_id] = ProductOutcome(p.product_id, p.filename, "already")
                continue
            if failing >= STOP_AFTER_FAILURES:
                # The archive or the store is down: the rest waits for the next attempt.
                w.products[p.product_id] = ProductOutcome(p.product_id, p.filename, "failed",
                                                          error="not tried: the products before it failed")
                continue
            if self.stop_event.is_set():
                return self._outcome(w, "stopped", "the daemon is stopping")
            if w.lease is not None and not self._renew(w):
                return self._outcome(w, "lost", "the request's lease was taken over")
            o = w.products[p.product_id] = self._product(w, relist.current(p), relist)
            failing = failing + 1 if o.state == "failed" else 0
        failed = [o for o in w.products.values() if o.state in ("failed", "skipped")]
        if failed:
            last = next((o.error for o in reversed(failed) if o.error and not o.error.startswith("not tried")), "")
            skipped = sum(o.state == "skipped" for o in failed)
            why = f"{len(failed)} of {len(listing)} products not stored" + \
                (f" ({skipped} being fetched by another worker)" if skipped else "") + (f"; last: {last}" if last else "")
            return self._outcome(w, "retry", why)
        return self._outcome(w, "done", f"{len(listing)} products stored")

    def _known(self, facility: str, product_ids: list[str]) -> dict[str, str]:
        with self.sessions() as s:
            return {k: r.state for k, r in repo.data_products_by_ids(s, facility, product_ids).items()}

    def _renew(self, w: _Work) -> bool:
        new = self.clock() + timedelta(seconds=self.settings.lease_s)
        with self.sessions.begin() as s:
            ok = repo.update_data_lease(s, w.id, w.lease, {"data_due_at": new})
        if ok:
            w.lease = new
        return ok

    def _outcome(self, w: _Work, state: str, message: str) -> RequestOutcome:
        ps = tuple(w.products.values())
        return RequestOutcome(w.id, w.facility, state, listed=len(ps), stored=sum(p.state == "stored" for p in ps),
                              already=sum(p.state == "already" for p in ps),
                              failed=sum(p.state in ("failed", "skipped") for p in ps), message=message, products=ps)

    def _settle(self, w: _Work, out: RequestOutcome) -> RequestOutcome:
        """Clear the request (done), schedule its next attempt (retry) or give up; fenced on the lease."""
        if out.state == "lost" or w.lease is None:
            return out
        now = self.clock()
        attempts = w.attempts + 1
        with self.sessions.begin() as s:
            if out.state == "stopped":  # not an attempt: due again at once, for any daemon
                ok = repo.update_data_lease(s, w.id, w.lease, {"data_due_at": now})
            elif out.state == "done":
                again = now + timedelta(seconds=self.settings.recheck_s) \
                    if out.stored and self.settings.recheck_s > 0 else None
                ok = repo.update_data_lease(s, w.id, w.lease, {"data_due_at": again, "data_attempts": 0})
                if ok:
                    log.info("request #%d (%s %s): %s%s", w.id, w.facility, w.facility_id, out.message,
                             f"; looking again in {self.settings.recheck_s:.0f} s for products added later"
                             if again else "")
            elif attempts >= self.settings.max_attempts:
                ok = repo.update_data_lease(s, w.id, w.lease, {"data_due_at": None, "data_attempts": attempts})
                if ok:
                    repo.add_event(s, DataRetrievalFailed(w.id, w.facility, w.facility_id or "", w.target_id,
                                                          attempts, out.stored + out.already, out.failed,
                                                          out.message[:1000]), target_id=w.target_id)
                    log.warning("request #%d (%s %s): giving up on its data after %d attempts: %s", w.id,
                                w.facility, w.facility_id, attempts, out.message)
                    out = replace(out, state="gave_up")
            else:
                delay = min(self.settings.backoff_cap_s, self.settings.backoff_base_s * 2 ** (attempts - 1))
                delay = delay / 2 + self.rng.uniform(0, delay / 2)  # jitter, never below half the step
                ok = repo.update_data_lease(s, w.id, w.lease, {"data_due_at": now + timedelta(seconds=delay),
                                                               "data_attempts": attempts})
                if ok:
                    log.info("request #%d (%s %s): attempt %d of %d: %s; next in %.0f s", w.id, w.facility,
                             w.facility_id, attempts, self.settings.max_attempts, out.message, delay)
        if not ok:
            log.info("request #%d: re-armed or taken over while being fetched; left to its new owner", w.id)
        return out

    # -- one product ---------------------------------------------------------------

    def _product(self, w: _Work, p: DataProduct, relist: "_Relister") -> ProductOutcome:
        now = self.clock()
        with self.sessions.begin() as s:
            row = prod.claim_download(
                s, facility=w.facility, product_id=p.product_id, worker=self.worker, now=now,
                until=now + timedelta(seconds=self.settings.lease_s),
                values={"kind": p.kind, "filename": p.filename, "target_id": w.target_id, "request_id": w.id,
                        "meta": {k: v for k, v in dict(p.meta).items() if isinstance(v, (str, int, float, bool))}})
            if row is None:
                cur = repo.get_data_product(s, w.facility, p.product_id)
                state = "already" if cur is not None and cur.state == "stored" else "skipped"
                return ProductOutcome(p.product_id, p.filename, state, cur.id if cur else None)
            row_id = row.id
        key = product_key(w.tdir, w.facility, w.label, p.filename)
        error = ""
        for attempt in range(self.settings.restarts + 1):
            try:
                stored, head = self._download(p, key)
            except UrlExpired as exc:
                error = str(exc)
                fresh = relist.fresh(p.product_id)
                if fresh is None:
                    error += "; listed again too often" if relist.exhausted else "; no fresh URL listed"
                    break
                log.info("%s: download URL expired; listed again for a fresh one", p.filename)
                p = fresh
                continue
            except (TomdError, httpx.HTTPError, OSError) as exc:
                error = redact(f"{type(exc).__name__}: {exc}")
                log.info("%s (%s %s): download %d failed: %s", p.filename, w.facility, w.facility_id,
                         attempt + 1, error)
                self._observe(w.facility, None, False)
                continue
            meta = {**{k: v for k, v in dict(p.meta).items() if isinstance(v, (str, int, float, bool))},
                    **prod.header_meta(bytes(head))}
            with self.sessions.begin() as s:
                res = prod.finish_download(s, row_id, stored, meta=meta)
            self._observe(w.facility, stored.size, True)
            return ProductOutcome(p.product_id, p.filename, "stored" if res.created else "already", res.id,
                                  res.size, res.md5, res.storage_key)
        with self.sessions.begin() as s:
            prod.fail_download(s, row_id, error or "download failed")
        return ProductOutcome(p.product_id, p.filename, "failed", row_id, error=error or "download failed")

    def _observe(self, facility: str, nbytes: int | None, ok: bool) -> None:
        if self.observer is not None:
            try:
                self.observer(facility, nbytes, ok)
            except Exception:  # noqa: BLE001 - metrics never break a download
                log.debug("product observer failed", exc_info=True)

    def download_deadline(self, size: int | None, received: int = 0) -> float:
        """Seconds one download may take: ``grace_s`` plus its size (or, unknown, the bytes so far)
        at ``min_rate_bps``, and never more than ``max_download_s``."""
        rate = max(1.0, self.settings.min_rate_bps)
        return min(self.settings.max_download_s, self.settings.grace_s + max(size or 0, received) / rate)

    def _download(self, p: DataProduct, key: str):
        """Stream one product into storage; (Stored, first bytes). Raises UrlExpired, DownloadFailed…"""
        if not p.url:
            raise DownloadFailed(f"{p.filename}: the archive gave no download URL")
        what = f"{p.filename} from {_show(p.url)}"
        with self.http.stream("GET", p.url) as resp:
            if resp.status_code != 200:
                raise _status_error(resp, what)
            size = p.size
            if size is None and resp.headers.get("Content-Length", "").isdigit():
                size = int(resp.headers["Content-Length"])
            body = _Body(resp, lambda received: self.download_deadline(size, received), what)
            stored = self.storage.put(key, body, size=size, md5=p.md5)
        return stored, body.head


class _Relister:
    """Fresh download URLs for one request: the product list fetched again, a bounded number of times."""

    def __init__(self, retriever: Retriever, fac: Facility, w: _Work):
        self.r, self.fac, self.w = retriever, fac, w
        self.count = 0
        self.latest: dict[str, DataProduct] = {}  # the newest listing, once listed again

    def current(self, p: DataProduct) -> DataProduct:
        """``p`` with the freshest URL known (after one URL expired, the others likely did too)."""
        return self.latest.get(p.product_id, p)

    @property
    def exhausted(self) -> bool:
        return self.count >= self.r.settings.max_relists

    def fresh(self, product_id: str) -> DataProduct | None:
        if self.exhausted:
            return None
        self.count += 1
        try:
            listing = self.fac.data_products(self.w.facility_id or "")
        except (RetryableError, PermanentError, NotFoundError) as exc:
            log.info("request #%d: listing again for fresh URLs failed: %s", self.w.id, exc)
            return None
        self.latest = {p.product_id: p for p in listing}
        return self.latest.get(product_id)


def _status_error(resp: httpx.Response, what: str) -> TomdError:
    """The error for a download answered with anything but 200 (the body read up to 4 kB)."""
    text = b""
    try:
        for chunk in resp.iter_raw(4096):
            text += chunk
            if len(text) >= 4096:
                break
    except httpx.HTTPError:
        pass
    body = text[:4096].decode("utf-8", "replace")
    status = resp.status_code
    if status in (400, 401, 403) and "expired" in body.lower():
        return UrlExpired(f"{what}: the download URL has expired (HTTP {status})")
    detail = _s3_message(body) or redact(" ".join(body.split())[:200])
    return DownloadFailed(f"{what}: HTTP {status} {detail}".rstrip())


def _s3_message(body: str) -> str:
    """``Code: Message`` from an S3 error document, else ""."""
    import re

    code = re.search(r"<Code>([^<]{1,100})</Code>", body)
    msg = re.search(r"<Message>([^<]{1,300})</Message>", body)
    return f"{code.group(1)}: {msg.group(1)}" if code and msg else ""
