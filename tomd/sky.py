"""Positions on the sky: separations, galactic coordinates, the HEALPix index.

Pure functions. Every position is ICRS degrees. Separations use Vincenty's
formula (stable at all distances, at the poles and across RA 0/360), never
Euclidean differences of RA.

The sky index is the nested HEALPix pixel at depth 29 (about 0.4 mas), a
64-bit integer. A pixel at a coarser depth d covers the contiguous range
``[p << 2(29-d), (p+1) << 2(29-d))`` of depth-29 indices, so a cone becomes
a handful of integer ranges that any B-tree index answers in a few probes,
whatever the number of targets.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

INDEX_DEPTH = 29
_DEG = math.pi / 180.0


def separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance in degrees (Vincenty)."""
    l1, b1, l2, b2 = ra1 * _DEG, dec1 * _DEG, ra2 * _DEG, dec2 * _DEG
    dl = l2 - l1
    sdl, cdl = math.sin(dl), math.cos(dl)
    s1, c1 = math.sin(b1), math.cos(b1)
    s2, c2 = math.sin(b2), math.cos(b2)
    num1 = c2 * sdl
    num2 = c1 * s2 - s1 * c2 * cdl
    den = s1 * s2 + c1 * c2 * cdl
    return math.atan2(math.hypot(num1, num2), den) / _DEG


def separation_deg_array(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Vectorised :func:`separation_deg`."""
    l1, b1 = np.radians(ra1), np.radians(dec1)
    l2, b2 = np.radians(ra2), np.radians(dec2)
    dl = l2 - l1
    sdl, cdl = np.sin(dl), np.cos(dl)
    s1, c1 = np.sin(b1), np.cos(b1)
    s2, c2 = np.sin(b2), np.cos(b2)
    num1 = c2 * sdl
    num2 = c1 * s2 - s1 * c2 * cdl
    den = s1 * s2 + c1 * c2 * cdl
    return np.degrees(np.arctan2(np.hypot(num1, num2), den))


@lru_cache(maxsize=1)
def _icrs_to_galactic_matrix() -> np.ndarray:
    """The ICRS→Galactic rotation, taken once from astropy (not hand-typed)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    # The ICRS unit vectors x, y, z are (ra, dec) = (0, 0), (90, 0), (0, 90).
    g = SkyCoord(ra=[0.0, 90.0, 0.0] * u.deg, dec=[0.0, 0.0, 90.0] * u.deg, frame="icrs").galactic
    cart = g.cartesian
    # Column j is the image of ICRS basis vector j.
    return np.vstack([cart.x.value, cart.y.value, cart.z.value])


@lru_cache(maxsize=1)
def _galactic_rows() -> tuple[tuple[float, float, float], ...]:
    return tuple(tuple(float(x) for x in row) for row in _icrs_to_galactic_matrix())


def to_galactic(ra, dec):
    """ICRS (deg) → Galactic (l, b) in degrees; scalars or arrays."""
    if type(ra) is float and type(dec) is float:
        # One position (every new target): plain math is about ten times faster than
        # numpy on scalars, and gives the same numbers to ~1e-13 deg (tests/test_sky.py).
        (a, b, c), (d, e, f), (g, h, i) = _galactic_rows()
        r, q = ra * _DEG, dec * _DEG
        cq = math.cos(q)
        x, y, z = cq * math.cos(r), cq * math.sin(r), math.sin(q)
        gx, gy, gz = a * x + b * y + c * z, d * x + e * y + f * z, g * x + h * y + i * z
        # atan2, not asin: asin loses ~1e-7 deg near the Galactic poles.
        return math.degrees(math.atan2(gy, gx)) % 360.0, math.degrees(math.atan2(gz, math.hypot(gx, gy)))
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    xyz = np.array([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)])
    g = _icrs_to_galactic_matrix() @ xyz
    lon = np.degrees(np.arctan2(g[1], g[0])) % 360.0
    lat = np.degrees(np.arcsin(np.clip(g[2], -1.0, 1.0)))
    if np.ndim(lon) == 0:
        return float(lon), float(lat)
    return lon, lat


def check_position(ra: float, dec: float) -> tuple[float, float]:
    """Validate and normalise a position: RA wrapped into [0, 360), Dec in [-90, 90]."""
    if not (math.isfinite(ra) and math.isfinite(dec)):
        raise ValueError(f"position must be finite, got ra={ra}, dec={dec}")
    if not -90.0 <= dec <= 90.0:
        raise ValueError(f"dec must be within [-90, 90] degrees, got {dec}")
    return ra % 360.0, dec


def parse_ra(text: str | float) -> float:
    """RA in degrees from degrees ("150.1") or sexagesimal hours ("10:00:24.0", "10h00m24s")."""
    return _parse_angle(text, is_ra=True)


def parse_dec(text: str | float) -> float:
    """Dec in degrees from degrees or sexagesimal degrees ("-12:30:00", "-12d30m")."""
    return _parse_angle(text, is_ra=False)


def _parse_angle(text: str | float, *, is_ra: bool) -> float:
    from astropy import units as u
    from astropy.coordinates import Angle

    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        if not s:
            raise ValueError("empty angle")
        try:
            value = float(s)
        except ValueError:
            sexagesimal = any(c in s for c in ": hmsd°'\"")
            if not sexagesimal:
                raise ValueError(f"not an angle: {s!r}") from None
            unit = u.hourangle if (is_ra and "d" not in s and "°" not in s) else u.deg
            try:
                value = float(Angle(s, unit=unit).deg)
            except Exception as exc:  # astropy raises several kinds
                raise ValueError(f"not an angle: {s!r} ({exc})") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite angle: {text!r}")
    if is_ra:
        if not 0.0 <= value <= 360.0:
            raise ValueError(f"expected degrees within [0, 360], got {value:g}")
        return value % 360.0
    if not -90.0 <= value <= 90.0:
        raise ValueError(f"expected degrees within [-90, 90], got {value:g}")
    return value


