"""tomd.config: loading, validation messages, env expansion and secrets."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import typing
from pathlib import Path

import pytest

from tomd.config import (
    Channel,
    Config,
    Database,
    Facility,
    Hooks,
    Logging,
    Metrics,
    Notify,
    Rules,
    Secret,
    Storage,
    Stream,
    Targets,
    check_config_file,
    load_config,
    parse_duration,
    resolve_config_path,
)
from tomd.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config.example.toml"


def write(tmp_path: Path, text: str, name: str = "tomd.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(tmp_path: Path, text: str, env: dict | None = None) -> list[str]:
    """Problem lines for ``text``, with the tmp directory stripped from paths."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return [line.replace(str(tmp_path) + "/", "") for line in info.value.problems]


def one_problem(tmp_path: Path, text: str, env: dict | None = None) -> str:
    lines = problems(tmp_path, text, env)
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------
# The example file


EXAMPLE_ENV = {"LCO_API_TOKEN": "lco-token-123", "GCN_CLIENT_ID": "gcn-id-0123",
               "GCN_CLIENT_SECRET": "gcn-secret-456", "SMTP_PASSWORD": "smtp-pw-789"}


def test_example_loads_and_says_what_it_means():
    config = load_config(EXAMPLE, env=EXAMPLE_ENV)
    expected = Config(
        database=Database(url="sqlite:///tomd.db", pool_size=5, echo=False),
        streams=[
            Stream(name="ztf", kind="kafka", bootstrap="localhost:9092",
                   topics=["^ztf_.*_programid1$"], format="ztf-avro", group="tomd",
                   start="earliest", batch_size=500, batch_timeout=0.5, schema_registry=None,
                   include_test=False, localization_max_deg=0.1,
                   kafka={"security.protocol": "PLAINTEXT", "session.timeout.ms": 45000}),
            Stream(name="gcn", kind="kafka", bootstrap="kafka.gcn.nasa.gov:9092",
                   topics=["gcn.notices.swift.bat.guano", "igwn.gwalert"], format="auto",
                   group="tomd-gcn", start="latest", batch_size=100, batch_timeout=2.0,
                   include_test=False, localization_max_deg=0.5,
                   kafka={"security.protocol": "SASL_SSL", "sasl.mechanisms": "OAUTHBEARER",
                          "sasl.oauthbearer.method": "oidc",
                          "sasl.oauthbearer.client.id": "gcn-id-0123",
                          "sasl.oauthbearer.client.secret": Secret("gcn-secret-456"),
                          "sasl.oauthbearer.token.endpoint.url":
                              "https://auth.gcn.nasa.gov/oauth2/token"}),
        ],
        facilities={
            "lco": Facility(kind="lco", url="https://observe.lco.global",
                            token=Secret("lco-token-123"), proposal="LCO2024B-001",
                            timeout=30.0, rate_limit=5.0, poll_interval=300.0,
                            templates={"1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO",
                                                  "filters": ["gp", "rp", "ip"],
                                                  "exposure_time": 300, "exposure_count": 1}}),
            "sim": Facility(kind="sim"),
        },
        storage=Storage(url="file://./tomd-data", multipart_threshold_mb=64),
        targets=Targets(match_radius_arcsec=1.5),
        rules=Rules(paths=["rules"]),
        hooks=Hooks(paths=["hooks"], timeout=60.0, max_attempts=5),
        metrics=Metrics(listen="127.0.0.1:9464", enabled=True),
        logging=Logging(level="INFO", format="text"),
        notify=Notify(channels={
            "slack-transients": Channel(kind="slack",
                                        url="https://hooks.slack.com/services/T000/B000/XXXX",
                                        rate_limit_per_hour=60),
            "ops-webhook": Channel(kind="webhook", url="https://ops.example.org/tomd"),
            "night-mail": Channel(kind="email", to=["night-shift@example.org"],
                                  smtp_host="smtp.example.org", smtp_port=587, username="tomd",
                                  password=Secret("smtp-pw-789"), starttls=True),
            "journal": Channel(kind="log"),
        }),
    )
    assert config == expected
    assert config.source == EXAMPLE
    assert config.facilities["lco"].token.reveal() == "lco-token-123"


def test_example_without_required_env_names_the_variable():
    lines = check_config_file(EXAMPLE, env={})
    expected = [('streams[1].kafka."sasl.oauthbearer.client.id"', "GCN_CLIENT_ID", '"sasl.oauthbearer.client.id" = '),
                ('streams[1].kafka."sasl.oauthbearer.client.secret"', "GCN_CLIENT_SECRET",
                 '"sasl.oauthbearer.client.secret" = '),
                ("facilities.lco.token", "LCO_API_TOKEN", "token = ")]
    assert len(lines) == len(expected), lines
    text = EXAMPLE.read_text().splitlines()
    for line, (key, var, starts) in zip(lines, expected):
        assert re.fullmatch(re.escape(f"{EXAMPLE}:") + r"\d+: " + re.escape(f"{key}: environment variable {var} "
                                                                          "is not set") + ".*", line), line
        assert text[int(line.split(":")[1]) - 1].startswith(starts)


def _schema_keys(cls: type, seen: set | None = None) -> set[str]:
    """Every key name of the schema (and ``<name>_file`` for secrets)."""
    seen = set() if seen is None else seen
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        keys.add(f.name)
        if hints[f.name] in (Secret, typing.Optional[Secret]):
            keys.add(f.name + "_file")
        stack = [hints[f.name]]
        while stack:
            hint = stack.pop()
            if dataclasses.is_dataclass(hint) and hint not in seen:
                seen.add(hint)
                keys |= _schema_keys(hint, seen)
            stack.extend(typing.get_args(hint))
    return keys


def test_example_documents_every_key_with_a_comment():
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    for key in sorted(_schema_keys(Config)):
        pattern = re.compile(rf'^\s*(?:#\s*)?(?:\[\[?[\w.-]*?)?{re.escape(key)}(?:\s*=|[.\]])')
        found = [i for i, line in enumerate(lines) if pattern.match(line)]
        assert found, f"config.example.toml does not show the key {key!r}"
        # the key (or its table) comes with a comment just above it
        i = found[0]
        assert any(lines[j].lstrip().startswith("#") for j in range(max(0, i - 4), i)), key


