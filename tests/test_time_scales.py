"""UTC (M)JD → datetime, as the parsers convert survey times: against astropy, leap seconds included."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from astropy.time import Time

from tomd.alerts.formats._common import _LEAP_DAYS, jd_utc_to_datetime, mjd_utc_to_datetime


def _astropy(jd: float) -> datetime:
    return Time(jd, format="jd", scale="utc").to_datetime(timezone=timezone.utc)


def test_random_times_match_astropy_to_the_microsecond():
    rng = random.Random(5)
    jds = [rng.uniform(2441317.5, 2462000.5) for _ in range(2000)]  # 1972 .. 2028
    for jd in jds:
        assert abs((jd_utc_to_datetime(jd) - _astropy(jd)).total_seconds()) <= 1e-6, jd


def test_the_leap_second_table_is_read():
    # 2016-12-31 (MJD 57753) and 2015-06-30 (MJD 57203) ended in a leap second; 2016-06-30 did not.
    assert {57753, 57203} <= _LEAP_DAYS and 57569 not in _LEAP_DAYS
    assert len(_LEAP_DAYS) >= 27


@pytest.mark.parametrize("mjd", [57753.5, 57753.9999, 57203.75, 41316.5, 40000.25])
def test_days_with_a_leap_second_and_before_1972_follow_erfa(mjd):
    # A leap-second day has 86,401 s: the same fraction of it is a different clock time.
    got = mjd_utc_to_datetime(mjd)
    ref = Time(mjd, format="mjd", scale="utc").to_datetime(timezone=timezone.utc)
    assert abs((got - ref).total_seconds()) <= 1e-6


def test_the_day_after_a_leap_second_starts_at_midnight():
    assert mjd_utc_to_datetime(57754.0) == datetime(2017, 1, 1, tzinfo=timezone.utc)
    assert mjd_utc_to_datetime(57754.5) == datetime(2017, 1, 1, 12, tzinfo=timezone.utc)
