"""Hot reload of the rule files by the running daemon, with no alert arriving (issue 4).

A quiet stream (GCN may be silent for hours) must not hide a broken edit until
the next alert: ``tomd run`` looks at the rule files every few seconds on its
own, outside any ingest transaction, logs a bad file at once (FILE:LINE:COL),
keeps the last good rules in force, and takes a good change without an alert
(``tomd_rules_loaded`` follows).
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.configs import write_daemon_config

REPO = Path(__file__).resolve().parents[1]

# How long a wait for the daemon may last before the test fails. Generous on purpose: CI runs the
# suite on two loaded cores; every wait ends as soon as its condition holds.
PATIENCE = 90.0

GOOD = 'name = "bright"\nwhen = "alert.mag < 15"\nadd_tags = ["bright"]\n'
BROKEN = 'name = "bright"\nwhen = "alert.mag <"\nadd_tags = ["bright"]\n'
SECOND = 'name = "faint"\nwhen = "alert.mag > 21"\nadd_tags = ["faint"]\n'


def write_config(tmp_path: Path, db_url: str) -> Path:
    """A daemon on one file stream that matches nothing: no alert ever arrives."""
    return write_daemon_config(tmp_path, db_url, extra=f"""
[[streams]]
name = "quiet"
kind = "file"
topics = ["{tmp_path}/nothing/*.json"]
format = "gcn-json"
""")


class Daemon:
    """A real ``tomd run`` process; its log lines gathered as they come."""

    def __init__(self, cfg: Path):
        env = {**os.environ, "TOMD_CONFIG": str(cfg)}
        self.p = subprocess.Popen([sys.executable, "-m", "tomd.cli", "run"], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True)
        self.reader.start()

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, found, what: str, timeout: float = PATIENCE):
        deadline = time.monotonic() + timeout
        while True:
            v = found()
            if v:
                return v
            assert self.p.poll() is None, f"tomd run exited while waiting for {what}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:g} s:\n{self.log()}"
            time.sleep(0.05)

    def line(self, *texts: str):
        return next((ln for ln in list(self.lines) if all(t in ln for t in texts)), None)

    def metric(self, base: str, name: str) -> float | None:
        body = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        m = re.search(rf"^{name} (\S+)$", body, re.M)
        return float(m.group(1)) if m else None

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        code = self.p.wait(timeout=PATIENCE)
        self.reader.join(timeout=10)
        return code


def test_a_quiet_daemon_reports_a_broken_edit_and_takes_a_good_change_without_alerts(db, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (tmp_path / "hooks").mkdir()
    (rules / "bright.toml").write_text(GOOD)
    d = Daemon(write_config(tmp_path, db.url))
    try:
        d.wait_for(lambda: d.line("tomd running"), "start")
        serving = d.wait_for(lambda: d.line("serving /metrics"), "metrics address")
        base = re.search(r"(http://127\.0\.0\.1:\d+)", serving).group(1)
        assert d.metric(base, "tomd_rules_loaded") == 1.0

        # A broken edit, and no alert (the stream matches no file): the daemon's own look logs it, with
        # its place; the last good rule stays.
        (rules / "bright.toml").write_text(BROKEN)
        d.wait_for(lambda: d.line("rule file rejected", "bright.toml:2:"), "report of the broken file")
        d.wait_for(lambda: d.line("bright.toml: keeping its last good version (rule bright)"), "keep notice")
        assert d.metric(base, "tomd_rules_loaded") == 1.0
        assert d.wait_for(lambda: d.metric(base, "tomd_rule_reload_failures_total"), "failure count") >= 1.0
        # Reported once, not at every look.
        time.sleep(2.5)
        assert sum("bright.toml:2:" in ln for ln in list(d.lines)) == 1, d.log()

        # A good change (a new file), still no alert: in force, and the metric says so.
        (rules / "faint.toml").write_text(SECOND)
        d.wait_for(lambda: d.metric(base, "tomd_rules_loaded") == 2.0, "the second rule in force")
        # The broken file fixed: its rule is reloaded, still two in force.
        (rules / "bright.toml").write_text(GOOD.replace("15", "16"))
        d.wait_for(lambda: d.line("rule bright reloaded from"), "reload of the fixed file")
        assert d.metric(base, "tomd_rules_loaded") == 2.0
        assert d.p.poll() is None
    finally:
        code = d.stop()
    assert code == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


def test_the_daemon_looks_at_the_rule_files_outside_the_ingest_path(db, tmp_path):
    """The daemon's own timer reloads the files: the ingest sink's ``current()`` only reads the rules
    in force (a reload there would run inside the ingest transaction)."""
    from dataclasses import replace

    from tomd.config import Config, Database, Stream
    from tomd.daemon import Daemon as TomdDaemon

    rules = tmp_path / "rules"
    rules.mkdir()
    cfg = Config(database=Database(url=db.url),
                 streams=(Stream(name="quiet", kind="file", topics=(str(tmp_path / "none/*.json"),),
                                 format="gcn-json"),))
    cfg = replace(cfg, rules=replace(cfg.rules, paths=(str(rules),)),
                  metrics=replace(cfg.metrics, listen="127.0.0.1:0"))
    daemon = TomdDaemon(cfg)
    rs = daemon.rules.ruleset
    looks: list[tuple[str, int]] = []  # (the thread that looked at the files, rules in force)
    rs.observer = lambda n, problems: looks.append((threading.current_thread().name, n))
    daemon.start()
    waiter = threading.Thread(target=daemon.wait, name="daemon-wait", daemon=True)
    waiter.start()
    try:
        # Until wait() has taken the looks over, current() still looks itself when its 2 s are up
        # (daemon.start() alone can last that long on a loaded machine): read only after that.
        deadline = time.monotonic() + PATIENCE
        while rs.check_every_s != math.inf:
            assert time.monotonic() < deadline and waiter.is_alive()
            time.sleep(0.01)
        (rules / "faint.toml").write_text(SECOND)
        # Read as the ingest sink reads, for longer than the look interval (2 s): the rules change
        # without this thread ever looking at the files.
        while [r.name for r in rs.current()] != ["faint"]:
            assert time.monotonic() < deadline and waiter.is_alive()
            time.sleep(0.01)
        (rules / "bright.toml").write_text(GOOD)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0 or [r.name for r in rs.current()] != ["bright", "faint"]:
            assert time.monotonic() < deadline + PATIENCE and waiter.is_alive()
            time.sleep(0.01)
        assert looks and {t for t, _ in looks} == {"daemon-wait"}, looks
        assert looks[-1] == ("daemon-wait", 2)
    finally:
        daemon.stop.set()
        waiter.join(timeout=PATIENCE)
        daemon.engine.dispose()
    assert not waiter.is_alive()
