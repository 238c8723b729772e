"""``tomd data …`` and ``tomd target plot``: the data-product commands.

Wired by ``tomd.cli.build_parser``::

    from tomd import data_cli
    data_cli.register(sub)               # adds the ``data`` group
    data_cli.register_target_plot(target)  # adds ``plot`` under ``target``

Each command is ``cmd_*(app, args) -> exit status`` like the others in
``tomd.cli``; ``app`` offers ``config`` and ``sessions``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _storage(app):
    from tomd.storage import storage_from_config

    return storage_from_config(app.config.storage)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _request_id(app, key: str) -> int:
    """An observation request by ``#ID``, id or name (as ``tomd obs show`` takes it)."""
    from tomd.facilities.cli import _find_row

    with app.sessions() as s:
        return _find_row(s, key).id


def cmd_data_list(app, args) -> int:
    from tomd.products import list_products

    rid = _request_id(app, args.request) if getattr(args, "request", None) else None
    rows = list_products(app.sessions, args.target, request_id=rid)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no data products", file=sys.stderr)
        return 0
    table = [[str(r["id"]), r["target"] or (f"notice #{r['notice_id']}" if r["notice_id"] else "-"), r["kind"],
              r["facility"], f"#{r['request_id']}" if r["request_id"] else "-", r["filename"], _size(r["size"]),
              r["state"] + (f" ({r['attempts']} tries)" if r["state"] == "failed" else ""),
              (r["stored_at"] or "-")[:19]]
             for r in rows]
    heads = ["id", "target", "kind", "facility", "request", "file", "size", "state", "stored (UTC)"]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip())
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    for r in rows:
        if r["state"] != "stored" and r.get("error"):
            print(f"  #{r['id']} {r['filename']}: {r['error']}", file=sys.stderr)
    return 0


def _retriever(app, facility: str):
    """A Retriever over the one facility a download needs (its client closed by the caller)."""
    from tomd.facilities import open_facilities
    from tomd.retrieve import Retriever

    facilities = open_facilities(app.config, only=facility)
    if facility not in facilities:
        facilities.close()
        from tomd.errors import ConfigError

        raise ConfigError(f"facility {facility!r} is not configured: add [facilities.{facility}]")
    return facilities, Retriever(app.sessions, facilities, _storage(app))


def _show_product(o, storage) -> str:
    if o.state == "stored":
        return f"stored {o.filename} ({_size(o.size)}, md5 {o.md5}) → {storage.describe(o.storage_key)}"
    if o.state == "already":
        return f"already stored: {o.filename}"
    if o.state == "skipped":
        return f"being fetched by another worker: {o.filename}"
    return f"failed {o.filename}: {o.error}"


def cmd_data_download(app, args) -> int:
    """Fetch a request's missing products (--request), or one product again (ID), now."""
    from tomd.db import repository as repo
    from tomd.errors import InputError, NotFoundError

    if (args.id is None) == (args.request is None):
        raise InputError("give a data product ID or --request R (one of them)")
    if args.request is not None:
        rid = _request_id(app, args.request)
        with app.sessions() as s:
            facility = repo.get_observation(s, rid).facility
    else:
        with app.sessions() as s:
            row = repo.get_data_product_by_id(s, int(str(args.id).lstrip("#")))
            if row is None:
                raise NotFoundError(f"no data product #{args.id} (see tomd data list)")
            facility = row.facility
    facilities, r = _retriever(app, facility)
    try:
        if args.request is not None:
            out = r.fetch_request(rid)
            for o in out.products:
                print(_show_product(o, r.storage), file=sys.stdout if o.state != "failed" else sys.stderr)
            print(f"request #{rid}: {out.stored} stored now, {out.already} already stored, {out.failed} not stored"
                  + (f" ({out.message})" if out.state != "done" else ""))
            return 0 if out.state == "done" else 1
        o = r.fetch_product(row.id)
        print(_show_product(o, r.storage), file=sys.stdout if o.state != "failed" else sys.stderr)
        return 0 if o.state in ("stored", "already") else 1
    finally:
        r.close()
        facilities.close()


