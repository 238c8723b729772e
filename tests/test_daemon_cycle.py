"""The whole daemon, in one process, wired as ``tomd run`` wires it (``add_components``).

Real ZTF packets from a file stream fire a rule; the submitter sends the
requests to a simulated observatory whose states progress by themselves; the
scheduler's status poll follows them to COMPLETED; the retriever stores their
frames; a user hook sees the events; the rule's notification goes out through
the notifier. Nothing here calls a stage by hand: if a component is not wired
into the daemon, this test fails.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from tests.alert_samples import ztf_files
from tests.configs import write_daemon_config
from tomd.config import load_config
from tomd.daemon import run
from tomd.db.models import DataProduct, HookRun, Notification, ObservationRequest, ObservationStatus
from tomd.facilities.sim import SimObservatory

HOOK = '''
from tomd.hooks import on


@on("observation.status_changed", "data.stored")
def journal(ctx):
    with open({path!r}, "a") as fh:
        fh.write(f"{{ctx.event.kind}} {{ctx.event_id}}\\n")
'''

RULE = '''
name = "everything-bright"
description = "every real ZTF alert brighter than 21 mag"
sources = ["ztf"]
when = "alert.mag < 21"

[observe]
facility = "sim"
template = "1m-gri"
window = "24h"

[notify]
channels = ["journal"]
message = "{target} fired"
'''


def _where(db) -> dict:
    from collections import Counter

    with db.sessions() as s:
        return {
            "requests": Counter((r.state, r.data_due_at is None) for r in s.scalars(select(ObservationRequest))),
            "products": Counter(p.state for p in s.scalars(select(DataProduct))),
            "hook_runs": Counter((h.hook, h.state) for h in s.scalars(select(HookRun))),
            "notifications": Counter(n.state for n in s.scalars(select(Notification))),
        }


@pytest.fixture
def sim():
    with SimObservatory(pending_s=1.0, token="sim-token") as s:
        yield s


def test_alerts_to_requests_to_data_with_hooks_and_notifications(db, sim, tmp_path, shared_data):
    files = ztf_files()[:6]
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bright.toml").write_text(RULE)
    (tmp_path / "hooks").mkdir()
    journal = tmp_path / "hook-journal.txt"
    (tmp_path / "hooks" / "journal.py").write_text(HOOK.format(path=str(journal)))
    cfg = write_daemon_config(tmp_path, db.url, hooks='timeout = "20s"', extra=f"""
[facilities.sim]
kind = "sim"
url = "{sim.url}"
token = "sim-token"
poll_interval = "1s"
[data]
interval = "1s"
[notify.channels.journal]
kind = "log"
[[streams]]
name = "ztf"
kind = "file"
topics = {[str(p) for p in files]!r}
format = "ztf-avro"
""".replace("'", '"'))  # the topics list's repr, in TOML's quotes
    config = load_config(cfg)

    def settled() -> bool:
        with db.sessions() as s:
            reqs = list(s.scalars(select(ObservationRequest)))
            stored = s.scalars(select(DataProduct).where(DataProduct.state == "stored")).all()
            runs = s.scalars(select(HookRun).where(HookRun.state == "done")).all()
            sent = s.scalars(select(Notification).where(Notification.state == "sent")).all()
        completed = {r.id for r in reqs if r.state == "completed"}
        with_data = {p.request_id for p in stored}
        # The user hook has seen both kinds of event (it runs in its own process after the event's
        # commit, so it may trail the rows above by a while on a loaded machine).
        kinds = {ln.split()[0] for ln in journal.read_text().splitlines() if ln.strip()} if journal.exists() else set()
        # Every completed request has its frames (the retriever looks once more an hour later).
        return (bool(completed) and completed <= with_data and bool(runs) and bool(sent)
                and {"observation.status_changed", "data.stored"} <= kinds)

    outcome: dict[str, object] = {}

    def watch(daemon) -> None:
        outcome["daemon"] = daemon
        def loop() -> None:
            deadline = time.monotonic() + 180  # ends as soon as it settles
            while time.monotonic() < deadline and not daemon.stop.is_set():
                if settled():
                    outcome["settled"] = True
                    break
                time.sleep(0.5)
            time.sleep(1.0)  # let the hook runner record the last runs
            daemon.stop.set()

        threading.Thread(target=loop, daemon=True).start()

    assert run(config, on_started=watch) == 0
    assert outcome.get("settled"), f"the daemon did not get there: {_where(db)}"

    with db.sessions() as s:
        reqs = list(s.scalars(select(ObservationRequest)))
        done = [r for r in reqs if r.state == "completed"]
        history = {r.id: [h.state for h in s.scalars(select(ObservationStatus).where(
            ObservationStatus.request_id == r.id).order_by(ObservationStatus.id))] for r in done}
        products = list(s.scalars(select(DataProduct).where(DataProduct.state == "stored",
                                                            DataProduct.request_id.is_not(None))))  # not cutouts
        sent = list(s.scalars(select(Notification).where(Notification.state == "sent")))
    # Each request was sent once; each completed one went pending → completed, recorded once each.
    assert sorted(sim.names().values()) == [1] * len(sim.names())
    for states in history.values():
        assert states.count("completed") == 1 and states.index("pending") < states.index("completed")
    # Its frames are stored under the target/facility/request layout, linked to the request.
    done_ids = {r.id for r in done}
    assert {p.request_id for p in products} & done_ids
    for p in products:
        assert (tmp_path / "data" / p.storage_key).is_file() and p.md5
    # The rule's notification went out, once per firing (decision).
    assert all(n.channel == "journal" for n in sent)
    assert len({n.dedupe_key for n in sent}) == len(sent)
    # The user hook saw the status changes and the stored data, each event once.
    lines = journal.read_text().splitlines()
    kinds = [ln.split()[0] for ln in lines]
    assert "observation.status_changed" in kinds and "data.stored" in kinds
    assert len(lines) == len(set(lines))

    # Every stage fed its metrics through the daemon's own wiring (not through direct calls).
    registry = outcome["daemon"].metrics.registry

    def total(name: str) -> float:
        return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)

    assert total("tomd_alerts_ingested_total") == len(files)
    assert total("tomd_rule_verdicts_total") >= len(files)
    assert total("tomd_submissions_total") == len(sim.names())
    assert total("tomd_facility_requests_total") > 0
    assert total("tomd_observation_status_changes_total") >= len(done)
    assert total("tomd_data_products_downloaded_total") == len(products)
    assert total("tomd_data_products_downloaded_bytes_total") == sum(p.size for p in products)
    assert total("tomd_hook_runs_total") >= len(lines)
    assert total("tomd_notifications_sent_total") == len(sent)
