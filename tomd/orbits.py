"""Where a solar-system target is on the sky: two-body propagation of its elements.

Offline and vectorised, for visibility: a target's stored orbital elements
(the LCO portal's schemes, see ``tomd.targets.model``) give its geocentric
astrometric ICRS position (what JPL Horizons calls "Astrometric RA & DEC") at
any UTC time. Heliocentric conic motion around the Sun (Gaussian constant),
elements referred to the ecliptic and equinox of J2000 (obliquity 84381.448″,
as Horizons and the MPC use), the Earth from ERFA's built-in ephemeris
(epv00), light time iterated twice. Planetary perturbations are ignored: a
main-belt orbit drifts by arcseconds over a month from its epoch
(tests/test_catalogs.py checks Ceres against a Horizons ephemeris), which
is nothing next to the degree-scale needs of visibility. Positions are
geocentric here; ``tomd.visibility`` adds each site's parallax (an object
0.01 au away shifts by up to 0.03°, one at the Moon's distance by 1°).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

GAUSS_K = 0.01720209895  # au^1.5 / day (Sun's GM = k²)
C_AU_PER_DAY = 173.1446326846693
_EPS = math.radians(84381.448 / 3600.0)  # mean obliquity of J2000 (IAU 1976)
_DEG_PER_DAY_AT_1AU = math.degrees(GAUSS_K)  # 0.9856076686 °/day


@dataclass(frozen=True)
class Orbit:
    """Heliocentric conic. Angles in degrees, distances in au, times MJD (TT/TDB)."""

    e: float
    q: float  # perihelion distance
    incl: float
    node: float
    argperi: float
    tp: float | None = None  # time of perihelion (comets; any e)
    epoch: float | None = None  # epoch of mean anomaly (e < 1)
    mean_anomaly: float | None = None
    daily_motion: float | None = None  # °/day; from the semi-major axis when None

    @classmethod
    def from_target(cls, t: Any) -> "Orbit":
        """From a target's scheme and element fields (a TargetSpec, a row, a mapping)."""
        get = (t.get if isinstance(t, Mapping) else lambda k: getattr(t, k, None))
        scheme = get("scheme")
        e = float(get("eccentricity"))
        incl, node, argp = float(get("orbinc")), float(get("longascnode")), float(get("argofperih"))
        if scheme == "MPC_COMET":
            return cls(e, float(get("perihdist")), incl, node, argp, tp=float(get("epochofperih")))
        if scheme in ("MPC_MINOR_PLANET", "JPL_MAJOR_PLANET"):
            a = float(get("meandist"))
            n = get("dailymot")
            return cls(e, a * (1.0 - e), incl, node, argp, epoch=float(get("epochofel")),
                       mean_anomaly=float(get("meananom")), daily_motion=float(n) if n is not None else None)
        raise ValueError(f"not orbital elements: scheme {scheme!r}")

    def heliocentric(self, mjd_tt: np.ndarray) -> np.ndarray:
        """(3, N) heliocentric ICRS-aligned equatorial positions (au)."""
        t = np.asarray(mjd_tt, dtype=float)
        e, q = self.e, self.q
        if self.mean_anomaly is not None:  # ellipse from M at an epoch
            a = q / (1.0 - e)
            n = self.daily_motion if self.daily_motion else _DEG_PER_DAY_AT_1AU / a ** 1.5
            m = np.radians(self.mean_anomaly + n * (t - self.epoch))
            x, y = _ellipse(a, e, m)
        elif e < 1.0 - 1e-8:
            a = q / (1.0 - e)
            m = np.radians(_DEG_PER_DAY_AT_1AU / a ** 1.5 * (t - self.tp))
            x, y = _ellipse(a, e, m)
        elif e > 1.0 + 1e-8:
            a = q / (e - 1.0)
            m = GAUSS_K / a ** 1.5 * (t - self.tp)
            h = _solve_hyperbolic(e, m)
            x, y = a * (e - np.cosh(h)), a * math.sqrt(e * e - 1.0) * np.sinh(h)
        else:  # parabola: Barker's equation s³/3 + s = W
            w = GAUSS_K / math.sqrt(2.0 * q ** 3) * (t - self.tp) * 1.5
            s = np.cbrt(w + np.sqrt(w * w + 1.0)) + np.cbrt(w - np.sqrt(w * w + 1.0))
            x, y = q * (1.0 - s * s), 2.0 * q * s
        o, i, w_ = math.radians(self.node), math.radians(self.incl), math.radians(self.argperi)
        co, so, ci, si, cw, sw = math.cos(o), math.sin(o), math.cos(i), math.sin(i), math.cos(w_), math.sin(w_)
        p = np.array([cw * co - sw * so * ci, cw * so + sw * co * ci, sw * si])
        qv = np.array([-sw * co - cw * so * ci, -sw * so + cw * co * ci, cw * si])
        ecl = np.outer(p, x) + np.outer(qv, y)
        ce, se = math.cos(_EPS), math.sin(_EPS)
        return np.array([ecl[0], ce * ecl[1] - se * ecl[2], se * ecl[1] + ce * ecl[2]])

    def radec(self, mjd_utc: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Geocentric astrometric ICRS (ra, dec) in degrees at UTC times."""
        xyz = self.geocentric_unit(mjd_utc)
        ra = np.degrees(np.arctan2(xyz[1], xyz[0])) % 360.0
        dec = np.degrees(np.arcsin(np.clip(xyz[2], -1.0, 1.0)))
        return ra, dec

    def geocentric_unit(self, mjd_utc: np.ndarray | float) -> np.ndarray:
        """(3, N) unit vectors towards the object from the geocentre (ICRS axes)."""
        geo = self.geocentric(mjd_utc)
        return geo / np.linalg.norm(geo, axis=0)

    def geocentric(self, mjd_utc: np.ndarray | float) -> np.ndarray:
        """(3, N) astrometric geocentric positions (au, ICRS axes; light-time corrected)."""
        import erfa
        from astropy.time import Time

        mjd = np.atleast_1d(np.asarray(mjd_utc, dtype=float))
        tt = Time(mjd, format="mjd", scale="utc").tt  # leap seconds from ERFA's table: no network
        pvh, _ = erfa.epv00(tt.jd1, tt.jd2)  # heliocentric Earth, BCRS axes (au)
        earth = np.asarray(pvh["p"]).T  # (3, N)
        t_tt = tt.mjd
        geo = self.heliocentric(t_tt) - earth
        for _ in range(2):  # light time: where the object was when the light left it
            tau = np.linalg.norm(geo, axis=0) / C_AU_PER_DAY
            geo = self.heliocentric(t_tt - tau) - earth
        return geo


def _ellipse(a: float, e: float, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.remainder(m + math.pi, 2 * math.pi) - math.pi
    ecc = m + e * np.sin(m) if e < 0.8 else np.full_like(m, math.pi) * np.sign(m)
    for _ in range(50):  # Newton; converges in a handful of steps for e < 1
        d = (ecc - e * np.sin(ecc) - m) / (1.0 - e * np.cos(ecc))
        ecc = ecc - d
        if np.all(np.abs(d) < 1e-13):
            break
    return a * (np.cos(ecc) - e), a * math.sqrt(1.0 - e * e) * np.sin(ecc)


def _solve_hyperbolic(e: float, m: np.ndarray) -> np.ndarray:
    h = np.arcsinh(m / e)
    for _ in range(100):
        d = (e * np.sinh(h) - h - m) / (e * np.cosh(h) - 1.0)
        h = h - d
        if np.all(np.abs(d) < 1e-13):
            break
    return h
