"""The tomd command, end to end in-process, on both databases."""

from __future__ import annotations

import json
import re

import pytest

from tomd.cli import main


@pytest.fixture
def config(db, tmp_path, monkeypatch):
    path = tmp_path / "tomd.toml"
    path.write_text(f'[database]\nurl = "{db.url}"\n[storage]\nurl = "file://{tmp_path}/data"\n'
                    f'[rules]\npaths = ["{tmp_path}/rules"]\n')
    monkeypatch.setenv("TOMD_CONFIG", str(path))
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_target_add_show_list_cone(config, capsys):
    code, out, _ = run(capsys, "target", "add", "SN 2025xyz", "--ra", "10:00:24", "--dec", "-12:30:00",
                       "--alias", "ZTF25aaabbbc", "--tag", "sn", "--extra", "redshift=0.05")
    assert code == 0 and "created target #1 SN 2025xyz" in out
    code, out, _ = run(capsys, "target", "add", "other name", "--ra", "150.1", "--dec", "-12.5002")
    assert code == 0 and "matched existing target #1" in out and "position" in out
    code, out, _ = run(capsys, "target", "show", "ztf 25aaabbbc", "--json")
    shown = json.loads(out)
    assert shown["ra"] == pytest.approx(150.1) and shown["extras"] == {"redshift": 0.05}
    assert shown["aliases"] == ["ZTF25aaabbbc", "other name"]
    run(capsys, "target", "add", "far", "--ra", "150.2", "--dec", "-12.5")
    code, out, _ = run(capsys, "target", "list", "--json", "--cone", "10:00:24", "-12:30:00", "10")
    hits = json.loads(out)
    assert [h["name"] for h in hits] == ["SN 2025xyz"] and hits[0]["separation_arcsec"] < 1e-6
    code, out, _ = run(capsys, "target", "list", "--tag", "sn")
    assert code == 0 and "SN 2025xyz" in out and "far" not in out


def test_bad_input_is_one_line_and_exit_1(config, capsys):
    code, _, err = run(capsys, "target", "add", "x", "--ra", "400", "--dec", "0")
    assert code == 1 and err.strip() == "tomd: --ra: expected degrees within [0, 360], got 400"
    code, _, err = run(capsys, "target", "show", "nope")
    assert code == 1 and "no target named 'nope'" in err
    code, _, err = run(capsys, "target", "add", "x", "--ra", "1", "--dec", "1", "--scheme", "MPC_COMET")
    assert code == 1 and "Traceback" not in err and "--epochofel" in err


