"""The reader's Measurement (pure): age, aged uncertainty, staleness, ChronoTick's fields."""

import time

import pytest

from orchestrator.reader import CHRONOTICK_FIELDS, DRIFT_BOUND, Measurement, NtpReader
from workers.config import NtpSettings

LATEST = {"node": "n1", "round_id": "r", "offset": 0.0125, "uncertainty": 0.004, "delay": 0.02, "stratum": 2,
          "leap": 0, "root_delay": 0.001, "root_dispersion": 0.0005, "precision": 2 ** -20, "server": "a:123",
          "address": "127.0.0.1:123", "quality": "strict", "measured_at": 1000.0, "published_at": 1000.2,
          "servers_used": 3, "servers_total": 4, "selection": "best", "a_future_field": 1}


def test_age_grows_the_uncertainty_by_the_drift_bound():
    m = Measurement.from_latest(LATEST, stale_after_s=360)
    assert m.age_at(1100.2) == pytest.approx(100.0)  # since publication, on the service's clock
    assert m.aged_uncertainty_at(1100.2) == pytest.approx(0.004 + 100 * DRIFT_BOUND)
    assert m.aged_uncertainty_at(900.0) == pytest.approx(0.004)  # never below the published bound
    assert DRIFT_BOUND == 15e-6
    fast = Measurement.from_latest(LATEST, drift_bound=100e-6)
    assert fast.aged_uncertainty_at(1100.2) == pytest.approx(0.004 + 0.01)


def test_staleness_follows_the_clock():
    now = time.time()
    fresh = Measurement.from_latest({**LATEST, "published_at": now - 10}, stale_after_s=360)
    old = Measurement.from_latest({**LATEST, "published_at": now - 400}, stale_after_s=360)
    assert not fresh.stale and old.stale
    assert 9 < fresh.age_s < 60
    assert fresh.aged_uncertainty > fresh.uncertainty


@pytest.mark.parametrize("node_off_s", [-7200.0, 7200.0])
def test_every_age_is_read_on_the_service_clock_not_against_the_nodes_measured_at(node_off_s):
    """A node 2 h off: fresh right after its round, stale three intervals after its last (issue #24)."""
    redis_now = 1_800_000_000.0
    just_published = {**LATEST, "measured_at": redis_now - 0.1 + node_off_s, "published_at": redis_now - 0.05}
    m = Measurement.from_latest(just_published, stale_after_s=360, clock=lambda: redis_now)
    assert not m.stale and m.age_s == pytest.approx(0.05)
    assert m.aged_uncertainty == pytest.approx(0.004 + 0.05 * DRIFT_BOUND)  # grown for 50 ms, not for 2 h
    last = {**LATEST, "measured_at": redis_now - 361 + node_off_s, "published_at": redis_now - 361}
    m = Measurement.from_latest(last, stale_after_s=360, clock=lambda: redis_now)
    assert m.stale and m.age_s == pytest.approx(361)
    assert m.aged_uncertainty == pytest.approx(0.004 + 361 * DRIFT_BOUND)


def test_a_value_that_is_no_measurement_is_refused_clearly():
    with pytest.raises(ValueError, match="offset is not a finite number"):
        Measurement.from_latest({**LATEST, "offset": float("nan")})
    with pytest.raises(KeyError):
        Measurement.from_latest({k: v for k, v in LATEST.items() if k != "offset"})
    old = Measurement.from_latest({k: v for k, v in LATEST.items()
                                   if k not in ("leap", "root_delay", "root_dispersion", "address", "selection")})
    assert (old.leap, old.root_delay, old.root_dispersion, old.address) == (0, 0.0, 0.0, "")
    # Written before ``selection`` was kept: one server's sample, whatever the configuration's default is now.
    assert old.selection == "best" != NtpSettings.selection


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


#: Every public name ``orchestrator.consumer`` had before the reader moved to ``orchestrator.reader`` (issue #27).
CONSUMER_NAMES = ("CHRONOTICK_FIELDS", "DEFAULT_STALE_AFTER_S", "DRIFT_BOUND", "EMPTY_STREAM_ID", "FOLLOW_BLOCK_MS",
                  "FOLLOW_RETRY_S", "FOLLOW_TIMEOUT_S", "HELD_ENTRY", "KEEP_MEASUREMENTS", "SEEN_REMEMBERED",
                  "SOCKET_TIMEOUT_S", "STALE_INTERVALS", "STATISTICS_RECENT", "ClockMeasurementSource", "Measurement",
                  "NtpReader", "ServiceUnavailable", "SourceStatistics")


def test_chronoticks_import_path_keeps_every_name_it_had():
    import orchestrator.consumer as consumer
    import orchestrator.reader as reader
    from orchestrator.consumer import ClockMeasurementSource as ClockMeasurementCollector  # ChronoTick's one line

    assert ClockMeasurementCollector is reader.ClockMeasurementSource
    assert sorted(consumer.__all__) == sorted(CONSUMER_NAMES)
    for name in CONSUMER_NAMES:
        assert getattr(consumer, name) is getattr(reader, name, getattr(consumer, name)), name
