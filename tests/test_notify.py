"""Notifications: enqueue, fan-out from events, the channels and the notifier.

Real parts: an http.server on loopback stands in for Slack's incoming
webhook and for a generic webhook receiver (it checks the payload shape and
can answer 500, 429 with Retry-After, or hang); aiosmtpd is the SMTP server,
with STARTTLS (a self-signed certificate made here) and AUTH LOGIN/PLAIN
required; moto's S3 server holds the light curves Slack shows by URL. Time
is a fake clock handed to the notifier, so limits and backoff are checked
without sleeping.
"""

from __future__ import annotations

import datetime as dt
import email
import errno
import email.policy
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.test_storage import new_bucket, s3_endpoint  # noqa: F401  (a moto S3 server fixture)
from tomd.config import Channel, Config, Notify, Secret
from tomd.db import repository as repo
from tomd.db.models import Notification
from tomd.events import AlertDeadLettered, ObservationFailed, RuleFired
from tomd.notify import (Message, Notifier, NotifySettings, enqueue, notifications_for, sign, slack_payload,
                         verify)

SLACK_TOKEN = "T0TOMD/B0TOMD/sEcReTsLaCkToKeN42"
HMAC_SECRET = "whsec_tomd_test_5f3a9c1d"
SMTP_PASSWORD = "smtp-pa55word-never-logged"


# ---------------------------------------------------------------- helpers --


class Clock:
    def __init__(self):
        self.now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class Endpoint:
    """A loopback HTTP server: records POSTs, answers from a plan (then 200 "ok").

    A planned delay holds the answer back that long, or until the endpoint closes."""

    def __init__(self):
        self.requests: list[dict] = []
        self.plan: list[tuple[int, str, dict, float]] = []  # (status, body, headers, delay)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, text, headers, delay = outer.plan.pop(0) if outer.plan else (200, "ok", {}, 0.0)
                if delay:
                    outer.closing.wait(delay)
                data = text.replace("{path}", self.path).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]

    def close(self):
        self.closing.set()  # answers still held back go now (to clients long gone): nothing waits on them
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    e = Endpoint()
    yield e
    e.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_smtp(make):
    """``make(port)``: an aiosmtpd Controller, started on a free port. It binds a port we only
    chose, which another process may take first: then another port."""
    for _ in range(20):
        controller = make(_free_port())
        try:
            controller.start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            controller.stop(no_assert=True)
            controller.loop.close()
            continue
        return controller
    raise AssertionError("no free port for the SMTP server")


