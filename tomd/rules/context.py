"""What a rule expression reads, built once per alert and shared by every rule.

Pure: these classes take plain values (the stored alert, the target row, its
photometry) and never touch the database. Light-curve features are computed
on first use only, so rules that do not read them do not pay for them.

Magnitudes are AB; times are MJD (UTC); rates are magnitudes per day, with
``rise_rate`` positive while brightening and ``decline_rate`` positive while
fading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple

from tomd import visibility
from tomd.alerts.model import payload_dict

_UNIX_MJD = 40587.0  # MJD of 1970-01-01T00:00 UTC (calendar fact, not a time-scale offset)


def mjd_of(t: datetime) -> float:
    """MJD (UTC) of an aware datetime."""
    return t.timestamp() / 86400.0 + _UNIX_MJD


class Point(NamedTuple):
    """One stored photometry point (what the features need of it).

    A named tuple, not a frozen dataclass: a batch's rules read thousands of them, and a frozen
    dataclass's ``__init__`` (object.__setattr__ per field) costs 2.7× a named tuple's ``_make`` (0.54 vs 0.20 µs).
    """

    mjd: float
    band: str
    kind: str  # detection | upper_limit | forced
    mag: float | None = None
    limit: float | None = None


def _short(band: str) -> str | None:
    for prefix in ("ztf", "lsst", "ps1", "atlas", "sdss"):
        if band.startswith(prefix) and len(band) > len(prefix):
            return band[len(prefix):]
    return None


def _slope(pts: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares d(mag)/d(day); None with fewer than 2 points or no time baseline."""
    n = len(pts)
    if n < 2:
        return None
    if n == 2:
        (t0, m0), (t1, m1) = pts
        return (m1 - m0) / (t1 - t0) if t1 - t0 >= 1e-3 else None
    mt = sum(p[0] for p in pts) / n
    mm = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mt) ** 2 for p in pts)
    if sxx < 1e-6:  # all within ~a minute
        return None
    return sum((p[0] - mt) * (p[1] - mm) for p in pts) / sxx


def lightcurve_features(points: Sequence[Point], now_mjd: float) -> dict[str, Any]:
    """Features of a light curve (points in any order). Missing ones are None."""
    det = [(p.mjd, p.mag, p.band) for p in points
           if p.kind == "detection" and p.mag is not None and p.mag == p.mag and abs(p.mag) != math.inf]
    det.sort()
    n_ul = sum(1 for p in points if p.kind == "upper_limit")
    f: dict[str, Any] = {
        "n_detections": len(det), "n_upper_limits": n_ul,
        "first_detection": None, "last_detection": None, "age_days": None, "since_last_days": None,
        "peak_mag": None, "peak_mjd": None, "peak_band": None, "last_mag": None, "last_band": None,
        "rise_rate": None, "decline_rate": None,
        "rise_rates": {}, "decline_rates": {}, "peak_mags": {}, "last_mags": {},
    }
    if not det:
        return f
    first, last = det[0], det[-1]
    peak = det[0]
    by_band: dict[str, list[tuple[float, float]]] = {}
    for d in det:
        if d[1] < peak[1]:
            peak = d
        by_band.setdefault(d[2], []).append((d[0], d[1]))
    f.update(first_detection=first[0], last_detection=last[0], age_days=now_mjd - first[0],
             since_last_days=now_mjd - last[0], peak_mag=peak[1], peak_mjd=peak[0], peak_band=peak[2],
             last_mag=last[1], last_band=last[2])
    rises, declines, peaks, lasts = f["rise_rates"], f["decline_rates"], f["peak_mags"], f["last_mags"]
    latest_of_short: dict[str, float] = {}
    rise = decline = None
    for band, pts in by_band.items():
        i_peak = 0
        for i in range(1, len(pts)):
            if pts[i][1] < pts[i_peak][1]:
                i_peak = i
        s_rise = _slope(pts[:i_peak + 1])
        s_decl = _slope(pts[i_peak:])
        r = -s_rise if s_rise is not None else None
        if r is not None and (rise is None or r > rise):
            rise = r
        if s_decl is not None and (decline is None or s_decl > decline):
            decline = s_decl
        keys = [band]
        short = _short(band)
        # "g" is the g band of whichever survey saw the object last in g.
        if short and pts[-1][0] >= latest_of_short.get(short, -math.inf):
            latest_of_short[short] = pts[-1][0]
            keys.append(short)
        for k in keys:
            if r is not None:
                rises[k] = r
            if s_decl is not None:
                declines[k] = s_decl
            peaks[k], lasts[k] = pts[i_peak][1], pts[-1][1]
    f["rise_rate"], f["decline_rate"] = rise, decline
    return f


