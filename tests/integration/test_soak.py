"""A short soak (the long one: python -m bench.soak --rounds 1000): Redis SIGKILLed twice, every round recorded once."""

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.integration


def test_every_round_is_recorded_exactly_once_through_redis_restarts(tmp_path):
    result = run_soak(tmp_path, rounds=120, nodes=2, interval_s=0.2, restarts=2, log=lambda *_: None)
    assert result["dispatched_checked"] >= 60
    assert result["missing"] == [] and result["duplicates"] == 0, result
    assert result["rounds"] >= 120