def _refused_port() -> socket.socket:
    """A loopback socket bound but not listening: connecting to its port is refused, and no other
    process can take the port while it is held (close it after)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


class SmtpServer:
    """aiosmtpd requiring STARTTLS, then AUTH (LOGIN or PLAIN) as tomd / SMTP_PASSWORD."""

    def __init__(self, cert: Path, key: Path):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.messages: list[email.message.EmailMessage] = []
        self.envelopes = []
        self.logins: list[tuple[str, str]] = []
        self.answers: list[str] = []  # replies to DATA before accepting ("451 ..." = try later)
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                if outer.answers:
                    return outer.answers.pop(0)
                outer.envelopes.append(envelope)
                outer.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
                return "250 OK"

        def authenticator(server, session, envelope, mechanism, auth_data):
            user, pw = auth_data.login.decode(), auth_data.password.decode()
            outer.logins.append((mechanism, user))
            return AuthResult(success=(user, pw) == ("tomd", SMTP_PASSWORD), handled=False)

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        # ready_timeout: its start (5 s by default) must not race a loaded machine
        self.controller = start_smtp(lambda port: Controller(
            Handler(), hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True,
            auth_required=True, auth_require_tls=True, authenticator=authenticator, ready_timeout=60.0))
        self.port = self.controller.port

    def close(self):
        self.controller.stop()


@pytest.fixture
def smtp(tls_cert):
    server = SmtpServer(*tls_cert)
    yield server
    server.close()


def config_with(**channels: Channel) -> Config:
    return Config(notify=Notify(channels=channels))


def add_target(db, name="ZTF24aaabbbc", *, ra=150.025, dec=2.2, photometry=True) -> int:
    from tomd.targets.model import TargetSpec
    from tomd.targets.store import upsert

    with db.sessions.begin() as s:
        tid = upsert(s, TargetSpec(name=name, ra=ra, dec=dec, aliases=("AT 2024xyz",)), origin="test").target_id
        if photometry:
            repo.insert_photometry(s, [
                {"target_id": tid, "source": "ztf", "mjd": 60600.1 + i, "band": "ztfg", "kind": "detection",
                 "mag": 19.0 - 0.4 * i, "mag_err": 0.05, "dedupe": f"p{i}"} for i in range(4)])
    return tid


def queue(db, channel: str, n: int, *, prefix="k", target_id=None, **msg) -> None:
    with db.sessions.begin() as s:
        for i in range(n):
            assert enqueue(s, channel=channel, dedupe_key=f"{prefix}{i}",
                           message=Message(msg.get("subject", f"message {prefix}{i}"), msg.get("text", ""),
                                           target_id=target_id, image=msg.get("image", False)))


def rows(db, channel: str | None = None) -> list[Notification]:
    with db.sessions() as s:
        q = select(Notification).order_by(Notification.id)
        if channel:
            q = q.where(Notification.channel == channel)
        return list(s.scalars(q))


def notifier(db, config: Config, clock=None, **kw) -> Notifier:
    return Notifier.from_config(config, db.sessions, clock=clock or Clock(), rng=__import__("random").Random(1),
                                **kw)


# ----------------------------------------------------------------- enqueue --


def test_enqueue_is_idempotent_per_channel_and_key(db):
    msg = Message("SN candidate", "rose 1.2 mag", fields={"rule": "fast-risers"}, target_id=None)
    with db.sessions.begin() as s:
        assert enqueue(s, channel="slack", dedupe_key="rule.fired:1", message=msg) is True
        assert enqueue(s, channel="slack", dedupe_key="rule.fired:1", message=msg) is False
        assert enqueue(s, channel="mail", dedupe_key="rule.fired:1", message=msg.as_json()) is True
    with db.sessions.begin() as s:  # another transaction, later: still one row
        assert enqueue(s, channel="slack", dedupe_key="rule.fired:1", message={"subject": "again"}) is False
        got = s.scalars(select(Notification).order_by(Notification.id)).all()
    assert [(r.channel, r.state) for r in got] == [("slack", "pending"), ("mail", "pending")]
    assert Message.from_json(got[0].message) == msg
    assert got[0].message["fields"] == [["rule", "fast-risers"]]


def test_enqueue_rejects_what_could_never_be_sent(db):
    with db.sessions.begin() as s:
        with pytest.raises(ValueError, match="subject"):
            enqueue(s, channel="slack", dedupe_key="x", message={"text": "no subject"})
        with pytest.raises(ValueError, match="unknown key 'colour'"):
            enqueue(s, channel="slack", dedupe_key="x", message={"subject": "s", "colour": "red"})
        assert enqueue(s, channel="slack", dedupe_key="y" * 1000, message={"subject": "long key"})
        assert not enqueue(s, channel="slack", dedupe_key="y" * 1000, message={"subject": "long key"})


# ----------------------------------------------------------------- fan-out --


def test_fan_out_rule_channels_and_subscriptions():
    config = config_with(
        slack=Channel(kind="slack", url="http://127.0.0.1:9/x", events=["observation.*"]),
        ops=Channel(kind="webhook", url="http://127.0.0.1:9/y", events=["alert.dead_lettered", "rule.fired"]),
        journal=Channel(kind="log"))
    fired = RuleFired(decision_id=42, rule="fast-risers", alert_id=7, target_id=3, reason="all 2 clauses true",
                      channels=("slack", "journal"), message="Rising fast: take a spectrum", request_id=9)
    out = notifications_for(fired, config)
    assert [(c, k) for c, k, _ in out] == [("slack", "rule.fired:42"), ("journal", "rule.fired:42"),
                                           ("ops", "rule.fired:42")]
    msg = out[0][2]
    assert msg.subject == "Rule fast-risers fired on {target}" and msg.text == "Rising fast: take a spectrum"
    assert ("Why", "all 2 clauses true") in msg.fields and ("Observation request", "#9") in msg.fields
    assert msg.target_id == 3 and msg.image

    failed = ObservationFailed(request_id=5, name="tomd-5-ab12", facility="lco", reason="the window ended",
                               attempts=3, target_id=3)
    (ch, key, m), = notifications_for(failed, config)
    assert (ch, key, m.level) == ("slack", "observation.failed:5", "error") and m.text == "the window ended"
    # an outbox row works the same, and an unknown kind falls back to its fields
    row = {"id": 77, "kind": "observation.paused", "payload": {"request_id": 5, "state": "PAUSED"}}
    (ch, key, m), = notifications_for(row, config)
    assert key == "observation.paused:event:77" and ("State", "PAUSED") in m.fields
    dead = AlertDeadLettered(dead_letter_id=3, stream="ztf", coords="ztf_x[0]@5", error="bad schema")
    assert [c for c, _, _ in notifications_for(dead, config)] == ["ops"]
    # test mode: labelled, never mistaken for a real firing
    test_row = {"kind": "rule.fired", "payload": {**fired.payload(), "mode": "test", "decision_id": 43}}
    (_, key, m), *_ = notifications_for(test_row, config)
    assert key == "rule.fired:43" and m.subject.startswith("[test] Rule fast-risers would fire")
    assert notifications_for(RuleFired(1, "quiet", None, None), config_with(j=Channel(kind="log"))) == []


# ------------------------------------------------------------------- slack --

_BLOCK_TYPES = {"header", "section", "context", "image", "divider", "actions"}


def check_slack_shape(payload: dict) -> None:
    """What Slack's incoming webhook accepts (else it answers 400 invalid_blocks)."""
    assert isinstance(payload["text"], str) and payload["text"]
    assert 1 <= len(payload["blocks"]) <= 50
    for b in payload["blocks"]:
        assert b["type"] in _BLOCK_TYPES
        if b["type"] == "header":
            assert b["text"]["type"] == "plain_text" and len(b["text"]["text"]) <= 150
        if b["type"] == "section":
            assert "text" in b or "fields" in b
            assert len(b.get("fields", [])) <= 10
            assert all(len(f["text"]) <= 2000 for f in b.get("fields", []))
            assert "text" not in b or len(b["text"]["text"]) <= 3000
        if b["type"] == "image":
            assert b["image_url"].startswith("http") and b["alt_text"]


