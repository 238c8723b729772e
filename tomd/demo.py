"""``make demo``: the whole pipeline on embedded defaults, then a summary.

Everything runs in a scratch directory (SQLite, local storage) with no
configuration and no network beyond loopback: a local Kafka-protocol broker
carries real ZTF and GCN packets, a simulated observatory accepts the rules'
requests and completes them in seconds, a tiny HTTP server receives the signed
webhook notifications. The daemon (``tomd run``'s own ``run()``, every
component wired) follows the requests to completion, stores their frames,
runs the example hooks and sends notifications; a watcher stops it once all
of that has settled (or after a timeout, so the demo never hangs). Each stage
prints what it did; the demo ends by itself and says how to run it for real.
"""

from __future__ import annotations

import json
import shutil
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import tomd
from tomd.db import migrate, repository as repo
from tomd.targets import store
from tomd.targets.importer import import_file

# The daemon's run ends when everything has settled (20-35 s here), or after this long regardless:
# generous, a loaded machine (CI) is slow, and the demo ends as soon as it settles.
SETTLE_TIMEOUT_S = 300.0
# The simulated observatory: seconds PENDING, then IN_PROGRESS, then COMPLETED.
SIM_PENDING_S, SIM_RUNNING_S = 2.0, 2.0
# Example hooks from the repository's hooks/ directory that the demo runs.
DEMO_HOOKS = ("data_quality.py", "status_notifier.py")
# Which events the example hooks take (to know when every delivery has run).
HOOK_EVENTS = {"data_quality.check_fits": ("data.stored",),
               "status_notifier.tell": ("observation.status_changed", "observation.failed",
                                        "observation.rejected")}
FINAL_STATES = ("completed", "failed", "expired", "cancelled", "rejected")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, title: str) -> None:
    _say()
    _say(f"── {n}. {title} " + "─" * max(0, 60 - len(title)))


def run_demo(workdir: Path) -> int:
    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    workdir = workdir.resolve()
    url = f"sqlite:///{workdir / 'tomd.db'}"
    summary: list[str] = []

    _step(1, "database")
    engine = migrate.connect(url)
    before, after = migrate.upgrade(engine)
    sessions = migrate.sessions(engine)
    _say(f"created {url} at schema revision {after}")

    _step(2, "targets: bulk import, twice")
    sample = workdir / "sample_targets.csv"
    sample.write_bytes(resources.files("tomd.data").joinpath("sample_targets.csv").read_bytes())
    first = import_file(sessions, sample, radius_arcsec=1.5, progress=False)
    _say(f"first import:  {first.created} created, {first.updated} merged into an existing target")
    second = import_file(sessions, sample, radius_arcsec=1.5, progress=False)
    _say(f"second import: {second.created} created, {second.unchanged} unchanged (no duplicates)")
    with sessions() as s:
        n_targets = repo.count_targets(s)
        merged = store.resolve(s, "ZTF23aaklqou")
        _say(f'"ZTF23aaklqou" (a row 0.2" from SN 2023ixf) resolved to target #{merged.id} {merged.name}')
    summary.append(f"targets: {n_targets} from {sample.name} (one row merged by position, none doubled "
                   "by the second import)")

    _step(3, "cone search: 10' around M101")
    with sessions() as s:
        m101 = store.resolve(s, "NGC 5457")
        hits = store.cone(s, m101.ra, m101.dec, 600.0)
        rows = store.describe(s, repo.query_targets(s, ids=[h[0] for h in hits]))
    seps = dict(hits)
    for r in sorted(rows, key=lambda r: seps[r["id"]]):
        _say(f"  {r['name']:12s} ra={r['ra']:10.5f} dec={r['dec']:+9.5f}  {seps[r['id']]:7.1f}\"  "
             f"tags={','.join(r['tags']) or '-'}")
    summary.append(f"cone search around M101: {len(hits)} targets within 10'")

    _step(4, "the daemon: Kafka broker, real alerts, simulated observatory")
    daemon_lines: list[str] = []
    ok, cfg_path, metrics_url, received = _demo_daemon(workdir, url, sessions, daemon_lines)
    _show_results(workdir, cfg_path, sessions, received, summary)
    summary += daemon_lines

    _step(9, "summary")
    for line in summary:
        _say(f"  • {line}")
    _say(f"  done in {time.perf_counter() - t0:.1f} s; everything is in {workdir}/")
    if not ok:
        _say(f"  ✗ the daemon had not settled after {SETTLE_TIMEOUT_S:.0f} s (see the log above)")
    _say()
    _say("Run tomd for real:")
    _say("  cp config.example.toml tomd.toml      # then edit: database, streams, facilities, channels")
    _say("  .venv/bin/tomd config check           # one line per problem, exit 1 if any")
    _say("  .venv/bin/tomd db upgrade             # create or migrate the schema")
    _say("  .venv/bin/tomd target import my-targets.csv")
    _say("  .venv/bin/tomd run                    # streams, submitter, status polls, downloads, hooks,")
    _say("                                        # notifications; until SIGTERM (SIGHUP re-reads rules)")
    _say("  curl http://127.0.0.1:9464/metrics    # Prometheus metrics; /healthz and /readyz beside them")
    _say(f"  (this run served them at {metrics_url} while the daemon ran)")
    _say("Look around what the demo stored:")
    for cmd in ("target list", "target show ZTF17aaarzyp", "obs list", "data list", "hook list",
                "notify list", "alert dead-letters"):
        _say(f"  TOMD_CONFIG={cfg_path} .venv/bin/tomd {cmd}")
    engine.dispose()
    return 0 if ok else 1