def cmd_data_upload(app, args) -> int:
    from tomd.products import upload

    report = upload(app.sessions, _storage(app), args.target, args.file, args.type)
    for line in report.errors:
        print(line, file=sys.stderr)
    what = f"{args.file} → {report.target_name} (#{report.target_id}), {report.kind}"
    if report.kind == "photometry":
        print(f"{what}: {report.stored} points stored, {report.duplicates} already stored, "
              f"{len(report.errors)} bad rows of {report.rows}")
    if report.product is not None:
        state = "stored" if report.product.created else "already stored"
        print(f"{what if report.kind != 'photometry' else '  file'}: {state} as data product "
              f"#{report.product.id} ({_size(report.product.size)}, md5 {report.product.md5})")
        meta = {k: v for k, v in report.meta.items() if k in ("DATE-OBS", "FILTER", "EXPTIME", "INSTRUME",
                                                               "TELESCOP", "OBJECT", "note")}
        if meta:
            print("  " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    return 0 if report.ok else 1


def cmd_data_export(app, args) -> int:
    from tomd.products import export_photometry

    text = export_photometry(app.sessions, args.target, args.format)
    if args.output and args.output != "-":
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_target_plot(app, args) -> int:
    from tomd.products import plot_light_curve

    out = plot_light_curve(app.sessions, args.name, args.output, title=args.title)
    print(f"wrote {out}")
    return 0


def _leaf(parent, name: str, func, help_: str) -> argparse.ArgumentParser:
    q = parent.add_parser(name, help=help_, description=help_)
    q.set_defaults(func=func)
    return q


def register(subparsers: Any) -> None:
    """Add the ``data`` command group to tomd's top-level subparsers."""
    data = subparsers.add_parser("data", help="data products: list, download, upload, export").add_subparsers(
        dest="sub", required=True, metavar="SUB")
    q = _leaf(data, "list", cmd_data_list, "list stored data products (downloads, uploads, skymaps)")
    q.add_argument("--target", help="only this target's products (any name, or #ID)")
    q.add_argument("--request", help="only this observation request's products (#ID or name)")
    q.add_argument("--json", action="store_true")
    q = _leaf(data, "download", cmd_data_download,
              "fetch products from the facility's archive now: a request's missing ones, or one again")
    q.add_argument("id", nargs="?", help="a data product's id (from tomd data list): fetch it again")
    q.add_argument("--request", help="an observation request (#ID or name): fetch what is not stored yet")
    q = _leaf(data, "upload", cmd_data_upload,
              "upload photometry (CSV/ECSV), a FITS image or a spectrum for a target")
    q.add_argument("target", help="target name (any alias) or #ID")
    q.add_argument("file")
    q.add_argument("--type", choices=["photometry", "spectroscopy", "image"],
                   help="kind of file (default: from the name: .csv/.ecsv photometry, .fits image)")
    q = _leaf(data, "export", cmd_data_export, "export a target's photometry (MJD UTC, AB mag, flux nJy)")
    q.add_argument("target", help="target name (any alias) or #ID")
    q.add_argument("--format", choices=["csv", "ecsv"], default="csv")
    q.add_argument("--output", "-o", help="file (default: stdout)")


def register_target_plot(target_subparsers: Any) -> None:
    """Add ``plot`` under the ``target`` group (pass the group's subparsers object)."""
    q = _leaf(target_subparsers, "plot", cmd_target_plot, "plot a target's light curve to a PNG (or PDF/SVG)")
    q.add_argument("name", help="target name (any alias) or #ID")
    q.add_argument("--output", "-o", required=True, help="image file: .png, .pdf or .svg")
    q.add_argument("--title", help="plot title (default: the target's name)")