def color(points: Sequence[Point], band1: str, band2: str, max_dt_days: float = 1.0) -> float | None:
    """mag(band1) - mag(band2) from the latest pair of detections within ``max_dt_days`` of each other.

    A band matches its full name ("ztfg") or its short name ("g").
    """
    a, b = [], []
    for p in points:
        if p.kind != "detection" or p.mag is None:
            continue
        if p.band == band1 or _short(p.band) == band1:
            a.append((p.mjd, p.mag))
        elif p.band == band2 or _short(p.band) == band2:
            b.append((p.mjd, p.mag))
    if not a or not b:
        return None
    a.sort()
    b.sort()
    best = None
    j = 0
    for t, m in a:  # both sorted: the nearest b moves forward only
        while j + 1 < len(b) and abs(b[j + 1][0] - t) <= abs(b[j][0] - t):
            j += 1
        tb, mb = b[j]
        if abs(tb - t) <= max_dt_days and (best is None or max(t, tb) >= best[0]):
            best = (max(t, tb), m - mb)
    return best[1] if best else None


class AlertView:
    """``alert.*`` in expressions: the normalised alert's fields, plus ``fields`` and ``payload``."""

    def __init__(self, alert, alert_id: int | None = None):
        loc = alert.localization
        self.id = alert_id
        self.source = alert.source
        self.key = alert.key
        self.kind = alert.kind
        self.object_id = alert.object_id
        self.ra = alert.ra if alert.ra is not None else (loc.ra if loc else None)
        self.dec = alert.dec if alert.dec is not None else (loc.dec if loc else None)
        self.ra_err_arcsec = alert.ra_err_arcsec
        self.dec_err_arcsec = alert.dec_err_arcsec
        self.band = alert.band
        self.mag = alert.mag
        self.mag_err = alert.mag_err
        self.flux = alert.flux
        self.flux_err = alert.flux_err
        self.mjd = mjd_of(alert.time)
        self.time = alert.time.isoformat()
        self.event_id = alert.event_id
        self.notice_type = alert.notice_type
        self.retraction = alert.retraction
        self.test = alert.test
        self.error_deg = loc.error_deg if loc else None
        self.area_90_deg2 = loc.area_90_deg2 if loc else None
        self.n_points = len(alert.photometry)
        self.fields = alert.fields if isinstance(alert.fields, dict) else {}
        self._payload = alert.payload  # a dict, or JSON from a parse worker: made a dict when read

    @property
    def payload(self) -> dict:
        p = self._payload
        if type(p) is not dict:
            p = self._payload = payload_dict(p)
        return p


