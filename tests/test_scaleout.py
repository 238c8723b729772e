"""Scale-out: two real `tomd run` processes, one PostgreSQL, one topic, every component wired.

Two daemons join one consumer group on a four-partition topic of the local
Kafka-protocol broker (Tansu) and share one simulated observatory (started
here, in the test process, so it counts every request group by name and
every archive download). Each daemon reaches the observatory through a
loopback proxy of its own, which records every call it forwards with its
start and end: that is how the test knows which daemon polled when. The
requests complete after a few seconds, so both daemons poll, download,
run a user hook and send webhook notifications (to a loopback receiver that
counts each delivery). The test shows, with the daemons' own /metrics, the
database and those witnesses:

- each partition is held by one daemon at a time, and every alert is
  ingested exactly once (per-daemon ingest counts add up, with no
  duplicates; one row per partition and offset);
- no submission is duplicated (each request name reaches the observatory
  once), also when a daemon dies holding claims on intents;
- no poll is duplicated: the two daemons' status listings never overlap in
  time, and each request's state changes are recorded once each;
- no hook run is duplicated (the hook's own journal, and one run per hook
  and event), no notification is delivered twice, no frame downloaded twice;
- after a SIGKILL the other daemon takes over all partitions, ingests the
  rest, and finishes the polls, downloads, hook runs and notifications
  (the dead daemon's claims end when their leases would).

Delivery to hooks and webhooks is at least once by design: a run or a send
in flight when its daemon is killed may happen again. Only those, read from
the database right after the kill, may appear twice; the test says how many
did.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from tomd.alerts.broker import produce
from tomd.db.models import (AlertRow, DataProduct, HookRun, Notification, ObservationRequest, ObservationStatus,
                            OutboxEvent)
from tomd.facilities.sim import SimObservatory

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 4
OPEN = ("intent", "submitting")
HOOK = "journal.journal"
HOOK_KINDS = ("observation.status_changed", "data.stored")


def ztf_copies(n: int, seed: int) -> list[bytes]:
    """``n`` real ZTF packets with new ids and positions: one new target per alert."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from ztf_copies import ztf_copies as copies
    finally:
        sys.path.remove(str(REPO / "bench"))
    return copies(n, seed=seed)


def produce_spread(bootstrap: str, topic: str, values: list[bytes]) -> dict[int, int]:
    """Round-robin over the partitions; returns how many went to each."""
    counts = {}
    for p in range(PARTITIONS):
        counts[p] = produce(bootstrap, topic, values[p::PARTITIONS], partition=p)
    return counts


# ------------------------------------------------------------ witnesses


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a killed daemon's sockets
            super().handle_error(request, client_address)


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    method: str
    path: str
    query: str


class Proxy:
    """One daemon's way to the observatory: forwards every call and records when it started and
    ended. URLs in the answers (next pages, frame downloads) are rewritten to come back here."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                try:
                    self._relay()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon was killed mid-call: nothing to answer

            def _relay(self) -> None:
                t0 = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    ctype = resp.getheader("Content-Type", "")
                    status, retry = resp.status, resp.getheader("Retry-After")
                finally:
                    conn.close()
                if "json" in ctype:
                    data = data.replace(upstream.encode(), proxy.url.encode())
                # The call ends when the observatory has answered, stamped before the answer goes back:
                # the daemon cannot go on (end its poll, free the facility) before the stamp, whereas a
                # stamp after the write could come arbitrarily late (this thread waits for the GIL) and
                # overlap the other daemon's next poll although the two polls followed each other.
                end = time.monotonic()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                if retry:
                    self.send_header("Retry-After", retry)
                self.end_headers()
                self.wfile.write(data)
                parts = urlsplit(self.path)
                with proxy._lock:
                    proxy.calls.append(Call(t0, end, self.command, parts.path, parts.query))

            do_GET = do_POST = _forward

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def listings(self) -> list[Call]:
        """The status poll's calls: request-group and observation listings (not look-ups by name)."""
        with self._lock:
            return [c for c in self.calls if c.method == "GET" and c.path in ("/api/requestgroups/",
                                                                              "/api/observations/")
                    and "name=" not in c.query]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Webhook:
    """A loopback webhook receiver: every notification id in every delivery, counted."""

    def __init__(self):
        self.received: Counter = Counter()  # notifications.id → times received
        self.deliveries: Counter = Counter()  # Tomd-Delivery → times received
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with hook._lock:
                    hook.deliveries[self.headers.get("Tomd-Delivery")] += 1
                    for item in doc["notifications"]:
                        hook.received[item["id"]] += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tomd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    """What the checks look at: the database and every outside witness."""

    db: object
    sim: SimObservatory
    proxies: dict[str, Proxy]
    webhook: Webhook
    journal: Path
    # What a daemon had in flight when it was killed (at-least-once: these may happen twice):
    # {"hook_runs": event ids, "notifications": ids, "downloads": frame ids}
    in_flight: dict[str, set] = field(default_factory=lambda: {"hook_runs": set(), "notifications": set(),
                                                               "downloads": set()})


