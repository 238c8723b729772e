"""Store the rows of a target file: every good row kept, every bad row reported.

Rows are upserted in chunks of 500 in one statement batch each; should the
database refuse a chunk, its rows are retried one by one in savepoints, so
a row the database refuses does not take its neighbours with it.
"""

from __future__ import annotations

import sys
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tomd.targets.io import count_rows, read_targets
from tomd.targets.store import UpsertResult, upsert, upsert_many

CHUNK = 500


@dataclass
class ImportReport:
    path: str
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[str] = field(default_factory=list)  # "FILE:LINE: field: reason"
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def import_file(sessions: sessionmaker[Session], path: Path, *, radius_arcsec: float,
                progress: bool | None = None) -> ImportReport:
    report = ImportReport(str(path))
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count_rows(path), unit="row", desc=path.name, file=sys.stderr)
    rows = read_targets(path)
    origin = f"import:{path.name}"
    try:
        while True:
            chunk = list(islice(rows, CHUNK))
            if not chunk:
                break
            good = []
            for row in chunk:
                if row.spec is None:
                    report.errors.append(f"{path}:{row.line}: {row.error}")
                else:
                    good.append(row)
            with sessions.begin() as s:
                try:
                    with s.begin_nested():
                        results = upsert_many(s, [r.spec for r in good], radius_arcsec=radius_arcsec, origin=origin)
                    outcomes = list(zip(good, results))
                except SQLAlchemyError:
                    # Find the row the database refuses; keep the others.
                    outcomes = _one_by_one(s, good, radius_arcsec, origin, report)
                for row, res in outcomes:
                    _count(report, f"{path}:{row.line}", res)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return report


def _one_by_one(s: Session, rows, radius_arcsec: float, origin: str, report: ImportReport):
    out = []
    for row in rows:
        try:
            with s.begin_nested():
                out.append((row, upsert(s, row.spec, radius_arcsec=radius_arcsec, origin=origin)))
        except SQLAlchemyError as exc:
            report.errors.append(f"{report.path}:{row.line}: database refused the row: {exc.__class__.__name__}")
    return out


def _count(report: ImportReport, where: str, res: UpsertResult) -> None:
    if res.created:
        report.created += 1
    elif res.changes or res.new_names:
        report.updated += 1
    else:
        report.unchanged += 1
    for name in res.conflicts:
        report.warnings.append(f"{where}: name: {name!r} already belongs to another target; not added")
