"""Parsing in a worker process while the stream thread stores what is parsed.

Decoding and parsing a ZTF alert (fastavro, then the normalised Alert) costs
about as much CPU as storing it, and in one Python process the two take turns
on one core. With a worker process the batch is cut in chunks: the worker
parses chunk k+1 while the stream thread stores chunk k (all chunks in the
batch's one transaction, so nothing about commits or offsets changes). On the
2-core benchmark machine this is the largest single step towards the ingest
goal (bench/ingest.py, README Benchmarks).

The worker builds its own parser from the stream's recipe (format, test
switch, schema registry, schema file): parsers are closures with caches and
cannot be sent. Messages go as bytes; alerts come back pickled, without
cutouts when the stream does not keep them. Per message the worker returns
what the in-process path would have: alerts, or the error a dead letter
records, or a parser bug's traceback, which the stream thread logs.

A worker that dies (a segfault in a C decoder, OOM) breaks only the chunk in
flight: the stream thread parses that batch itself, logs it, and starts a new
worker for the next batch.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from tomd.alerts.ingest import _keyed, parse_one
from tomd.alerts.model import Alert, PayloadJson
from tomd.db.migrate import json_bytes

log = logging.getLogger(__name__)

# (alerts or None, the dead letter's error or None): what the ingest path works with.
Parsed = tuple[list[Alert] | None, str | None]


@dataclass(frozen=True)
class ParserRecipe:
    """What builds a stream's parser (tomd.daemon.parser_for), in any process."""

    format: str
    include_test: bool = False
    schema_registry: str | None = None
    schema_file: str | None = None
    keep_cutouts: bool = True

    def build(self):
        from tomd.daemon import parser_for

        return parser_for(self.format, include_test=self.include_test, schema_registry=self.schema_registry,
                          schema_file=self.schema_file)


# ------------------------------------------------------------- the worker --

_worker_parse = None
_worker_recipe: ParserRecipe | None = None


def _init_worker(recipe: ParserRecipe) -> None:
    global _worker_parse, _worker_recipe
    _worker_recipe = recipe
    _worker_parse = _keyed(recipe.build())


def _parse_chunk(items: list[tuple[bytes | None, Any, bytes | None]]) -> list[tuple]:
    assert _worker_recipe is not None and _worker_parse is not None
    out = []
    for value, headers, key in items:
        alerts, error, tb = parse_one(_worker_recipe.format, _worker_parse, value, headers, key)
        if alerts:
            # The payload goes as one JSON string (unpickling its thousands of objects cost the stream
            # thread more than half of what the worker saved it); cutouts only if they are kept.
            keep = _worker_recipe.keep_cutouts
            alerts = [dataclasses.replace(a, payload=PayloadJson(json_bytes(a.payload)),
                                          cutouts=a.cutouts if keep else {}) for a in alerts]
        out.append((alerts, error, tb))
    return out


# ------------------------------------------------------ the stream's side --

class ParsePool:
    """One worker process parsing for one stream, chunk by chunk, in order."""

    FIRST_CHUNK = 32  # the stream thread waits for the first chunk alone: keep it small
    CHUNK = 128  # later chunks: enough alerts per statement for the database work to stay batched

    def __init__(self, recipe: ParserRecipe, *, workers: int = 1):
        self.recipe = recipe
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the daemon has threads (librdkafka's, the scheduler's) that a fork
            # would copy mid-lock.
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.recipe,))
        return self._pool

    def start(self) -> None:
        """Start the worker now (its imports take a second), not at the first alert."""
        self._executor().submit(_parse_chunk, []).result()

    def chunks(self, n: int) -> list[tuple[int, int]]:
        out, i = [], 0
        size = self.FIRST_CHUNK
        while i < n:
            out.append((i, min(n, i + size)))
            i += size
            size = self.CHUNK
        return out

    def parse(self, messages: Sequence[Any], fallback) -> Iterator[list[tuple[Any, list[Alert] | None, str | None]]]:
        """Yield the batch's (message, alerts, error) chunk by chunk, in order, as the worker finishes them.

        ``fallback(messages)`` parses in this process; it takes over for the rest of the batch if the
        worker dies. Every chunk is sent at once: the worker is busy on the next while the caller
        stores the one yielded.
        """
        spans = self.chunks(len(messages))
        try:
            ex = self._executor()
            futures: list[Future] = [
                ex.submit(_parse_chunk, [(m.value, getattr(m, "headers", None), getattr(m, "key", None))
                                         for m in messages[a:b]]) for a, b in spans]
        except (BrokenProcessPool, RuntimeError, OSError) as exc:
            self._broken(exc)
            yield fallback(messages)
            return
        for (a, b), fut in zip(spans, futures):
            try:
                results = fut.result()
            except (BrokenProcessPool, OSError, EOFError) as exc:
                self._broken(exc)
                for f in futures:
                    f.cancel()
                yield fallback(messages[a:])
                return
            chunk = []
            for m, (alerts, error, tb) in zip(messages[a:b], results):
                if tb is not None:
                    log.error("parser failed on %s (in the parse worker): %s\n%s", m.coords, error, tb,
                              extra={"coords": m.coords})
                chunk.append((m, alerts, error))
            yield chunk

    def _broken(self, exc: BaseException) -> None:
        self.restarts += 1
        log.warning("the parse worker died (%s: %s); this batch is parsed in the stream thread and a new "
                    "worker starts for the next", exc.__class__.__name__, exc)
        self.close(wait=False)

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=wait, cancel_futures=True)

