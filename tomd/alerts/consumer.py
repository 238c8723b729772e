"""The Kafka edge of alert ingestion: consume a batch, hand it over, commit.

At-least-once with batch semantics (Invariant 1)::

    consume(batch_size, timeout) ──► handler.handle(batch) ──► commit offsets
                                          │ RetryableError
                                          ▼
                    pause the partitions, back off (polling, so the group
                    keeps this member), offer the same batch again, resume

An offset is committed only after the handler returned, and the handler
returns only after its database transaction committed. A crash between the
two re-delivers the batch; the handler's per-alert unique keys make the
replay change nothing. This module knows nothing about databases or alert
formats: it moves ``RawMessage`` batches and offsets.

Errors are logged with Kafka coordinates ``topic[partition]@offset``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import (
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from tomd.errors import ConfigError, RetryableError

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (topic, partition)

# librdkafka settings the loop owns: changing them would break Invariant 1.
_OWNED_KEYS = ("bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store")


@dataclass(frozen=True)
class RawMessage:
    """One Kafka record, detached from the client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def coords(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    @classmethod
    def from_kafka(cls, msg: Message) -> RawMessage:
        kind, ts = msg.timestamp()
        return cls(
            topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
            key=msg.key(), value=msg.value(),
            timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else ts,
            headers=tuple(msg.headers() or ()),
        )


class BatchHandler(Protocol):
    def handle(self, messages: list[RawMessage]) -> None:
        """Apply ``messages`` and durably commit everything they caused.

        Must be idempotent per message (a batch can be delivered again after
        a crash or a rebalance). Raises ``RetryableError`` when the failure is
        transient (database down): the same batch is offered again later.
        """


@dataclass(frozen=True)
class ConsumerSettings:
    bootstrap: str
    topics: Sequence[str]  # names, or "^regex" patterns
    group: str
    start: str = "earliest"  # "earliest" | "latest" | ISO-8601 timestamp (partitions without a committed offset)
    batch_size: int = 500
    batch_timeout_s: float = 0.5
    kafka: Mapping[str, object] = field(default_factory=dict)  # straight to librdkafka (SASL, OIDC, TLS, ...)
    client_id: str = "tomd"
    retry_initial_s: float = 0.5  # back-off after a RetryableError, doubling ...
    retry_max_s: float = 30.0  # ... up to this


@dataclass
class ConsumerStats:
    """Counters for metrics. Mappings are replaced, never mutated, so another
    thread may read them at any time."""

    consumed: int = 0  # records received (a retried batch counts again)
    handled: int = 0  # records in batches the handler finished
    skipped: int = 0  # records older than a timestamp start position
    batches: int = 0  # handler calls that returned
    retries: int = 0  # handler calls that raised RetryableError
    commits: int = 0
    commit_failures: int = 0
    errors: int = 0  # non-fatal errors reported by the client
    rebalances: int = 0
    backing_off: bool = False
    busy: bool = False  # a batch is being handled, or waits for a retry
    consume_seconds: float = 0.0  # in consume() calls that returned records, and building RawMessages
    assigned: frozenset[Partition] = frozenset()
    committed: Mapping[Partition, int] = field(default_factory=dict)  # next offset, as committed by us
    lag: Mapping[Partition, int] = field(default_factory=dict)  # high watermark - position


def parse_start(start: str) -> int | None:
    """Milliseconds since the epoch for a timestamp start, None for earliest/latest."""
    if start in ("earliest", "latest"):
        return None
    try:
        when = _dt.datetime.fromisoformat(start)
    except ValueError:
        raise ConfigError([f'start: expected "earliest", "latest" or an ISO-8601 timestamp, got {start!r}']) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return int(when.timestamp() * 1000)


def _key(tp: TopicPartition | RawMessage) -> Partition:
    return (tp.topic, tp.partition)


def describe(messages: Sequence[RawMessage]) -> str:
    """``topic[p]@first-last`` per partition, for log lines about a batch."""
    spans: dict[Partition, tuple[int, int]] = {}
    for m in messages:
        lo, hi = spans.get(_key(m), (m.offset, m.offset))
        spans[_key(m)] = (min(lo, m.offset), max(hi, m.offset))
    return ", ".join(f"{t}[{p}]@{lo}" + (f"-{hi}" if hi != lo else "") for (t, p), (lo, hi) in sorted(spans.items()))


class StreamConsumer:
    """Feeds one consumer group's share of some topics to a ``BatchHandler``.

    ``run(stop)`` blocks until ``stop`` is set (or a fatal error), then
    commits what was handled and leaves the group. Not thread-safe: one
    thread runs it; others may read ``stats``.
    """

    def __init__(self, settings: ConsumerSettings, handler: BatchHandler):
        owned = [k for k in _OWNED_KEYS if k in settings.kafka]
        if owned:
            raise ConfigError([f"kafka.{k}: set by tomd, remove it (offsets are committed after the database)"
                               for k in owned])
        if not settings.topics:
            raise ConfigError(["topics: expected at least one topic"])
        self.settings = settings
        self.handler = handler
        self.stats = ConsumerStats()
        self._start_ms = parse_start(settings.start)
        self._consumer: Consumer | None = None
        self._uncommitted: dict[Partition, int] = {}  # handled but not yet committed: next offset
        self._not_before: dict[Partition, int] = {}  # timestamp start: skip records older than this
        self._pending: list[RawMessage] = []  # the batch being handled or waiting for a retry
        self._start_offsets: dict[Partition, int] = {}  # where reading began, per assigned partition (for lag)
        self._fatal: KafkaError | None = None

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        self._consumer = Consumer(self._kafka_config())
        self._consumer.subscribe(list(self.settings.topics), on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)
        try:
            # ``stop`` is checked only between batches: a batch in flight is
            # always finished and committed before the loop exits.
            while not stop.is_set():
                batch = self._next_batch()
                if batch:
                    self._handle_until_done(batch, stop)
                # Also commits offsets of skipped records, or retries a failed commit.
                self._commit()
        finally:
            self._close()

    def _kafka_config(self) -> dict[str, object]:
        return {
            # Defaults a stream's kafka table may override. The prefetch queue
            # holds up to 64 MB by default: about 1,000 ZTF alerts with their
            # cutouts. Against the local broker, a consumer that decodes
            # between polls then waits for fetches about 0.5 ms per alert
            # (plain consume + decode: 1,400 alerts/s); with 256 MB it keeps up
            # (4,800/s; bench/ingest.py's ceiling uses the same). An upper
            # bound, filled only while behind.
            "queued.max.messages.kbytes": 256 * 1024,
            **self.settings.kafka,
            "bootstrap.servers": self.settings.bootstrap,
            "group.id": self.settings.group,
            "client.id": self.settings.client_id,
            # Offsets are committed by this loop, synchronously, with explicit
            # offsets, right after each handled batch — not by auto-commit
            # with store_offsets. Why: the committed offset then moves in step
            # with the database (a crash re-delivers at most the batch in
            # flight, not up to auto.commit.interval.ms of alerts); a failed
            # commit is seen and logged where it happens; and because
            # rebalance callbacks only run inside consume(), by the time one
            # runs everything handled is already committed. The cost, one
            # round trip per batch of up to batch_size alerts, is small.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A timestamp start positions fresh partitions in _on_assign;
            # "earliest" is its fallback (with the _not_before filter).
            "auto.offset.reset": "latest" if self.settings.start == "latest" else "earliest",
            "error_cb": self._on_error,
            "logger": logging.getLogger("tomd.alerts.kafka"),
        }

    def _next_batch(self) -> list[RawMessage]:
        assert self._consumer is not None
        t0 = time.perf_counter()
        messages = self._consumer.consume(num_messages=self.settings.batch_size,
                                          timeout=self.settings.batch_timeout_s)
        self._raise_if_fatal()
        batch = []
        for msg in messages:
            if msg.error() is not None:
                self._on_message_error(msg)
                continue
            raw = RawMessage.from_kafka(msg)
            self.stats.consumed += 1
            if self._before_start(raw):
                self.stats.skipped += 1
                # Nothing to do for it: done, so its offset may be committed.
                self._uncommitted[_key(raw)] = max(self._uncommitted.get(_key(raw), 0), raw.offset + 1)
                continue
            batch.append(raw)
        if messages:  # idle waits for new records are not work
            self.stats.consume_seconds += time.perf_counter() - t0
        self._update_lag()
        return batch

    def _handle_until_done(self, batch: list[RawMessage], stop: threading.Event) -> None:
        """Handle ``batch``; after a RetryableError offer the same batch again, until it
        succeeds or ``stop`` is set (then it stays uncommitted and is re-delivered later).

        Meanwhile the assigned partitions are paused and the loop keeps polling
        so that the group keeps this member. No seek is needed: on resume
        librdkafka fetches from after the last record it returned, i.e. after
        this batch, which by then has been handled.
        """
        self._pending = batch
        self.stats.busy = True
        attempt = 0
        try:
            while self._pending:  # on_revoke drops records of partitions taken away
                try:
                    self._handle(self._pending)
                    return
                except RetryableError as exc:
                    attempt += 1
                    self.stats.retries += 1
                    delay = self._backoff(attempt, exc.retry_after)
                    log.warning("handler failed on %s (attempt %d), retrying in %.2f s: %s",
                                describe(self._pending), attempt, delay, exc,
                                extra={"coords": self._pending[0].coords})
                    if attempt == 1:
                        self._pause(self._consumer.assignment())
                    if not self._wait(delay, stop):
                        log.info("stopping with %s not handled; it is delivered again on restart",
                                 describe(self._pending))
                        return
        finally:
            self._pending = []
            self.stats.busy = False
            if attempt:
                self._consumer.resume(self._consumer.assignment())
                self.stats.backing_off = False

    def _handle(self, batch: list[RawMessage]) -> None:
        try:
            self.handler.handle(batch)
        except RetryableError:
            raise
        except Exception:
            # A bug or a permanent failure: stop without committing this batch
            # (it is delivered again after the restart) and let it surface.
            log.exception("handler failed on %s; stopping without committing them", describe(batch),
                          extra={"coords": batch[0].coords})
            raise
        self.stats.batches += 1
        self.stats.handled += len(batch)
        for m in batch:
            self._uncommitted[_key(m)] = max(self._uncommitted.get(_key(m), 0), m.offset + 1)

    def _commit(self, only: set[Partition] | None = None) -> None:
        """Commit handled offsets synchronously; keep the ones that failed."""
        if self._consumer is None or self._fatal is not None:
            return  # a fenced or closed client cannot commit; the handler's keys absorb the re-delivery
        todo = {k: o for k, o in self._uncommitted.items() if only is None or k in only}
        if not todo:
            return
        try:
            result = self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=False)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal():
                raise
            # Not lost: retried after the next batch or at revoke/stop; if
            # this member has been fenced, the new owner re-delivers and the
            # handler's unique keys absorb it.
            self.stats.commit_failures += 1
            log.warning("offset commit failed for %s: %s", _offsets_text(todo), err.str())
            return
        committed = dict(self.stats.committed)
        for tp in result or ():
            if tp.error is not None:
                self.stats.commit_failures += 1
                log.warning("offset commit failed: %s", tp.error.str(),
                            extra={"coords": f"{tp.topic}[{tp.partition}]@{tp.offset}"})
                continue
            committed[_key(tp)] = tp.offset
            if self._uncommitted.get(_key(tp)) == tp.offset:
                del self._uncommitted[_key(tp)]
        self.stats.committed = committed
        self.stats.commits += 1

    # --------------------------------------------------------------- retries

    def _pause(self, partitions: list[TopicPartition]) -> None:
        self.stats.backing_off = True
        self._consumer.pause(partitions)

    def _wait(self, delay: float, stop: threading.Event) -> bool:
        """Poll, consuming nothing, for ``delay`` seconds (less if a rebalance took
        the whole pending batch away); False if stopped."""
        deadline = time.monotonic() + delay
        while self._pending and not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            # Polling keeps max.poll.interval.ms satisfied and serves rebalances.
            strays = []
            for msg in self._consumer.consume(num_messages=self.settings.batch_size, timeout=min(left, 0.2)):
                if msg.error() is not None:
                    self._on_message_error(msg)
                else:
                    strays.append(msg)
            self._raise_if_fatal()
            if strays:  # paused partitions return nothing; never drop a record if one does
                self._rewind([RawMessage.from_kafka(m) for m in strays])
        return not stop.is_set()

    def _rewind(self, messages: Sequence[RawMessage]) -> None:
        """Pause the partitions of ``messages`` and seek them back to their first offset."""
        first: dict[Partition, int] = {}
        for m in messages:
            first[_key(m)] = min(first.get(_key(m), m.offset), m.offset)
        tps = [TopicPartition(t, p, o) for (t, p), o in first.items()]
        self._pause(tps)
        for tp in tps:
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                # Carrying on would skip these records. Stopping is safe:
                # nothing of them was committed, so the restart re-delivers.
                raise RuntimeError(f"cannot rewind {tp.topic}[{tp.partition}]@{tp.offset}: {exc}") from exc

    def _backoff(self, attempt: int, hint: float | None) -> float:
        cap = self.settings.retry_max_s
        ceiling = min(cap, self.settings.retry_initial_s * 2 ** (attempt - 1))
        # Jitter, so daemons sharing one database do not all retry in step.
        delay = random.uniform(ceiling / 2, ceiling)
        if hint:
            delay = max(delay, min(hint, cap))
        return delay

    # ---------------------------------------------------------- rebalancing

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats.rebalances += 1
        if self._start_ms is not None:
            self._position_by_time(consumer, partitions)
        # Assign explicitly: offsets set above are only honoured that way.
        if self._cooperative():
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self._pending:  # backing off: nothing new until the pending batch is handled
            self._pause(partitions)
        else:
            # librdkafka keeps a partition's pause flag across an eager
            # rebalance: one paused during a back-off that was revoked and
            # comes back would otherwise stay paused for good.
            consumer.resume(partitions)
        self.stats.assigned = frozenset(_key(tp) for tp in consumer.assignment())
        self._lag_at_assignment(consumer, partitions)
        log.info("assigned %s", _partitions_text(partitions))

    def _lag_at_assignment(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lag of newly assigned partitions from the broker's watermarks.

        Lag is otherwise refreshed from fetches, so a partition nothing new
        arrives on would have no lag at all: /metrics would show only the
        partitions that happen to be busy. Here each gets high watermark −
        where reading starts (the committed offset, else where the start
        position puts it). Round trips, but only at a rebalance; a broker
        that does not answer leaves the partition to the fetch path.
        """
        starts: dict[Partition, int] = {_key(tp): tp.offset for tp in partitions if tp.offset >= 0}
        try:
            for tp in consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in partitions], timeout=5):
                if tp.error is None and tp.offset >= 0:
                    starts[_key(tp)] = tp.offset
        except KafkaException as exc:
            log.warning("cannot read committed offsets for the lag of %s: %s", _partitions_text(partitions), exc)
            return
        lag = dict(self.stats.lag)
        for tp in partitions:
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
            except KafkaException as exc:
                # The broker does not answer: the rest would each wait the full
                # timeout inside this callback; the fetch path fills them in.
                log.info("no watermarks for %s[%d] (%s); their lag comes with the first fetch",
                         tp.topic, tp.partition, exc)
                break
            if high is None or high < 0:
                continue
            start = starts.get(_key(tp))
            if start is None:  # nothing committed: the start position decides
                start = high if self.settings.start == "latest" else low
            self._start_offsets[_key(tp)] = start
            lag[_key(tp)] = max(0, high - start)
        self.stats.lag = lag

    def _position_by_time(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start partitions without a committed offset at the start timestamp."""
        assert self._start_ms is not None
        committed = consumer.committed(partitions, timeout=10)
        fresh = [TopicPartition(tp.topic, tp.partition, self._start_ms) for tp in committed if tp.offset < 0]
        if not fresh:
            return
        found: dict[Partition, int] = {}
        try:
            for tp in consumer.offsets_for_times(fresh, timeout=10):
                if tp.error is None:
                    # -1: no record at or after the timestamp yet: start at the end.
                    found[_key(tp)] = tp.offset if tp.offset >= 0 else OFFSET_END
        except KafkaException as exc:
            log.warning("offset lookup by time failed (%s); reading from the earliest offset instead", exc)
        for tp in partitions:
            if any(_key(tp) == _key(f) for f in fresh):
                if _key(tp) in found:
                    tp.offset = found[_key(tp)]
                # Also skip older records client-side: a broker that cannot
                # look offsets up by time (Tansu answers the earliest offset)
                # then still starts at the right record. With a broker that
                # can, the first record is already new enough.
                self._not_before[_key(tp)] = self._start_ms

    def _before_start(self, raw: RawMessage) -> bool:
        """True for a record older than the timestamp start of a fresh partition."""
        not_before = self._not_before.get(_key(raw))
        if not_before is None:
            return False
        if raw.timestamp_ms is not None and raw.timestamp_ms < not_before:
            return True
        # Kafka's rule: start at the first record at or after the timestamp,
        # then deliver everything (producer timestamps need not be ordered).
        del self._not_before[_key(raw)]
        return False

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Callbacks run inside consume(), so no batch is in flight: commit what
        # was handled while this member still owns the partitions.
        keys = {_key(tp) for tp in partitions}
        self._commit(only=keys)
        self._forget(keys)
        log.info("revoked %s", _partitions_text(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group moved on without us (session timeout): committing now
        # would be rejected. The new owner re-delivers; the handler is idempotent.
        keys = {_key(tp) for tp in partitions}
        log.warning("lost %s; handled but uncommitted records will be delivered again: %s",
                    _partitions_text(partitions),
                    _offsets_text({k: o for k, o in self._uncommitted.items() if k in keys}) or "none")
        self._forget(keys)

    def _forget(self, keys: set[Partition]) -> None:
        # A batch waiting for a retry loses these records: the new owner
        # reads them again from the committed offset.
        self._pending = [m for m in self._pending if _key(m) not in keys]
        for k in keys:
            self._uncommitted.pop(k, None)
            self._not_before.pop(k, None)
            self._start_offsets.pop(k, None)
        self.stats.assigned = frozenset(self.stats.assigned - keys)
        self.stats.lag = {k: v for k, v in self.stats.lag.items() if k not in keys}

    def _cooperative(self) -> bool:
        return "cooperative" in str(self.settings.kafka.get("partition.assignment.strategy", ""))

    # --------------------------------------------------------------- errors

    def _on_error(self, err: KafkaError) -> None:
        """Client-wide errors (brokers down, authentication)."""
        if err.fatal():
            self._fatal = err
            log.critical("fatal Kafka client error: %s", err.str())
        else:
            self.stats.errors += 1
            log.warning("Kafka client error (retrying): %s", err.str())

    def _on_message_error(self, msg: Message) -> None:
        err: KafkaError = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return  # reached the end of a partition: not an error
        coords = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        if err.fatal():
            self._fatal = err
            log.critical("fatal Kafka consumer error: %s", err.str(), extra={"coords": coords})
            self._raise_if_fatal()
        self.stats.errors += 1
        log.warning("Kafka consumer error: %s", err.str(), extra={"coords": coords})

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise KafkaException(self._fatal)

    # ---------------------------------------------------------------- misc

    def _update_lag(self) -> None:
        """Records behind the high watermark, per assigned partition.

        Uses the watermark cached from fetch responses: no round trip. A
        partition nothing was consumed from yet counts from where reading
        starts, and one not fetched from yet keeps its lag from assignment.
        """
        assert self._consumer is not None
        before = self.stats.lag
        lag = {}
        for tp in self._consumer.position(self._consumer.assignment()):
            k = _key(tp)
            position = tp.offset if tp.offset >= 0 else self._start_offsets.get(k)
            try:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                high = None
            if position is not None and high is not None and high >= 0:
                lag[k] = max(0, high - position)
            elif k in before:
                lag[k] = before[k]
        self.stats.lag = lag

    def _close(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            self._commit()
        finally:
            consumer.close()  # leaves the group now rather than at session timeout
            self._consumer = None
            self.stats.assigned = frozenset()
            self.stats.lag = {}


def _partitions_text(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def _offsets_text(offsets: Mapping[Partition, int]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(offsets.items()))
