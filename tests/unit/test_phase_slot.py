"""Each node's normal slots on Redis' clock: the same for every beat, whenever it started (issue #25 item 5)."""

import pytest

from orchestrator.scheduler import phase_slot


@pytest.mark.parametrize("index, expected", [(0, 1080.0), (1, 1120.0), (2, 1040.0)])
def test_node_i_of_n_is_at_i_over_n_of_the_interval(index, expected):
    assert phase_slot(1000.5, index, 3, 120.0) == pytest.approx(expected)


def test_a_slot_at_the_time_itself_counts_only_when_not_strictly_after():
    assert phase_slot(1040.0, 2, 3, 120.0) == pytest.approx(1160.0)
    assert phase_slot(1040.0, 2, 3, 120.0, strictly=False) == pytest.approx(1040.0)


def test_every_beat_computes_the_same_slots_whenever_it_starts():
    slots = {round(phase_slot(start, 1, 4, 10.0) % 10.0, 9) for start in (0.0, 3.3, 17.9, 1e9 + 0.7)}
    assert slots == {2.5}
