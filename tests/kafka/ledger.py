"""A test BatchHandler that applies records to a real SQLite file.

Each record is one row keyed by its Kafka coordinates (topic, partition,
offset) and inserted with ``ON CONFLICT DO NOTHING``, as the real handler
keys alerts by their survey id. Two counters live in the same transaction:

* ``applied``: rows that were new (a replay adds nothing),
* ``delivered``: records handed to ``handle`` and committed,

so ``delivered > applied`` shows a re-delivery and ``applied == count(*)``
with no gaps shows nothing was lost.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from tomd.alerts.consumer import RawMessage
from tomd.errors import RetryableError

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL, value BLOB,
    PRIMARY KEY (topic, partition, "offset"));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('applied', 0), ('delivered', 0);
"""


class Ledger:
    """BatchHandler writing to ``path``; hooks let tests inject failures.

    ``before(batch, call_no)`` runs before the transaction (raise
    RetryableError there to simulate a database outage); ``after(batch,
    call_no)`` runs after it committed (kill the process there to crash
    between the database commit and the offset commit).
    """

    def __init__(self, path: Path | str, *, before: Callable | None = None, after: Callable | None = None,
                 busy_timeout: float = 5.0):
        self.path = str(path)
        self.before = before
        self.after = after
        self.busy_timeout = busy_timeout
        self.calls: list[list[RawMessage]] = []  # every batch offered, including failed ones
        with closing(self._connect()) as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)

    def _read(self) -> sqlite3.Connection:
        # The test's own reads wait for the writer: a short busy_timeout is for
        # the handler under test (to provoke retries), not for the observer.
        return sqlite3.connect(self.path, timeout=30.0, isolation_level=None)

    def handle(self, messages: list[RawMessage]) -> None:
        self.calls.append(list(messages))
        if self.before:
            self.before(messages, len(self.calls))
        db = self._connect()
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:  # locked: the database is "down"
                raise RetryableError(f"database unavailable: {exc}") from exc
            new = 0
            for m in messages:
                cur = db.execute(
                    'INSERT INTO applied (topic, partition, "offset", value) VALUES (?, ?, ?, ?) '
                    "ON CONFLICT DO NOTHING", (m.topic, m.partition, m.offset, m.value))
                new += cur.rowcount
            db.execute("UPDATE counters SET n = n + ? WHERE name = 'applied'", (new,))
            db.execute("UPDATE counters SET n = n + ? WHERE name = 'delivered'", (len(messages),))
            db.execute("COMMIT")
        finally:
            db.close()
        if self.after:
            self.after(messages, len(self.calls))

    # ------------------------------------------------------------ inspection

    def counters(self) -> dict[str, int]:
        with closing(self._read()) as db:
            return dict(db.execute("SELECT name, n FROM counters"))

    def rows(self) -> list[tuple[str, int, int]]:
        with closing(self._read()) as db:
            return list(db.execute('SELECT topic, partition, "offset" FROM applied ORDER BY 1, 2, 3'))

    def count(self) -> int:
        with closing(self._read()) as db:
            return db.execute("SELECT count(*) FROM applied").fetchone()[0]

    def per_partition(self) -> dict[tuple[str, int], list[int]]:
        out: dict[tuple[str, int], list[int]] = {}
        for topic, partition, offset in self.rows():
            out.setdefault((topic, partition), []).append(offset)
        return out
