"""Real ``tomd run`` processes for ``bench/ingest.py --daemons N``: their config, start, watch and stop.

The scale-out README describes (several daemons in one consumer group, one
PostgreSQL), launched as tests/test_scaleout.py launches them: ``python -m
tomd.cli --config FILE run`` from the repository, stdout and stderr read line
by line in a thread (the metrics address is logged there; the lines are what
a daemon that failed says). Each daemon listens for /metrics on a port the
system picks (``127.0.0.1:0``), so N of them never clash; the bench reads
their counters there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StreamSettings:
    """What the daemons' ``[[streams]]`` entry says: the same as the in-process run's ``Stream``."""

    bootstrap: str
    topic: str
    group: str  # one group for all N: Kafka splits the partitions among them
    batch_size: int
    store_cutouts: bool
    parse_workers: int
    kafka: Mapping[str, object]


def write_config(path: Path, *, db_url: str, stream: StreamSettings, rules_dir: Path, hooks_dir: Path,
                 data_dir: Path) -> Path:
    """The daemons' tomd.toml (one file for all: nothing in it is per daemon). Rules, hooks and
    stored data are the run's own directories: relative defaults would load the repository's
    ``rules/`` and ``hooks/`` examples (the daemons' working directory is the repository)."""
    q = json.dumps  # a JSON string is a TOML basic string
    kafka = "\n".join(f"{q(k)} = {q(v)}" for k, v in stream.kafka.items())
    path.write_text(f"""
[database]
url = {q(db_url)}

[metrics]
listen = "127.0.0.1:0"

[storage]
url = {q(f"file://{data_dir}")}

[rules]
paths = [{q(str(rules_dir))}]

[hooks]
paths = [{q(str(hooks_dir))}]

[[streams]]
name = "bench"
bootstrap = {q(stream.bootstrap)}
topics = [{q(stream.topic)}]
format = "ztf-avro"
group = {q(stream.group)}
batch_size = {stream.batch_size}
store_cutouts = {"true" if stream.store_cutouts else "false"}
parse_workers = {stream.parse_workers}

[streams.kafka]
{kafka}
""")
    return path


@dataclass
class DaemonProcess:
    """One ``tomd run``; its output is collected by a thread (and its metrics address found there).

    ``hold``: stop the process (SIGSTOP) as soon as it says where it serves /metrics, until
    ``release()``. ``tomd run`` starts that server before its streams (and before their
    imports and parse workers, a second or two on a busy machine): held there, N daemons
    started together go on from the same point and join their consumer group together,
    whatever each one's start-up took (imports, config, database) before.
    """

    name: str
    proc: subprocess.Popen
    hold: bool = False
    lines: list[str] = field(default_factory=list)
    url: str | None = None

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving /metrics, /healthz and /readyz on (http://\S+)", line)
            if m:
                if self.hold:
                    self._signal(signal.SIGSTOP)  # before url is set: a known url means held
                self.url = m.group(1)

    def _signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def release(self) -> None:
        """Let a held daemon go on (harmless if it was not held)."""
        self._signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, last: int = 40) -> str:
        return "".join(self.lines[-last:])

    def metrics(self) -> dict[str, float]:
        """{sample name: value summed over its labels} from /metrics."""
        assert self.url is not None
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            body = resp.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out


class Counters:
    """The daemons' ingest counters as last read from their /metrics, and when (seconds after
    ``start``) each daemon was first seen with a message consumed and last seen with more handled:
    to the resolution of the looks (``look()``)."""

    CONSUMED = "tomd_consumer_messages_total"  # records received from Kafka
    HANDLED = "tomd_messages_handled_total"  # records in batches ingest finished (committed)

    def __init__(self, daemons: list[DaemonProcess]):
        self.daemons = daemons
        self.start = time.perf_counter()
        self.consumed = [0.0] * len(daemons)
        self.handled = [0.0] * len(daemons)
        self.first_message_s: list[float | None] = [None] * len(daemons)
        self.last_batch_s: list[float | None] = [None] * len(daemons)

    def look(self) -> None:
        """Read every daemon's counters (one that does not answer keeps its last values: an exit
        is seen by ``wait_until``)."""
        for i, d in enumerate(self.daemons):
            try:
                m = d.metrics()
            except OSError:
                continue
            now = time.perf_counter() - self.start
            if m.get(self.CONSUMED, 0.0) and self.first_message_s[i] is None:
                self.first_message_s[i] = now
            if m.get(self.HANDLED, 0.0) > self.handled[i]:
                self.last_batch_s[i] = now
            self.consumed[i], self.handled[i] = m.get(self.CONSUMED, 0.0), m.get(self.HANDLED, 0.0)

    def restart_clock(self) -> None:
        """Times from now (the first message's arrival) on; those seen already (in the look that
        started the clock) are 0."""
        now = time.perf_counter()
        shift = now - self.start
        self.start = now
        self.first_message_s = [None if t is None else max(0.0, t - shift) for t in self.first_message_s]
        self.last_batch_s = [None if t is None else max(0.0, t - shift) for t in self.last_batch_s]


def start_daemons(n: int, config: Path, *, hold: bool = False) -> list[DaemonProcess]:
    """``n`` ``tomd run`` processes on one config, started back to back (children of this process);
    ``hold``: each one stopped once it serves /metrics (``DaemonProcess``)."""
    cmd = [sys.executable, "-m", "tomd.cli", "--config", str(config), "run"]
    return [DaemonProcess(f"daemon-{i}", subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          text=True), hold=hold)
            for i in range(n)]


