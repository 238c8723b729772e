"""The fast visibility path against astropy's AltAz, offline."""

from __future__ import annotations

import math
import socket
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from tomd import visibility as vis


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Invariant 8: visibility never touches the network (IERS downloads would)."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def astropy_alt(site: vis.Site, ra, dec, mjd):
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    iers.conf.auto_download = False
    loc = EarthLocation.from_geodetic(site.lon * u.deg, site.lat * u.deg, site.height * u.m)
    frame = AltAz(obstime=Time(mjd, format="mjd", scale="utc"), location=loc)
    return SkyCoord(ra * u.deg, dec * u.deg).transform_to(frame).alt.deg


def test_fast_altitude_agrees_with_astropy_altaz():
    rng = np.random.default_rng(4)
    worst = 0.0
    for code, site in vis.SITES.items():
        for _ in range(6):
            ra, dec = rng.uniform(0, 360), math.degrees(math.asin(rng.uniform(-1, 1)))
            mjd = 60300.0 + rng.uniform(0, 700)  # 2023-12 .. 2025-11
            fast = vis.altitude_deg(site, ra, dec, mjd)
            ref = astropy_alt(site, ra, dec, mjd)
            worst = max(worst, abs(fast - ref))
    assert worst < 0.05, f"worst altitude difference {worst:.4f} deg"


def test_grid_altitudes_agree_with_astropy_along_a_night():
    site = vis.SITES["lsc"]
    ra, dec = 83.8221, -5.3911  # M42
    d = vis.day(60700)
    r, dd, _ = vis._of_date(d.rot, ra, dec)
    alt = np.degrees(vis._altitude(site.lat, site.lon, d.gast, r, dd))
    ref = astropy_alt(site, ra, dec, d.mjd)
    assert np.max(np.abs(alt - ref)) < 0.05
    # Sun altitude along the grid, too.
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, get_body
    from astropy.time import Time

    loc = EarthLocation.from_geodetic(site.lon * u.deg, site.lat * u.deg, site.height * u.m)
    t = Time(d.mjd, format="mjd", scale="utc")
    sun_ref = get_body("sun", t).transform_to(AltAz(obstime=t, location=loc)).alt.deg
    sun = np.degrees(vis._altitude(site.lat, site.lon, d.gast, d.sun_ra, d.sun_dec))
    assert np.max(np.abs(sun - sun_ref)) < 0.05


def test_observability_decides_like_the_sky():
    # Polaris is never above the horizon from Chile; a southern target at night is.
    polaris = vis.observability(["lsc"], 37.95, 89.26, 60700.0, 24)
    assert not polaris.visible and "airmass" in polaris.reason
    # Sgr A* region from Chile in June (long nights, transits at local midnight).
    sgr = vis.observability(["lsc"], 266.4, -29.0, 60840.0, 24, max_airmass=1.5, min_moon_deg=0)
    assert sgr.visible and sgr.airmass < 1.1
    # The same target checked against astropy at the time found.
    alt = astropy_alt(vis.SITES["lsc"], 266.4, -29.0, sgr.mjd)
    assert alt >= math.degrees(math.asin(1 / 1.5)) - 0.1
    # A window shorter than the time to night: not visible.
    day_only = vis.observability(["lsc"], 266.4, -29.0, 60840.7, 2, max_airmass=1.5, min_moon_deg=0)
    assert not day_only.visible and "dark" in day_only.reason


def test_observability_is_fast_once_the_day_is_cached():
    vis.observability(vis.FACILITY_SITES["lco"], 10.0, -20.0, 60750.2, 24)
    t0 = time.perf_counter()
    n = 200
    for i in range(n):
        vis.observability(vis.FACILITY_SITES["lco"], (i * 7.3) % 360, -20.0, 60750.2, 24)
    per = (time.perf_counter() - t0) / n
    assert per < 2e-3, f"{per * 1e6:.0f} us per target"


def test_a_window_beyond_the_maximum_is_cut_to_it():
    """Bounded work per alert: visible("lco", hours=1e6) evaluates 14 days, not 40000."""
    sites = vis.FACILITY_SITES["lco"]
    start = 60750.3
    forty_days = vis.observability(sites, 10.0, -20.0, start, 40 * 24)
    assert forty_days.window_hours == vis.MAX_WINDOW_HOURS == 336
    for hours in (1e6, math.inf, 1e300):
        v = vis.observability(sites, 10.0, -20.0, start, hours)
        assert v.window_hours == 336 and v.as_dict()["window_hours"] == 336
        w = vis._window(sites, start, hours, -12.0)
        assert w.hours == 336 and w.mjd[-1] - w.mjd[0] <= 14.0
    # Same answer as the maximum window asked for outright; shorter windows are as asked.
    assert vis.observability(sites, 10.0, -20.0, start, 1e6) == vis.observability(sites, 10.0, -20.0, start, 336)
    assert vis.observability(sites, 10.0, -20.0, start, 24).window_hours == 24
    # The day cache holds every UTC day of a maximal window (15 from a mid-day start): a second alert
    # in that window computes no day again.
    assert vis.DAY_CACHE >= vis.MAX_WINDOW_DAYS + 1
    assert set(range(60750, 60765)) <= set(vis._DAYS)
    with pytest.raises(ValueError, match="NaN"):
        vis.observability(sites, 10.0, -20.0, start, math.nan)


def test_an_orbit_window_is_cut_too():
    from tomd.orbits import Orbit

    orbit = Orbit(q=1.2, e=0.3, incl=10.0, node=40.0, argperi=50.0, tp=60700.0)
    v = vis.observability_orbit(vis.FACILITY_SITES["lco"], orbit, 60750.3, 1e6, max_airmass=100.0, min_moon_deg=0.0)
    assert v.window_hours == 336 and v.airmass is not None


def test_an_hours_value_computed_by_a_rule_is_cut_at_run_time():
    """rule check cannot see a computed window: the expression's call is bounded where it is evaluated."""
    from tomd.alerts.model import Alert
    from tomd.rules.context import AlertView, Context, TargetView, mjd_of
    from tomd.rules.expr import compile_expression

    now = datetime(2025, 3, 1, 6, 0, tzinfo=timezone.utc)
    alert = Alert(source="ztf", key="1", time=now, ra=266.4, dec=-29.0, mag=17.5)
    target = TargetView({"id": 7, "name": "far", "ra": 266.4, "dec": -29.0}, now_mjd=mjd_of(now))
    c = Context(AlertView(alert, 1), target, mjd_of(now), facility_kinds={"lco": "lco"})
    expr = compile_expression("visible('lco', hours=alert.mag * 1e9) "
                              "and airmass('lco', hours=-alert.dec * 1e300) < 2", [])
    assert expr.first_false(*c.args()) == -1  # the Galactic centre rises before dawn in Chile
    assert c.visibility("lco", 17.5 * 1e9).window_hours == 336  # the expression's call, as it was evaluated