def test_slack_message_has_target_reason_and_links(db, endpoint):
    tid = add_target(db)
    config = config_with(slack=Channel(kind="slack", url=endpoint.url("/services/" + SLACK_TOKEN)))
    fired = RuleFired(decision_id=1, rule="fast-risers", alert_id=None, target_id=tid,
                      reason="all 2 clauses true (rise=1.2)", channels=("slack",), message="Take a spectrum")
    with db.sessions.begin() as s:
        for ch, key, msg in notifications_for(fired, config):
            enqueue(s, channel=ch, dedupe_key=key, message=msg)
    results = notifier(db, config).run_once()
    assert [r.state for r in results] == ["sent"]
    (payload,) = endpoint.bodies()
    assert endpoint.requests[0]["path"] == "/services/" + SLACK_TOKEN
    check_slack_shape(payload)
    text = json.dumps(payload, ensure_ascii=False)
    assert "Rule fast-risers fired on ZTF24aaabbbc" in payload["blocks"][0]["text"]["text"]
    assert "Take a spectrum" in text and "rise=1.2" in text
    assert "https://alerce.online/object/ZTF24aaabbbc" in text and "https://www.wis-tns.org/object/2024xyz" in text
    assert "10:00:06.00 +02:12:00.0" in text  # RA 150.025, Dec +2.2
    assert "17.80 ± 0.05 mag (ztfg)" in text  # the latest detection's magnitude
    assert not [b for b in payload["blocks"] if b["type"] == "image"]  # a local store: no public image URL
    (row,) = rows(db)
    assert (row.state, row.attempts, row.error) == ("sent", 1, None) and row.sent_at is not None


def test_slack_shows_the_light_curve_by_presigned_url_on_s3(db, endpoint, s3_endpoint):
    import httpx

    from tomd.storage import S3Store

    store = S3Store(new_bucket(s3_endpoint), "tomd", region="us-east-1", endpoint_url=s3_endpoint)
    tid = add_target(db)
    config = config_with(slack=Channel(kind="slack", url=endpoint.url()))
    queue(db, "slack", 1, subject="Look at {target}", target_id=tid, image=True)
    assert [r.state for r in notifier(db, config, storage=store).run_once()] == ["sent"]
    (payload,) = endpoint.bodies()
    check_slack_shape(payload)
    (image,) = [b for b in payload["blocks"] if b["type"] == "image"]
    assert "X-Amz-Signature=" in image["image_url"] and "ZTF24aaabbbc" in image["alt_text"]
    png = httpx.get(image["image_url"], timeout=60)  # public: no credentials, only the signed URL
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_slack_digest_stays_within_block_limits():
    from tomd.notify import Entry, Outgoing

    entries = tuple(Entry(i, Message(f"m{i}", "x" * 5000, fields={"a": "b" * 3000})) for i in range(1, 40))
    payload = slack_payload(Outgoing("slack", entries))
    check_slack_shape(payload)
    assert payload["blocks"][0]["text"]["text"].startswith("39 notifications")
    assert "and 17 more" in json.dumps(payload)


# ----------------------------------------------------------------- webhook --


def test_webhook_body_is_signed_and_verifiable(db, endpoint):
    tid = add_target(db, photometry=False)
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url(), secret=Secret(HMAC_SECRET),
                                     events=["observation.failed"]))
    failed = ObservationFailed(request_id=5, name="tomd-5-ab12", facility="lco", reason="the window ended",
                               attempts=3, target_id=tid)
    with db.sessions.begin() as s:
        for ch, key, msg in notifications_for(failed, config):
            enqueue(s, channel=ch, dedupe_key=key, message=msg, event_id=None)
    assert [r.state for r in notifier(db, config).run_once()] == ["sent"]
    (req,) = endpoint.requests
    header = req["headers"]["Tomd-Signature"]
    assert verify(HMAC_SECRET, req["body"], header)
    assert not verify(HMAC_SECRET, req["body"].replace(b"window", b"WINDOW"), header)  # tampered body
    assert not verify("another-secret", req["body"], header)
    t = int(header.split(",")[0][2:])
    assert not verify(HMAC_SECRET, req["body"], header, now=t + 301)  # a replay, too late
    assert header == sign(HMAC_SECRET, req["body"], t)
    body = json.loads(req["body"])
    (row,) = rows(db)
    assert req["headers"]["Tomd-Delivery"] == body["delivery"] == f"n{row.id}"
    assert req["headers"]["Tomd-Event"] == "observation.failed"
    (item,) = body["notifications"]
    assert body["digest"] is False and body["channel"] == "ops"
    assert item["subject"] == "Observation of ZTF24aaabbbc failed (lco)" and item["level"] == "error"
    assert item["dedupe_key"] == "observation.failed:5" and item["text"] == "the window ended"
    assert item["target"]["name"] == "ZTF24aaabbbc" and item["fields"]["Facility"] == "lco"