# Bits of x spread to the even positions, for interleaving (x, y) into a
# nested pixel number one byte at a time.
_SPREAD = [sum(((b >> i) & 1) << (2 * i) for i in range(8)) for b in range(256)]
_NSIDE = 1 << INDEX_DEPTH
_HALF_PI = math.pi / 2


def _interleave(ix: int, iy: int) -> int:
    out = 0
    for shift in (0, 8, 16, 24):
        out |= (_SPREAD[(ix >> shift) & 0xFF] | (_SPREAD[(iy >> shift) & 0xFF] << 1)) << (2 * shift)
    return out


def sky_index(ra: float, dec: float) -> int:
    """Nested HEALPix pixel of (ra, dec) at depth 29.

    Pure Python (about 3 µs, where a call into cdshealpix's core costs
    ~200 µs of thread-pool start-up); the algorithm is healpix_base's
    loc2pix (Górski et al. 2005). tests/test_sky.py checks it against
    cdshealpix on random points, near the poles and on face edges; the two
    differ only for points exactly on a corner shared by four base faces,
    which either convention may own.
    """
    nside = _NSIDE
    z = math.sin(math.radians(dec))
    za = abs(z)
    tt = (math.radians(ra % 360.0) / _HALF_PI) % 4.0
    if za <= 2.0 / 3.0:
        temp1 = nside * (0.5 + tt)
        temp2 = nside * z * 0.75
        jp = int(temp1 - temp2)  # ascending edge line
        jm = int(temp1 + temp2)  # descending edge line
        ifp, ifm = jp >> INDEX_DEPTH, jm >> INDEX_DEPTH
        face = (ifp | 4) if ifp == ifm else (ifp if ifp < ifm else ifm + 8)
        ix = jm & (nside - 1)
        iy = nside - (jp & (nside - 1)) - 1
    else:
        ntt = min(3, int(tt))
        tp = tt - ntt
        if za < 0.99:
            tmp = nside * math.sqrt(3.0 * (1.0 - za))
        else:  # near the poles 1 - |z| loses digits; use cos(dec) instead
            tmp = nside * math.cos(math.radians(dec)) / math.sqrt((1.0 + za) / 3.0)
        jp = min(int(tp * tmp), nside - 1)
        jm = min(int((1.0 - tp) * tmp), nside - 1)
        if z >= 0:
            face, ix, iy = ntt, nside - jm - 1, nside - jp - 1
        else:
            face, ix, iy = ntt + 8, jp, jm
    return (face << (2 * INDEX_DEPTH)) + _interleave(ix, iy)


def sky_index_array(ra, dec) -> np.ndarray:
    """:func:`sky_index` over arrays (one definition of the index everywhere)."""
    ra_a = np.asarray(ra, dtype=np.float64).reshape(-1)
    dec_a = np.asarray(dec, dtype=np.float64).reshape(-1)
    return np.fromiter((sky_index(a, b) for a, b in zip(ra_a.tolist(), dec_a.tolist())),
                       dtype=np.int64, count=ra_a.shape[0])


def _depth_for_radius(radius_deg: float) -> int:
    # Mean pixel size at depth d is about 58.6° / 2**d. A cell a few times
    # larger than the cone keeps the cover to a handful of cells (few ranges).
    if radius_deg <= 0:
        return INDEX_DEPTH
    d = int(math.floor(math.log2(58.6 / (4.0 * radius_deg))))
    return max(0, min(INDEX_DEPTH, d))


def cone_ranges(ra: float, dec: float, radius_deg: float) -> list[tuple[int, int]]:
    """Half-open depth-29 index ranges covering the cone (a superset; filter exactly after)."""
    from cdshealpix import cdshealpix as core

    if radius_deg >= 180.0:
        return [(0, 12 << (2 * INDEX_DEPTH))]
    depth = _depth_for_radius(radius_deg)
    # Rust core directly, as in sky_index_array; same arguments as
    # cdshealpix.nested.cone_search(lon, lat, radius, depth, depth_delta=2).
    ipix, depths, _ = core.cone_search(
        np.uint8(depth), np.uint8(2), np.float64(math.radians(ra % 360.0)),
        np.float64(math.radians(dec)), np.float64(math.radians(radius_deg)), False,
    )
    ranges = []
    for p, d in zip(ipix.tolist(), depths.tolist()):
        shift = 2 * (INDEX_DEPTH - int(d))
        ranges.append((int(p) << shift, (int(p) + 1) << shift))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def warm_up() -> None:
    """Import what the first new target needs (cdshealpix, astropy), now.

    Imported lazily so that commands which never match positions start fast; the
    daemon calls this before it consumes, because the import (0.5–2 s on a busy
    2-core machine) would otherwise land inside the first batch and delay the
    first alert of the night by as much.
    """
    cone_ranges(0.0, 0.0, 1.0 / 3600.0)
    to_galactic(0.0, 0.0)  # the rotation comes from astropy, once


def cells_of_ranges(ranges: list[tuple[int, int]], depth: int) -> list[int]:
    """The depth-``depth`` cells that the depth-29 ranges touch (sorted)."""
    shift = 2 * (INDEX_DEPTH - depth)
    cells: set[int] = set()
    for lo, hi in ranges:
        cells.update(range(lo >> shift, ((hi - 1) >> shift) + 1))
    return sorted(cells)