# ------------------------------------------------------------- the daemons


@dataclass
class Daemon:
    """One `tomd run` process; its output is read line by line in a thread."""

    name: str
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    url: str | None = None

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving /metrics, /healthz and /readyz on (http://\S+)", line)
            if m:
                self.url = m.group(1)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def story(self) -> str:
        """What matters when a wait times out: group membership lines, errors, consumer metrics."""
        keep = [ln for ln in self.lines if re.search(r"assigned|revoked|lost|ERROR|WARNING|Traceback|rror:", ln)
                and "rejected:" not in ln]
        try:
            m = [f"{n}{dict(ls)} {v}" for (n, ls), v in self.metrics().items() if n.startswith("tomd_consumer_")]
        except OSError as exc:
            m = [f"(no metrics: {exc})"]
        return "".join(keep[-60:]) + "\n".join(m)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} from /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            body = resp.read().decode()
        out = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=10) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False


def start_daemon(name: str, config: Path) -> Daemon:
    env = {**os.environ, "TOMD_CONFIG": str(config)}
    proc = subprocess.Popen([sys.executable, "-m", "tomd.cli", "run"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Daemon(name, proc)


def total(m: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def held_partitions(m: dict, topic: str) -> set[int]:
    """Partitions this daemon holds now: the per-partition series (lag as of the last fetch,
    committed offset) are exported only for the partitions assigned to it."""
    return {int(dict(ls)["partition"]) for (n, ls), _ in m.items()
            if n in ("tomd_consumer_lag_messages", "tomd_consumer_committed_offset")
            and dict(ls).get("topic") == topic}


def wait_until(what: str, cond: Callable[[], bool], daemons: list[Daemon], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for d in daemons:
            assert d.alive(), f"daemon {d.name} exited while waiting for {what}:\n{d.output}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(
            f"--- {d.name}\n{d.story()}" for d in daemons)
        time.sleep(0.1)


# ------------------------------------------------ "nothing twice" checks


def check_submissions(w: World) -> str:
    """Each request name reached the observatory at most once, and every request the database
    holds as submitted is one group there, under its own facility id."""
    db, sim = w.db, w.sim
    names = sim.names()
    twice = {n: c for n, c in names.items() if c > 1}
    assert not twice, f"submitted more than once: {twice}"
    with db.sessions() as s:
        rows = s.execute(select(ObservationRequest.name, ObservationRequest.facility_id)
                         .where(ObservationRequest.facility_id.is_not(None))).all()
    assert {n for n, _ in rows} == set(names), "the database and the observatory disagree"
    by_id = {str(g["id"]): g["name"] for g in sim.groups()}
    assert all(by_id[fid] == n for n, fid in rows)
    return f"{len(rows)} requests, each submitted once"


def overlaps(a: list[Call], b: list[Call]) -> list[tuple[Call, Call]]:
    """Pairs of calls, one from each list, that were in progress at the same time."""
    out, j = [], 0
    a, b = sorted(a, key=lambda c: c.start), sorted(b, key=lambda c: c.start)
    for x in a:
        while j < len(b) and b[j].end < x.start:
            j += 1
        out += [(x, y) for y in b[j:] if y.start <= x.end and y.end >= x.start]
        if len(out) > 10:
            break
    return out


def check_polls(w: World) -> str:
    """Two daemons never polled the observatory at the same time (each facility's poll holds a
    PostgreSQL advisory lock), and every state change of a request is recorded once."""
    la, lb = w.proxies["a"].listings(), w.proxies["b"].listings()
    both = overlaps(la, lb)
    assert la and lb, f"both daemons polled: a {len(la)} listing calls, b {len(lb)}"
    assert not both, f"the two daemons polled at the same time: {both[:3]}"
    with w.db.sessions() as s:
        rows = s.execute(select(ObservationStatus.request_id, ObservationStatus.state)
                         .order_by(ObservationStatus.request_id, ObservationStatus.id)).all()
    history: dict[int, list[str]] = {}
    for rid, state in rows:
        history.setdefault(rid, []).append(state)
    again = {rid: h for rid, h in history.items() if any(x == y for x, y in zip(h, h[1:]))
             or h.count("completed") > 1}
    assert not again, f"a state change recorded twice: {dict(list(again.items())[:5])}"
    completed = sum(h.count("completed") for h in history.values())
    return (f"status listings: a {len(la)} calls, b {len(lb)}, never at the same time; {len(rows)} status rows, "
            f"each change once ({completed} completions)")


def check_hooks(w: World) -> str:
    """The hook's own journal has each event once (bar a run in flight at the kill), one run per
    hook and event, and every event of the kinds it takes was run."""
    lines = w.journal.read_text().splitlines()
    seen = Counter(int(ln.split()[0]) for ln in lines)
    twice = {e: n for e, n in seen.items() if n > 1}
    assert set(twice) <= w.in_flight["hook_runs"] and max(twice.values(), default=1) <= 2, \
        f"hook ran twice for events not in flight at the kill: {twice}"
    with w.db.sessions() as s:
        doubled = s.execute(select(HookRun.hook, HookRun.event_id).group_by(HookRun.hook, HookRun.event_id)
                            .having(func.count() > 1)).all()
        events = set(s.scalars(select(OutboxEvent.id).where(OutboxEvent.kind.in_(HOOK_KINDS))))
        runs = {e: st for e, st in s.execute(select(HookRun.event_id, HookRun.state).where(HookRun.hook == HOOK))
                if e in events}  # its registration is a run too (of hook.registered)
    assert not doubled, doubled
    assert set(runs) == events and set(runs.values()) == {"done"}, Counter(runs.values())
    assert set(seen) == events
    return f"{len(events)} hook runs, one per event ({len(twice)} in flight at the kill ran again)"


def check_notifications(w: World) -> str:
    """Every notification was delivered to the webhook once (bar a send in flight at the kill)."""
    with w.db.sessions() as s:
        rows = dict(s.execute(select(Notification.id, Notification.state)).all())
        keys = s.execute(select(Notification.channel, Notification.dedupe_key)).all()
    assert len(keys) == len(set(keys))
    assert rows and set(rows.values()) == {"sent"}, Counter(rows.values())
    got = w.webhook.received
    assert set(got) == set(rows), (len(got), len(rows))
    twice = {i: n for i, n in got.items() if n > 1}
    assert set(twice) <= w.in_flight["notifications"] and max(twice.values(), default=1) <= 2, \
        f"delivered twice though not in flight at the kill: {twice}"
    return f"{len(rows)} notifications, each delivered once ({len(twice)} in flight at the kill sent again)"


def check_downloads(w: World) -> str:
    """Every frame of every completed request is stored once, downloaded once (bar one in flight
    at the kill)."""
    per_frame = Counter(int(r.path.split("/")[2]) for r in w.sim.downloads())
    with w.db.sessions() as s:
        # The frames of observation requests (alert cutouts are products too, stored by ingest).
        stored = s.execute(select(DataProduct.product_id, DataProduct.state)
                           .where(DataProduct.request_id.is_not(None))).all()
    assert stored and {st for _, st in stored} == {"stored"}, Counter(st for _, st in stored)
    ids = [int(pid) for pid, _ in stored]
    assert len(ids) == len(set(ids)) and set(ids) == set(per_frame)
    by_request: dict[int, set[int]] = {}
    for i in ids:
        by_request.setdefault(i // 1000, set()).add(i)  # the sim's frame ids: request id × 1000 + n
    for rid, frames in by_request.items():
        assert frames == {f["id"] for f in w.sim.frames(rid)}, rid
    twice = {f: n for f, n in per_frame.items() if n > 1}
    assert set(twice) <= w.in_flight["downloads"] and max(twice.values(), default=1) <= 2, \
        f"downloaded twice though not in flight at the kill: {twice}"
    return f"{len(ids)} frames stored, each downloaded once ({len(twice)} in flight at the kill fetched again)"


def side_effect_checks() -> list[Callable[[World], str]]:
    """Every check that something done on the outside happened once, whichever daemon did it.

    Each is ``check(world) -> str`` (a one-line summary) and raises AssertionError otherwise.
    """
    return [check_submissions, check_polls, check_hooks, check_notifications, check_downloads]


# ------------------------------------------------------------------- test


JOURNAL_HOOK = '''
from tomd.hooks import on


@on("observation.status_changed", "data.stored")
def journal(ctx):
    # One short O_APPEND write per run: both daemons' workers append to this one file.
    with open({path!r}, "a") as fh:
        fh.write(f"{{ctx.event_id}} {{ctx.hook}}\\n")
'''


def write_shared(tmp_path: Path) -> Path:
    """The rule and hook files both daemons read; returns the hook's journal."""
    rules = tmp_path / "rules"
    rules.mkdir()
    # Fires on every alert of a new target: each alert means one observation request (one frame)
    # and one webhook notification. (ZTF's magpsf is in every packet; alert.mag is None for a
    # negative subtraction.)
    (rules / "follow-everything.toml").write_text("""
name = "follow-everything"
sources = ["ztf"]
when = "alert.fields.magpsf < 30"

[observe]
facility = "sim"
template = "1m-r"
window = "24h"

[notify]
channels = ["ops"]
message = "{target} fired"
""")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    journal = tmp_path / "journal.txt"
    journal.touch()
    (hooks / "journal.py").write_text(JOURNAL_HOOK.format(path=str(journal)))
    return journal


def write_config(tmp_path: Path, name: str, db_url: str, bootstrap: str, topic: str, sim_url: str,
                 webhook_url: str) -> Path:
    """One daemon's config: the same for both but for the way to the observatory (its proxy)."""
    path = tmp_path / f"tomd-{name}.toml"
    path.write_text(f"""
[database]
url = "{db_url}"

[metrics]
listen = "127.0.0.1:0"

[storage]
url = "file://{tmp_path}/data"

[rules]
paths = ["{tmp_path}/rules"]

[hooks]
paths = ["{tmp_path}/hooks"]

[data]
interval = "1s"

[facilities.sim]
kind = "sim"
url = "{sim_url}"
rate_limit = 1000
poll_interval = "1s"

[facilities.sim.templates.1m-r]
instrument_type = "1M0-SCICAM-SINISTRO"
filters = ["rp"]
exposure_time = 60
exposure_count = 1

[notify.channels.ops]
kind = "webhook"
url = "{webhook_url}"
image = false

[[streams]]
name = "ztf"
bootstrap = "{bootstrap}"
topics = ["{topic}"]
format = "ztf-avro"
group = "tomd-scaleout"
batch_size = 20
batch_timeout = "200ms"

[streams.kafka]
"session.timeout.ms" = 2000
"heartbeat.interval.ms" = 500
""")
    return path


def count(db, model) -> int:
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def open_intents(db) -> int:
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(ObservationRequest)
                        .where(ObservationRequest.state.in_(OPEN)))


def end_leases_of(db, pid: int, in_flight: dict[str, set]) -> dict[str, int]:
    """A killed daemon's claims stay until their leases end (minutes). End them now, as time would,
    and note what it had in flight: those runs, sends and downloads may happen a second time."""
    from datetime import datetime, timedelta, timezone

    mine = f"%:{pid}:%"
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    ended = {}
    with db.sessions.begin() as s:
        runs = s.execute(select(HookRun.id, HookRun.event_id).where(HookRun.claimed_by.like(mine),
                                                                     HookRun.state == "running")).all()
        in_flight["hook_runs"] |= {e for _, e in runs}
        ended["hook runs"] = len(runs)
        s.execute(update(HookRun).where(HookRun.id.in_([i for i, _ in runs])).values(claimed_until=past))
        sends = s.execute(update(Notification).where(Notification.claimed_by.like(mine),
                                                     Notification.state == "pending")
                          .values(claimed_until=past).returning(Notification.id)).scalars().all()
        in_flight["notifications"] |= set(sends)
        ended["notifications"] = len(sends)
        downloading = [p for p in s.scalars(select(DataProduct).where(DataProduct.state == "downloading"))
                       if f":{pid}:" in str(((p.meta or {}).get("claim") or {}).get("by", ""))]
        for p in downloading:
            p.meta = {**p.meta, "claim": {**p.meta["claim"], "until": past.isoformat()}}
        in_flight["downloads"] |= {int(p.product_id) for p in downloading}
        ended["downloads"] = len(downloading)
        # A request's data lease is its data_due_at moved ahead; due now, whoever held it (the
        # products' own claims keep a live download from being doubled).
        ended["data leases"] = s.execute(update(ObservationRequest).where(ObservationRequest.data_due_at > past)
                                         .values(data_due_at=past)).rowcount
        ended["intents"] = s.execute(update(ObservationRequest)
                                     .where(ObservationRequest.state.in_(OPEN),
                                            ObservationRequest.claimed_by.like(mine))
                                     .values(claimed_until=past, next_attempt_at=None)).rowcount
    return ended


def progress(db, sim: SimObservatory) -> dict[str, object]:
    """Where the later stages are (for a wait that timed out)."""
    downloads = Counter(int(r.path.split("/")[2]) for r in sim.downloads())
    with db.sessions() as s:
        return {
            "downloads": (len(downloads), sum(downloads.values())),
            "completed without products": s.scalar(select(func.count()).select_from(ObservationRequest).where(
                ObservationRequest.state == "completed",
                ~select(DataProduct.id).where(DataProduct.request_id == ObservationRequest.id).exists())),
            "product kinds": Counter(s.scalars(select(DataProduct.kind))),
            "requests": Counter(s.scalars(select(ObservationRequest.state))),
            "products": Counter(s.scalars(select(DataProduct.state))),
            "hook runs": Counter(s.scalars(select(HookRun.state).where(HookRun.hook == HOOK))),
            "hook events": s.scalar(select(func.count()).select_from(OutboxEvent)
                                    .where(OutboxEvent.kind.in_(HOOK_KINDS))),
            "notifications": Counter(s.scalars(select(Notification.state))),
            "data due": s.scalar(select(func.count()).select_from(ObservationRequest)
                                 .where(ObservationRequest.data_due_at.is_not(None))),
        }


def settled(db, sim: SimObservatory) -> dict[str, int] | None:
    """None until every request completed with its frames stored (each frame the observatory was
    asked for stored), every hook run done and every notification sent; then how many of each."""
    with db.sessions() as s:
        states = Counter(s.scalars(select(ObservationRequest.state)))
        products = Counter(s.scalars(select(DataProduct.state).where(DataProduct.request_id.is_not(None))))
        without = s.scalar(select(func.count()).select_from(ObservationRequest).where(
            ObservationRequest.state == "completed",
            ~select(DataProduct.id).where(DataProduct.request_id == ObservationRequest.id).exists()))
        events = s.scalar(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.kind.in_(HOOK_KINDS)))
        runs = s.scalar(select(func.count()).select_from(HookRun).join(OutboxEvent, OutboxEvent.id == HookRun.event_id)
                        .where(HookRun.hook == HOOK, HookRun.state == "done", OutboxEvent.kind.in_(HOOK_KINDS)))
        notes = Counter(s.scalars(select(Notification.state)))
    downloaded = {int(r.path.split("/")[2]) for r in sim.downloads()}
    if (set(states) - {"completed", "rejected"} or without or set(products) - {"stored"}
            or products.get("stored", 0) != len(downloaded) or runs != events or set(notes) - {"sent"}):
        return None
    return {"requests completed": states["completed"], "frames": products["stored"], "hook runs": runs,
            "notifications": notes.get("sent", 0)}


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_two_daemons_share_partitions_ingest_once_submit_once_and_take_over(db, kafka_broker, make_topic,
                                                                           shared_data, tmp_path):
    first, second = 120, 360
    values = ztf_copies(first + second, seed=11)
    topic = make_topic(partitions=PARTITIONS)
    # Requests complete 4 s after submission, with one frame each: both daemons poll, fetch,
    # run the hook on status changes and stored data, and notify, while alerts still arrive.
    sim = SimObservatory(token=None, pending_s=4.0).start()
    sim.archive(frames_per_config=1)
    proxies = {n: Proxy(sim.url) for n in ("a", "b")}
    webhook = Webhook()
    journal = write_shared(tmp_path)
    world = World(db, sim, proxies, webhook, journal)
    cfgs = {n: write_config(tmp_path, n, db.url, kafka_broker.bootstrap, topic, proxies[n].url, webhook.url)
            for n in ("a", "b")}
    a, b = start_daemon("a", cfgs["a"]), start_daemon("b", cfgs["b"])
    daemons = [a, b]
    try:
        # 1. Both join the group; the partitions are split between them.
        wait_until("both daemons serving /metrics", lambda: a.url is not None and b.url is not None, daemons)
        wait_until("both daemons ready", lambda: a.ready() and b.ready(), daemons)
        produced = produce_spread(kafka_broker.bootstrap, topic, values[:first])
        wait_until(f"{first} alerts ingested", lambda: count(db, AlertRow) == first, daemons)
        wait_until("every intent submitted", lambda: open_intents(db) == 0, daemons)

        def split() -> bool:
            # Counters move just after the commits the waits above saw (a submission is counted after
            # its row is written): wait until they account for every alert before comparing them.
            ma, mb = a.metrics(), b.metrics()
            outcomes = sum(total(m, "tomd_submissions_total", facility="sim")
                           + total(m, "tomd_submission_rejections_total") for m in (ma, mb))
            return (total(ma, "tomd_alerts_ingested_total") + total(mb, "tomd_alerts_ingested_total") == first
                    and outcomes == first
                    and len(held_partitions(ma, topic) | held_partitions(mb, topic)) == PARTITIONS)

        wait_until("the metrics of both daemons to show the split", split, daemons)
        ma, mb = a.metrics(), b.metrics()
        pa, pb = held_partitions(ma, topic), held_partitions(mb, topic)
        assert pa and pb and not pa & pb and pa | pb == set(range(PARTITIONS)), (pa, pb)
        ingested = {d.name: total(m, "tomd_alerts_ingested_total", topic=topic) for d, m in ((a, ma), (b, mb))}
        assert ingested["a"] > 0 and ingested["b"] > 0 and sum(ingested.values()) == first, ingested
        # Nobody handled a message the other one had: no duplicates anywhere.
        assert total(ma, "tomd_alerts_duplicate_total") == total(mb, "tomd_alerts_duplicate_total") == 0
        assert total(ma, "tomd_consumer_assigned_partitions") + total(mb, "tomd_consumer_assigned_partitions") \
            == PARTITIONS
        submitted = {d.name: total(m, "tomd_submissions_total", facility="sim") for d, m in ((a, ma), (b, mb))}
        rejected = sum(total(m, "tomd_submission_rejections_total") for m in (ma, mb))
        assert sum(submitted.values()) == len(sim.names()) and sum(submitted.values()) + rejected == first
        print(f"\nphase 1: {first} alerts on {PARTITIONS} partitions; daemon a held {sorted(pa)} and ingested "
              f"{ingested['a']:.0f}, daemon b held {sorted(pb)} and ingested {ingested['b']:.0f}; submissions "
              f"a={submitted['a']:.0f} b={submitted['b']:.0f}, rejected {rejected:.0f}")
        # Both daemons work on the later stages too, the facility's polls taken in turns.
        # (Listings seen at each daemon's own proxy, not only its poll counter: a poll that found
        # nothing due counts as ok without listing anything, and check_polls needs both to have listed.)
        wait_until("both daemons polling, downloading, running the hook and notifying",
                   lambda: all(total(m, "tomd_status_polls_total", outcome="ok") > 0
                               for m in (a.metrics(), b.metrics()))
                   and all(p.listings() for p in proxies.values())
                   and len(journal.read_text().splitlines()) > 0 and webhook.received
                   and count(db, DataProduct) > 0, daemons)

        # 2. A killed mid-stream: b takes over a's partitions and ingests the rest.
        produced2 = produce_spread(kafka_broker.bootstrap, topic, values[first:])
        wait_until("daemon a well into the second batch",
                   lambda: count(db, AlertRow) >= first + second // 4, daemons)
        ma = a.metrics()  # its last word
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(30)
        at_kill = count(db, AlertRow)
        daemons = [b]
        # 3. Claims a held when it died (intents, hook runs, sends, downloads) stay claimed until their
        #    leases end (minutes). End them now, as time would: b finishes them; it looks each
        #    "submitting" intent up by name before any retry.
        ended = end_leases_of(db, a.proc.pid, world.in_flight)
        wait_until("every alert ingested by the survivor", lambda: count(db, AlertRow) == first + second, daemons)
        wait_until("b holding every partition",
                   lambda: held_partitions(b.metrics(), topic) == set(range(PARTITIONS)), daemons)
        mb = b.metrics()
        assert total(mb, "tomd_consumer_assigned_partitions") == PARTITIONS
        wait_until("b's lag down to 0", lambda: total(b.metrics(), "tomd_consumer_lag_messages") == 0, daemons)

        # Exactly once: one row per (partition, offset), as many per partition as were produced.
        with db.sessions() as s:
            per_partition = dict(s.execute(select(AlertRow.partition, func.count()).group_by(AlertRow.partition)).all())
            distinct = s.scalar(select(func.count()).select_from(
                select(AlertRow.partition, AlertRow.offset).distinct().subquery()))
        assert per_partition == {p: produced[p] + produced2[p] for p in range(PARTITIONS)}
        assert distinct == first + second

        produce(kafka_broker.bootstrap, topic, ztf_copies(1, seed=12), partition=0)  # wakes b's submitter
        wait_until("every intent resolved", lambda: open_intents(db) == 0, daemons)
        # The survivor finishes what a left: every request polled to completion, its frame stored,
        # every hook run done, every notification sent.
        try:
            wait_until("b finishing the polls, downloads, hook runs and notifications",
                       lambda: settled(db, sim) is not None, daemons, timeout=120)
        except AssertionError as exc:
            raise AssertionError(f"{progress(db, sim)}\n{exc}") from None
        done = settled(db, sim)
        summaries = [check(world) for check in side_effect_checks()]
        mb = b.metrics()
        with db.sessions() as s:  # those a left in "submitting" were found by name, never sent again
            recovered = s.scalar(select(func.count()).select_from(ObservationStatus)
                                 .where(ObservationStatus.message.like("found by name%")))
        polls = {d: {o: total(m, "tomd_status_polls_total", outcome=o) for o in ("ok", "skipped", "failed")}
                 for d, m in (("a", ma), ("b", mb))}
        assert polls["a"]["ok"] > 0 and polls["b"]["ok"] > 0
        print(f"phase 2: a killed at {at_kill - first} of {second} alerts; b took over all {PARTITIONS} "
              f"partitions and ingested the rest ({first + second} alerts in total, each once); "
              f"{ended['intents']} intents a held when it died were finished by b ({recovered} of them found at the "
              f"observatory by name); a's other claims ended: {ended}; b finished: {done}; "
              f"poll cycles a={polls['a']} b={polls['b']}")
        print("checks: " + "; ".join(summaries))
    finally:
        for d in (a, b):
            if d.alive():
                d.proc.send_signal(signal.SIGTERM)
        for d in (a, b):
            try:
                d.proc.wait(120)
            except subprocess.TimeoutExpired:
                d.proc.kill()
        sim.stop()
        webhook.stop()
        for p in proxies.values():
            p.stop()
    assert b.proc.returncode == 0, b.output
