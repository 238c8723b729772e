"""``make demo``: the whole pipeline on embedded defaults, then a summary.

Everything runs in a scratch directory (SQLite, local storage) with no
configuration and no network beyond loopback. Each stage prints what it did;
the demo ends by itself and says how to run the daemon for real.
"""

from __future__ import annotations

import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from tomd.db import migrate, repository as repo
from tomd.targets import store
from tomd.targets.importer import import_file


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, title: str) -> None:
    _say()
    _say(f"── {n}. {title} " + "─" * max(0, 60 - len(title)))


def run_demo(workdir: Path) -> int:
    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    url = f"sqlite:///{workdir / 'tomd.db'}"
    summary: list[str] = []

    _step(1, "database")
    engine = migrate.connect(url)
    before, after = migrate.upgrade(engine)
    sessions = migrate.sessions(engine)
    _say(f"created {url} at schema revision {after}")

    _step(2, "targets: bulk import, twice")
    sample = workdir / "sample_targets.csv"
    sample.write_bytes(resources.files("tomd.data").joinpath("sample_targets.csv").read_bytes())
    first = import_file(sessions, sample, radius_arcsec=1.5, progress=False)
    _say(f"first import:  {first.created} created, {first.updated} merged into an existing target")
    second = import_file(sessions, sample, radius_arcsec=1.5, progress=False)
    _say(f"second import: {second.created} created, {second.unchanged} unchanged (no duplicates)")
    with sessions() as s:
        n_targets = repo.count_targets(s)
        merged = store.resolve(s, "ZTF23aaklqou")
        _say(f'"ZTF23aaklqou" (a row 0.2" from SN 2023ixf) resolved to target #{merged.id} {merged.name}')
    summary.append(f"{n_targets} targets from {sample.name} (one row merged by position)")

    _step(3, "cone search: 10' around M101")
    with sessions() as s:
        m101 = store.resolve(s, "NGC 5457")
        hits = store.cone(s, m101.ra, m101.dec, 600.0)
        rows = store.describe(s, repo.query_targets(s, ids=[h[0] for h in hits]))
    seps = dict(hits)
    for r in sorted(rows, key=lambda r: seps[r["id"]]):
        _say(f"  {r['name']:12s} ra={r['ra']:10.5f} dec={r['dec']:+9.5f}  {seps[r['id']]:7.1f}\"  "
             f"tags={','.join(r['tags']) or '-'}")
    summary.append(f"cone search around M101: {len(hits)} targets within 10'")

    _step(4, "summary")
    for line in summary:
        _say(f"  • {line}")
    _say(f"  done in {time.perf_counter() - t0:.1f} s; everything is in {workdir}/")
    _say()
    _say("Run tomd for real:")
    _say("  cp config.example.toml tomd.toml      # then edit: database, streams, facilities")
    _say("  .venv/bin/tomd config check           # one line per problem, exit 1 if any")
    _say("  .venv/bin/tomd db upgrade             # create or migrate the schema")
    _say("  .venv/bin/tomd target import my-targets.csv")
    _say("  .venv/bin/tomd target list --cone 14:03:12.6 +54:20:56 600")
    _say(f"Look around the demo's database: TOMD_DATABASE_URL={url} and a tomd.toml with")
    _say('  [database]\n  url = "${TOMD_DATABASE_URL}"')
    engine.dispose()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-work")))