def _demo_daemon(workdir: Path, url: str, sessions, summary: list[str]) -> tuple[bool, Path, str, list[dict]]:
    """Publish the shipped packets to a local broker and run the daemon until everything settled."""
    from tomd.alerts.broker import LOCAL_GROUP_SETTINGS, LocalBroker, create_topics, free_port, produce
    from tomd.config import load_config
    from tomd.daemon import run
    from tomd.facilities.sim import SimObservatory

    alerts_dir = resources.files("tomd.data").joinpath("alerts")
    ztf = sorted((p.read_bytes() for p in alerts_dir.joinpath("ztf").iterdir() if p.name.endswith(".avro")))
    gcn = [p.read_bytes() for p in sorted(alerts_dir.joinpath("gcn").iterdir(), key=lambda p: p.name)
           if p.name.endswith((".xml", ".json"))]
    secret = secrets.token_hex(16)  # the webhook's signing secret, in a file the config names
    hooks = _copy_hooks(workdir / "hooks")
    with LocalBroker(log_path=workdir / "broker.log") as broker, \
            SimObservatory(token="demo-token", pending_s=SIM_PENDING_S, running_s=SIM_RUNNING_S) as sim, \
            _WebhookReceiver(secret) as webhook:
        _say(f"Kafka-protocol broker (Tansu) on {broker.bootstrap}")
        create_topics(broker.bootstrap, {"ztf_demo": 2, "gcn_demo": 1})
        # One corrupted message in the middle: it must end in the dead letters.
        produce(broker.bootstrap, "ztf_demo", ztf[:7] + [b"\x00not an alert"] + ztf[7:])
        produce(broker.bootstrap, "gcn_demo", gcn)
        published = len(ztf) + 1 + len(gcn)
        _say(f"published {len(ztf)} ZTF alerts (+1 corrupted) to ztf_demo, {len(gcn)} GCN notices to gcn_demo")
        _say(f"simulated observatory on {sim.url}: PENDING {SIM_PENDING_S:g} s, IN_PROGRESS {SIM_RUNNING_S:g} s, "
             "then COMPLETED with FITS frames in its archive")
        _say(f"webhook receiver on {webhook.url} (checks the Tomd-Signature HMAC)")
        if hooks:
            _say(f"hooks: {', '.join('hooks/' + h for h in hooks)} copied to {workdir / 'hooks'}")
        else:
            _say("hooks: the repository's hooks/ examples are not found next to this install; none run")
        _write_demo_rules(workdir / "rules")
        (workdir / "webhook.secret").write_text(secret + "\n")
        metrics_port = free_port()  # known before the daemon starts, to print and scrape it
        cfg_path = workdir / "tomd.toml"
        kafka = "\n".join(f'"{k}" = {v}' for k, v in LOCAL_GROUP_SETTINGS.items())
        cfg_path.write_text(f"""# written by `tomd demo`
[database]
url = "{url}"

[storage]
url = "file://{workdir}/data"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[rules]
paths = ["{workdir}/rules"]

[hooks]
paths = ["{workdir}/hooks"]
timeout = "30s"
poll = "1s"

[hooks.settings.status_notifier]
channel = "demo-webhook"

# The simulated frames carry no DATE-OBS or EXPTIME (real LCO frames do): check what they have.
[hooks.settings.data_quality]
channel = "log"
required = ["OBJECT", "FILTER"]

# The simulated observatory the demo started; polled every second (a real one: minutes).
[facilities.sim]
kind = "sim"
url = "{sim.url}"
token = "demo-token"
poll_interval = "1s"

[data]
interval = "1s"

[notify]
interval = "1s"

[notify.channels.log]
kind = "log"

[notify.channels.demo-webhook]
kind = "webhook"
url = "{webhook.url}"
secret_file = "{workdir}/webhook.secret"

[[streams]]
name = "ztf"
bootstrap = "{broker.bootstrap}"
topics = ["ztf_demo"]
format = "ztf-avro"
[streams.kafka]
{kafka}

[[streams]]
name = "gcn"
bootstrap = "{broker.bootstrap}"
topics = ["gcn_demo"]
format = "auto"
[streams.kafka]
{kafka}
""")
        config = load_config(cfg_path)
        _say(f"daemon config: {cfg_path}")
        _say("starting the daemon (tomd run, every component); its log follows on stderr")
        _say()
        outcome: dict = {}
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
                 if sig is not None}
        t_run = time.perf_counter()
        try:
            code = run(config, on_started=lambda d: _watch(d, sessions, published, webhook, metrics_port, outcome))
        finally:
            for sig, handler in saved.items():  # run() installs the daemon's handlers
                signal.signal(sig, handler)
        elapsed = time.perf_counter() - t_run
        received = list(webhook.received)
    _say()
    settled = bool(outcome.get("settled"))
    why = "everything settled" if settled else f"not settled, still waiting for {outcome.get('waiting', '?')}"
    _say(f"the daemon ran {elapsed:.1f} s and was stopped by the demo ({why}; exit code {code})")
    for m in outcome.get("metrics", []):
        _say(f"  {m}")

    verified = sum(1 for r in received if r["verified"])
    summary.append(f"webhook: {len(received)} signed POST(s) received by the loopback server, {verified} with a "
                   "valid HMAC signature")
    summary.append(f"the daemon ran {elapsed:.0f} s (tomd run's own run(), every component wired), "
                   f"stopped by the demo once {'everything settled' if settled else 'its timeout passed'}")
    return settled and code == 0, cfg_path, f"http://127.0.0.1:{metrics_port}/metrics", received


