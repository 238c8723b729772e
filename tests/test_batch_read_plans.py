"""The ingest path's batch reads keep plans made for their arrays on PostgreSQL.

Each batch looks up its alert keys, its names and its sky ranges with one
statement each, the arrays as parameters. psycopg prepares a statement from
its sixth run, and PostgreSQL may then switch to a generic plan, made without
the arrays' values, that reads the whole table once per element (measured:
250-400 ms of server CPU per batch at 10,000 targets, growing with the table,
instead of 1-2 ms). The session is set here to use generic plans, as the
server would after that switch, on tables whose statistics were never
gathered (a new database filling up, as the ingest measurement that found
this; autovacuum analyzes late). The reads must still use their indexes and
never scan a whole table (``pg_stat_xact_user_tables`` counts this
transaction's scans), and the session's setting must be what it was after.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text

from tomd import sky
from tomd.db import migrate
from tomd.db import repository as repo
from tests.conftest import pg_database_at

N_TARGETS = 50_000  # enough that an index beats a whole-table read for a few dozen elements


def _seq_scans(s, table: str) -> int:
    return s.execute(text("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = :t"), {"t": table}).scalar_one()


@pytest.fixture(scope="module")
def engine():
    with pg_database_at("head") as engine:
        rng = np.random.default_rng(3)
        ras, decs = rng.uniform(0, 360, N_TARGETS), np.degrees(np.arcsin(rng.uniform(-1, 1, N_TARGETS)))
        with migrate.sessions(engine).begin() as s:
            ids = repo.create_targets(s, [{"name": f"T{i}", "type": "sidereal", "ra": float(ra), "dec": float(dec),
                                           "hpx": int(sky.sky_index(ra, dec)), "extras": {}}
                                          for i, (ra, dec) in enumerate(zip(ras, decs))])
            repo.create_target_names(s, [{"target_id": t, "name": f"T{i}", "norm": f"t{i}", "primary": True,
                                          "source": "test"} for i, t in enumerate(ids)])
            # Ten points per target, as a light curve; tags and a list for some.
            s.execute(text("INSERT INTO photometry (target_id, source, mjd, band, kind, mag, dedupe)"
                           " SELECT t.id, 'ztf', 60000 + k, 'ztfg', 'detection', 18, 'p' || k"
                           " FROM targets t, generate_series(1, 10) k"))
            s.execute(text("INSERT INTO target_tags (target_id, tag) SELECT id, 'x' FROM targets WHERE id % 10 = 0"))
            s.execute(text("INSERT INTO alerts (source, key, kind, time, ingested_at, fields)"
                           " SELECT 'ztf', 'k' || g, 'transient', now(), now(), '{}' FROM generate_series(1, :n) g"),
                      {"n": N_TARGETS})
        yield engine, list(zip(ras.tolist(), decs.tolist()))


def test_batch_reads_use_indexes_when_the_session_uses_generic_plans(engine) -> None:
    engine, positions = engine
    with migrate.sessions(engine).begin() as s:
        s.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
        s.execute(text("SET LOCAL jit = on"))
        # The tables that grow largest. (Small ones, target_tags here, may rightly be read whole; and on a
        # never-analyzed table a plan made for 20 ids may guess a whole read of target_names is cheaper:
        # one read per batch, not one per element, and gone once autovacuum has analyzed it.)
        before = {t: _seq_scans(s, t) for t in ("targets", "alerts", "photometry")}
        for round_ in range(8):  # past psycopg's prepare threshold (5)
            near = positions[round_ * 20:(round_ + 1) * 20]
            ranges = [r for ra, dec in near for r in sky.cone_ranges(ra, dec, 1.5 / 3600)]
            found = repo.targets_near(s, ranges)
            # Every target whose position was asked for is found (by its own cell).
            assert len(found) >= len(near)
            names = repo.match_target_names(s, [f"t{i}" for i in range(round_ * 20, (round_ + 1) * 20)])
            assert len(names) == 20
            keys = repo.existing_alert_keys(s, "ztf", [f"k{i}" for i in range(1 + round_ * 20, 1 + (round_ + 1) * 20)])
            assert len(keys) == 20
            # The rule engine's reads of a batch's targets (rows, names, tags, lists, light curves): measured
            # fine with generic plans too, kept here so that stays so.
            ids = sorted(found)[:20]
            rows, names_of, tags, _lists, phot = repo.rule_context_rows(s, ids)
            assert set(rows) == set(ids) and all(len(phot[t]) == 10 and names_of[t] for t in ids)
        after = {t: _seq_scans(s, t) for t in before}
        assert after == before, f"whole-table scans: {after} (before {before})"
        # The transaction's settings are back as they were.
        assert s.execute(text("SELECT current_setting('plan_cache_mode'), current_setting('jit')")).one() == (
            "force_generic_plan", "on")