class DaemonFailed(RuntimeError):
    """A daemon exited, or a wait on the daemons timed out: the message holds their output."""


def wait_until(what: str, cond: Callable[[], bool], daemons: list[DaemonProcess], timeout: float,
               interval: Callable[[], float] | float = 0.02) -> None:
    """Until ``cond()``; a daemon that exits, or the deadline, raises ``DaemonFailed`` with the
    daemons' output (instead of the bench waiting forever). ``interval``: seconds between looks,
    or a function giving them."""
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [d for d in daemons if not d.alive()]
        if dead:
            raise DaemonFailed(f"while waiting for {what}, " + "; ".join(
                f"{d.name} exited with status {d.proc.returncode}:\n{d.output()}" for d in dead))
        if time.monotonic() > deadline:
            raise DaemonFailed(f"timed out after {timeout:.0f} s waiting for {what}:\n" + "\n".join(
                f"--- {d.name}\n{d.output()}" for d in daemons))
        time.sleep(interval() if callable(interval) else interval)


def stop_daemons(daemons: list[DaemonProcess], grace: float = 30.0) -> None:
    """SIGTERM to all (and SIGCONT: a held one must run to act on it), then SIGKILL to those
    still running after ``grace`` seconds."""
    for d in daemons:
        if d.alive():
            d.proc.send_signal(signal.SIGTERM)
            d.release()
    deadline = time.monotonic() + grace
    for d in daemons:
        try:
            d.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(10)


def cpu_seconds(daemon_pids: set[int], db_name: str | None, broker_pid: int | None, *,
                children_as: str = "tomd") -> dict[str, float]:
    """CPU seconds (user + system, all threads) so far of the daemons ("tomd") and their descendants
    (parse workers, hook workers: counted as ``children_as``), the PostgreSQL backends serving
    ``db_name``, and the broker. bench/ingest.py's in-process run passes its own pid, its parse
    workers apart. Linux /proc; empty elsewhere."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    stats: dict[int, list[str]] = {}
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        stats[p] = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces

    def of_daemon(p: int) -> bool:
        seen = 0
        while p > 1 and p in stats and seen < 64:
            if p in daemon_pids:
                return True
            p, seen = int(stats[p][1]), seen + 1
        return False

    out = dict.fromkeys(("tomd", children_as, "postgresql", "broker"), 0.0)
    for p, f in stats.items():
        if p == broker_pid:  # before the daemons' descendants: the in-process run started the broker
            who = "broker"
        elif p in daemon_pids:
            who = "tomd"
        elif of_daemon(p):
            who = children_as
        else:
            try:
                cmdline = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if not db_name or db_name not in cmdline:
                continue
            who = "postgresql"  # "postgres: 15/main: postgres <db> 127.0.0.1(port) ..."
        out[who] += (int(f[11]) + int(f[12])) / tick
    return out
