"""Data-quality check on new FITS images.

On every ``data.stored`` event for an image product in FITS, the file is read
from storage (local or S3, through ``ctx.local_copy``) and checked:

- the header has the keywords in ``required`` (default DATE-OBS, EXPTIME, FILTER);
- the image is not blank (pixel standard deviation > 0);
- at most ``max_bad_fraction`` (default 5 %) of the pixels are NaN/inf or
  saturated (``SATURATE`` from the header, else ``saturation``, default 60000).

A good image tags the target ``dq-ok``; a bad one tags it ``dq-failed`` and
sends the problems to ``channel`` (default "log"). Settings:
``[hooks.settings.data_quality]``. :func:`inspect_fits` is pure and can be
used on its own.
"""

from __future__ import annotations

from pathlib import Path

from tomd.hooks import on

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fits.gz")
DEFAULT_REQUIRED = ("DATE-OBS", "EXPTIME", "FILTER")


def inspect_fits(path: str | Path, *, required=DEFAULT_REQUIRED, max_bad_fraction: float = 0.05,
                 saturation: float | None = 60000.0) -> tuple[list[str], dict[str, float]]:
    """(problems, stats) of the first image HDU in ``path``; no problems means it looks usable."""
    import numpy as np
    from astropy.io import fits

    problems: list[str] = []
    with fits.open(path, memmap=False) as hdul:
        hdu = next((h for h in hdul if h.is_image and h.data is not None and h.data.ndim >= 2), None)
        if hdu is None:
            return ["no image data in any HDU"], {}
        header = hdu.header
        primary = hdul[0].header
        missing = [k for k in required if k not in header and k not in primary]
        if missing:
            problems.append("missing header keyword(s): " + ", ".join(missing))
        data = np.asarray(hdu.data, dtype=float)
        sat = header.get("SATURATE", primary.get("SATURATE", saturation))
    finite = np.isfinite(data)
    n = data.size
    bad = n - int(finite.sum())
    saturated = int((data[finite] >= float(sat)).sum()) if sat is not None else 0
    std = float(np.std(data[finite])) if finite.any() else 0.0
    stats = {"pixels": float(n), "nonfinite": float(bad), "saturated": float(saturated),
             "median": float(np.median(data[finite])) if finite.any() else float("nan"), "std": std}
    if std == 0.0:
        problems.append("blank image (all finite pixels equal)")
    frac = (bad + saturated) / n if n else 1.0
    if frac > max_bad_fraction:
        problems.append(f"{frac:.1%} of pixels are NaN/inf or saturated (limit {max_bad_fraction:.0%})")
    return problems, stats


@on("data.stored", timeout="5m", max_attempts=3)
def check_fits(ctx):
    ev = ctx.event
    if ev.product_kind != "image" or not ev.filename.lower().endswith(FITS_SUFFIXES):
        return
    cfg = ctx.settings
    with ctx.local_copy(ev.storage_key) as path:
        problems, stats = inspect_fits(path, required=tuple(cfg.get("required", DEFAULT_REQUIRED)),
                                       max_bad_fraction=float(cfg.get("max_bad_fraction", 0.05)),
                                       saturation=cfg.get("saturation", 60000.0))
    ctx.log.info("%s: %s", ev.filename, "ok" if not problems else "; ".join(problems))
    if ev.target_id is not None:
        ctx.tag("dq-failed" if problems else "dq-ok")
    if problems:
        name = ctx.target.name if ctx.target else f"product {ev.product_id}"
        ctx.notify(cfg.get("channel", "log"), f"Data quality: {ev.filename} of {name} failed",
                   "\n".join(problems), level="warning",
                   fields=[("facility", ev.facility), ("product", ev.product_id),
                           ("median", f"{stats.get('median', float('nan')):.1f}"),
                           ("std", f"{stats.get('std', 0.0):.1f}")])