# ------------------------------------------------------------------- email --


def email_channel(smtp: SmtpServer, tls_cert, **kw) -> Channel:
    return Channel(kind="email", to=["night@example.org", "pi@example.org"], smtp_host="127.0.0.1",
                   smtp_port=smtp.port, username="tomd", password=Secret(SMTP_PASSWORD), starttls=True,
                   ca_file=str(tls_cert[0]), sender="tomd <tomd@example.org>", timeout=60.0, **kw)


def test_email_over_starttls_with_login_and_the_light_curve(db, smtp, tls_cert):
    tid = add_target(db)
    config = config_with(mail=email_channel(smtp, tls_cert))
    fired = RuleFired(decision_id=8, rule="fast-risers", alert_id=None, target_id=tid, reason="rise=1.2",
                      channels=("mail",), message="Take a spectrum tonight")
    with db.sessions.begin() as s:
        for ch, key, msg in notifications_for(fired, config):
            enqueue(s, channel=ch, dedupe_key=key, message=msg)
    assert [r.state for r in notifier(db, config).run_once()] == ["sent"]
    (m,) = smtp.messages
    assert smtp.logins and smtp.logins[0][1] == "tomd"
    assert m["Subject"] == "[tomd] Rule fast-risers fired on ZTF24aaabbbc"
    assert m["To"] == "night@example.org, pi@example.org" and "tomd@example.org" in m["From"]
    assert sorted(smtp.envelopes[0].rcpt_tos) == ["night@example.org", "pi@example.org"]
    body = m.get_body(("plain",)).get_content()
    assert "Take a spectrum tonight" in body and "rise=1.2" in body and "https://alerce.online/object/" in body
    (att,) = list(m.iter_attachments())
    assert att.get_content_type() == "image/png" and att.get_filename() == "ZTF24aaabbbc-light-curve.png"
    assert att.get_content().startswith(b"\x89PNG")


def test_email_temporary_refusal_is_retried_wrong_password_is_final(db, smtp, tls_cert, caplog):
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    config = config_with(mail=email_channel(smtp, tls_cert))
    queue(db, "mail", 1)
    smtp.answers.append("451 4.3.0 mailbox busy, try later")
    n = notifier(db, config, clock)
    (r,) = n.run_once()
    assert r.state == "retry" and "451" in r.error and r.next_attempt_at > clock.now
    clock.now = r.next_attempt_at
    assert [x.state for x in n.run_once()] == ["sent"] and len(smtp.messages) == 1

    bad = config_with(mail=replace(email_channel(smtp, tls_cert), password=Secret("wrong-" + SMTP_PASSWORD)))
    queue(db, "mail", 1, prefix="b")
    (r,) = notifier(db, bad, clock).run_once()
    assert r.state == "failed" and "authentication failed" in r.error
    row = rows(db)[-1]
    assert row.state == "failed" and row.attempts == 1 and "authentication failed for user 'tomd'" in row.error
    assert SMTP_PASSWORD not in caplog.text and SMTP_PASSWORD not in row.error


def test_email_refuses_to_log_in_without_tls(db, tls_cert):
    """A server that offers no STARTTLS: tomd never sends the password in clear."""
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            return "250 OK"

    c = start_smtp(lambda port: Controller(Sink(), hostname="127.0.0.1", port=port, ready_timeout=60.0))
    try:
        ch = Channel(kind="email", to=["a@example.org"], smtp_host="127.0.0.1", smtp_port=c.port, username="tomd",
                     password=Secret(SMTP_PASSWORD), timeout=60.0)
        queue(db, "mail", 1)
        (r,) = notifier(db, config_with(mail=ch)).run_once()
    finally:
        c.stop()
    assert r.state == "failed" and "does not offer STARTTLS" in r.error


# ---------------------------------------------------------- limits, digests --


def test_rate_limit_holds_across_restarts(db, endpoint):
    clock = Clock()
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url(), rate_limit_per_hour=3))
    queue(db, "ops", 5)
    assert len(notifier(db, config, clock).run_until_idle()) == 3
    assert len(notifier(db, config, clock).run_until_idle()) == 0  # a restarted daemon counts from the table
    assert [r.state for r in rows(db)] == ["sent"] * 3 + ["pending"] * 2
    clock.advance(1800)
    assert notifier(db, config, clock).run_until_idle() == []
    clock.advance(1801)  # the first three are now more than an hour old
    assert [r.state for r in notifier(db, config, clock).run_until_idle()] == ["sent", "sent"]
    assert len(endpoint.requests) == 5  # nothing dropped, nothing twice