def test_import_exit_status_and_export(config, capsys, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("name,ra,dec\nA,1,2\nB,3,4\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,ra,dec\nC,5,6\nD,5,100\n")
    code, out, _ = run(capsys, "target", "import", str(good))
    assert code == 0 and "2 created" in out
    code, out, err = run(capsys, "target", "import", str(bad))
    assert code == 1 and f"{bad}:3: dec:" in err and "1 created" in out
    code, out, _ = run(capsys, "target", "export")
    assert out.splitlines()[0].startswith("name,type,ra,dec") and len(out.splitlines()) == 4


def test_unmigrated_database_is_refused_with_the_fix(tmp_path, capsys, monkeypatch):
    path = tmp_path / "tomd.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "new.db"}"\n')
    monkeypatch.setenv("TOMD_CONFIG", str(path))
    code, _, err = run(capsys, "target", "list")
    assert code == 1 and "run `tomd db upgrade`" in err
    code, out, _ = run(capsys, "db", "upgrade")
    assert code == 0 and "migrated" in out
    code, out, _ = run(capsys, "db", "upgrade")
    assert code == 0 and "already" in out
    code, _, _ = run(capsys, "target", "list")
    assert code == 0


def test_config_check(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('[database]\nurl = "sqlite:///x.db"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[database]\nurl = 42\n[facilities.lco]\nkind = "lco"\nurl = "ftp://x"\nbogus = 1\n')
    assert run(capsys, "--config", str(good), "config", "check")[0] == 0
    code, _, err = run(capsys, "--config", str(bad), "config", "check")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 4  # the three above and lco's missing token
    assert all(line.startswith(f"{bad}") for line in lines)
    assert any("database.url" in line for line in lines)
    assert any("facilities.lco.url" in line for line in lines)
    assert any("facilities.lco.bogus" in line for line in lines)
    assert any("facilities.lco.token" in line for line in lines)
    code, _, err = run(capsys, "--config", str(tmp_path / "missing.toml"), "config", "check")
    assert code == 1 and "no such file" in err


def test_alert_replay_of_real_packets_in_every_format(config, capsys, shared_data):
    from sqlalchemy import select

    from tomd.db.models import AlertRow, Notice
    from tomd.db.migrate import connect, sessions

    files = [
        *sorted((shared_data / "ztf/pittgoogle").glob("*.avro")),
        *sorted((shared_data / "lsst/fink-broker-rubin_test_data_9_0").glob("*.avro"))[:5],
        *sorted((shared_data / "lsst/pittgoogle-confluent-wire").glob("lsst.v1*.avro")),
        *sorted((shared_data / "gcn/voevent/skyportal").glob("*.xml")),
        shared_data / "gcn/gcn-classic-binary/SWIFT_BAT_GRB_POS_ACK.bin",
        *sorted((shared_data / "other/lasair").glob("*.json")),
    ]
    code, out, err = run(capsys, "alert", "replay", "--no-progress", *map(str, files))
    assert code == 0, err
    assert f"{len(files)} files" in out and "0 dead letters" in out
    code, out2, _ = run(capsys, "alert", "replay", "--no-progress", *map(str, files))
    assert code == 0 and " 0 alerts stored" in out2  # a replay changes nothing
    # Mock LVK events are skipped unless asked for; with --include-test they become notices.
    lvk = sorted((shared_data / "lvk/userguide-examples").glob("MS181101ab-*.avro"))
    code, out, _ = run(capsys, "alert", "replay", "--no-progress", *map(str, lvk))
    assert code == 0 and " 0 alerts stored" in out and f"{len(lvk)} test events skipped" in out
    code, out, _ = run(capsys, "alert", "replay", "--no-progress", "--include-test", *map(str, lvk))
    assert code == 0 and f" {len(lvk)} alerts stored" in out
    from tomd.config import load_config

    engine = connect(load_config().database.url)
    with sessions(engine)() as s:
        sources = set(s.scalars(select(AlertRow.source)))
        notice = s.scalars(select(Notice).where(Notice.event_id == "MS181101ab")).one()
    engine.dispose()
    assert {"ztf", "rubin", "gcn", "lvk"} <= sources
    assert notice.retracted  # the RETRACTION notice marked the event
    # Every LVK example notice carries the same skymap: stored once, as a data product of the notice.
    code, out, _ = run(capsys, "data", "list", "--json")
    import json as _json

    skymaps = [p for p in _json.loads(out) if p["kind"] == "skymap"]
    assert code == 0 and len(skymaps) == 1 and skymaps[0]["size"] == 777600


GCN_OIDC = """
[database]
url = "sqlite:///{db}"
[[streams]]
name = "gcn"
bootstrap = "kafka.gcn.nasa.gov:9092"
topics = ["gcn.notices.swift.bat.guano"]
format = "gcn-json"
[streams.kafka]
"security.protocol" = "sasl_ssl"
"sasl.mechanisms" = "OAUTHBEARER"
"sasl.oauthbearer.method" = "oidc"
"sasl.oauthbearer.client.id" = "${{GCN_CLIENT_ID}}"
"sasl.oauthbearer.client.secret" = "${{GCN_CLIENT_SECRET:-}}"
"sasl.oauthbearer.token.endpoint.url" = "https://auth.gcn.nasa.gov/oauth2/token"
"""


@pytest.mark.parametrize("command", [["config", "check"], ["run", "--exit-when-idle", "1"]])
def test_gcn_oidc_without_its_secret_is_refused_by_config_check_and_run(tmp_path, capsys, monkeypatch, command):
    """Issue 3: an empty GCN client secret must not pass (librdkafka would never get a token)."""
    cfg = tmp_path / "tomd.toml"
    cfg.write_text(GCN_OIDC.format(db=tmp_path / "tomd.db"))
    monkeypatch.setenv("GCN_CLIENT_ID", "gcn-id-123")
    monkeypatch.delenv("GCN_CLIENT_SECRET", raising=False)
    code, out, err = run(capsys, "--config", str(cfg), *command)
    assert code == 1 and "OK" not in out
    assert err.strip().splitlines() == [
        f'{cfg}:14: streams[0].kafka."sasl.oauthbearer.client.secret": empty ("${{GCN_CLIENT_SECRET:-}}" expands '
        'to ""); "sasl.oauthbearer.method" = "oidc" needs the OIDC client secret to get a token']
    assert not (tmp_path / "tomd.db").exists()  # refused before anything started
    monkeypatch.setenv("GCN_CLIENT_SECRET", "  gcn-secret-sss ")
    monkeypatch.setenv("GCN_CLIENT_ID", "")
    code, out, err = run(capsys, "--config", str(cfg), "config", "check")
    assert code == 1 and "sasl.oauthbearer.client.id" in err and "gcn-secret-sss" not in out + err


# ------------------------------------------------------------ alert replay --


def _stream_config(tmp_path, db_url: str, monkeypatch) -> None:
    """A config with stream "ztf-public" and a rule that listens to that stream only."""
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "heard.toml").write_text('name = "heard-on-public"\nsources = ["ztf"]\nstreams = ["ztf-public"]\n'
                                      "when = 'alert.ra >= 0'\nadd_tags = [\"heard\"]\n")
    path = tmp_path / "tomd.toml"
    path.write_text(f'[database]\nurl = "{db_url}"\n[storage]\nurl = "file://{tmp_path}/data"\n'
                    f'[rules]\npaths = ["{rules}"]\n'
                    '[[streams]]\nname = "ztf-public"\nbootstrap = "127.0.0.1:9"\ntopics = ["ztf"]\n'
                    'format = "ztf-avro"\n')
    monkeypatch.setenv("TOMD_CONFIG", str(path))


def _ztf_files(tmp_path, n: int, seed: int = 3) -> list[str]:
    """``n`` ZTF alert files, copies of real packets with distinct ids (bench/ztf_copies.py)."""
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from ztf_copies import ztf_copies

    out = tmp_path / f"ztf-{seed}"
    out.mkdir()
    files = []
    for i, value in enumerate(ztf_copies(n, seed=seed)):
        files.append(out / f"alert-{i:04d}.avro")
        files[-1].write_bytes(value)
    return [str(f) for f in files]


def _alert_streams(db) -> list[str]:
    from sqlalchemy import select

    from tomd.db.models import AlertRow

    with db.sessions() as s:
        return sorted(s.scalars(select(AlertRow.stream)))


def test_alert_replay_with_a_stream_stores_on_that_stream_so_its_rules_hear(db, tmp_path, capsys, monkeypatch,
                                                                          shared_data):
    """Issue 3: `--stream ztf-public` stores the alerts on ztf-public (rules selecting it judge them);
    without --stream they are stream "replay"."""
    _stream_config(tmp_path, db.url, monkeypatch)
    files = _ztf_files(tmp_path, 3)
    on_public, plain = files[:2], files[2:]
    code, out, err = run(capsys, "alert", "replay", "--no-progress", "--stream", "ztf-public", *on_public)
    assert code == 0 and " 2 alerts stored" in out, err
    code, out, err = run(capsys, "alert", "replay", "--no-progress", *plain)
    assert code == 0 and " 1 alerts stored" in out, err
    assert _alert_streams(db) == ["replay", "ztf-public", "ztf-public"]
    code, out, _ = run(capsys, "target", "list", "--tag", "heard", "--json")
    assert code == 0 and len(json.loads(out)) == 2  # the rule heard the two on its stream, not the other
    code, out, err = run(capsys, "rule", "backtest", "--since", "2000-01-01", "--json")
    assert code == 0, err
    assert json.loads(out)["streams"] == {"ztf-public": 2, "replay": 1}


def test_alert_replay_waits_out_a_database_outage(db, tmp_path, capsys, monkeypatch, shared_data):
    """Issue 3: a RetryableError (the database went away) is retried with backoff, not the end of the replay."""
    if db.kind != "postgresql":
        pytest.skip("a network outage needs a database behind a network")
    import threading
    import time

    from sqlalchemy.engine import make_url

    from tests.netfault import TcpProxy

    url = make_url(db.url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        _stream_config(tmp_path, url.set(port=proxy.port).render_as_string(hide_password=False), monkeypatch)
        files = _ztf_files(tmp_path, 200)
        cut = threading.Event()

        def outage():  # once a few alerts are in, the line is down for 3 s
            deadline = time.monotonic() + 60
            while len(_alert_streams(db)) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            proxy.cut()
            cut.set()
            time.sleep(3)
            proxy.restore()

        t = threading.Thread(target=outage, daemon=True)
        t.start()
        code, out, err = run(capsys, "alert", "replay", "--no-progress", "--batch-size", "1", *files)
        t.join()
        assert cut.is_set()
        assert code == 0, err
        assert "200 files: 200 alerts stored" in out
        assert "database" in err and "trying again in" in err  # what happened, and that it waits
        assert len(_alert_streams(db)) == 200
    finally:
        proxy.close()


def test_alert_replay_gives_up_after_its_retries_naming_the_file(db, tmp_path, capsys, monkeypatch, shared_data):
    """Issue 3: the database stays away: a bounded number of attempts, then a clear error naming the file;
    running the same replay again later finishes it, each alert stored once."""
    if db.kind != "postgresql":
        pytest.skip("a network outage needs a database behind a network")
    import threading
    import time

    from sqlalchemy.engine import make_url

    from tests.netfault import TcpProxy

    url = make_url(db.url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        _stream_config(tmp_path, url.set(port=proxy.port).render_as_string(hide_password=False), monkeypatch)
        files = _ztf_files(tmp_path, 200)

        def outage():
            deadline = time.monotonic() + 60
            while len(_alert_streams(db)) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            proxy.cut()

        t = threading.Thread(target=outage, daemon=True)
        t.start()
        started = time.monotonic()
        code, out, err = run(capsys, "alert", "replay", "--no-progress", "--batch-size", "1", "--retries", "2",
                             *files)
        t.join()
        assert code == 1 and time.monotonic() - started < 60
        last = err.strip().splitlines()[-1]
        m = re.fullmatch(r"tomd: (\S+): not stored after 3 attempts over \d+ s \(database: .*\); (\d+) of 200 "
                         r"files are stored: run the same replay again to finish \(what is stored is skipped\)", last)
        assert m, err
        done = int(m.group(2))
        assert 3 <= done < 200 and m.group(1) == files[done]  # the first file not stored
        assert err.count("trying again in") == 2
        stored = len(_alert_streams(db))
        assert done <= stored <= done + 1  # + 1: a commit the cut interrupted may have landed
        proxy.restore()
        code, out, err = run(capsys, "alert", "replay", "--no-progress", *files)
        assert code == 0 and f"200 files: {200 - stored} alerts stored, {stored} already stored" in out, err
        assert len(_alert_streams(db)) == 200
    finally:
        proxy.close()


# ------------------------------------------------------ retry-dead-letters --


def test_retry_dead_letters_exits_1_while_letters_still_fail(db, tmp_path, capsys, monkeypatch):
    """Issue 3: exit 1 and how many when a letter fails again; 0 when all were ingested or none were due."""
    _stream_config(tmp_path, db.url, monkeypatch)
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"Obj\x01not an alert at all")
    code, out, _ = run(capsys, "alert", "replay", "--no-progress", "--stream", "ztf-public", str(junk))
    assert code == 1 and "1 dead letters" in out
    code, out, _ = run(capsys, "alert", "dead-letters", "--json")
    assert [d["stream"] for d in json.loads(out)] == ["ztf-public"]  # retried as that stream reads
    code, out, _ = run(capsys, "alert", "retry-dead-letters")
    assert code == 1 and "1 dead letters retried: 0 ingested, 1 still failing" in out
    code, out, _ = run(capsys, "alert", "retry-dead-letters", "--stream", "elsewhere")
    assert code == 0 and "0 dead letters retried" in out
