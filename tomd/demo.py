"""``make demo``: the whole pipeline on embedded defaults, then a summary.

Everything runs in a scratch directory (SQLite, local storage) with no
configuration and no network beyond loopback. Each stage prints what it did;
the demo ends by itself and says how to run the daemon for real.
"""

from __future__ import annotations

import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from tomd.db import migrate, repository as repo
from tomd.targets import store
from tomd.targets.importer import import_file


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
    summary.append(f"{n_targets} targets from {sample.name} (one row merged by position)")

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

    _step(4, "alert streams: a local Kafka broker, real packets, the daemon")
    stream_lines = _demo_stream(workdir, url, sessions)
    summary += stream_lines

    _step(5, "summary")
    for line in summary:
        _say(f"  • {line}")
    _say(f"  done in {time.perf_counter() - t0:.1f} s; everything is in {workdir}/")
    _say()
    _say("Run tomd for real:")
    _say("  cp config.example.toml tomd.toml      # then edit: database, streams, facilities")
    _say("  .venv/bin/tomd config check           # one line per problem, exit 1 if any")
    _say("  .venv/bin/tomd db upgrade             # create or migrate the schema")
    _say("  .venv/bin/tomd target import my-targets.csv")
    _say("  .venv/bin/tomd run                    # consume every [[streams]] entry until SIGTERM")
    _say("Look around what the demo stored:")
    _say(f"  TOMD_CONFIG={workdir}/tomd.toml .venv/bin/tomd target list")
    _say(f"  TOMD_CONFIG={workdir}/tomd.toml .venv/bin/tomd target show ZTF17aaarzyp")
    _say(f"  TOMD_CONFIG={workdir}/tomd.toml .venv/bin/tomd alert dead-letters")
    engine.dispose()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-work")))


def _demo_stream(workdir: Path, url: str, sessions) -> list[str]:
    """Publish the shipped packets to a local broker and let ``tomd run`` ingest them."""
    from sqlalchemy import func, select

    from tomd.alerts.broker import LOCAL_GROUP_SETTINGS, LocalBroker, create_topics, produce
    from tomd.config import load_config
    from tomd.daemon import Daemon
    from tomd.db.models import AlertRow, Notice, Photometry

    alerts_dir = resources.files("tomd.data").joinpath("alerts")
    ztf = sorted((p.read_bytes() for p in alerts_dir.joinpath("ztf").iterdir() if p.name.endswith(".avro")))
    gcn = [p.read_bytes() for p in sorted(alerts_dir.joinpath("gcn").iterdir(), key=lambda p: p.name)
           if p.name.endswith((".xml", ".json"))]
    with LocalBroker(log_path=workdir / "broker.log") as broker:
        _say(f"Kafka-protocol broker (Tansu) on {broker.bootstrap}")
        create_topics(broker.bootstrap, {"ztf_demo": 2, "gcn_demo": 1})
        # One corrupted message in the middle: it must end in the dead letters.
        produce(broker.bootstrap, "ztf_demo", ztf[:7] + [b"\x00not an alert"] + ztf[7:])
        produce(broker.bootstrap, "gcn_demo", gcn)
        _say(f"published {len(ztf)} ZTF alerts (+1 corrupted) to ztf_demo, {len(gcn)} GCN notices to gcn_demo")
        _write_demo_rules(workdir / "rules")
        cfg_path = workdir / "tomd.toml"
        kafka = "\n".join(f'"{k}" = {v}' for k, v in LOCAL_GROUP_SETTINGS.items())
        cfg_path.write_text(f"""# written by `tomd demo`
[database]
url = "{url}"

[storage]
url = "file://{workdir.resolve()}/data"

[rules]
paths = ["{workdir.resolve()}/rules"]

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
        daemon = Daemon(load_config(cfg_path))
        daemon.start()
        daemon.wait(idle_exit_s=3.0)
        counts = daemon.summary()
        daemon.engine.dispose()
    for name, c in counts.items():
        _say(f"stream {name}: {c['messages']} messages → {c['alerts']} alerts, {c['targets_created']} new targets, "
             f"{c['photometry_points']} photometry points, {c['notices']} notices, {c['dead_letters']} dead letters")
    with sessions() as s:
        for d in repo.dead_letters(s):
            _say(f"  dead letter: {d.topic}[{d.partition}]@{d.offset}: {d.error}")
        name, tid, n = s.execute(
            select(AlertRow.object_id, AlertRow.target_id, func.count(Photometry.id))
            .join(Photometry, Photometry.target_id == AlertRow.target_id)
            .where(AlertRow.source == "ztf").group_by(AlertRow.object_id, AlertRow.target_id)
            .order_by(func.count(Photometry.id).desc()).limit(1)
        ).one()
        _say(f"  light curve of {name} (target #{tid}), {n} points:")
        for p in repo.photometry_of(s, tid)[-6:]:
            if p.mag is not None:
                value = f"{p.mag:6.2f} ± {p.mag_err or 0:.2f} mag"
            elif p.flux is not None:
                value = f"{p.flux:9.0f} ± {p.flux_err or 0:.0f} nJy"
            else:
                value = f"fainter than {p.limit:.2f} mag"
            _say(f"    MJD {p.mjd:.4f} {p.band:5s} {p.kind:11s} {value}")
        for notice in s.scalars(select(Notice).order_by(Notice.id)):
            err = f"{notice.error_deg * 3600:.1f}\"" if notice.error_deg is not None else "?"
            tgt = f"→ target #{notice.target_id}" if notice.target_id else "(too coarse for a target)"
            _say(f"  notice {notice.event_id} {notice.notice_type}: error {err} {tgt}")
        _say()
        _say("rules: verdicts recorded with every alert (in the same transaction)")
        from tomd.db.models import Decision, ObservationRequest

        for rule, outcome, n in s.execute(select(Decision.rule, Decision.outcome, func.count())
                                          .group_by(Decision.rule, Decision.outcome)
                                          .order_by(Decision.rule, Decision.outcome)):
            _say(f"  {rule:22s} {outcome:12s} {n}")
        fired = s.scalars(select(Decision).where(Decision.outcome == "fired").order_by(Decision.id)).first()
        requests = list(s.scalars(select(ObservationRequest).order_by(ObservationRequest.id)))
    if fired is not None:
        _say()
        _say(f"tomd rule explain {fired.alert_id}:")
        from tomd.cli import main as tomd_main

        tomd_main(["--config", str(cfg_path), "rule", "explain", str(fired.alert_id)])
    _say()
    _say("observation requests (exactly once, to the simulated observatory):")
    for r in requests:
        _say(f"  #{r.id} {r.name} → {r.facility} {r.template} {r.mode}: {r.state}"
             f" (facility id {r.facility_id or '-'}, {r.facility_state or r.last_error or ''})")
    total = sum(c["alerts"] for c in counts.values())
    submitted = sum(1 for r in requests if r.facility_id)
    return [f"{total} alerts ingested from a local Kafka broker; the corrupted message went to the dead letters",
            f"{len(requests)} observation request(s) from rule decisions, {submitted} accepted by the simulated "
            "observatory",
            f"the daemon's config for this run: {cfg_path}"]


def _write_demo_rules(rules_dir: Path) -> None:
    """Two rules for the demo: an active one on the simulated facility, a test one."""
    rules_dir.mkdir(parents=True, exist_ok=True)
    (rules_dir / "bright-ztf.toml").write_text("""\
# Written by `tomd demo`: bright, real ZTF detections, observed on the simulated facility.
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