def test_digest_batches_what_was_queued_meanwhile(db, endpoint):
    clock = Clock()
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url(), digest=900.0))
    n = notifier(db, config, clock)
    queue(db, "ops", 1, prefix="first")
    assert [len(r.ids) for r in n.run_once()] == [1]  # a quiet channel sends at once
    queue(db, "ops", 4, prefix="burst")
    clock.advance(60)
    assert n.run_once() == []  # within 15 minutes of the last message: wait
    clock.advance(841)
    (r,) = n.run_once()
    assert r.state == "sent" and len(r.ids) == 4
    first, digest = endpoint.bodies()
    assert first["digest"] is False and len(first["notifications"]) == 1
    assert digest["digest"] is True
    assert [i["subject"] for i in digest["notifications"]] == [f"message burst{i}" for i in range(4)]
    assert endpoint.requests[1]["headers"]["Tomd-Event"] == "digest"
    sent = rows(db)[1:]
    assert len({r.sent_at for r in sent}) == 1 and all(r.state == "sent" for r in sent)


def test_digest_email_is_one_message(db, smtp, tls_cert):
    clock = Clock()
    config = config_with(mail=email_channel(smtp, tls_cert, digest=3600.0))
    queue(db, "mail", 3)
    n = notifier(db, config, clock)
    (r,) = n.run_once()
    assert len(r.ids) == 3 and len(smtp.messages) == 1
    m = smtp.messages[0]
    assert m["Subject"].startswith("[tomd] 3 notifications: message k0")
    body = m.get_body(("plain",)).get_content()
    assert all(f"{i + 1}. message k{i}" in body for i in range(3))


# ----------------------------------------------------------------- retries --


def test_server_errors_and_429_are_retried_then_sent(db, endpoint):
    clock = Clock()
    config = config_with(slack=Channel(kind="slack", url=endpoint.url()))
    endpoint.plan += [(500, "rollup_error", {}, 0.0), (429, "rate_limited", {"Retry-After": "120"}, 0.0)]
    queue(db, "slack", 1)
    n = notifier(db, config, clock)
    (r,) = n.run_once()
    assert r.state == "retry" and "HTTP 500: rollup_error" in r.error
    assert n.run_once() == []  # backing off
    clock.now = r.next_attempt_at
    (r,) = n.run_once()
    assert r.state == "retry" and "HTTP 429" in r.error
    assert (r.next_attempt_at - clock.now).total_seconds() >= 120  # Retry-After honoured
    clock.now = r.next_attempt_at
    (r,) = n.run_once()
    assert r.state == "sent"
    (row,) = rows(db)
    assert (row.state, row.attempts) == ("sent", 3) and len(endpoint.requests) == 3


def test_failing_endpoint_is_recorded_failed_after_max_attempts(db, endpoint):
    clock = Clock()
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url(), max_attempts=3))
    endpoint.plan += [(503, "down for maintenance", {}, 0.0)] * 5
    queue(db, "ops", 1)
    n = notifier(db, config, clock)
    states = []
    for _ in range(5):
        got = n.run_once()
        states += [r.state for r in got]
        clock.advance(7200)
    assert states == ["retry", "retry", "failed"]
    (row,) = rows(db)
    assert row.state == "failed" and row.attempts == 3
    assert row.error.startswith("gave up after 3 attempts: ") and "HTTP 503: down for maintenance" in row.error


def test_a_refusal_is_final_at_once(db, endpoint):
    config = config_with(slack=Channel(kind="slack", url=endpoint.url()))
    endpoint.plan.append((404, "no_service", {}, 0.0))
    queue(db, "slack", 1)
    (r,) = notifier(db, config).run_once()
    assert r.state == "failed" and "HTTP 404: no_service" in r.error
    assert rows(db)[0].attempts == 1


def test_a_slow_endpoint_times_out_and_is_retried(db, endpoint):
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url(), timeout=0.3))
    endpoint.plan.append((200, "ok", {}, 120.0))  # held until the endpoint closes: no answer can beat 0.3 s
    queue(db, "ops", 1)
    (r,) = notifier(db, config).run_once()
    assert r.state == "retry" and "no answer within 0.3s" in r.error


def test_unknown_channel_is_recorded_failed_with_the_reason(db):
    queue(db, "gone", 1)
    (r,) = notifier(db, config_with(journal=Channel(kind="log"))).run_once()
    assert r.state == "failed" and "no channel 'gone' is configured (known: journal)" in r.error


def test_log_channel_writes_the_message(db, caplog):
    caplog.set_level(logging.INFO, logger="tomd.notify.log")
    tid = add_target(db, photometry=False)
    queue(db, "journal", 1, subject="Hello {target}", text="from the log channel", target_id=tid)
    assert [r.state for r in notifier(db, config_with(journal=Channel(kind="log"))).run_once()] == ["sent"]
    (rec,) = [r for r in caplog.records if r.name == "tomd.notify.log"]
    assert "Hello ZTF24aaabbbc" in rec.getMessage() and "from the log channel" in rec.getMessage()


# ------------------------------------------------------------- concurrency --


