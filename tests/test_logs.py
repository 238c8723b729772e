"""Log lines: JSON that parses, alert coordinates carried, secrets never shown."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tests.configs import sim_rule, write_daemon_config
from tomd.logs import AlertLog, JsonFormatter, TextFormatter, redact

SECRETS = ["s3cr3t-pa55", "tok_9f8e7d6c5b4a", "ghp_abcdefghijklmnopqrstuvwxyz012345", "T000/B000/XXXXyyyyZZZZ"]


@pytest.fixture
def capture():
    """A logger writing through one formatter into a buffer; returns (logger, lines())."""
    made = []

    def make(formatter: logging.Formatter):
        buf = io.StringIO()
        handler = logging.StreamHandler(buf)
        handler.setFormatter(formatter)
        logger = logging.getLogger(f"tomd.test.logs.{len(made)}")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        made.append(logger)
        return logger, lambda: buf.getvalue().splitlines()

    yield make
    for logger in made:
        logger.handlers.clear()


def json_lines(lines):
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_every_json_line_parses_and_keeps_the_standard_fields(capture):
    log, lines = capture(JsonFormatter())
    log.info("plain")
    log.warning('quotes " and \\ backslashes and \n newlines and ünïcode')
    log.info("args %s %d", "x", 3, extra={"coords": "ztf_20250101_programid1[3]@1234", "n": 3,
                                           "obj": object(), "nested": {"a": [1, 2, {"b": None}]}})
    log.info("extra named like a standard field", extra={"time": "not a time", "level": "nope"})
    try:
        raise RuntimeError("inner \"quoted\" failure")
    except RuntimeError:
        log.exception("it failed")
    docs = json_lines(lines())
    assert len(docs) == len(lines()) == 5
    for d in docs:
        assert {"time", "level", "logger", "message"} <= d.keys()
        assert d["time"].endswith("Z")
    assert docs[1]["message"].startswith('quotes " and \\')
    assert docs[2]["coords"] == "ztf_20250101_programid1[3]@1234"
    assert docs[2]["message"] == "args x 3" and docs[2]["n"] == 3 and docs[2]["nested"]["a"][2] == {"b": None}
    assert docs[3]["level"] == "INFO" and docs[3]["time"] != "not a time"
    assert "RuntimeError" in docs[4]["exception"] and docs[4]["level"] == "ERROR"


def test_alert_log_adapter_carries_the_coordinates_on_every_line(capture):
    log, lines = capture(JsonFormatter())
    alog = AlertLog(log, "ztf[0]@42", alert_key="1095578115815010001")
    alog.info("stored")
    alog.warning("odd value", extra={"field": "magpsf"})
    docs = json_lines(lines())
    assert [d["coords"] for d in docs] == ["ztf[0]@42", "ztf[0]@42"]
    assert docs[0]["alert_key"] == "1095578115815010001" and docs[1]["field"] == "magpsf"


def test_text_lines_show_the_coordinates(capture):
    log, lines = capture(TextFormatter())
    log.warning("handler failed", extra={"coords": "gcn[1]@7"})
    assert lines()[0].endswith("handler failed [coords=gcn[1]@7]")


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_secrets_are_redacted_in_messages_exceptions_urls_and_extras(capture, formatter):
    log, lines = capture(formatter)
    log.info("connecting to postgresql+psycopg://tomd:s3cr3t-pa55@db.example.org:5432/tomd")
    log.info("GET https://observe.lco.global/api/requests/?token=tok_9f8e7d6c5b4a&page=2")
    log.info("sending header Authorization: Token tok_9f8e7d6c5b4a")
    log.info("header was Bearer tok_9f8e7d6c5b4a")
    log.info("posting to https://hooks.slack.com/services/T000/B000/XXXXyyyyZZZZ")
    log.info("kafka sasl.password=%s", "s3cr3t-pa55")
    log.info("pushed with ghp_abcdefghijklmnopqrstuvwxyz012345")
    log.info("settings", extra={"settings": {"sasl.password": "s3cr3t-pa55", "api_key": "tok_9f8e7d6c5b4a"},
                                "db_password": "s3cr3t-pa55"})
    try:
        raise ConnectionError("could not connect to https://user:s3cr3t-pa55@broker.example.org/ (api_key=tok_9f8e7d6c5b4a)")
    except ConnectionError:
        log.exception("stream stopped")
    out = "\n".join(lines())
    for secret in SECRETS:
        assert secret not in out, secret
    assert out.count("***") >= 9
    # What is not secret stays readable.
    assert "db.example.org:5432/tomd" in out and "page=2" in out and "hooks.slack.com/services/" in out
    if isinstance(formatter, JsonFormatter):
        docs = json_lines(lines())
        assert len(docs) == 9
        assert docs[7]["settings"] == {"sasl.password": "***", "api_key": "***"}
        assert docs[7]["db_password"] == "***"
        assert "broker.example.org" in docs[8]["exception"]


def test_redaction_cannot_break_json(capture):
    # A "password" whose value ends in a quote and a URL whose password holds JSON-ish text.
    log, lines = capture(JsonFormatter())
    log.info('password="abc" token:\'x\' http://u:p"a,s}s@h/ {"k": "v"}')
    log.info("x", extra={"coords": 'weird"topic[0]@1', "password": {"nested": "s3cr3t-pa55"}})
    for line in lines():
        json.loads(line)
    assert "s3cr3t-pa55" not in "".join(lines())


def test_redact_keeps_ordinary_text():
    text = "ztf_20250101_programid1[3]@1234: magpsf=18.2 band=r, tokens of appreciation"
    assert redact(text) == text


def test_a_repeating_failure_logs_once_with_traceback_then_counted_lines_then_recovery(capture):
    from tomd.logs import FailureLog

    log, lines = capture(JsonFormatter())
    now = [0.0]
    seen = []
    f = FailureLog(log, "sweep", every_s=30.0, on_error=seen.append, clock=lambda: now[0])
    for i in range(100):  # one failure a second for 100 s
        now[0] = float(i)
        try:
            raise ConnectionError(f"database gone token=s3cr3t-pa55 try {i}")
        except ConnectionError as exc:
            f.failed(exc)
    now[0] = 100.0
    f.ok()
    f.ok()  # no news
    docs = json_lines(lines())
    assert len(seen) == 100  # every failure reaches the observer (the metrics)
    assert [d["level"] for d in docs] == ["ERROR", "WARNING", "WARNING", "WARNING", "INFO"]
    assert "exception" in docs[0] and not any("exception" in d for d in docs[1:])
    assert "30 more failure(s)" in docs[1]["message"] and "\n" not in docs[1]["message"]
    assert "works again after 100 failure(s)" in docs[-1]["message"]
    assert not any("s3cr3t-pa55" in line for line in lines())


def test_a_daemon_logs_alert_lines_with_their_coordinates_and_ids(db, shared_data, tmp_path):
    """Real ZTF packets (and one undecodable file) through ``tomd --log-format json run``
    with a rule that fires and submits to the simulated observatory: every line about an
    alert carries its stream coordinates and ids as JSON fields, every line about a
    submission its request, decision and target."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from sqlalchemy import func, select

    from tomd.db.models import AlertRow, Decision, DeadLetter, ObservationRequest

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bright.toml").write_text(sim_rule("bright"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.avro").write_bytes(b"Obj\x01 not really avro")
    packets = sorted((shared_data / "ztf/ztf-avro-alert").glob("*.avro"))
    cfg = write_daemon_config(tmp_path, db.url, extra=f"""
[facilities.sim]
kind = "sim"
[[streams]]
name = "archive"
kind = "file"
topics = ["{shared_data / 'ztf/ztf-avro-alert'}/*.avro", "{bad}/*.avro"]
format = "ztf-avro"
""")
    repo_root = Path(__file__).resolve().parents[1]

    def finished() -> bool:
        """Every packet stored, the broken file dead-lettered, every firing submitted."""
        with db.sessions() as s:
            alerts = s.scalar(select(func.count()).select_from(AlertRow))
            dead = s.scalar(select(func.count()).select_from(DeadLetter))
            fired = s.scalar(select(func.count()).select_from(Decision).where(Decision.outcome == "fired"))
            sent = s.scalar(select(func.count()).select_from(ObservationRequest).join(
                Decision, Decision.id == ObservationRequest.decision_id).where(
                Decision.outcome == "fired", ObservationRequest.state.not_in(("intent", "submitting"))))
        return alerts == len(packets) and dead >= 1 and sent == fired  # (one alert a file)

    # Stopped (SIGTERM, as systemd stops it) once the database shows all the work done: not after
    # a few idle seconds (--exit-when-idle), which a slow start or a slow submission could outlast.
    log_file = tmp_path / "stderr.txt"
    with log_file.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tomd.cli", "--log-format", "json", "run"],
                                env={**os.environ, "TOMD_CONFIG": str(cfg)}, cwd=repo_root,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 180
            while not finished() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    stderr = log_file.read_text()
    assert returncode == 0, stderr[-3000:]
    assert finished(), stderr[-3000:]
    docs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    with db.sessions() as s:
        fired = s.scalar(select(func.count()).select_from(Decision).where(Decision.outcome == "fired"))
    assert fired > 0
    fired_lines = [d for d in docs if d["logger"] == "tomd.rules.engine" and " fired on alert " in d["message"]]
    assert len(fired_lines) == fired  # one line per committed firing
    for d in fired_lines:
        assert {"alert_id", "object_id", "coords", "target_id", "rule", "decision_id", "request_id"} <= d.keys(), d
        assert ".avro" in d["coords"] and d["object_id"].startswith("ZTF")
    about_alerts = [d for d in docs if "alert_id" in d or " alert " in d["message"]]
    assert about_alerts and all({"alert_id", "coords"} <= d.keys() for d in about_alerts), about_alerts
    dead = [d for d in docs if d["message"].startswith("dead letter ")]
    assert dead and all("broken.avro" in d["coords"] and d.get("stream") == "archive" for d in dead), dead
    submitted = [d for d in docs if " submitted to sim as " in d["message"]]
    assert len(submitted) == fired
    for d in submitted:
        assert {"request", "request_id", "facility", "decision_id", "target_id"} <= d.keys(), d
    decisions = {d["decision_id"] for d in fired_lines}
    assert {d["decision_id"] for d in submitted} == decisions