def _watch(daemon, sessions, published: int, webhook: "_WebhookReceiver", metrics_port: int, outcome: dict) -> None:
    """Stop the daemon once the pipeline has settled, or after SETTLE_TIMEOUT_S."""

    def loop() -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline and not daemon.stop.is_set():
            consumed = sum(r.consumer.stats.consumed for r in daemon.runners)
            waiting = "the streams" if consumed < published else _waiting_for(sessions, webhook)
            if waiting is None:
                outcome["settled"] = True
                break
            outcome["waiting"] = waiting
            time.sleep(0.5)
        outcome["metrics"] = _scrape(metrics_port)
        daemon.stop.set()

    threading.Thread(target=loop, name="demo-watcher", daemon=True).start()


def _waiting_for(sessions, webhook: "_WebhookReceiver") -> str | None:
    """What the pipeline is still doing (None: settled): requests, downloads, hook runs, notifications."""
    from sqlalchemy import select

    from tomd.db.models import DataProduct, HookRun, Notification, ObservationRequest, OutboxEvent

    with sessions() as s:
        reqs = list(s.scalars(select(ObservationRequest)))
        if not reqs or any(r.state not in FINAL_STATES for r in reqs):
            return "observation requests to complete"
        products = list(s.scalars(select(DataProduct).where(DataProduct.request_id.is_not(None))))
        with_data = {p.request_id for p in products if p.state == "stored"}
        if any(p.state == "pending" for p in products) or \
                any(r.id not in with_data for r in reqs if r.state == "completed"):
            return "frames to download"
        ran = {(h.hook, h.event_id) for h in s.scalars(select(HookRun).where(HookRun.state.in_(("done", "failed"))))}
        for hook, kinds in HOOK_EVENTS.items():
            for ev in s.scalars(select(OutboxEvent.id).where(OutboxEvent.kind.in_(kinds))):
                if (hook, ev) not in ran:
                    return "hook runs"
        notes = list(s.scalars(select(Notification)))
        if not notes or any(n.state == "pending" for n in notes):
            return "notifications to be sent"
    if not webhook.received:
        return "the webhook"
    return None