def test_two_notifiers_never_send_one_notification_twice(db, endpoint):
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url()),
                         limited=Channel(kind="webhook", url=endpoint.url("/limited"), rate_limit_per_hour=7))
    queue(db, "ops", 60)
    queue(db, "limited", 20)
    endpoint.plan += [(200, "ok", {}, 0.005)] * 80  # slow enough for the two to overlap
    settings = NotifySettings(batch=5)
    a = Notifier.from_config(config, db.sessions, settings=settings, worker_id="a")
    b = Notifier.from_config(config, db.sessions, settings=settings, worker_id="b")
    barrier = threading.Barrier(2)
    sent: dict[str, list[int]] = {}

    def work(n: Notifier):
        barrier.wait()
        sent[n.worker] = [i for r in n.run_until_idle(timeout_s=300) if r.state == "sent" for i in r.ids]

    threads = [threading.Thread(target=work, args=(n,)) for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(360)
    deliveries = [r["headers"]["Tomd-Delivery"] for r in endpoint.requests]
    assert len(deliveries) == len(set(deliveries)) == 60 + 7
    assert not set(sent["a"]) & set(sent["b"])
    assert sum(1 for r in endpoint.requests if r["path"] == "/limited") == 7  # the limit holds for both
    states = [r.state for r in rows(db, "limited")]
    assert states.count("sent") == 7 and states.count("pending") == 13


def test_a_second_notifier_waits_for_the_channel_lock(db, endpoint):
    """Another notifier is between counting and committing its claim: this one must wait, then see
    the claimed rows as in flight (without the lock it would count 0 and send past the limit)."""
    clock = Clock()
    config = config_with(limited=Channel(kind="webhook", url=endpoint.url(), rate_limit_per_hour=7))
    queue(db, "limited", 20)
    n = notifier(db, config, clock)
    results: list = []
    with db.sessions.begin() as s:
        repo.lock_notification_channel(s, "limited")
        claimed = repo.claim_notifications(s, "other", channel="limited", now=clock.now,
                                           lease_until=clock.now + dt.timedelta(minutes=5), limit=7)
        assert len(claimed) == 7
        t = threading.Thread(target=lambda: results.extend(n.run_channel("limited")))
        t.start()
        t.join(1.0)
        assert t.is_alive()  # waiting for the other's transaction
    t.join(120)
    assert not t.is_alive() and results == [] and endpoint.requests == []


# ----------------------------------------------------------------- secrets --


def test_secrets_never_reach_logs_or_errors(db, endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    url = endpoint.url("/services/" + SLACK_TOKEN)
    config = config_with(slack=Channel(kind="slack", url=url, max_attempts=2),
                         ops=Channel(kind="webhook", url=endpoint.url("/h?token=" + HMAC_SECRET[::-1]),
                                     secret=Secret(HMAC_SECRET)))
    # The endpoint echoes the request path (the Slack token) in its error answers.
    endpoint.plan += [(500, "internal error at {path}", {}, 0.0), (400, "invalid_payload for {path}", {}, 0.0),
                      (502, "bad gateway {path}", {}, 0.0)]
    queue(db, "slack", 1)
    queue(db, "ops", 1)
    n = notifier(db, config, clock)
    n.run_once()
    clock.advance(3600)
    n.run_once()
    errors = " ".join(r.error or "" for r in rows(db))
    assert "HTTP 400" in errors and "HTTP 502" in errors
    for secret in (SLACK_TOKEN, HMAC_SECRET, HMAC_SECRET[::-1]):
        assert secret not in caplog.text and secret not in errors
    assert SLACK_TOKEN not in repr(config)
    # a channel that cannot even be reached: the error names the host only
    held = _refused_port()
    try:
        dead = config_with(slack=Channel(kind="slack", url=f"http://127.0.0.1:{held.getsockname()[1]}/services/"
                                                             f"{SLACK_TOKEN}"))
        queue(db, "slack", 1, prefix="d")
        (r,) = notifier(db, dead, clock).run_once()
    finally:
        held.close()
    assert r.state == "retry" and "127.0.0.1" in r.error and SLACK_TOKEN not in r.error + caplog.text


# --------------------------------------------------------------------- CLI --


def test_cli_notify_test_and_list(tmp_path, endpoint, capsys):
    from tomd.cli import main

    cfg = tmp_path / "tomd.toml"
    cfg.write_text(f"""
[database]
url = "sqlite:///{tmp_path / 'tomd.db'}"
[storage]
url = "file://{tmp_path / 'store'}"
[rules]
paths = ["{tmp_path / 'rules'}"]
[hooks]
paths = ["{tmp_path / 'hooks'}"]
[metrics]
listen = "127.0.0.1:0"
[notify.channels.ops]
kind = "webhook"
url = "{endpoint.url('/secret-path-xyz')}"
secret = "{HMAC_SECRET}"
""")
    assert main(["--config", str(cfg), "db", "upgrade"]) == 0
    assert main(["--config", str(cfg), "notify", "test", "ops", "--message", "hello from the CLI"]) == 0
    (req,) = endpoint.requests
    assert verify(HMAC_SECRET, req["body"], req["headers"]["Tomd-Signature"])
    assert json.loads(req["body"])["notifications"][0]["text"] == "hello from the CLI"
    endpoint.plan.append((410, "channel_is_archived", {}, 0.0))
    assert main(["--config", str(cfg), "notify", "test", "ops"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 410: channel_is_archived" in err and "secret-path-xyz" not in err
    assert main(["--config", str(cfg), "notify", "test", "nope"]) == 1
    assert "no notification channel 'nope'" in capsys.readouterr().err
    assert main(["--config", str(cfg), "notify", "list", "--state", "failed"]) == 0
    assert "no notifications in state failed" in capsys.readouterr().out


# ------------------------------------------------------- wiring and config --


def test_builtin_subscriber_enqueues_once_and_wakes_after_commit(db):
    from tomd.notify import notification_kinds, subscriber

    config = config_with(journal=Channel(kind="log", events=["observation.*"]), quiet=Channel(kind="log"))
    assert "rule.fired" in notification_kinds(config) and "observation.failed" in notification_kinds(config)
    assert "alert.ingested" not in notification_kinds(config)
    woken = []
    fn = subscriber(config, wake=lambda: woken.append(True))
    failed = ObservationFailed(request_id=5, name="tomd-5-ab12", facility="lco", reason="window over")
    with db.sessions.begin() as s:
        fn(s, failed)
        assert woken == []  # not before the commit: the notifier would not see the row
    assert woken == [True]
    with db.sessions.begin() as s:
        fn(s, failed)  # the event delivered again (at least once): nothing new
    assert woken == [True] and [(r.channel, r.dedupe_key) for r in rows(db)] == [("journal", "observation.failed:5")]


def test_config_names_an_unknown_event_kind(tmp_path):
    from tomd.config import load_config
    from tomd.errors import ConfigError

    cfg = tmp_path / "tomd.toml"
    cfg.write_text('[notify.channels.ops]\nkind = "log"\nevents = ["observation.faild", "observation.*"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    (line,) = e.value.problems
    assert line.startswith(f"{cfg}:3: notify.channels.ops.events[0]: ") and 'did you mean "observation.failed"' in line


def test_status_changes_hook_failures_and_retrieval_failures_read_well():
    from tomd.events import DataRetrievalFailed, HookFailed, ObservationStatusChanged

    config = config_with(ops=Channel(kind="log", events=["observation.*", "hook.failed", "data.retrieval_failed"]))
    (_, key, m), = notifications_for(ObservationStatusChanged(5, "tomd-5-ab", "lco", "123", 3, "PENDING",
                                                              "COMPLETED"), config)
    assert m.subject == "Observation of {target} COMPLETED at lco" and ("State", "PENDING → COMPLETED") in m.fields
    assert m.image and key.startswith("observation.status_changed:")
    (_, key, m), = notifications_for(HookFailed("dq.check", 77, "data.stored", 5, "ValueError: bad header"), config)
    assert (key, m.level, m.text) == ("hook.failed:dq.check:77", "error", "ValueError: bad header")
    (_, key, m), = notifications_for(DataRetrievalFailed(9, "lco", "123", 3, 6, 2, 1, "HTTP 503"), config)
    assert key == "data.retrieval_failed:9:6" and m.level == "error" and ("Missing", "1") in m.fields


def test_end_to_end_outbox_to_hook_runner_builtin_to_webhook(db, endpoint, tmp_path):
    """The daemon's wiring: the hook runner's builtin turns outbox events into queued
    notifications exactly once, and the notifier (woken after the commit) delivers them."""
    from tests.test_hooks import drain, make_runner
    from tomd.hooks.registry import Registry
    from tomd.notify import notification_kinds, subscriber

    tid = add_target(db, photometry=False)
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url(), secret=Secret(HMAC_SECRET),
                                     events=["observation.failed"]))
    n = notifier(db, config)
    registry = Registry()
    registry.add_builtin("builtin:notify", notification_kinds(config), subscriber(config, wake=n.wake))
    (tmp_path / "hooks").mkdir()
    runner = make_runner(db, tmp_path / "hooks", registry=registry)
    try:
        runner.start()  # the builtin takes the events committed after its registration
        with db.sessions.begin() as s:
            repo.add_event(s, RuleFired(11, "fast-risers", None, tid, "rise=1.2", ("ops",), "Look"), target_id=tid)
            repo.add_event(s, ObservationFailed(5, "tomd-5-ab", "lco", "window over", 2, tid), target_id=tid)
        drain(runner, db)
        assert n.wake_event.is_set()
        drain(runner, db)  # again: nothing new is queued
    finally:
        runner.close()
    assert sorted(r.dedupe_key for r in rows(db)) == ["observation.failed:5", "rule.fired:11"]
    assert [r.state for r in n.run_until_idle()] == ["sent", "sent"]
    subjects = sorted(b["notifications"][0]["subject"] for b in endpoint.bodies())
    assert subjects == ["Observation of ZTF24aaabbbc failed (lco)", "Rule fast-risers fired on ZTF24aaabbbc"]
    assert all(verify(HMAC_SECRET, r["body"], r["headers"]["Tomd-Signature"]) for r in endpoint.requests)


def test_metrics_count_delivered_and_finally_failed(db, endpoint):
    from tomd.metrics import Metrics

    metrics = Metrics()
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url()), bad=Channel(kind="slack", url=endpoint.url()))
    endpoint.plan.append((403, "action_prohibited", {}, 0.0))  # "bad" goes first (channels in name order)
    queue(db, "bad", 1)
    queue(db, "ops", 2)
    notifier(db, config, observer=metrics).run_until_idle()
    text = metrics.exposition().decode()
    assert 'tomd_notifications_sent_total{channel="ops"} 2.0' in text
    assert 'tomd_notifications_failed_total{channel="bad"} 1.0' in text


def test_cli_list_retry_and_flush(tmp_path, endpoint, capsys):
    from tomd.cli import main
    from tomd.db import migrate

    cfg = tmp_path / "tomd.toml"
    cfg.write_text(f"""
[database]
url = "sqlite:///{tmp_path / 'tomd.db'}"
[storage]
url = "file://{tmp_path / 'store'}"
[rules]
paths = ["{tmp_path / 'rules'}"]
[hooks]
paths = ["{tmp_path / 'hooks'}"]
[metrics]
listen = "127.0.0.1:0"
[notify.channels.ops]
kind = "webhook"
url = "{endpoint.url()}"
""")
    assert main(["--config", str(cfg), "db", "upgrade"]) == 0
    engine = migrate.connect(f"sqlite:///{tmp_path / 'tomd.db'}")
    sessions = migrate.sessions(engine)
    with sessions.begin() as s:
        enqueue(s, channel="ops", dedupe_key="a", message=Message("first"))
        enqueue(s, channel="ops", dedupe_key="b", message=Message("second"))
    endpoint.plan.append((404, "no such hook", {}, 0.0))
    capsys.readouterr()
    assert main(["--config", str(cfg), "notify", "flush"]) == 1  # one failed
    assert "sent 1, to retry 0, failed 1" in capsys.readouterr().out
    assert main(["--config", str(cfg), "notify", "list", "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert "#1" in out and "failed" in out and "first" in out and "HTTP 404: no such hook" in out
    assert main(["--config", str(cfg), "notify", "retry", "--all-failed"]) == 0
    assert "1 failed notification queued again" in capsys.readouterr().out
    assert main(["--config", str(cfg), "notify", "flush"]) == 0
    assert main(["--config", str(cfg), "notify", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [(r["subject"], r["state"]) for r in listed] == [("second", "sent"), ("first", "sent")]
    engine.dispose()


def test_notify_list_fills_the_target_name(db, capsys):
    """The queue keeps "{target}" (filled at send time); the list shows what is (or was) sent."""
    import argparse
    from types import SimpleNamespace

    from tomd.notify_cli import cmd_notify_list

    tid = add_target(db, "SN 2026abc", photometry=False)
    with db.sessions.begin() as s:
        enqueue(s, channel="ops", dedupe_key="a", message=Message("{target} brightened", target_id=tid),
                target_id=tid)
        enqueue(s, channel="ops", dedupe_key="b", message=Message("about {target}"))
        enqueue(s, channel="ops", dedupe_key="c", message=Message("plain {braces} stay"))
    app = SimpleNamespace(config=Config(), sessions=db.sessions)
    args = argparse.Namespace(state=None, channel=None, limit=50, json=False)
    assert cmd_notify_list(app, args) == 0
    out = capsys.readouterr().out
    assert "SN 2026abc brightened" in out and "about (no target)" in out and "plain {braces} stay" in out
    assert "{target}" not in out
    assert cmd_notify_list(app, argparse.Namespace(state=None, channel=None, limit=50, json=True)) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["subject"] for r in listed) == ["SN 2026abc brightened", "about (no target)",
                                                   "plain {braces} stay"]


def test_run_loop_sends_when_woken_and_stops(db, endpoint):
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url()))
    n = Notifier.from_config(config, db.sessions, settings=NotifySettings(interval_s=30.0))
    stop = threading.Event()
    t = threading.Thread(target=n.run, args=(stop,))
    t.start()
    try:
        queue(db, "ops", 1)
        n.wake()  # else the next look would be 30 s away
        deadline = time.monotonic() + 120
        while not endpoint.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(endpoint.requests) == 1
    finally:
        stop.set()
        n.wake()
        t.join(60)
    assert not t.is_alive()
    assert [r.state for r in rows(db)] == ["sent"]


def test_a_held_back_row_does_not_make_the_loop_spin(db, endpoint):
    """A retried row that is due but held back by the rate limit must not count as 'due soon'
    (the run loop would otherwise look again every 50 ms)."""
    clock = Clock()
    config = config_with(ops=Channel(kind="webhook", url=endpoint.url(), rate_limit_per_hour=1))
    endpoint.plan.append((500, "oops", {}, 0.0))
    queue(db, "ops", 2)
    n = notifier(db, config, clock)
    (r,) = n.run_once()  # the one message the limit allows: #1, which fails (a failure uses no room)
    assert r.state == "retry"
    assert [x.state for x in n.run_once()] == ["sent"]  # #2 takes the hour's only slot
    with db.sessions() as s:
        assert repo.next_notification_attempt(s, clock.now) == r.next_attempt_at
    clock.now = r.next_attempt_at + dt.timedelta(seconds=1)
    assert n.run_once() == []  # #1 is due but the limit holds it back
    with db.sessions() as s:
        assert repo.next_notification_attempt(s, clock.now) is None
