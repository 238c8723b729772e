"""Sky helpers against astropy: separations, galactic coordinates, the index."""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import Latitude, Longitude, SkyCoord

from tomd import sky

RNG = np.random.default_rng(42)


def _random_positions(n):
    ra = RNG.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(RNG.uniform(-1, 1, n)))
    return ra, dec


def test_separation_matches_astropy_everywhere_including_poles_and_wrap():
    ra1, dec1 = _random_positions(500)
    ra2, dec2 = _random_positions(500)
    # Add hard cases: across RA 0/360, at the poles, antipodes, tiny separations.
    ra1 = np.r_[ra1, 359.9999, 0.0, 10.0, 0.0, 123.0]
    dec1 = np.r_[dec1, 0.0, 89.99999, -89.9999, 0.0, 45.0]
    ra2 = np.r_[ra2, 0.0001, 180.0, 190.0, 180.0, 123.0 + 1e-9]
    dec2 = np.r_[dec2, 0.0, 89.99999, -89.9999, 0.0, 45.0]
    ours = sky.separation_deg_array(ra1, dec1, ra2, dec2)
    ref = SkyCoord(ra1 * u.deg, dec1 * u.deg).separation(SkyCoord(ra2 * u.deg, dec2 * u.deg)).deg
    assert np.allclose(ours, ref, atol=1e-10, rtol=0)
    scalar = [sky.separation_deg(*args) for args in zip(ra1, dec1, ra2, dec2)]
    assert np.allclose(scalar, ref, atol=1e-10, rtol=0)


def test_galactic_matches_astropy():
    ra, dec = _random_positions(300)
    l, b = sky.to_galactic(ra, dec)
    ref = SkyCoord(ra * u.deg, dec * u.deg).galactic
    assert np.allclose(b, ref.b.deg, atol=1e-9)
    dl = (l - ref.l.deg + 180) % 360 - 180
    assert np.allclose(dl * np.cos(np.radians(b)), 0, atol=1e-9)


def test_galactic_of_one_position_matches_astropy():
    """Plain floats take the scalar path (math, not numpy): same answer, poles and RA 0/360 included."""
    ra, dec = _random_positions(300)
    ra = np.r_[ra, 0.0, 359.9999999, 192.85948, 266.405, 10.0]
    dec = np.r_[dec, 90.0, -90.0, 27.12825, -28.936, 0.0]
    ref = SkyCoord(ra * u.deg, dec * u.deg).galactic
    for r, d, rl, rb in zip(ra.tolist(), dec.tolist(), ref.l.deg, ref.b.deg):
        lon, lat = sky.to_galactic(r, d)
        assert type(lon) is float and type(lat) is float and 0.0 <= lon < 360.0
        assert abs(lat - rb) < 1e-9
        if abs(lat) < 89.9:
            assert abs(((lon - rl + 180) % 360 - 180) * np.cos(np.radians(lat))) < 1e-9


def test_sky_index_matches_cdshealpix():
    import cdshealpix.nested as hp

    ra, dec = _random_positions(20000)
    # Near the poles (where the polar formula switches), on face edges, at the wrap.
    ra = np.r_[ra, RNG.uniform(0, 360, 2000), RNG.uniform(0, 360, 2000), np.full(500, 359.999999999),
               np.full(500, 45.0), np.zeros(2)]
    dec = np.r_[dec, RNG.uniform(89.0, 90.0, 2000), RNG.uniform(-90.0, -89.99, 2000),
                RNG.uniform(-90, 90, 500), np.degrees(np.arcsin(2 / 3)) + RNG.uniform(-1e-9, 1e-9, 500),
                [90.0, -90.0]]
    ref = hp.lonlat_to_healpix(Longitude(ra * u.deg), Latitude(dec * u.deg), sky.INDEX_DEPTH)
    assert np.array_equal(sky.sky_index_array(ra, dec), ref.astype(np.int64))


@pytest.mark.parametrize("center", [(0.0, 0.0), (359.9999, 0.0), (0.0, 90.0), (77.0, -89.9999),
                                    (180.0, 45.0), (45.0, 41.8103)])
@pytest.mark.parametrize("radius_arcsec", [0.5, 1.5, 30.0, 3600.0, 5 * 3600.0])
def test_cone_ranges_cover_every_point_inside_the_cone(center, radius_arcsec):
    ra0, dec0 = center
    r = radius_arcsec / 3600.0
    # Points on and just inside the rim, all around, plus random points inside.
    ang = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    frac = np.r_[np.full(720, 0.999999), RNG.uniform(0, 1, 720)]
    ang = np.r_[ang, RNG.uniform(0, 2 * np.pi, 720)]
    c = SkyCoord(ra0 * u.deg, dec0 * u.deg)
    pts = c.directional_offset_by(ang * u.rad, frac * r * u.deg)
    idx = sky.sky_index_array(pts.ra.deg, pts.dec.deg)
    ranges = sky.cone_ranges(ra0, dec0, r)
    assert len(ranges) <= 16  # a handful of index probes, whatever the radius
    inside = np.zeros(len(idx), dtype=bool)
    for lo, hi in ranges:
        inside |= (idx >= lo) & (idx < hi)
    assert inside.all(), f"{(~inside).sum()} points inside the cone fall outside the ranges"


@pytest.mark.parametrize(
    "text,expected",
    [("150.1", 150.1), ("10:00:24", 150.1), ("10h00m24s", 150.1), ("10 00 24", 150.1), ("0", 0.0), ("360", 0.0)],
)
def test_parse_ra(text, expected):
    assert math.isclose(sky.parse_ra(text), expected, abs_tol=1e-9)


@pytest.mark.parametrize(
    "text,expected",
    [("-12.5", -12.5), ("-12:30:00", -12.5), ("+89:30:00", 89.5), ("-00:30:00", -0.5), ("12d30m", 12.5)],
)
def test_parse_dec(text, expected):
    assert math.isclose(sky.parse_dec(text), expected, abs_tol=1e-9)


@pytest.mark.parametrize("bad", ["", "abc", "361", "-1", "nan", "25:00:00x"])
def test_parse_ra_rejects(bad):
    with pytest.raises(ValueError):
        sky.parse_ra(bad)


@pytest.mark.parametrize("bad", ["91", "-90.5", "xx", "inf"])
def test_parse_dec_rejects(bad):
    with pytest.raises(ValueError):
        sky.parse_dec(bad)