def _scrape(port: int) -> list[str]:
    """A few of the daemon's own metrics, read from its /metrics endpoint while it runs."""
    import httpx

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    except httpx.HTTPError as exc:
        return [f"/metrics not read: {exc}"]
    lines = [ln for ln in text.splitlines() if ln.startswith("tomd_")]
    # One counter per stage, summed over its labels.
    stages = ("tomd_alerts_ingested_total", "tomd_rule_verdicts_total", "tomd_submissions_total",
              "tomd_observation_status_changes_total", "tomd_data_products_downloaded_total",
              "tomd_hook_runs_total", "tomd_notifications_sent_total")
    shown = []
    for name in stages:
        values = [float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.split("{")[0].split(" ")[0] == name]
        if values:
            shown.append(f"  {name} {sum(values):g}")
    return [f"http://127.0.0.1:{port}/metrics: {len(lines)} tomd series while running, among them"] + shown


def _show_results(workdir: Path, cfg_path: Path, sessions, received: list[dict], summary: list[str]) -> None:
    """What the daemon did, read back from the database and through the CLI."""
    from sqlalchemy import func, select

    from tomd.cli import main as tomd_main
    from tomd.db.models import (AlertRow, DataProduct, Decision, HookRun, Notice, Notification,
                                ObservationRequest, OutboxEvent, Photometry)
    from tomd.products import plot_light_curve

    def cli(*argv: str) -> None:
        _say(f"$ tomd {' '.join(argv)}")
        sys.stdout.flush()
        tomd_main(["--config", str(cfg_path), *argv])
        sys.stdout.flush()

    with sessions() as s:
        by_source = dict(s.execute(select(AlertRow.source, func.count()).group_by(AlertRow.source)).all())
        dead = list(repo.dead_letters(s))
        n_targets = repo.count_targets(s)
        name, tid, n_phot = s.execute(
            select(AlertRow.object_id, AlertRow.target_id, func.count(Photometry.id))
            .join(Photometry, Photometry.target_id == AlertRow.target_id)
            .where(AlertRow.source == "ztf").group_by(AlertRow.object_id, AlertRow.target_id)
            .order_by(func.count(Photometry.id).desc()).limit(1)
        ).one()
        notices = list(s.scalars(select(Notice).order_by(Notice.id)))
        verdicts = [(rule, outcome, n) for (rule, outcome), n in sorted(repo.verdict_counts(s).items())]
        fired = s.scalars(select(Decision).where(Decision.outcome == "fired").order_by(Decision.id)).first()
        requests = list(s.scalars(select(ObservationRequest).order_by(ObservationRequest.id)))
        products = Counter((p.request_id is not None, p.state) for p in s.scalars(select(DataProduct)))
        runs = Counter((h.hook, h.state) for h, kind in s.execute(
            select(HookRun, OutboxEvent.kind).join(OutboxEvent, OutboxEvent.id == HookRun.event_id))
            if kind != "hook.registered")
        notes = Counter((n.channel, n.state) for n in s.scalars(select(Notification)))
        n_events = s.scalar(select(func.count()).select_from(OutboxEvent))

    _step(5, "alerts and rules")
    _say(f"alerts: {', '.join(f'{n} {src}' for src, n in sorted(by_source.items()))}; "
         f"{len(dead)} dead letter(s)")
    for d in dead:
        _say(f"  dead letter: {d.topic}[{d.partition}]@{d.offset}: {d.error}")
    for notice in notices:
        err = f"{notice.error_deg * 3600:.1f}\"" if notice.error_deg is not None else "?"
        tgt = f"→ target #{notice.target_id}" if notice.target_id else "(too coarse for a target)"
        _say(f"  notice {notice.event_id} {notice.notice_type}: error {err} {tgt}")
    _say()
    _say("rules: verdicts recorded with every alert (in the same transaction)")
    for rule, outcome, n in verdicts:
        _say(f"  {rule:22s} {outcome:12s} {n}")
    if fired is not None:
        _say()
        cli("rule", "explain", str(fired.alert_id))

    _step(6, "observations: submitted once, polled, frames stored")
    for r in requests:
        _say(f"  #{r.id} {r.name} → {r.facility} {r.template} {r.mode}: {r.state}"
             f" (facility id {r.facility_id or '-'}, {r.facility_state or r.last_error or ''})")
    done = [r for r in requests if r.state == "completed"]
    if done:
        _say()
        cli("obs", "show", str(done[0].id))
        _say()
        cli("data", "list", "--request", str(done[0].id))
        _say()
        _say("tags on the observed targets (data_quality.check_fits: dq-ok / dq-failed per frame):")
        with sessions() as s:
            for r in requests:
                if r.target_id:
                    row = store.describe(s, repo.query_targets(s, ids=[r.target_id]))[0]
                    _say(f"  {row['name']:14s} {', '.join(sorted(row['tags'])) or '-'}")

    _step(7, "hooks and notifications")
    cli("hook", "runs", "--limit", "8")
    _say()
    cli("notify", "list", "--limit", "8")
    _say()
    _say("what the webhook receiver got (signed JSON, one POST per delivery):")
    if not received:
        _say("  nothing")
    for r in received:
        mark = "signature verified ✓" if r["verified"] else "SIGNATURE INVALID ✗"
        _say(f"  POST {r['path']} delivery {r['delivery']} event {r['event']}: {mark}")
        for subject in r["subjects"]:
            _say(f"    {subject}")

    _step(8, f"light curve of {name}")
    png = workdir / f"lightcurve-{name}.png"
    plot_light_curve(sessions, tid, png)
    _say(f"  {name} (target #{tid}), {n_phot} photometry points → {png}")

    n_alerts = sum(by_source.values())
    summary.append(f"alerts: {n_alerts} ingested from the local Kafka broker "
                   f"({', '.join(f'{n} {src}' for src, n in sorted(by_source.items()))}); "
                   f"dead letters: {len(dead)} (the corrupted message)")
    summary.append(f"targets: {n_targets} in the database after the alerts; notices: {len(notices)}")
    summary.append("verdicts: " + ", ".join(f"{rule} {outcome} {n}" for rule, outcome, n in verdicts))
    by_state = Counter(r.state for r in requests)
    summary.append(f"requests: {len(requests)} ({', '.join(f'{n} {st}' for st, n in sorted(by_state.items()))}), "
                   "each submitted exactly once to the simulated observatory")
    summary.append(f"products stored: {products.get((True, 'stored'), 0)} FITS frames of the completed requests "
                   f"(+{products.get((False, 'stored'), 0)} ZTF alert cutouts) under {workdir / 'data'}"
                   + (f"; {products.get((True, 'failed'), 0)} failed" if products.get((True, "failed")) else ""))
    hook_done = Counter(h for (h, st), n in runs.items() for _ in range(n) if st == "done")
    hook_failed = sum(n for (_h, st), n in runs.items() if st == "failed")
    summary.append(f"hook runs: {sum(hook_done.values())} done ("
                   + ", ".join(f"{h} {n}" for h, n in sorted(hook_done.items())) + ")"
                   + (f", {hook_failed} failed" if hook_failed else "") + f"; {n_events} outbox events")
    sent = Counter(ch for (ch, st), n in notes.items() for _ in range(n) if st == "sent")
    unsent = sum(n for (_ch, st), n in notes.items() if st != "sent")
    summary.append(f"notifications sent: {sum(sent.values())} ("
                   + ", ".join(f"{ch} {n}" for ch, n in sorted(sent.items())) + ")"
                   + (f", {unsent} not sent" if unsent else ""))
    summary.append(f"light curve: {png}")


