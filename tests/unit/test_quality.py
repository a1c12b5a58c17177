"""workers/quality.py: the gate a sample must pass, its 2x fallback, and the gate as it crosses Celery."""

from __future__ import annotations

import json

import pytest

from workers import config as config_mod
from workers.quality import RELAXED_FACTOR, Thresholds

GATE = Thresholds(max_delay_s=0.1, max_uncertainty_s=0.05, min_stratum=1, max_stratum=3)


def _sample(delay_s: float = 0.02, uncertainty_s: float = 0.01, stratum: int = 2) -> dict:
    return {"delay_s": delay_s, "uncertainty_s": uncertainty_s, "stratum": stratum}


def test_a_sample_within_every_bound_passes():
    assert GATE.violations(_sample()) == []
    assert GATE.violations(_sample(delay_s=0.1, uncertainty_s=0.05, stratum=3)) == [], "the bounds are inclusive"


@pytest.mark.parametrize(("sample", "says"), [
    (_sample(delay_s=0.1001), "delay 100.100 ms > 100.000 ms"),
    (_sample(uncertainty_s=0.06), "uncertainty 60.000 ms > 50.000 ms"),
    (_sample(stratum=0), "stratum 0 outside 1-3"),
    (_sample(stratum=4), "stratum 4 outside 1-3"),
])
def test_each_violation_is_named_with_its_figures(sample, says):
    assert GATE.violations(sample) == [says]


def test_every_violation_is_listed():
    assert len(GATE.violations(_sample(delay_s=1.0, uncertainty_s=1.0, stratum=9))) == 3


def test_the_fallback_doubles_delay_and_uncertainty_but_never_stratum():
    relaxed = GATE.relaxed()
    assert RELAXED_FACTOR == 2.0, "ChronoTick's 2x"
    assert relaxed == Thresholds(0.2, 0.1, 1, 3)
    assert relaxed.violations(_sample(delay_s=0.15, uncertainty_s=0.09)) == []
    assert relaxed.violations(_sample(stratum=4)) == ["stratum 4 outside 1-3"], "stratum is never relaxed"


def test_the_gate_crosses_celery_as_json_unchanged():
    assert Thresholds.from_dict(json.loads(json.dumps(GATE.as_dict()))) == GATE


def test_the_strict_gate_is_the_configs():
    ntp = config_mod.ntp_from_mapping({"servers": ["127.0.0.1"], "max_delay": 0.3, "max_acceptable_uncertainty": 0.2,
                                       "min_stratum": 1, "max_stratum": 4})
    assert Thresholds.from_settings(ntp) == Thresholds(0.3, 0.2, 1, 4)
