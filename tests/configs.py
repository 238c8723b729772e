"""The tomd.toml a test writes for a daemon: everything it listens on or reads and writes kept to the test's own.

A daemon started by a test must not bind the default metrics port (two tests at
once, or a tomd running on the machine, would collide: ``127.0.0.1:0`` takes a
free port), store data under the working directory, or load the repository's
own ``rules/`` and ``hooks/`` examples (relative paths resolve against the
working directory, which for a ``tomd run`` subprocess is the repository).
"""

from __future__ import annotations

from pathlib import Path


def write_daemon_config(tmp_path: Path, db_url: str, *, hooks: str = "", extra: str = "") -> Path:
    """``tmp_path/tomd.toml`` (its path returned): database, metrics, storage, rules (``tmp_path/rules``)
    and hooks (``tmp_path/hooks``), then ``extra`` (streams, facilities...). ``hooks`` are more lines
    of the ``[hooks]`` table."""
    path = tmp_path / "tomd.toml"
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
{hooks}
{extra}""")
    return path


def sim_rule(name: str) -> str:
    """A rule file's text: fires on every ZTF alert (every packet's magpsf is under 30 mag; alert.mag
    would not do: a negative subtraction has none) and observes it with the simulated observatory's
    1m-gri template, for 24 h."""
    return f"""
name = "{name}"
sources = ["ztf"]
when = "alert.fields.magpsf < 30"

[observe]
facility = "sim"
template = "1m-gri"
window = "24h"
"""