def _copy_hooks(dest: Path) -> list[str]:
    """The repository's example hooks, when this is a checkout (``make demo`` installs it editable)."""
    src = Path(tomd.__file__).resolve().parent.parent / "hooks"
    found = [h for h in DEMO_HOOKS if (src / h).is_file()]
    dest.mkdir(parents=True, exist_ok=True)
    for h in found:
        shutil.copyfile(src / h, dest / h)
    return found


class _WebhookReceiver:
    """A loopback HTTP server standing in for a webhook endpoint: it checks each POST's
    ``Tomd-Signature`` the way a receiver should and answers 401 to a bad one."""

    def __init__(self, secret: str):
        self.secret = secret
        self.received: list[dict] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/tomd-hook"

    def __enter__(self) -> "_WebhookReceiver":
        from tomd.notify import SIGNATURE_HEADER, verify

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = verify(receiver.secret, body, self.headers.get(SIGNATURE_HEADER, ""))
                try:
                    items = json.loads(body).get("notifications", [])
                except ValueError:
                    items = []
                receiver.received.append({
                    "path": self.path, "delivery": self.headers.get("Tomd-Delivery"),
                    "event": self.headers.get("Tomd-Event"), "verified": ok,
                    "subjects": [str(i.get("subject")) for i in items]})
                self.send_response(204 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet: the demo prints what it received
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="demo-webhook", daemon=True,
                         kwargs={"poll_interval": 0.1}).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _write_demo_rules(rules_dir: Path) -> None:
    """Two rules for the demo: an active one on the simulated facility, a test one."""
    rules_dir.mkdir(parents=True, exist_ok=True)
    (rules_dir / "bright-ztf.toml").write_text("""\
# Written by `tomd demo`: bright, real ZTF detections, observed on the simulated facility.
# A negative subtraction (isdiffpos 'f': fainter than the reference) has no alert.mag,
# so `alert.mag < 17` is false for it: this fires on positive subtractions only.
name = "bright-ztf"
description = "ZTF detections brighter than 17 mag with a good real/bogus score"
sources = ["ztf"]
when = "alert.mag < 17 and alert.fields.real_bogus > 0.5"
add_to_lists = ["demo-followup"]

[observe]
facility = "sim"
template = "1m-gri"
mode = "NORMAL"
window = "24h"
priority = 1.0

[notify]
channels = ["log"]
message = "{target} is bright: follow-up requested on the simulated 1 m"

[limits]
cooldown = "1d"
per_night = 5
""")
    (rules_dir / "grb-localised.toml").write_text("""\
# Written by `tomd demo`: a test-mode rule on well-localised GCN notices.
name = "grb-localised"
description = "GCN notices with an error radius under 5 arcmin (test mode: records, submits nothing)"
mode = "test"
sources = ["gcn"]
when = "alert.kind == 'localization' and target.name != None"
add_tags = ["grb"]
""")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-work")))