# --------------------------------------------------------------------------
# Defaults and where the file comes from


def test_no_file_at_default_path_gives_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config == Config()
    assert config.source is None
    assert config.database.url == "sqlite:///tomd.db"
    assert config.storage.url == "file://./tomd-data"
    assert config.streams == []
    assert list(config.facilities) == ["sim"]
    assert config.facilities["sim"].kind == "sim"
    assert config.metrics.listen == "127.0.0.1:9464"
    assert check_config_file(env={}) == []


def test_default_path_is_used_when_present(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[logging]\nlevel = 'DEBUG'\n")
    config = load_config(env={})
    assert config.logging.level == "DEBUG"
    assert config.source == Path("tomd.toml")


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_explicit_path_that_does_not_exist_is_an_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert info.value.problems == [f"{missing}: no such config file"]
    assert isinstance(info.value, UserError)
    assert check_config_file(missing, env={}) == [f"{missing}: no such config file"]


def test_tomd_config_env_points_at_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[logging]\nlevel = 'DEBUG'\n")  # ./tomd.toml, must be ignored
    other = write(tmp_path, "[logging]\nlevel = 'ERROR'\n", "other.toml")
    env = {"TOMD_CONFIG": str(other)}
    assert resolve_config_path(None, env=env) == other
    assert load_config(env=env).logging.level == "ERROR"
    # an explicit path beats the environment
    assert resolve_config_path("tomd.toml", env=env) == Path("tomd.toml")
    assert load_config("tomd.toml", env=env).logging.level == "DEBUG"


def test_tomd_config_env_to_missing_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(env={"TOMD_CONFIG": str(tmp_path / "gone.toml")})


def test_resolve_config_path_default_and_os_environ(monkeypatch):
    monkeypatch.delenv("TOMD_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("tomd.toml")
    monkeypatch.setenv("TOMD_CONFIG", "/etc/tomd/tomd.toml")
    assert resolve_config_path(None) == Path("/etc/tomd/tomd.toml")
    assert resolve_config_path("x.toml") == Path("x.toml")


# --------------------------------------------------------------------------
# One line per problem


@pytest.mark.parametrize("text, expected", [
    ("""
     [facilities.lco]
     kind = "lco"
     url = 42
     token = "t"
     """, 'tomd.toml:3: facilities.lco.url: expected an http(s) URL, got 42'),
    ("""
     [facilities.lco]
     kind = "lco"
     url = "ftp://observe.lco.global"
     token = "t"
     """, 'tomd.toml:3: facilities.lco.url: expected an http(s) URL, got "ftp://observe.lco.global"'),
    ("""
     [[streams]]
     name = "a"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"

     [[streams]]
     name = "b"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf"
     """, 'tomd.toml:11: streams[1].format: expected one of ztf-avro, rubin-avro, rubin-avro-file, '
          'fink-avro, lasair-json, gcn-json, gcn-voevent, gcn-binary, lvk-avro, lvk-json, antares, '
          'hop, auto, got "ztf"'),
    ("""
     [databse]
     url = "sqlite:///x.db"
     """, 'tomd.toml:1: databse: unknown key; did you mean "database"?'),
    ("""
     [metrics]
     listen = "127.0.0.1:9464"
     enabeld = false
     """, 'tomd.toml:3: metrics.enabeld: unknown key; did you mean "enabled"?'),
    ("""
     [metrics]
     zzz = 1
     """, 'tomd.toml:2: metrics.zzz: unknown key; expected one of enabled, listen'),
    ("""
     [[streams]]
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"
     """, 'tomd.toml:1: streams[0].name: missing required key; expected a string'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     format = "ztf-avro"
     """, 'tomd.toml:1: streams[0].topics: missing required key; expected a list of strings'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = "ztf_alerts"
     format = "ztf-avro"
     """, 'tomd.toml:4: streams[0].topics: expected a list of strings, got "ztf_alerts"'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["ok", 7]
     format = "ztf-avro"
     """, 'tomd.toml:4: streams[0].topics[1]: expected a string, got 7'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = []
     format = "ztf-avro"
     """, 'tomd.toml:4: streams[0].topics: expected a non-empty list of topics, got []'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["^ztf_(unclosed"]
     format = "ztf-avro"
     """, None),  # checked by prefix below
    ("""
     [[streams]]
     name = "ztf"
     topics = ["t"]
     format = "ztf-avro"
     """, 'tomd.toml:1: streams[0].bootstrap: missing required key for a kafka stream; '
          'expected host:port[,host:port...]'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost"
     topics = ["t"]
     format = "ztf-avro"
     """, 'tomd.toml:3: streams[0].bootstrap: expected host:port[,host:port...], like '
          '"localhost:9092", got "localhost"'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"
     batch_size = 0
     """, 'tomd.toml:6: streams[0].batch_size: expected an integer from 1 to 100000, got 0'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"
     batch_size = 1.5
     """, 'tomd.toml:6: streams[0].batch_size: expected an integer, got 1.5'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"
     batch_timeout = "5 minutes"
     """, 'tomd.toml:6: streams[0].batch_timeout: expected a duration like "30s", "5m", "2h" '
          'or "2d", got "5 minutes"'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"
     start = "yesterday"
     """, 'tomd.toml:6: streams[0].start: expected "earliest", "latest" or an ISO-8601 '
          'timestamp, got "yesterday"'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"
     kafka = { "group.id" = "other" }
     """, 'tomd.toml:6: streams[0].kafka."group.id": set streams[0].group instead'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"

     [streams.kafka]
     "fetch.max.bytes" = [1, 2]
     """, 'tomd.toml:8: streams[0].kafka."fetch.max.bytes": expected a string, number or '
          'boolean, got a list'),
    ("""
     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["t"]
     format = "ztf-avro"

     [[streams]]
     name = "ztf"
     bootstrap = "localhost:9092"
     topics = ["u"]
     format = "ztf-avro"
     """, 'tomd.toml:8: streams[1].name: duplicate stream name "ztf" (also streams[0])'),
    ("""
     [streams]
     name = "ztf"
     """, 'tomd.toml:1: streams: expected a list of tables, got a table'),
    ("""
     database = 5
     """, 'tomd.toml:1: database: expected a table, got 5'),
    ("""
     [database]
     url = "mysql://db/tomd"
     """, 'tomd.toml:2: database.url: expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB, '
          'got "mysql://db/tomd"'),
    ("""
     [database]
     pool_size = "5"
     """, 'tomd.toml:2: database.pool_size: expected an integer, got "5"'),
    ("""
     [database]
     echo = 1
     """, 'tomd.toml:2: database.echo: expected true or false, got 1'),
    ("""
     [database]
     password = "pw"
     """, 'tomd.toml:2: database.password: a sqlite database takes no password'),
    ("""
     [database]
     url = "postgresql://db.example.org/tomd"
     password = "pw"
     """, 'tomd.toml:2: database.url: expected a user name in the URL (USER@HOST) to go with '
          'the password'),
    ("""
     [facilities.keck]
     kind = "keck"
     url = "https://keck.example.org"
     """, 'tomd.toml:2: facilities.keck.kind: expected one of lco, soar, sim, gemini, swift, '
          'got "keck"'),
    ("""
     [facilities.gemini]
     kind = "gemini"
     """, 'tomd.toml:1: facilities.gemini.url: missing required key for a "gemini" facility; '
          'expected an http(s) URL'),
    ("""
     [facilities.lco]
     kind = "lco"
     url = "https://observe.lco.global"
     """, 'tomd.toml:1: facilities.lco.token: missing required key for a "lco" facility; '
          'expected an API token (or token_file)'),
    ("""
     [facilities.sim]
     kind = "sim"
     rate_limit = 0
     """, 'tomd.toml:3: facilities.sim.rate_limit: expected a number greater than 0 and at most '
          '1000, got 0.0'),
    ("""
     [facilities.sim]
     kind = "sim"
     templates = { x = 1 }
     """, 'tomd.toml:3: facilities.sim.templates.x: expected a table, got 1'),
    ("""
     [storage]
     url = "/var/tomd"
     """, 'tomd.toml:2: storage.url: expected file://PATH or s3://BUCKET/PREFIX, got "/var/tomd"'),
    ("""
     [targets]
     match_radius_arcsec = -1
     """, 'tomd.toml:2: targets.match_radius_arcsec: expected a number greater than 0 and at '
          'most 3600, got -1.0'),
    ("""
     [metrics]
     listen = "9464"
     """, 'tomd.toml:2: metrics.listen: expected host:port, like "127.0.0.1:9464" (port 0: any free port), got "9464"'),
    ("""
     [logging]
     level = "info"
     """, 'tomd.toml:2: logging.level: expected one of DEBUG, INFO, WARNING, ERROR, got "info"'),
    ("""
     [hooks]
     max_attempts = 0
     """, 'tomd.toml:2: hooks.max_attempts: expected an integer from 1 to 100, got 0'),
    ("""
     [notify.channels.slack]
     kind = "slack"
     """, 'tomd.toml:1: notify.channels.slack.url: missing required key for a "slack" channel; '
          'expected an http(s) URL'),
    ("""
     [notify.channels.mail]
     kind = "email"
     smtp_host = "smtp.example.org"
     to = ["night shift"]
     """, 'tomd.toml:4: notify.channels.mail.to[0]: expected an e-mail address, got "night shift"'),
])
def test_each_problem_is_one_line_with_file_line_and_key(tmp_path, text, expected):
    line = one_problem(tmp_path, text)
    if expected is None:
        assert line.startswith("tomd.toml:4: streams[0].topics: expected a valid regular expression")
    else:
        assert line == expected


@pytest.mark.parametrize("key, why", [
    ("enable.auto.commit", "tomd commits offsets itself"),
    ("enable.auto.offset.store", "tomd stores offsets itself"),
    ("client.id", "set by tomd to tomd-<stream name>"),
    ("group.id", "set streams[0].group instead"),
])
def test_kafka_keys_that_run_would_refuse_or_override_fail_config_check(tmp_path, key, why):
    """`run` owns these (tomd.alerts.consumer): `config check` must not accept them quietly."""
    line = one_problem(tmp_path, f"""
        [[streams]]
        name = "ztf"
        bootstrap = "localhost:9092"
        topics = ["t"]
        format = "ztf-avro"

        [streams.kafka]
        "session.timeout.ms" = 45000
        "{key}" = "x"
        """)
    assert line.startswith(f'tomd.toml:9: streams[0].kafka."{key}": {why}'), line


def test_schema_file_is_parsed_at_load_and_resolved_beside_the_config(tmp_path):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "fink.avsc").write_text(
        '{"type": "record", "name": "r", "fields": [{"name": "objectId", "type": "string"}]}')
    path = write(tmp_path, """
        [[streams]]
        name = "fink"
        bootstrap = "localhost:9092"
        topics = ["fink_sn_candidates_ztf"]
        format = "fink-avro"
        schema_file = "schemas/fink.avsc"
        """)
    (st,) = load_config(path, env={}).streams
    assert st.schema_file == str(tmp_path / "schemas" / "fink.avsc")
    assert Stream(name="x", topics=["t"], format="fink-avro").schema_file is None


@pytest.mark.parametrize("content, fmt, why", [
    (None, "fink-avro", "schema file s.avsc: No such file or directory"),
    ("{not json", "fink-avro", "schema file s.avsc: not JSON"),
    ('{"type": "record", "name": "r", "fields": [{"name": "a", "type": "nosuchtype"}]}', "auto",
     "schema file s.avsc: not an Avro schema: UnknownType: nosuchtype"),
    ('{"type": "string"}', "ztf-avro", 'only fink-avro and auto streams read schemaless Avro; '
                                       'this stream\'s format is "ztf-avro"'),
])
def test_schema_file_problems_are_one_line(tmp_path, content, fmt, why):
    if content is not None:
        (tmp_path / "s.avsc").write_text(content)
    line = one_problem(tmp_path, f"""
        [[streams]]
        name = "fink"
        bootstrap = "localhost:9092"
        topics = ["t"]
        format = "{fmt}"
        schema_file = "s.avsc"
        """)
    assert line.startswith(f"tomd.toml:6: streams[0].schema_file: {why}"), line


def test_inline_tables_report_the_line_of_the_inline_table(tmp_path):
    line = one_problem(tmp_path, """
        # comment
        facilities = { lco = { kind = "lco", url = "https://x.org", token = "t", timeout = "soon" } }
        """)
    assert line == ('tomd.toml:2: facilities.lco.timeout: expected a duration like "30s", "5m", '
                    '"2h" or "2d", got "soon"')


def test_line_numbers_skip_multiline_strings_and_arrays(tmp_path):
    lines = problems(tmp_path, '''
        [[streams]]
        name = "ztf"
        bootstrap = "localhost:9092"
        topics = [
          "a",
          "b",
        ]
        format = "ztf-avro"
        group = """
        url = 42
        """

        [[streams]]
        name = "rubin"
        kind = "file"
        topics = ["alerts/*.avro"]
        format = "rubin"

        [facilities."my lco"]
        kind = "lco"
        url = "https://observe.lco.global"
        token = "t"

        [facilities.lco]
        kind = "lco"
        url = "https://observe.lco.global"
        token = "t"
        proposal.x = 1
        ''')
    assert lines == [
        'tomd.toml:9: streams[0].group: expected a consumer group name without spaces, '
        'got "url = 42\\n"',
        'tomd.toml:17: streams[1].format: expected one of ztf-avro, rubin-avro, rubin-avro-file, '
        'fink-avro, lasair-json, gcn-json, gcn-voevent, gcn-binary, lvk-avro, lvk-json, antares, '
        'hop, auto, got "rubin"',
        'tomd.toml:19: facilities."my lco": expected a name of letters, digits, \'-\', \'_\' or '
        '\'.\', got "my lco"',
        'tomd.toml:28: facilities.lco.proposal: expected a string, got a table',
    ]


def test_line_numbers_are_left_out_when_the_scan_is_unsure(tmp_path):
    # an escaped quote inside a multi-line string fools the simple scanner;
    # its result disagrees with the parsed document, so no line is claimed
    lines = problems(tmp_path, r'''
        [logging]
        level = "info"

        [facilities.sim]
        kind = "sim"
        proposal = """a \""" b
        kind = 1
        """
        ''')
    assert lines == ['tomd.toml: logging.level: expected one of DEBUG, INFO, WARNING, ERROR, got "info"']


def test_all_problems_are_reported_together_in_file_order(tmp_path):
    lines = problems(tmp_path, """
        [database]
        url = "oracle://x"
        pool_size = 0

        [[streams]]
        name = "ztf"
        topics = ["t"]
        format = "nope"
        kafka = { "sasl.password" = 5 }

        [facilities.lco]
        kind = "lco"
        url = 42
        tokne = "x"

        [logging]
        format = "xml"
        """)
    assert lines == [
        'tomd.toml:2: database.url: expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB, '
        'got "oracle://x"',
        'tomd.toml:3: database.pool_size: expected an integer from 1 to 1000, got 0',
        'tomd.toml:5: streams[0].bootstrap: missing required key for a kafka stream; '
        'expected host:port[,host:port...]',
        'tomd.toml:8: streams[0].format: expected one of ztf-avro, rubin-avro, rubin-avro-file, '
        'fink-avro, lasair-json, gcn-json, gcn-voevent, gcn-binary, lvk-avro, lvk-json, antares, '
        'hop, auto, got "nope"',
        'tomd.toml:9: streams[0].kafka."sasl.password": expected a string, got an integer',
        'tomd.toml:11: facilities.lco.token: missing required key for a "lco" facility; '
        'expected an API token (or token_file)',
        'tomd.toml:13: facilities.lco.url: expected an http(s) URL, got 42',
        'tomd.toml:14: facilities.lco.tokne: unknown key; did you mean "token"?',
        'tomd.toml:17: logging.format: expected one of text, json, got "xml"',
    ]


def test_config_error_message_is_the_lines(tmp_path):
    path = write(tmp_path, "[logging]\nlevel = 1\nformat = 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == "\n".join(info.value.problems)
    assert len(info.value.problems) == 2


def test_toml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    path = write(tmp_path, """
        [database]
        url = "sqlite:///x.db"
        pool_size = = 5
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert len(info.value.problems) == 1
    assert re.fullmatch(re.escape(str(path)) + r":3:\d+: invalid TOML: .+", info.value.problems[0])
    assert "(at line" not in info.value.problems[0]


def test_toml_duplicate_key_and_bad_bytes(tmp_path):
    path = write(tmp_path, "[metrics]\nenabled = true\nenabled = false\n")
    [line] = check_config_file(path, env={})
    assert line.startswith(f"{path}:3:") and "invalid TOML" in line
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[metrics]\nlisten = \"\xff\"\n")
    [line] = check_config_file(bad, env={})
    assert line.startswith(f"{bad}") and "invalid TOML" in line


def test_never_a_traceback_for_any_wrong_value(tmp_path):
    """Every key set to every kind of TOML value: valid or a ConfigError, nothing else."""
    base = {
        "database": {}, "storage": {}, "targets": {}, "rules": {}, "hooks": {}, "metrics": {},
        "logging": {},
        "streams": [{"name": "s", "bootstrap": "h:1", "topics": ["t"], "format": "auto"}],
        "facilities": {"f": {"kind": "gemini", "url": "https://g.org"}},
        "notify": {"channels": {"c": {"kind": "log"}}},
    }
    tables = {"database": Database, "storage": Storage, "targets": Targets, "rules": Rules,
              "hooks": Hooks, "metrics": Metrics, "logging": Logging}
    values = ['42', '"x"', 'true', '[]', '{}', '1.5', '["a", 1]', '1979-05-27T07:32:00Z', '"${X}"',
              '"${X:-}"', '-3', '{ a = { b = 1 } }']

    def render(table: str, body: dict) -> str:
        out = [f"[{table}]"]
        out += [f"{k} = {v}" for k, v in body.items()]
        return "\n".join(out) + "\n"

    cases = []
    for table, cls in tables.items():
        for f in dataclasses.fields(cls):
            for v in values:
                cases.append(render(table, {f.name: v}))
    for f in dataclasses.fields(Stream):
        for v in values:
            body = {"name": '"s"', "bootstrap": '"h:1"', "topics": '["t"]', "format": '"auto"',
                    f.name: v}
            cases.append("[[streams]]\n" + "\n".join(f"{k} = {w}" for k, w in body.items()) + "\n")
    for f in dataclasses.fields(Facility):
        for v in values:
            cases.append(render("facilities.f", {"kind": '"gemini"', "url": '"https://g.org"', f.name: v}))
    for f in dataclasses.fields(Channel):
        for v in values:
            cases.append(render("notify.channels.c", {"kind": '"log"', f.name: v}))
    assert base  # documents the shape
    path = tmp_path / "tomd.toml"
    for text in cases:
        path.write_text(text)
        try:
            load_config(path, env={})
        except ConfigError as e:
            for line in e.problems:
                assert "\n" not in line
                assert line.startswith(str(path) + ":"), line
        except Exception as e:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{type(e).__name__}: {e} for\n{text}")


# --------------------------------------------------------------------------
# Environment expansion


def test_env_expansion_with_and_without_default(tmp_path):
    path = write(tmp_path, """
        [database]
        url = "postgresql+psycopg://${DB_USER}@${DB_HOST:-localhost}:${DB_PORT:-5432}/tomd"

        [metrics]
        listen = "${METRICS_HOST:-0.0.0.0}:9464"
        """)
    config = load_config(path, env={"DB_USER": "tomd", "DB_PORT": "6543"})
    assert config.database.url == "postgresql+psycopg://tomd@localhost:6543/tomd"
    assert config.metrics.listen == "0.0.0.0:9464"
    # an empty variable takes the default too
    config = load_config(path, env={"DB_USER": "tomd", "DB_HOST": ""})
    assert config.database.url == "postgresql+psycopg://tomd@localhost:5432/tomd"


def test_env_missing_variable_names_key_and_variable(tmp_path):
    line = one_problem(tmp_path, """
        [storage]
        url = "s3://${BUCKET}/alerts"
        """)
    assert line == ("tomd.toml:2: storage.url: environment variable BUCKET is not set "
                    "(use ${BUCKET:-default} for a default)")


def test_env_values_in_lists_dicts_and_numbers(tmp_path):
    path = write(tmp_path, """
        [[streams]]
        name = "ztf"
        bootstrap = "${KAFKA:-localhost:9092}"
        topics = ["${TOPIC}", "fixed"]
        format = "ztf-avro"
        batch_size = "${BATCH}"
        include_test = "${TEST:-false}"
        localization_max_deg = "${LOC:-0.25}"
        kafka = { "client.rack" = "${CLIENT}" }
        """)
    config = load_config(path, env={"TOPIC": "ztf_x", "BATCH": "250", "CLIENT": "me"})
    stream = config.streams[0]
    assert stream.bootstrap == "localhost:9092"
    assert stream.topics == ["ztf_x", "fixed"]
    assert stream.batch_size == 250
    assert stream.include_test is False
    assert stream.localization_max_deg == 0.25
    assert stream.kafka == {"client.rack": "me"}
    lines = check_config_file(path, env={"TOPIC": "t", "BATCH": "many", "CLIENT": "me"})
    assert lines == [f'{path}:6: streams[0].batch_size: expected an integer, got "many"']


def test_env_bad_reference_syntax(tmp_path):
    line = one_problem(tmp_path, """
        [metrics]
        listen = "${1BAD}:9464"
        """)
    assert line == 'tomd.toml:2: metrics.listen: expected ${NAME} or ${NAME:-default}, got "${1BAD}"'
    line = one_problem(tmp_path, """
        [metrics]
        listen = "${HOST:9464"
        """)
    assert "unclosed ${" in line and line.startswith("tomd.toml:2: metrics.listen:")


def test_env_in_templates_is_expanded(tmp_path):
    path = write(tmp_path, """
        [facilities.sim]
        kind = "sim"
        [facilities.sim.templates.t]
        proposal = "${PROP}"
        nested = { list = ["${PROP}"] }
        """)
    config = load_config(path, env={"PROP": "P1"})
    assert config.facilities["sim"].templates == {"t": {"proposal": "P1", "nested": {"list": ["P1"]}}}
    assert check_config_file(path, env={}) == [
        f"{path}:4: facilities.sim.templates.t.proposal: environment variable PROP is not set "
        "(use ${PROP:-default} for a default)",
        f"{path}:5: facilities.sim.templates.t.nested.list[0]: environment variable PROP is not set "
        "(use ${PROP:-default} for a default)",
    ]


def test_uses_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMD_TEST_LEVEL", "WARNING")
    path = write(tmp_path, '[logging]\nlevel = "${TOMD_TEST_LEVEL}"\n')
    assert load_config(path).logging.level == "WARNING"


# --------------------------------------------------------------------------
# Secrets


def test_secret_from_file_is_read_and_stripped(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "lco").write_text("  lco-from-file\n")
    abs_file = tmp_path / "smtp"
    abs_file.write_text("smtp-from-file\n")
    path = write(tmp_path, f"""
        [facilities.lco]
        kind = "lco"
        url = "https://observe.lco.global"
        token_file = "secrets/lco"

        [notify.channels.mail]
        kind = "email"
        to = ["a@b.org"]
        smtp_host = "smtp.b.org"
        password_file = "{abs_file}"
        """)
    config = load_config(path, env={})
    assert config.facilities["lco"].token.reveal() == "lco-from-file"
    assert config.notify.channels["mail"].password.reveal() == "smtp-from-file"


def test_secret_file_problems(tmp_path):
    (tmp_path / "empty").write_text("\n")
    lines = problems(tmp_path, """
        [facilities.a]
        kind = "lco"
        url = "https://observe.lco.global"
        token_file = "missing"

        [facilities.b]
        kind = "lco"
        url = "https://observe.lco.global"
        token_file = "empty"

        [facilities.c]
        kind = "lco"
        url = "https://observe.lco.global"
        token = "abc"
        token_file = "empty"

        [facilities.d]
        kind = "gemini"
        url = "https://gemini.example.org"
        token_file = 3
        """)
    assert lines == [
        'tomd.toml:4: facilities.a.token_file: cannot read secret file "missing": '
        'No such file or directory',
        'tomd.toml:9: facilities.b.token_file: secret file "empty" is empty',
        'tomd.toml:15: facilities.c.token_file: token and token_file are both set; keep one',
        'tomd.toml:20: facilities.d.token_file: expected a file path, got 3',
    ]


def test_unknown_file_key_for_a_non_secret(tmp_path):
    line = one_problem(tmp_path, """
        [facilities.sim]
        kind = "sim"
        proposal_file = "p"
        """)
    assert line.startswith("tomd.toml:3: facilities.sim.proposal_file: unknown key; did you mean")


def test_kafka_secrets(tmp_path):
    (tmp_path / "kpw").write_text("kafka-pw\n")
    path = write(tmp_path, """
        [[streams]]
        name = "gcn"
        bootstrap = "kafka.gcn.nasa.gov:9092"
        topics = ["gcn.notices.icecube.lvk_nu_track_search"]
        format = "gcn-json"

        [streams.kafka]
        "sasl.username" = "me"
        "sasl.password_file" = "kpw"
        "sasl.oauthbearer.client.secret" = "${CS}"
        "ssl.key.password" = "${KEYPW:-}"
        "fetch.wait.max.ms" = 100
        "enable.partition.eof" = false
        """)
    stream = load_config(path, env={"CS": "client-secret"}).streams[0]
    assert stream.kafka["sasl.password"] == Secret("kafka-pw")
    assert isinstance(stream.kafka["sasl.oauthbearer.client.secret"], Secret)
    assert "ssl.key.password" not in stream.kafka  # empty: not set
    assert stream.kafka_config() == {
        "sasl.username": "me", "sasl.password": "kafka-pw",
        "sasl.oauthbearer.client.secret": "client-secret",
        "fetch.wait.max.ms": 100, "enable.partition.eof": False,
    }
    assert "kafka-pw" not in repr(stream) and "client-secret" not in repr(stream)


def test_secrets_never_appear_in_repr(tmp_path):
    (tmp_path / "tok").write_text("file-token-zzz")
    path = write(tmp_path, """
        [database]
        url = "postgresql://tomd:url-pw-xyz@db.example.org:5432/tomd"

        [facilities.lco]
        kind = "lco"
        url = "https://observe.lco.global"
        token = "${LCO}"

        [facilities.soar]
        kind = "soar"
        url = "https://observe.lco.global"
        token_file = "tok"

        [notify.channels.hook]
        kind = "webhook"
        url = "https://hooks.slack.com/services/T1/B2/slack-url-token"
        secret = "hmac-secret-abc"
        """)
    config = load_config(path, env={"LCO": "env-token-qqq"})
    text = repr(config) + str(config)
    for secret in ("url-pw-xyz", "env-token-qqq", "file-token-zzz", "hmac-secret-abc",
                   "slack-url-token"):
        assert secret not in text
    assert "***" in repr(config.database)
    assert config.database.url == "postgresql+psycopg://tomd:url-pw-xyz@db.example.org:5432/tomd"
    assert config.database.safe_url == "postgresql+psycopg://tomd:***@db.example.org:5432/tomd"
    assert config.database.password.reveal() == "url-pw-xyz"
    assert config.facilities["lco"].token.reveal() == "env-token-qqq"
    assert f"{config.facilities['lco'].token}" == "***"


def test_secrets_never_appear_in_error_messages(tmp_path):
    lines = problems(tmp_path, """
        [database]
        url = "mysql://tomd:db-pw-111@db/tomd"

        [facilities.lco]
        kind = "lco"
        url = "not a url"
        token = "tok-222"
        tokenn = "tok-333"

        [facilities.gem]
        kind = "gemini"
        url = "https://gemini.example.org"
        token = ["tok-444"]

        [[streams]]
        name = "x"
        bootstrap = "h:1"
        topics = ["t"]
        format = "auto"
        kafka = { "sasl.password" = 555, "ssl.key.password" = "pw-666", "group.id" = "g" }
        """, env={})
    text = "\n".join(lines)
    assert len(lines) == 6, lines
    for secret in ("db-pw-111", "tok-222", "tok-333", "tok-444", "555", "pw-666"):
        assert secret not in text
    assert 'got "mysql://tomd:***@db/tomd"' in text
    assert "facilities.gem.token: expected a string, got a list" in text


def test_database_password_is_merged_into_the_url(tmp_path):
    (tmp_path / "dbpw").write_text("p@ss:/word\n")
    path = write(tmp_path, """
        [database]
        url = "postgresql://tomd@db.example.org/tomd"
        password_file = "dbpw"
        pool_size = 10
        echo = true
        """)
    db = load_config(path, env={}).database
    assert db.url == "postgresql+psycopg://tomd:p%40ss%3A%2Fword@db.example.org/tomd"
    assert db.password.reveal() == "p@ss:/word"
    assert (db.pool_size, db.echo) == (10, True)
    assert "p%40ss" not in repr(db) and "p@ss" not in repr(db)


def test_database_password_with_at_sign_is_redacted_in_errors(tmp_path):
    line = one_problem(tmp_path, """
        [database]
        url = "mysql://tomd:p@ss/w@rd@db/tomd"
        """)
    assert "p@ss" not in line and "rd@" not in line and "w@" not in line
    assert line.endswith('got "mysql://tomd:***@db/tomd"')


def test_database_password_in_both_places_is_an_error(tmp_path):
    line = one_problem(tmp_path, """
        [database]
        url = "postgresql+psycopg://tomd:a@db/tomd"
        password = "b"
        """)
    assert line == "tomd.toml:3: database.password: the password is given both in url and here; keep one"


def test_secret_type():
    s = Secret("hunter2")
    assert s.reveal() == "hunter2"
    assert str(s) == "***" and "hunter2" not in repr(s) and f"{s}" == "***" and "%s" % s == "***"
    assert s == Secret("hunter2") and s != Secret("x") and s != "hunter2"
    assert hash(s) == hash(Secret("hunter2"))
    assert not Secret("")
    with pytest.raises(TypeError):
        Secret(3)


def test_empty_secret_counts_as_not_set(tmp_path):
    path = write(tmp_path, """
        [facilities.g]
        kind = "gemini"
        url = "https://gemini.example.org"
        token = "${GEMINI_TOKEN:-}"
        """)
    assert load_config(path, env={}).facilities["g"].token is None
    assert load_config(path, env={"GEMINI_TOKEN": "k"}).facilities["g"].token == Secret("k")


# --------------------------------------------------------------------------
# Values and normalisation


def test_postgresql_url_is_normalised(tmp_path):
    path = write(tmp_path, '[database]\nurl = "postgresql://tomd@127.0.0.1:5432/test"\n')
    assert load_config(path, env={}).database.url == "postgresql+psycopg://tomd@127.0.0.1:5432/test"


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("2d", 172800.0), ("0.5s", 0.5),
    ("250ms", 0.25), ("1h30m", 5400.0), (45, 45.0), (1.5, 1.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5", "5 m", "m", "-1s", "0s", 0, True, "1y"])
def test_parse_duration_rejects(bad):
    with pytest.raises(Exception) as info:
        parse_duration(bad)
    assert "expected a duration" in str(info.value)


def test_full_stream_and_facility_values(tmp_path):
    path = write(tmp_path, """
        [[streams]]
        name = "rubin"
        bootstrap = "a.example.org:9092, b.example.org:9092"
        topics = ["alerts-simulated", "^lsst-.*"]
        format = "rubin-avro"
        start = 2025-06-01T00:00:00Z
        schema_registry = "https://usdf-alert-schemas-dev.slac.stanford.edu"
        include_test = true

        [[streams]]
        name = "archive"
        kind = "file"
        topics = ["data/*.avro"]
        format = "rubin-avro-file"
        start = "2025-06-01T12:00:00+00:00"

        [facilities.gemini-south]
        kind = "gemini"
        url = "https://gemini.example.org"
        timeout = "1m"
        rate_limit = 1
        poll_interval = "2h"

        [storage]
        url = "s3://tomd-data/products/raw"
        s3_endpoint_url = "http://127.0.0.1:9000"
        s3_region = "us-east-1"

        [targets]
        match_radius_arcsec = 2
        """)
    config = load_config(path, env={})
    rubin, archive = config.streams
    assert rubin.bootstrap == "a.example.org:9092,b.example.org:9092"
    assert rubin.start == "2025-06-01T00:00:00+00:00"
    assert rubin.include_test is True and rubin.kind == "kafka"
    assert archive.kind == "file" and archive.bootstrap is None
    assert archive.start == "2025-06-01T12:00:00+00:00"
    gem = config.facilities["gemini-south"]
    assert (gem.timeout, gem.rate_limit, gem.poll_interval) == (60.0, 1.0, 7200.0)
    assert isinstance(gem.rate_limit, float)
    assert list(config.facilities) == ["gemini-south"]  # no implicit "sim" beside real ones
    assert config.storage.s3_bucket == "tomd-data"
    assert config.storage.s3_prefix == "products/raw"
    assert config.storage.local_dir is None
    assert Storage().local_dir == Path("tomd-data")
    assert config.targets.match_radius_arcsec == 2.0


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.database = Database()  # type: ignore[misc]


# --------------------------------------------------------------------------
# check_config_file


def test_check_config_file_good_and_bad(tmp_path):
    good = write(tmp_path, '[metrics]\nlisten = "0.0.0.0:9100"\n', "good.toml")
    assert check_config_file(good, env={}) == []
    assert check_config_file(str(good), env={}) == []
    bad = write(tmp_path, '[metrics]\nlisten = "0.0.0.0"\nport = 1\n', "bad.toml")
    assert check_config_file(bad, env={}) == [
        f'{bad}:2: metrics.listen: expected host:port, like "127.0.0.1:9464" (port 0: any free port), got "0.0.0.0"',
        f"{bad}:3: metrics.port: unknown key; expected one of enabled, listen",
    ]


# --------------------------------------------------------------------------
# Kafka SASL credentials: a stream that cannot authenticate is refused at
# load (config check and daemon start), not left to librdkafka's retries.

GCN_STREAM = """
    [[streams]]
    name = "gcn"
    bootstrap = "kafka.gcn.nasa.gov:9092"
    topics = ["gcn.notices.swift.bat.guano"]
    format = "gcn-json"

    [streams.kafka]
    "security.protocol" = "sasl_ssl"
    "sasl.mechanisms" = "OAUTHBEARER"
    "sasl.oauthbearer.method" = "oidc"
    """
GCN_CREDENTIALS = {
    "id": '"sasl.oauthbearer.client.id" = "${GCN_CLIENT_ID}"',
    "secret": '"sasl.oauthbearer.client.secret" = "${GCN_CLIENT_SECRET:-}"',
    "endpoint": '"sasl.oauthbearer.token.endpoint.url" = "https://auth.gcn.nasa.gov/oauth2/token"',
}
GCN_ENV = {"GCN_CLIENT_ID": "gcn-id-123", "GCN_CLIENT_SECRET": "gcn-secret-sss"}


def gcn_config(tmp_path: Path, *, drop: str | None = None, **replace: str) -> Path:
    lines = [v for k, v in {**GCN_CREDENTIALS, **replace}.items() if k != drop]
    return write(tmp_path, textwrap.dedent(GCN_STREAM) + "\n".join(lines) + "\n")


def test_gcn_oidc_stream_with_every_credential_loads(tmp_path):
    stream = load_config(gcn_config(tmp_path), env=GCN_ENV).streams[0]
    assert stream.kafka_config() == {
        "security.protocol": "sasl_ssl", "sasl.mechanisms": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.client.id": "gcn-id-123", "sasl.oauthbearer.client.secret": "gcn-secret-sss",
        "sasl.oauthbearer.token.endpoint.url": "https://auth.gcn.nasa.gov/oauth2/token"}


def test_gcn_oidc_with_an_empty_client_secret_is_refused(tmp_path):
    """${GCN_CLIENT_SECRET:-} unset: the secret expands to "" and librdkafka could never get a token."""
    path = gcn_config(tmp_path)
    lines = check_config_file(path, env={"GCN_CLIENT_ID": "gcn-id-123"})
    assert lines == [f'{path}:12: streams[0].kafka."sasl.oauthbearer.client.secret": empty '
                     '("${GCN_CLIENT_SECRET:-}" expands to ""); "sasl.oauthbearer.method" = "oidc" '
                     'needs the OIDC client secret to get a token']


@pytest.mark.parametrize("drop, key, what", [
    ("id", "sasl.oauthbearer.client.id", "the OIDC client id"),
    ("secret", "sasl.oauthbearer.client.secret", "the OIDC client secret"),
    ("endpoint", "sasl.oauthbearer.token.endpoint.url", "the token endpoint URL (GCN: "
                                                        "https://auth.gcn.nasa.gov/oauth2/token)"),
])
def test_gcn_oidc_without_a_credential_is_refused_and_names_it(tmp_path, drop, key, what):
    line = one_problem(tmp_path, textwrap.dedent(GCN_STREAM) + "\n".join(
        v for k, v in GCN_CREDENTIALS.items() if k != drop) + "\n", env=GCN_ENV)
    assert line == (f'tomd.toml:7: streams[0].kafka."{key}": missing; "sasl.oauthbearer.method" = "oidc" '
                    f"needs {what} to get a token")
    assert "gcn-secret-sss" not in line


@pytest.mark.parametrize("key, value, message", [
    ("id", '"sasl.oauthbearer.client.id" = "  "', 'blank; "sasl.oauthbearer.method" = "oidc" needs the OIDC '
                                                  "client id to get a token"),
    ("secret", '"sasl.oauthbearer.client.secret" = " \\t "', 'blank; "sasl.oauthbearer.method" = "oidc" '
                                                            "needs the OIDC client secret to get a token"),
    ("endpoint", '"sasl.oauthbearer.token.endpoint.url" = "auth.gcn.nasa.gov/oauth2/token"',
     'expected an http(s) URL, got "auth.gcn.nasa.gov/oauth2/token"'),
    ("id", '"sasl.oauthbearer.client.id" = 42', "expected a string, got an integer"),
])
def test_gcn_oidc_credentials_that_cannot_work_are_refused(tmp_path, key, value, message):
    line = one_problem(tmp_path, textwrap.dedent(GCN_STREAM) + "\n".join(
        value if k == key else v for k, v in GCN_CREDENTIALS.items()) + "\n", env=GCN_ENV)
    assert line.split(": ", 2)[2] == message, line
    assert "gcn-secret-sss" not in line


def test_oidc_other_grants_need_no_client_secret(tmp_path):
    """librdkafka's jwt-bearer grant signs an assertion, and Azure IMDS asks the VM: no client secret."""
    for extra in ('"sasl.oauthbearer.grant.type" = "urn:ietf:params:oauth:grant-type:jwt-bearer"\n'
                  '"sasl.oauthbearer.assertion.private.key.file" = "key.pem"',
                  '"sasl.oauthbearer.metadata.authentication.type" = "azure_imds"'):
        path = gcn_config(tmp_path, drop="secret", id=extra)
        assert check_config_file(path, env=GCN_ENV) == []


def test_oidc_is_checked_whatever_the_case_of_its_values(tmp_path):
    """librdkafka reads "OIDC" as oidc and "SASL_SSL" as sasl_ssl."""
    text = textwrap.dedent(GCN_STREAM).replace('"oidc"', '"OIDC"') + GCN_CREDENTIALS["id"] + "\n"
    lines = problems(tmp_path, text, env=GCN_ENV)
    assert [line.split(": ")[1] for line in lines] == [
        'streams[0].kafka."sasl.oauthbearer.client.secret"', 'streams[0].kafka."sasl.oauthbearer.token.endpoint.url"']


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plain_and_scram_need_a_username_and_a_password(tmp_path, mechanism):
    head = textwrap.dedent(f"""
        [[streams]]
        name = "ztf"
        bootstrap = "localhost:9092"
        topics = ["t"]
        format = "ztf-avro"
        [streams.kafka]
        "security.protocol" = "SASL_SSL"
        "sasl.mechanism" = "{mechanism}"
        """)
    lines = problems(tmp_path, head + '"sasl.username" = ""\n"sasl.password" = "${ZTF_KAFKA_PASSWORD:-}"\n')
    assert lines == [
        f'tomd.toml:9: streams[0].kafka."sasl.username": empty; "sasl.mechanism" = "{mechanism}" needs the '
        "SASL user name",
        f'tomd.toml:10: streams[0].kafka."sasl.password": empty ("${{ZTF_KAFKA_PASSWORD:-}}" expands to ""); '
        f'"sasl.mechanism" = "{mechanism}" needs the SASL password']
    line = one_problem(tmp_path, head + '"sasl.username" = "me"\n')
    assert line == (f'tomd.toml:6: streams[0].kafka."sasl.password": missing; "sasl.mechanism" = "{mechanism}" '
                    "needs the SASL password")
    (tmp_path / "pw").write_text("pw-777\n")
    path = write(tmp_path, head + '"sasl.username" = "me"\n"sasl.password_file" = "pw"\n')
    assert load_config(path, env={}).streams[0].kafka_config()["sasl.password"] == "pw-777"


def test_sasl_credentials_are_not_asked_for_without_sasl(tmp_path):
    """librdkafka ignores sasl.* unless security.protocol is SASL_*; a file stream reads no Kafka at all."""
    path = write(tmp_path, """
        [[streams]]
        name = "ztf"
        bootstrap = "localhost:9092"
        topics = ["t"]
        format = "ztf-avro"
        kafka = { "security.protocol" = "SSL", "sasl.mechanisms" = "PLAIN" }

        [[streams]]
        name = "archive"
        kind = "file"
        topics = ["*.avro"]
        format = "ztf-avro"
        kafka = { "security.protocol" = "SASL_SSL", "sasl.mechanisms" = "SCRAM-SHA-512" }
        """)
    assert check_config_file(path, env={}) == []
