"""The ``tomd`` command. The only place that configures logging.

Every user mistake ends as one clear line on stderr and exit status 1 (2 for
usage errors, from argparse); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tomd import __version__
from tomd.errors import (
    ConfigError,
    DatabaseNotReady,
    InputError,
    NotFoundError,
    RetryableError,
    TomdError,
    UserError,
)

log = logging.getLogger("tomd")


# ------------------------------------------------------------ app context --


@dataclass
class App:
    """What a command needs, built lazily from the config."""

    config_arg: str | None

    @cached_property
    def config(self):
        from tomd.config import load_config

        return load_config(self.config_arg)

    @cached_property
    def engine(self):
        from tomd.db.migrate import connect

        db = self.config.database
        return connect(db.url, pool_size=db.pool_size, echo=db.echo)

    @cached_property
    def sessions(self):
        """Session factory on a database at the current schema revision."""
        from tomd.db.migrate import ensure_current, sessions

        ensure_current(self.engine)
        return sessions(self.engine)


# --------------------------------------------------------------- commands --


def cmd_config_check(app: App, args) -> int:
    from tomd.config import check_config_file, resolve_config_path

    path = resolve_config_path(app.config_arg)
    if not path.exists():
        print(f"{path}: no such file", file=sys.stderr)
        return 1
    problems = check_config_file(path)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{path}: OK")
    return 1 if problems else 0


def cmd_db_upgrade(app: App, args) -> int:
    from tomd.db.migrate import upgrade

    before, after = upgrade(app.engine)
    if before == after:
        print(f"database already at revision {after}")
    else:
        print(f"database migrated from {before or 'empty'} to {after}")
    return 0


def cmd_db_status(app: App, args) -> int:
    from tomd.db.migrate import current_revision, head_revision

    cur, head = current_revision(app.engine), head_revision()
    print(f"revision {cur or 'none'} (this tomd: {head})")
    return 0 if cur == head else 1


def _spec_from_args(args):
    from tomd import sky
    from tomd.targets.io import _infer
    from tomd.targets.model import ELEMENT_FIELDS, TargetSpec

    def angle(value, parse, field):
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise InputError(str(exc), field=f"--{field}") from None

    extras = {}
    for item in args.extra or []:
        if "=" not in item:
            raise InputError(f"expected KEY=VALUE, got {item!r}", field="--extra")
        k, v = item.split("=", 1)
        extras[k.strip()] = _infer(v.strip())
    return TargetSpec(
        name=args.name,
        ra=angle(args.ra, sky.parse_ra, "ra"),
        dec=angle(args.dec, sky.parse_dec, "dec"),
        epoch=args.epoch, pm_ra=args.pm_ra, pm_dec=args.pm_dec,
        parallax=args.parallax, distance=args.distance,
        scheme=args.scheme,
        aliases=tuple(args.alias or ()), tags=tuple(args.tag or ()), lists=tuple(args.list or ()),
        extras=extras, name_source="user",
        **{f: getattr(args, f) for f in ELEMENT_FIELDS},
    )


def _spec_from_catalog(app: App, args):
    """Look the name up in ``--from``'s service; the CLI's aliases, tags, lists and extras are added."""
    from tomd.catalogs import Catalogs, title
    from tomd.targets.model import ELEMENT_FIELDS, SIDEREAL_FIELDS

    given = [f for f in (*SIDEREAL_FIELDS, "scheme", *ELEMENT_FIELDS) if getattr(args, f, None) is not None]
    if given:
        raise InputError(f"--from {args.catalog} gives the position or elements; do not also give "
                         f"--{given[0].replace('_', '-')}", field="--from")
    base = _spec_from_args(args)  # for the CLI's names, tags, lists and extras
    entry = Catalogs(app.config.catalogs, app.sessions).lookup(args.catalog, args.name)
    if not entry.scheme and (entry.ra is None or entry.dec is None):
        raise UserError(f"{title(args.catalog)}: {entry.name} has neither a position nor orbital elements")
    where = (f"ra {entry.ra:.6f} dec {entry.dec:+.6f}" if entry.ra is not None and entry.dec is not None
             else f"{entry.scheme} elements at MJD {entry.elements.get('epochofel', float('nan')):.1f}")
    what = ", ".join(x for x in (entry.object_type, f"z={entry.redshift:g}" if entry.redshift is not None else None)
                     if x)
    print(f"{title(args.catalog)}: {entry.name}" + (f" ({what})" if what else "") + f", {where}")
    spec = entry.to_spec(query=args.name, tags=base.tags, lists=base.lists, extras=base.extras)
    from dataclasses import replace

    return replace(spec, aliases=tuple(dict.fromkeys((*spec.aliases, *base.aliases))))


def _refresh_elements(s, target_id: int, spec) -> tuple[dict[str, Any], float | None]:
    """A catalog's newer osculating elements replace a solar-system target's older ones.

    Elements are not a position the merge must keep: they age (perturbations),
    and a later epoch from Horizons or the MPC is the same object's better orbit.
    Returns the changes and the replaced epoch.
    """
    from tomd.db import repository as repo
    from tomd.events import TargetUpdated
    from tomd.targets.model import ELEMENT_FIELDS

    t = repo.get_target(s, target_id)
    if (not spec.scheme or t is None or t.type != "non_sidereal" or spec.epochofel is None
            or (t.epochofel is not None and spec.epochofel <= t.epochofel + 0.5)):
        return {}, None
    before = t.epochofel
    values = {"scheme": spec.scheme, **{f: getattr(spec, f) for f in ELEMENT_FIELDS}}
    changes = {k: v for k, v in values.items() if getattr(t, k) != v}
    if changes:
        repo.update_target(s, target_id, values)
        repo.add_event(s, TargetUpdated(target_id, t.name, changes, (), "cli"), target_id=target_id)
    return changes, before


def cmd_target_add(app: App, args) -> int:
    from tomd.errors import PermanentError, RetryableError

    if getattr(args, "near", None) is not None:
        return _target_add_near(app, args)
    if getattr(args, "radius", None) is not None:
        raise InputError("--radius goes with --near RA DEC", field="--radius")
    if args.name is None:
        raise InputError("give a NAME (or --from tns --near RA DEC)", field="NAME")
    if getattr(args, "catalog", None):
        try:
            spec = _spec_from_catalog(app, args)
        except (RetryableError, PermanentError) as exc:  # "service down" etc.: one line, no traceback
            raise UserError(str(exc)) from None
    else:
        spec = _spec_from_args(args)
    _add_target(app, args, spec)
    return 0


def _target_add_near(app: App, args) -> int:
    """``--from tns --near RA DEC``: every object TNS reports there becomes (or joins) a target."""
    from tomd import sky
    from tomd.catalogs import Catalogs
    from tomd.errors import PermanentError, RetryableError

    if args.catalog != "tns":
        raise InputError("--near asks TNS for the objects reported near a position: add --from tns",
                         field="--near")
    if args.name is not None:
        raise InputError(f"--near finds the names itself; do not also give NAME ({args.name!r})", field="--near")
    try:
        ra, dec = sky.parse_ra(args.near[0]), sky.parse_dec(args.near[1])
    except ValueError as exc:
        raise InputError(str(exc), field="--near") from None
    radius = 5.0 if args.radius is None else args.radius
    if not 0.0 < radius <= 3600.0:
        raise InputError(f"expected a radius in arcseconds above 0 and at most 3600, got {radius:g}",
                         field="--radius")
    try:
        names = Catalogs(app.config.catalogs, app.sessions).tns_near(ra, dec, radius)
    except (RetryableError, PermanentError) as exc:
        raise UserError(str(exc)) from None
    if not names:
        raise NotFoundError(f'TNS: no object reported within {radius:g}" of ra {ra:.6f} dec {dec:+.6f}')
    print(f'TNS: {len(names)} object{"s" if len(names) > 1 else ""} within {radius:g}": {", ".join(names)}')
    for name in names:
        one = argparse.Namespace(**{**vars(args), "name": name, "near": None})
        try:
            spec = _spec_from_catalog(app, one)
        except (RetryableError, PermanentError) as exc:
            # Targets already added stay; the message says which object stopped the run.
            raise UserError(f"{exc} (while adding {name}; the ones before it were added)") from None
        _add_target(app, one, spec)
    return 0


def _add_target(app: App, args, spec) -> None:
    """Create or merge ``spec`` and say what happened."""
    from tomd.targets.model import SpecError
    from tomd.targets.store import upsert

    try:
        with app.sessions.begin() as s:
            res = upsert(s, spec, radius_arcsec=app.config.targets.match_radius_arcsec, origin="cli")
            refreshed, before = ({}, None)
            if getattr(args, "catalog", None) and not res.created:
                refreshed, before = _refresh_elements(s, res.target_id, spec)
            from tomd.db.repository import get_target

            name = get_target(s, res.target_id).name
    except SpecError as exc:
        raise InputError(str(exc).split(": ", 1)[1], field=f"--{exc.field.replace('_', '-')}") from None
    if res.created:
        print(f"created target #{res.target_id} {name}")
    else:
        how = "name" if res.match.by == "name" else f'position ({res.match.separation_arcsec:.2f}" away)'
        print(f"matched existing target #{res.target_id} {name} by {how}")
        sep = res.match.separation_arcsec
        if res.match.by == "name" and sep is not None and sep > app.config.targets.match_radius_arcsec:
            print(f'  warning: the stored position is {sep:.1f}" from the one given; it was kept',
                  file=sys.stderr)
        if res.new_names:
            print(f"  added names: {', '.join(res.new_names)}")
        if res.changes:
            print(f"  updated: {', '.join(res.changes)}")
        if refreshed:
            was = f" (were at MJD {before:.1f})" if before is not None else ""
            print(f"  orbital elements replaced by the catalog's, epoch MJD {spec.epochofel:.1f}{was}")
    for n in res.conflicts:
        print(f"  warning: name {n!r} already belongs to another target; not added", file=sys.stderr)


def _parse_cone(values: Sequence[str]) -> tuple[float, float, float]:
    from tomd import sky

    ra_s, dec_s, r_s = values
    try:
        ra, dec = sky.parse_ra(ra_s), sky.parse_dec(dec_s)
    except ValueError as exc:
        raise InputError(str(exc), field="--cone") from None
    try:
        radius = float(r_s)
    except ValueError:
        raise InputError(f"radius must be arcseconds, got {r_s!r}", field="--cone") from None
    if radius <= 0:
        raise InputError(f"radius must be > 0 arcseconds, got {r_s}", field="--cone")
    return ra, dec, radius


def cmd_target_list(app: App, args) -> int:
    from tomd.db import repository as repo
    from tomd.targets.store import cone, describe

    with app.sessions() as s:
        seps: dict[int, float] = {}
        ids = None
        if args.cone:
            ra, dec, radius = _parse_cone(args.cone)
            hits = cone(s, ra, dec, radius)
            seps = dict(hits)
            ids = [h[0] for h in hits]
        rows = describe(s, repo.query_targets(s, ids=ids, tag=args.tag, list_name=args.list, limit=args.limit))
    if seps:
        for r in rows:
            r["separation_arcsec"] = seps[r["id"]]
        rows.sort(key=lambda r: r["separation_arcsec"])
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no targets", file=sys.stderr)
        return 0
    cols = ["id", "name", "ra", "dec", "tags"] + (["separation_arcsec"] if seps else [])
    _print_table(rows, cols)
    return 0


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.6f}" if abs(v) < 1000 else f"{v:.2f}"
        if isinstance(v, list):
            return ",".join(map(str, v)) or "-"
        return str(v)

    table = [[cell(r.get(c)) for c in cols] for r in rows]
    heads = [c.replace("separation_arcsec", 'sep(")') for c in cols]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def cmd_target_show(app: App, args) -> int:
    from tomd.targets.store import describe, resolve

    with app.sessions() as s:
        t = resolve(s, args.name)
        if t is None:
            raise NotFoundError(f"no target named {args.name!r}")
        d = describe(s, [t])[0]
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"#{d['id']} {d['name']} ({d['type']})")
    for k, v in d.items():
        if k in ("id", "name", "type") or v in (None, [], {}):
            continue
        print(f"  {k:13s} {v}")
    return 0


def cmd_target_import(app: App, args) -> int:
    from tomd.targets.importer import import_file

    path = Path(args.file)
    report = import_file(app.sessions, path, radius_arcsec=app.config.targets.match_radius_arcsec,
                         progress=None if not args.no_progress else False)
    for line in report.errors + report.warnings:
        print(line, file=sys.stderr)
    print(f"{path}: {report.created} created, {report.updated} updated, {report.unchanged} unchanged, "
          f"{len(report.errors)} bad rows")
    return 0 if report.ok else 1


def cmd_target_export(app: App, args) -> int:
    from tomd.db import repository as repo
    from tomd.targets.io import export_rows, write_csv, write_ecsv
    from tomd.targets.store import describe

    with app.sessions() as s:
        rows = describe(s, repo.query_targets(s, tag=args.tag, list_name=args.list))
    header, out = export_rows(rows)
    text = write_ecsv(header, out) if args.format == "ecsv" else write_csv(header, out)
    if args.output and args.output != "-":
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {len(out)} targets to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _replay_formats() -> list[str]:
    """The registered formats, without importing the parsers (tests check they agree)."""
    import typing

    from tomd.config import POLL_FORMATS, StreamFormat

    return [*typing.get_args(StreamFormat), *POLL_FORMATS]


REPLAY_FORMATS = _replay_formats()


def _positive_degrees(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected degrees, got {text!r}") from None
    if not 0.0 < value <= 180.0:
        raise argparse.ArgumentTypeError(f"expected degrees in (0, 180], got {text!r}")
    return value


def _retries(text: str) -> int:
    if not text.isdigit() or int(text) > 1000:
        raise argparse.ArgumentTypeError(f"expected a whole number of retries (0-1000), got {text!r}")
    return int(text)


def cmd_alert_replay(app: App, args) -> int:
    from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor

    paths = [Path(p) for p in args.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError("no such file", where=str(missing[0]))
    from tomd.daemon import build_stages, parser_for

    # Replayed files are read as the configured stream reads them: the one
    # named by --stream, else the first of that format. Its localization
    # threshold, schema registry and schema file apply unless overridden.
    streams = app.config.streams
    if args.stream:
        st = next((s for s in streams if s.name == args.stream), None)
        if st is None:
            known = ", ".join(s.name for s in streams) or "none configured"
            raise InputError(f"no stream named {args.stream!r} (streams: {known})", where="--stream")
    else:
        st = next((s for s in streams if s.format == (args.format or "auto")), None)
    fmt = args.format or (st.format if st else "auto")
    if args.stream and fmt != st.format:
        raise InputError(f"stream {st.name!r} reads {st.format}, not {fmt}", where="--format")
    loc_max = args.localization_max_deg if args.localization_max_deg is not None else (
        st.localization_max_deg if st else 0.1)
    schema_file = args.schema_file or (st.schema_file if st else None)
    if args.schema_file and fmt not in ("fink-avro", "auto"):
        raise InputError(f"only fink-avro and auto read schemaless Avro, not {fmt}", where="--schema-file")
    # Named stream: its alerts are stored on it, so the rules that select it hear
    # them and `rule backtest --since` finds them there. Else the stream "replay".
    settings = IngestSettings(stream=st.name if args.stream else "replay", format=fmt,
                              include_test=args.include_test,
                              localization_max_deg=loc_max,
                              match_radius_arcsec=app.config.targets.match_radius_arcsec)
    parser = parser_for(fmt, include_test=args.include_test, schema_registry=st.schema_registry if st else None,
                        schema_file=schema_file)
    rules, storage = build_stages(app.config)  # replayed alerts meet the rules, as live ones do
    ing = Ingestor(app.sessions, settings, parser, sinks=[rules], storage=storage)
    bar = None
    if sys.stderr.isatty() and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="file", file=sys.stderr)

    def say(line: str) -> None:
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    batch: list = []
    done = 0  # files whose batch committed
    failure = None
    for i, p in enumerate(paths):
        batch.append(FileMessage(str(p), 0, p.read_bytes()))
        if len(batch) >= args.batch_size or i == len(paths) - 1:
            where = str(paths[done]) + (f" (and the {len(batch) - 1} files after it in its batch)"
                                        if len(batch) > 1 else "")
            failure = _handle_patiently(ing, batch, where, args.retries, say)
            if failure is not None:
                break
            done += len(batch)
            if bar is not None:
                bar.update(len(batch))
            batch = []
    if bar is not None:
        bar.close()
    t = ing.totals
    print(f"{t.messages} files: {t.alerts} alerts stored, {t.duplicates} already stored, "
          f"{t.targets_created} new targets, {t.photometry_points} photometry points, {t.notices} notices, "
          f"{t.skipped_test} test events skipped, {t.dead_letters} dead letters")
    if failure is not None:
        print(f"tomd: {where}: {failure}; {done} of {len(paths)} files are stored: run the same replay "
              "again to finish (what is stored is skipped)", file=sys.stderr)
        return 1
    return 1 if t.dead_letters else 0


# Waits between attempts of a replayed batch: doubling from the first, at most
# the second. 8 retries wait about 1.5 min in all (a locked SQLite adds its own
# 30 s busy timeout to each attempt).
REPLAY_BACKOFF_S = (0.5, 30.0)


def _handle_patiently(ing, batch: list, where: str, retries: int, say: Callable[[str], None]) -> str | None:
    """Apply one batch, waiting out transient failures (SQLite locked by a running
    daemon, PostgreSQL restarting, storage briefly away) as the daemon's consumer
    does, but only ``retries`` times since a person is waiting. A batch applied
    again stores nothing twice (alerts by key, letters by fingerprint). None when
    it committed, else why not."""
    import time

    started = time.monotonic()
    first, longest = REPLAY_BACKOFF_S
    for attempt in range(retries + 1):
        try:
            ing.handle(batch)
            return None
        except RetryableError as exc:
            if attempt == retries:
                return (f"not stored after {attempt + 1} attempts over {time.monotonic() - started:.0f} s "
                        f"({exc})")
            delay = max(exc.retry_after or 0.0, min(longest, first * 2 ** attempt))
            say(f"tomd: {where}: {exc}; trying again in {delay:.1f} s (attempt {attempt + 2} of {retries + 1}; "
                "Ctrl-C stops, and the same replay can be run again later)")
            time.sleep(delay)
    return None  # not reached: the last attempt returns


def cmd_alert_dead_letters(app: App, args) -> int:
    from tomd.db import repository as repo

    with app.sessions() as s:
        rows = repo.dead_letters(s, unresolved_only=not args.all)
    out = [{"id": d.id, "stream": d.stream, "format": d.format,
            "coords": f"{d.topic}[{d.partition}]@{d.offset}" if d.partition is not None else d.topic,
            "error": d.error, "bytes": len(d.raw), "retries": d.retries,
            "created_at": d.created_at.isoformat(),
            "resolved_at": d.resolved_at.isoformat() if d.resolved_at else None} for d in rows]
    if args.json:
        print(json.dumps(out, indent=2))
    elif not out:
        print("no dead letters", file=sys.stderr)
    else:
        for d in out:
            print(f"#{d['id']} {d['stream']} {d['coords']} ({d['bytes']} bytes, {d['retries']} retries): {d['error']}")
    return 0


def cmd_alert_retry_dead_letters(app: App, args) -> int:
    from tomd.alerts.ingest import IngestSettings, retry_dead_letters

    streams = {st.name: st for st in app.config.streams}

    def settings_for(stream: str, fmt: str) -> IngestSettings:
        st = streams.get(stream)
        return IngestSettings(stream=stream, format=st.format if st else fmt, include_test=bool(st and st.include_test),
                              localization_max_deg=st.localization_max_deg if st else 0.1,
                              match_radius_arcsec=app.config.targets.match_radius_arcsec)

    from tomd.daemon import build_stages, parser_for

    # Each letter is parsed as its stream parses now: its format, its own
    # include_test, and (Rubin) the schema registry it names. Letters of a
    # stream no longer configured keep their format and drop test events.
    registry = {st.name: st.schema_registry for st in app.config.streams if st.schema_registry}
    schema_files = {st.name: st.schema_file for st in app.config.streams if st.schema_file}
    parsers: dict[tuple[str, str, bool], Any] = {}

    def parser_of(settings: IngestSettings):
        key = (settings.stream, settings.format, settings.include_test)
        if key not in parsers:
            parsers[key] = parser_for(settings.format, include_test=settings.include_test,
                                      schema_registry=registry.get(settings.stream),
                                      schema_file=schema_files.get(settings.stream))
        return parsers[key]

    rules, storage = build_stages(app.config)
    res = retry_dead_letters(app.sessions, parser_of, settings_for, stream=args.stream,
                             sinks=[rules], storage=storage)
    print(f"{res.retried} dead letters retried: {res.resolved} ingested, {res.still_failing} still failing")
    return 1 if res.still_failing else 0


def cmd_run(app: App, args) -> int:
    from tomd.daemon import run

    config = app.config  # invalid config: one line per problem, exit 1, before anything starts
    if not config.streams:
        log.warning("no [[streams]] configured: nothing to consume")
    return run(config, idle_exit_s=args.exit_when_idle)


def cmd_demo(app: App, args) -> int:
    from tomd.demo import run_demo

    return run_demo(Path(args.workdir))


# ----------------------------------------------------------------- parser --


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tomd", description="Headless Target and Observation Manager.")
    p.add_argument("--config", "-c", help="config file (default: $TOMD_CONFIG or ./tomd.toml)")
    p.add_argument("--log-format", choices=["text", "json"], help="log line format (default: from config)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"tomd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(parent, name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        q = parent.add_parser(name, help=help_, description=help_)
        q.set_defaults(func=func)
        return q

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True, metavar="SUB")
    leaf(config, "check", cmd_config_check, "validate the config file; exit 1 with one line per problem")

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="sub", required=True, metavar="SUB")
    leaf(db, "upgrade", cmd_db_upgrade, "create or migrate the database schema")
    leaf(db, "status", cmd_db_status, "show the schema revision")

    target = sub.add_parser("target", help="targets").add_subparsers(dest="sub", required=True, metavar="SUB")
    q = leaf(target, "add", cmd_target_add, "add a target, or merge into the one it matches")
    q.add_argument("name", nargs="?", metavar="NAME", help="the target's name (not with --near)")
    q.add_argument("--from", dest="catalog", choices=["simbad", "ned", "horizons", "mpc", "tns"],
                   help="look NAME up in this catalog (position or orbital elements, aliases, type, redshift)")
    q.add_argument("--near", nargs=2, metavar=("RA", "DEC"),
                   help="with --from tns: add every object TNS reports near this position "
                        "(a negative sexagesimal DEC needs degrees instead, e.g. -12.5)")
    q.add_argument("--radius", type=float, metavar="ARCSEC", help="--near's search radius (default 5)")
    q.add_argument("--ra", help="degrees or sexagesimal hours (10:00:24.1)")
    q.add_argument("--dec", help="degrees or sexagesimal degrees (-12:30:00)")
    q.add_argument("--epoch", type=float, help="Julian year of ra/dec (default J2000)")
    q.add_argument("--pm-ra", type=float, help="proper motion in RA*cos(dec), mas/yr")
    q.add_argument("--pm-dec", type=float, help="proper motion in Dec, mas/yr")
    q.add_argument("--parallax", type=float, help="mas")
    q.add_argument("--distance", type=float, help="pc")
    q.add_argument("--scheme", help="orbital elements: MPC_MINOR_PLANET, MPC_COMET or JPL_MAJOR_PLANET")
    from tomd.targets.model import ELEMENT_FIELDS

    for f in ELEMENT_FIELDS:
        q.add_argument(f"--{f}", type=float, help=argparse.SUPPRESS)
    q.add_argument("--alias", action="append", help="another name (repeatable)")
    q.add_argument("--tag", action="append", help="a tag (repeatable)")
    q.add_argument("--list", action="append", help="a target list (repeatable)")
    q.add_argument("--extra", action="append", metavar="KEY=VALUE", help="a typed extra (repeatable)")

    q = leaf(target, "list", cmd_target_list, "list targets")
    q.add_argument("--json", action="store_true")
    q.add_argument("--cone", nargs=3, metavar=("RA", "DEC", "RADIUS_ARCSEC"), help="targets within a cone")
    q.add_argument("--tag")
    q.add_argument("--list")
    q.add_argument("--limit", type=int)

    q = leaf(target, "show", cmd_target_show, "show one target by any of its names")
    q.add_argument("name")
    q.add_argument("--json", action="store_true")

    q = leaf(target, "import", cmd_target_import, "import targets from CSV or ECSV")
    q.add_argument("file")
    q.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    from tomd.data_cli import register_target_plot

    register_target_plot(target)

    q = leaf(target, "export", cmd_target_export, "export targets as CSV or ECSV")
    q.add_argument("--format", choices=["csv", "ecsv"], default="csv")
    q.add_argument("--output", "-o", help="file (default: stdout)")
    q.add_argument("--tag")
    q.add_argument("--list")

    q = leaf(sub, "run", cmd_run, "run the daemon: consume every configured stream until SIGTERM")
    q.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                   help="stop after this many seconds without new messages (demos, tests, catch-up runs)")

    alert = sub.add_parser("alert", help="alerts").add_subparsers(dest="sub", required=True, metavar="SUB")
    q = leaf(alert, "replay", cmd_alert_replay, "ingest saved alerts (Avro, JSON, XML, GCN binary) like the stream")
    q.add_argument("files", nargs="+")
    q.add_argument("--format", choices=REPLAY_FORMATS, metavar="FORMAT",
                   help="alert format: " + ", ".join(REPLAY_FORMATS) + " (default: --stream's, else auto: "
                        "guess from the bytes)")
    q.add_argument("--stream", help="read the files as this configured stream does (its format, "
                                    "localization_max_deg, schema_registry, schema_file)")
    q.add_argument("--localization-max-deg", type=_positive_degrees, metavar="DEG",
                   help="events localised better than this radius become targets (default: the "
                        "stream's localization_max_deg, else 0.1)")
    q.add_argument("--schema-file", metavar="AVSC", help="schema of schemaless Avro files (Fink livestream "
                                                         "dumps; default: the stream's schema_file)")
    q.add_argument("--include-test", action="store_true", help="also ingest mock/test events")
    q.add_argument("--batch-size", type=int, default=200)
    q.add_argument("--retries", type=_retries, default=8, metavar="N",
                   help="times to try a batch again while the database or storage is briefly unavailable "
                        "(SQLite locked by a running daemon, PostgreSQL restarting), waiting 0.5 s, 1 s, 2 s ... "
                        "up to 30 s between tries (default 8: about 1.5 min); then the replay stops naming "
                        "the file")
    q.add_argument("--no-progress", action="store_true")
    q = leaf(alert, "dead-letters", cmd_alert_dead_letters, "list messages that could not be ingested")
    q.add_argument("--json", action="store_true")
    q.add_argument("--all", action="store_true", help="include resolved ones")
    q = leaf(alert, "retry-dead-letters", cmd_alert_retry_dead_letters, "parse dead letters again and ingest them")
    q.add_argument("--stream", help="only this stream's letters")

    # Later stages bring their own command groups; each module adds them here.
    from tomd.data_cli import register as register_data
    from tomd.facilities.cli import register as register_facilities
    from tomd.rules.cli import register as register_rules

    register_rules(sub)
    register_facilities(sub)
    register_data(sub)
    from tomd.hooks.cli import register as register_hooks
    from tomd.notify_cli import register as register_notify

    register_hooks(sub)
    register_notify(sub)

    q = leaf(sub, "demo", cmd_demo, "run the whole pipeline on embedded defaults and summarise")
    q.add_argument("--workdir", default="demo-work", help="where the demo keeps its database and files")
    return p


def _setup_logging(args, app: App) -> None:
    fmt = args.log_format
    level = logging.DEBUG if args.verbose else logging.INFO
    if fmt is None:
        try:
            fmt = app.config.logging.format
            level = logging.DEBUG if args.verbose else getattr(logging, app.config.logging.level)
        except TomdError:
            fmt = "text"  # a bad config is reported by the command itself
    from tomd.logs import configure

    configure(fmt=fmt, level=level)


_NEGATIVE_ANGLE = re.compile(r"^-\d[\d:.hdms'\"°]*$")


def _protect_negative_angles(argv: Sequence[str]) -> list[str]:
    # argparse takes "-12:30:00" for an option; a leading space hides it
    # (angle parsing strips it). No tomd option starts with a digit.
    return [f" {a}" if _NEGATIVE_ANGLE.match(a) else a for a in argv]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_protect_negative_angles(sys.argv[1:] if argv is None else argv))
    app = App(args.config)
    try:
        if args.func is not cmd_config_check:
            _setup_logging(args, app)
        code = args.func(app, args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return code
    except BrokenPipeError:
        return _reader_gone()
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    except (UserError, DatabaseNotReady) as exc:
        print(f"tomd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """``tomd data list --json | head -1``: the reader closed the pipe. Quiet, as Unix tools are
    (they die of SIGPIPE: the shell sees 128 + 13). stdout now points at /dev/null, so the
    interpreter's flush at exit finds nowhere to fail (it would print a second traceback)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
