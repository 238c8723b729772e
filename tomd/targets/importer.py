"""Store the rows of a target file: every good row kept, every bad row reported.

Each row is upserted in its own savepoint, so a row the database refuses
does not take its neighbours with it; rows are committed in chunks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tomd.targets.io import count_rows, read_targets
from tomd.targets.store import upsert

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
    done = False
    try:
        while not done:
            with sessions.begin() as s:
                for _ in range(CHUNK):
                    row = next(rows, None)
                    if row is None:
                        done = True
                        break
                    if bar is not None:
                        bar.update(1)
                    where = f"{path}:{row.line}"
                    if row.spec is None:
                        report.errors.append(f"{where}: {row.error}")
                        continue
                    try:
                        with s.begin_nested():
                            res = upsert(s, row.spec, radius_arcsec=radius_arcsec, origin=f"import:{path.name}")
                    except SQLAlchemyError as exc:
                        report.errors.append(f"{where}: database refused the row: {exc.__class__.__name__}")
                        continue
                    if res.created:
                        report.created += 1
                    elif res.changes or res.new_names:
                        report.updated += 1
                    else:
                        report.unchanged += 1
                    for name in res.conflicts:
                        report.warnings.append(f"{where}: name: {name!r} already belongs to another target; not added")
    finally:
        if bar is not None:
            bar.close()
    return report
