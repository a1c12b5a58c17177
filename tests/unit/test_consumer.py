"""The reader's Measurement (pure): age, aged uncertainty, staleness, ChronoTick's fields."""

import time

import pytest

from orchestrator.consumer import CHRONOTICK_FIELDS, DRIFT_BOUND, Measurement, NtpReader

LATEST = {"node": "n1", "round_id": "r", "offset": 0.0125, "uncertainty": 0.004, "delay": 0.02, "stratum": 2,
          "leap": 0, "root_delay": 0.001, "root_dispersion": 0.0005, "precision": 2 ** -20, "server": "a:123",
          "address": "127.0.0.1:123", "quality": "strict", "measured_at": 1000.0, "published_at": 1000.2,
          "servers_used": 3, "servers_total": 4, "selection": "best", "a_future_field": 1}


def test_age_grows_the_uncertainty_by_the_drift_bound():
    m = Measurement.from_latest(LATEST, stale_after_s=360)
    assert m.age_at(1100.0) == pytest.approx(100.0)
    assert m.aged_uncertainty_at(1100.0) == pytest.approx(0.004 + 100 * DRIFT_BOUND)
    assert m.aged_uncertainty_at(900.0) == pytest.approx(0.004)  # never below the published bound
    assert DRIFT_BOUND == 15e-6
    fast = Measurement.from_latest(LATEST, drift_bound=100e-6)
    assert fast.aged_uncertainty_at(1100.0) == pytest.approx(0.004 + 0.01)


def test_staleness_follows_the_clock():
    now = time.time()
    fresh = Measurement.from_latest({**LATEST, "measured_at": now - 10}, stale_after_s=360)
    old = Measurement.from_latest({**LATEST, "measured_at": now - 400}, stale_after_s=360)
    assert not fresh.stale and old.stale
    assert 9 < fresh.age_s < 60
    assert fresh.aged_uncertainty > fresh.uncertainty


def test_as_chronotick_has_exactly_ntpmeasurements_fields():
    m = Measurement.from_latest(LATEST)
    out = m.as_chronotick()
    assert tuple(out) == CHRONOTICK_FIELDS == ("offset", "delay", "stratum", "precision", "server", "timestamp",
                                              "uncertainty")
    assert out["timestamp"] == LATEST["measured_at"] and out["offset"] == LATEST["offset"]
    assert m.raw["a_future_field"] == 1


def test_reader_refuses_nonsense_settings():
    with pytest.raises(ValueError, match="stale_after_s"):
        NtpReader("redis://127.0.0.1:1/0", stale_after_s=0)
    with pytest.raises(ValueError, match="drift_bound"):
        NtpReader("redis://127.0.0.1:1/0", drift_bound=-1)
