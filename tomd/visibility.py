"""Is a target observable from a facility's sites soon? Fast enough for every alert.

The expensive astronomy is done once per UTC day, for all sites together:
astropy/ERFA give, on a 10-minute grid, the Sun and Moon positions, the
apparent (Greenwich) sidereal time and the ICRS → true-equator-of-date
rotation. Per target and site the altitude is then plain vectorised
hour-angle arithmetic (sin alt = sin φ sin δ + cos φ cos δ cos H) on that
grid. Offline by design: IERS tables are never downloaded (UT1 is taken as
UTC, < 1 s, i.e. < 0.004°); refraction is ignored like astropy's AltAz
without pressure. tests/test_visibility.py checks the result against
astropy's AltAz to a small fraction of a degree.

LCO's sites are built in, keyed by facility kind (``lco``: the 1 m/2 m/0.4 m
network; ``soar``: SOAR at Cerro Pachón).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

STEP_MIN = 10.0
_STEPS_PER_DAY = int(24 * 60 / STEP_MIN)

#: The longest window visibility is computed over: 14 days. Rule expressions must do bounded work
#: (``visible("lco", hours=1e6)`` would otherwise compute a day's Sun and Moon for 40000 days, per
#: alert), so ``rule check`` refuses a literal ``hours=`` or an ``[observe] window`` (with ``visible``)
#: above it, and every call here clamps its window to it (an hours value computed at run time too).
#: Two weeks covers a request's window and one lunation's dark half.
MAX_WINDOW_DAYS = 14
MAX_WINDOW_HOURS = MAX_WINDOW_DAYS * 24.0
#: Days kept computed: the UTC days one window of the maximum touches (a window starting mid-day spans
#: MAX_WINDOW_DAYS + 1 of them) and the next, into which the window moves as the clock passes midnight.
DAY_CACHE = MAX_WINDOW_DAYS + 2


@dataclass(frozen=True)
class Site:
    code: str
    name: str
    lat: float  # degrees, geodetic
    lon: float  # degrees east
    height: float  # metres


SITES: dict[str, Site] = {s.code: s for s in (
    Site("ogg", "Haleakala Observatory, Maui", 20.7069, -156.2575, 3055.0),
    Site("coj", "Siding Spring Observatory", -31.2733, 149.0706, 1116.0),
    Site("lsc", "Cerro Tololo Inter-American Observatory", -30.1674, -70.8048, 2198.0),
    Site("cpt", "South African Astronomical Observatory, Sutherland", -32.3806, 20.8101, 1460.0),
    Site("tfn", "Teide Observatory, Tenerife", 28.3000, -16.5111, 2330.0),
    Site("elp", "McDonald Observatory", 30.6801, -104.0151, 2027.0),
    Site("tlv", "Wise Observatory, Mitzpe Ramon", 30.5958, 34.7633, 875.0),
    Site("sor", "SOAR, Cerro Pachón", -30.2378, -70.7337, 2713.0),
    Site("gn", "Gemini North, Maunakea", 19.8238, -155.46905, 4213.0),
    Site("gs", "Gemini South, Cerro Pachón", -30.24075, -70.736694, 2722.0),
)}

#: Sites per facility kind (config ``facilities.NAME.kind``). A "sim"
#: facility observes from every LCO site.
FACILITY_SITES: dict[str, tuple[str, ...]] = {
    "lco": ("ogg", "coj", "lsc", "cpt", "tfn", "elp", "tlv"),
    "soar": ("sor",),
    "gemini": ("gn", "gs"),  # a program's prefix narrows it to one (tomd.rules.load.RuleEnv.site_keys)
    "gemini-gn": ("gn",),
    "gemini-gs": ("gs",),
    "sim": ("ogg", "coj", "lsc", "cpt", "tfn", "elp", "tlv"),
}


def _configure_astropy_offline() -> None:
    from astropy.utils import iers

    iers.conf.auto_download = False  # Invariant 8: no hidden network
    try:
        iers.conf.iers_degraded_accuracy = "warn"
    except AttributeError:  # older astropy
        pass


@dataclass(frozen=True)
class Day:
    """The 10-minute grid of one UTC day (MJD ``mjd0`` .. ``mjd0 + 1``), for every site."""

    mjd0: int
    mjd: np.ndarray  # (N,)
    gast: np.ndarray  # radians, apparent Greenwich sidereal time (UT1 ~ UTC)
    rot: np.ndarray  # 3x3 ICRS → true equator and equinox of date (mid-day)
    sun_ra: np.ndarray  # true-of-date, radians
    sun_dec: np.ndarray
    moon_ra: np.ndarray
    moon_dec: np.ndarray
    moon_xyz: np.ndarray  # (3, N) unit vectors, ICRS-aligned (GCRS)


def _compute_day(mjd0: int) -> Day:
    import erfa
    from astropy.coordinates import get_body
    from astropy.time import Time

    _configure_astropy_offline()
    mjd = mjd0 + np.arange(_STEPS_PER_DAY + 1) * (STEP_MIN / 1440.0)
    t = Time(mjd, format="mjd", scale="utc")
    tt = t.tt  # leap seconds from ERFA's built-in table: no network
    # UT1 is taken as UTC (degraded accuracy accepted, < 1 s).
    gast = erfa.gst06a(t.jd1, t.jd2, tt.jd1, tt.jd2)
    mid = len(mjd) // 2
    rot = erfa.pnm06a(tt.jd1[mid], tt.jd2[mid])
    with _quiet():
        sun = get_body("sun", t)
        moon = get_body("moon", t)

    def radec_of_date(c):
        cart = c.cartesian
        xyz = np.array([cart.x.value, cart.y.value, cart.z.value])
        xyz = xyz / np.linalg.norm(xyz, axis=0)
        v = rot @ xyz
        return np.arctan2(v[1], v[0]), np.arcsin(np.clip(v[2], -1, 1)), xyz

    sun_ra, sun_dec, _ = radec_of_date(sun)
    moon_ra, moon_dec, moon_xyz = radec_of_date(moon)
    return Day(mjd0, mjd, gast, rot, sun_ra, sun_dec, moon_ra, moon_dec, moon_xyz)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


_DAYS: OrderedDict[int, Day] = OrderedDict()
_LOCK = threading.Lock()


def day(mjd0: int) -> Day:
    """The cached grid of one UTC day (computed once; the last ``DAY_CACHE`` days used are kept)."""
    with _LOCK:
        d = _DAYS.get(mjd0)
        if d is not None:
            _DAYS.move_to_end(mjd0)
            return d
    d = _compute_day(mjd0)
    with _LOCK:
        _DAYS[mjd0] = d
        while len(_DAYS) > DAY_CACHE:
            _DAYS.popitem(last=False)
    return d


def _altitude(lat: float, lon: float, gast: np.ndarray, ra: np.ndarray | float, dec: np.ndarray | float) -> np.ndarray:
    """Altitude (radians) from true-of-date ra/dec (radians), site in degrees."""
    phi = math.radians(lat)
    h = gast + math.radians(lon) - ra
    return np.arcsin(np.clip(math.sin(phi) * np.sin(dec) + math.cos(phi) * np.cos(dec) * np.cos(h), -1.0, 1.0))


def _of_date(rot: np.ndarray, ra_deg: float, dec_deg: float) -> tuple[float, float, np.ndarray]:
    r, d = math.radians(ra_deg), math.radians(dec_deg)
    xyz = np.array([math.cos(d) * math.cos(r), math.cos(d) * math.sin(r), math.sin(d)])
    v = rot @ xyz
    return math.atan2(v[1], v[0]), math.asin(max(-1.0, min(1.0, v[2]))), xyz


def altitude_deg(site: Site, ra: float, dec: float, mjd: float) -> float:
    """Altitude (degrees) of an ICRS position from ``site`` at ``mjd`` (UTC), by the fast path."""
    d = day(int(math.floor(mjd)))
    import erfa
    from astropy.time import Time

    t = Time(mjd, format="mjd", scale="utc")
    tt = t.tt
    gast = erfa.gst06a(t.jd1, t.jd2, tt.jd1, tt.jd2)
    r, dd, _ = _of_date(d.rot, ra, dec)
    return float(np.degrees(_altitude(site.lat, site.lon, np.asarray(gast), r, dd)))


@dataclass(frozen=True)
class Visibility:
    visible: bool
    site: str | None = None  # first site where it is
    mjd: float | None = None  # first time it is (UTC)
    airmass: float | None = None  # best airmass in dark time over the window, over all sites
    best_site: str | None = None
    moon_distance_deg: float | None = None  # at the best time
    reason: str = ""
    window_hours: float | None = None  # the window evaluated: the one asked for, at most MAX_WINDOW_HOURS

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("visible", "site", "mjd", "airmass", "best_site",
                                              "moon_distance_deg", "reason", "window_hours")}


def window_hours(hours: float) -> float:
    """The window evaluated for ``hours``: at most ``MAX_WINDOW_HOURS``, so one call's work is bounded
    whatever the rule computed (``hours=target.age_days * 1e6``, infinity). NaN is an error."""
    if isinstance(hours, bool) or not isinstance(hours, (int, float, np.integer, np.floating)):
        raise TypeError(f"visibility window: hours must be a number, got {hours!r}")
    h = float(hours)
    if math.isnan(h):
        raise ValueError("visibility window: hours is not a number (NaN)")
    return min(h, MAX_WINDOW_HOURS)


@dataclass(frozen=True)
class _Window:
    """The grid of one window for a set of sites: everything that does not depend on the target."""

    mjd: np.ndarray  # (N,)
    gast: np.ndarray  # (N,)
    rot: np.ndarray  # 3x3, at the window's first day
    moon_xyz: np.ndarray  # (3, N)
    dark: np.ndarray  # (S, N) Sun below max_sun_alt
    sin_lat: np.ndarray  # (S, 1)
    cl_cos_lst: np.ndarray  # (S, N) cos(lat) cos(local sidereal time)
    cl_sin_lst: np.ndarray  # (S, N) cos(lat) sin(local sidereal time)
    codes: tuple[str, ...]
    hours: float  # the window's length as evaluated (clamped to MAX_WINDOW_HOURS)


_WINDOWS: OrderedDict[tuple, _Window] = OrderedDict()


def _window(sites: tuple[str, ...], start_mjd: float, hours: float, max_sun_alt: float) -> _Window | None:
    """Cached per (sites, start rounded down to the grid step, hours, Sun limit): alerts arriving in
    the same 10 minutes share it, and only the target-dependent arithmetic is left per alert.
    ``hours`` is clamped to MAX_WINDOW_HOURS: at most MAX_WINDOW_DAYS + 1 days are computed."""
    hours = window_hours(hours)
    step = STEP_MIN / 1440.0
    k0 = math.floor(start_mjd / step)
    key = (sites, k0, hours, max_sun_alt)
    with _LOCK:
        w = _WINDOWS.get(key)
    if w is not None:
        return w
    start, end = k0 * step, start_mjd + hours / 24.0
    parts = []
    for m0 in range(int(math.floor(start)), int(math.floor(end)) + 1):
        d = day(m0)
        sel = (d.mjd >= start - 1e-9) & (d.mjd <= end)
        if m0 < int(math.floor(end)):
            sel &= d.mjd < m0 + 1  # the next day's grid starts with that instant
        if sel.any():
            parts.append((d, sel))
    if not parts:
        return None
    mjd = np.concatenate([d.mjd[sel] for d, sel in parts])
    gast = np.concatenate([d.gast[sel] for d, sel in parts])
    sun_ra = np.concatenate([d.sun_ra[sel] for d, sel in parts])
    sun_dec = np.concatenate([d.sun_dec[sel] for d, sel in parts])
    moon = np.concatenate([d.moon_xyz[:, sel] for d, sel in parts], axis=1)
    ss = [SITES[c] for c in sites]
    lat = np.radians([[x.lat] for x in ss])
    lon = np.radians([[x.lon] for x in ss])
    sin_lat, cos_lat = np.sin(lat), np.cos(lat)
    sun_alt = np.arcsin(np.clip(sin_lat * np.sin(sun_dec) + cos_lat * np.cos(sun_dec) * np.cos(gast + lon - sun_ra),
                                -1, 1))
    lst = gast + lon  # (S, N)
    w = _Window(mjd, gast, parts[0][0].rot, moon, sun_alt <= math.radians(max_sun_alt), sin_lat,
                cos_lat * np.cos(lst), cos_lat * np.sin(lst), tuple(sites), hours)
    with _LOCK:
        _WINDOWS[key] = w
        while len(_WINDOWS) > 256:
            _WINDOWS.popitem(last=False)
    return w


def observability(sites: Iterable[str], ra: float, dec: float, start_mjd: float, hours: float = 24.0, *,
                  max_airmass: float = 2.0, min_moon_deg: float = 30.0, max_sun_alt: float = -12.0) -> Visibility:
    """Is (ra, dec) observable from any of ``sites`` in [start, start + hours]?

    Observable at a grid time: Sun below ``max_sun_alt``, target airmass
    (sec z) at most ``max_airmass`` and the Moon at least ``min_moon_deg`` away.
    A window longer than ``MAX_WINDOW_HOURS`` is cut to it (``window_hours`` of the answer).
    """
    if ra is None or dec is None:
        return Visibility(False, reason="the target has no position")
    w = _window(tuple(sites), start_mjd, hours, max_sun_alt)
    if w is None:
        return Visibility(False, reason="empty window", window_hours=window_hours(hours))
    r, dd, xyz = _of_date(w.rot, ra, dec)
    # sin alt = sin φ sin δ + cos φ cos δ cos(LST − α), with cos(LST − α) expanded: no trig on arrays.
    cd = math.cos(dd)
    sin_alt = w.sin_lat * math.sin(dd) + (w.cl_cos_lst * (cd * math.cos(r)) + w.cl_sin_lst * (cd * math.sin(r)))
    cosm = xyz @ w.moon_xyz  # (N,)
    return _verdict(w, sin_alt, cosm, max_airmass, min_moon_deg, max_sun_alt)


def _verdict(w: _Window, sin_alt: np.ndarray, cosm: np.ndarray, max_airmass: float, min_moon_deg: float,
             max_sun_alt: float) -> Visibility:
    """The answer from the target's sin(altitude) (S, N) and cos(Moon distance) (N,) on the window's grid."""
    moon_ok = cosm <= math.cos(math.radians(min_moon_deg))
    usable = w.dark & moon_ok  # (S, N)
    min_sin = 1.0 / max_airmass if max_airmass >= 1.0 else 1.0
    ok = usable & (sin_alt >= min_sin)
    best_flat = int(np.argmax(np.where(usable, sin_alt, -2.0)))
    s_best, n_best = divmod(best_flat, sin_alt.shape[1])
    best = float(sin_alt[s_best, n_best]) if usable[s_best, n_best] else -1.0
    airmass = 1.0 / best if best > 0.01 else None
    best_site = w.codes[s_best] if best > -1.0 else None
    best_moon = float(np.degrees(np.arccos(np.clip(cosm[n_best], -1, 1)))) if best > -1.0 else None
    if ok.any():
        cols = ok.any(axis=0)
        n = int(np.argmax(cols))
        s = int(np.argmax(ok[:, n]))
        return Visibility(True, w.codes[s], float(w.mjd[n]), airmass, best_site, best_moon, "", w.hours)
    if not w.dark.any():
        why = f"no dark time (Sun below {max_sun_alt:g}°) in the window"
    elif not (w.dark & (sin_alt >= min_sin)).any():
        why = f"never at airmass <= {max_airmass:g} in dark time"
    else:
        why = f"the Moon is within {min_moon_deg:g}° whenever it is high enough"
    return Visibility(False, None, None, airmass, best_site, best_moon, why, w.hours)


def moon_distance_deg(ra: float, dec: float, mjd: float) -> float:
    """Separation of the Moon (geocentric) from (ra, dec) at ``mjd``, degrees (grid-interpolated)."""
    d = day(int(math.floor(mjd)))
    i = int(round((mjd - d.mjd0) * 1440.0 / STEP_MIN))
    _, _, xyz = _of_date(d.rot, ra, dec)
    return float(np.degrees(np.arccos(np.clip(xyz @ d.moon_xyz[:, i], -1, 1))))


# ---- solar-system targets ----
# A target with orbital elements moves: its position is propagated
# (tomd.orbits, offline two-body) to every grid time of the window, and the
# same altitude arithmetic runs with a per-time ra/dec. Positions are cached
# per (orbit, window grid), so the alerts of one 10-minute step share them.

_TRACKS: OrderedDict[tuple, np.ndarray] = OrderedDict()


_EARTH_RADIUS_AU = 6378.137 / 149597870.7


def _track(orbit, mjd: np.ndarray) -> np.ndarray:
    """(3, N) geocentric ICRS positions (au) of ``orbit`` at the grid times ``mjd``."""
    key = (orbit, float(mjd[0]), len(mjd))
    with _LOCK:
        xyz = _TRACKS.get(key)
    if xyz is None:
        with _quiet():
            xyz = orbit.geocentric(mjd)
        with _LOCK:
            _TRACKS[key] = xyz
            while len(_TRACKS) > 256:
                _TRACKS.popitem(last=False)
    return xyz


def observability_orbit(sites: Iterable[str], orbit, start_mjd: float, hours: float = 24.0, *,
                        max_airmass: float = 2.0, min_moon_deg: float = 30.0,
                        max_sun_alt: float = -12.0) -> Visibility:
    """``observability`` for a solar-system target given by a ``tomd.orbits.Orbit``.

    Topocentric: each site sees the object from its own place on the Earth
    (spherical Earth; what matters for near-Earth objects), so the altitude
    is that of the site-to-object vector, in the true equator of date where
    the site's direction is (cos φ cos LST, cos φ sin LST, sin φ).
    """
    w = _window(tuple(sites), start_mjd, hours, max_sun_alt)
    if w is None:
        return Visibility(False, reason="empty window", window_hours=window_hours(hours))
    geo = _track(orbit, w.mjd)  # (3, N) au
    v = w.rot @ geo  # true equator and equinox of date
    x = v[0] - _EARTH_RADIUS_AU * w.cl_cos_lst  # (S, N): from each site
    y = v[1] - _EARTH_RADIUS_AU * w.cl_sin_lst
    z = v[2] - _EARTH_RADIUS_AU * w.sin_lat
    sin_alt = (x * w.cl_cos_lst + y * w.cl_sin_lst + z * w.sin_lat) / np.sqrt(x * x + y * y + z * z)
    unit = geo / np.linalg.norm(geo, axis=0)
    cosm = np.einsum("ij,ij->j", unit, w.moon_xyz)
    return _verdict(w, sin_alt, cosm, max_airmass, min_moon_deg, max_sun_alt)


def orbit_radec(orbit, mjd: float) -> tuple[float, float]:
    """Geocentric astrometric (ra, dec) degrees of ``orbit`` at ``mjd`` (UTC)."""
    with _quiet():
        ra, dec = orbit.radec(mjd)
    return float(ra[0]), float(dec[0])