class TargetView:
    """``target.*``: the stored target and its light-curve features (computed on first use).

    ``row`` is the target's column mapping (or None: the alert has no target,
    and every field reads as missing).
    """

    def __init__(self, row: Mapping[str, Any] | None, *, names: Sequence[str] = (), tags: Sequence[str] = (),
                 lists: Sequence[str] = (), points: Sequence[Point] = (), now_mjd: float = 0.0):
        row = row or {}
        self.id = row.get("id")
        self.name = row.get("name")
        self.type = row.get("type")
        self.ra = row.get("ra")
        self.dec = row.get("dec")
        self.gal_l = row.get("gal_l")
        self.gal_b = row.get("gal_b")
        self.distance = row.get("distance")
        self.parallax = row.get("parallax")
        self.extras = dict(row.get("extras") or {})
        self.scheme = row.get("scheme")  # orbital elements: a solar-system target
        self._row = row
        self.names = tuple(names)
        self.tags = frozenset(tags)
        self.lists = frozenset(lists)
        self._points = points
        self._now = now_mjd

    @cached_property
    def points(self) -> tuple[Point, ...]:
        """The target's photometry as Points, made on first use (rows (mjd, band, kind, mag, limit) work too):
        rules that read no light-curve feature do not pay for them."""
        return tuple(p if type(p) is Point else Point._make(p) for p in self._points)

    @cached_property
    def orbit(self):
        """The ``tomd.orbits.Orbit`` of a solar-system target (None for sidereal ones or bad elements)."""
        if not self.scheme:
            return None
        from tomd.orbits import Orbit

        try:
            return Orbit.from_target(self._row)
        except (TypeError, ValueError):
            return None

    @cached_property
    def _lc(self) -> dict[str, Any]:
        return lightcurve_features(self.points, self._now)

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes not set yet: the light-curve features. The first read computes them
        # all and makes each a plain attribute, so every later read (each rule's) is an instance-dict hit.
        # One cached_property per feature cost ~1 µs per feature and alert at its first read (Python
        # 3.11's takes a lock): a rule reading four features paid more for them than for its verdict.
        if name in LIGHTCURVE_FEATURES:
            lc = self._lc
            self.__dict__.update(lc)
            return lc[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


#: ``target.<name>`` read from the light curve (lightcurve_features' keys).
LIGHTCURVE_FEATURES = frozenset({
    "n_detections", "n_upper_limits", "first_detection", "last_detection", "age_days", "since_last_days",
    "peak_mag", "peak_mjd", "peak_band", "last_mag", "last_band", "rise_rate", "decline_rate",
    "rise_rates", "decline_rates", "peak_mags", "last_mags",
})


FeatureFn = Callable[["Context"], Any]
_MISSING = object()


class Context:
    """Everything one alert's rules read. Context functions are the ``fn_*`` methods."""

    def __init__(self, alert: AlertView, target: TargetView, now_mjd: float, *,
                 facility_kinds: Mapping[str, str] | None = None,
                 features: Mapping[str, FeatureFn] | None = None):
        self.alert = alert
        self.target = target
        self.now = now_mjd
        self.facility_kinds = facility_kinds or {}
        self.features = features or {}
        self._cache: dict[Any, Any] = {}
        # What every compiled expression takes, made once per alert (read once per rule).
        self.argv = (alert, target, now_mjd, self)

    def args(self) -> tuple:
        return self.argv

    def sites(self, facility: str) -> tuple[str, ...]:
        kind = self.facility_kinds.get(facility, facility)
        if kind in visibility.FACILITY_SITES:
            return visibility.FACILITY_SITES[kind]
        if kind in visibility.SITES:
            return (kind,)
        raise ValueError(f"no sites known for facility {facility!r} (kind {kind!r})")

    def visibility(self, facility: str, hours: float = 24.0, max_airmass: float = 2.0, min_moon_deg: float = 30.0,
                   max_sun_alt: float = -12.0) -> visibility.Visibility:
        key = ("vis", facility, hours, max_airmass, min_moon_deg, max_sun_alt)
        v = self._cache.get(key)
        if v is None and self.target.orbit is not None:  # a solar-system target moves: follow its orbit
            v = self._cache[key] = visibility.observability_orbit(
                self.sites(facility), self.target.orbit, self.now, hours, max_airmass=max_airmass,
                min_moon_deg=min_moon_deg, max_sun_alt=max_sun_alt)
        if v is None:
            ra = self.target.ra if self.target.ra is not None else self.alert.ra
            dec = self.target.dec if self.target.dec is not None else self.alert.dec
            v = self._cache[key] = visibility.observability(
                self.sites(facility), ra, dec, self.now, hours, max_airmass=max_airmass,
                min_moon_deg=min_moon_deg, max_sun_alt=max_sun_alt)
        return v

    def fn_visible(self, facility, hours=24.0, max_airmass=2.0, min_moon_deg=30.0, max_sun_alt=-12.0) -> bool:
        return self.visibility(facility, hours, max_airmass, min_moon_deg, max_sun_alt).visible

    def fn_airmass(self, facility, hours=24.0, min_moon_deg=0.0, max_sun_alt=-12.0) -> float | None:
        return self.visibility(facility, hours, 100.0, min_moon_deg, max_sun_alt).airmass

    def position(self) -> tuple[float | None, float | None]:
        """Where the target is now: its orbit's position for a solar-system target, else its (or the alert's) ra/dec."""
        if self.target.orbit is not None:
            key = ("position",)
            if key not in self._cache:
                self._cache[key] = visibility.orbit_radec(self.target.orbit, self.now)
            return self._cache[key]
        ra = self.target.ra if self.target.ra is not None else self.alert.ra
        dec = self.target.dec if self.target.dec is not None else self.alert.dec
        return ra, dec

    def fn_moon_distance(self) -> float | None:
        ra, dec = self.position()
        if ra is None or dec is None:
            return None
        key = ("moon",)
        if key not in self._cache:
            self._cache[key] = visibility.moon_distance_deg(ra, dec, self.now)
        return self._cache[key]

    def fn_color(self, band1, band2, max_dt_days=1.0) -> float | None:
        key = ("color", band1, band2, max_dt_days)
        v = self._cache.get(key, _MISSING)
        if v is _MISSING:
            v = self._cache[key] = color(self.target.points, band1, band2, max_dt_days)
        return v

    def feature(self, name: str) -> Any:
        """A registered feature's value for this alert: computed once, and so is its error.

        A failing feature raises the same exception to every rule that reads it
        (and to the reason's second look at the clause), without calling it again.
        """
        key = ("feature", name)
        v = self._cache.get(key, _MISSING)
        if v is _MISSING:
            try:
                v = self.features[name](self)
            except Exception as exc:  # noqa: BLE001 - kept and raised again below
                v = _Failed(exc)
            self._cache[key] = v
        if type(v) is _Failed:
            raise v.exc
        return v


class _Failed:
    """A feature's error, kept for the alert's other reads."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception):
        self.exc = exc
