"""What a person reads (orchestrator/display.py): here, the one line Flower shows for a round's callback."""

from orchestrator.display import summarise_early_round, summarise_result

RESULT = {"quality": "strict", "server": "time.example.org:123", "offset": 0.0031234, "uncertainty": 0.0015,
          "servers_used": 8, "servers_total": 10}
LATE = [{"server": "dead.example.org:123", "status": "late", "reason": "timeout", "attempts": 1},
        {"server": "slow.example.org:123", "status": "late", "sample": {"offset_s": 0.0032}, "attempts": 1}]


def test_a_round_decided_early_leads_with_its_result_then_its_late_servers():
    """Flower's result column for the callback of a round published early: the round's result first."""
    assert summarise_early_round(RESULT, LATE) == (
        "strict: time.example.org:123 +3.123 ms ±1.500 ms, 8/10 servers; "
        "late: dead.example.org:123 failed: timeout; slow.example.org:123 ok +3.200 ms")


def test_a_round_with_nothing_published_says_so():
    nothing = dict(RESULT, quality="outlier", server=None, offset=None, uncertainty=None, servers_used=3)
    assert summarise_result(nothing) == "outlier: nothing published, 3/10 servers"
    assert summarise_early_round(nothing, LATE[:1]).startswith("outlier: nothing published, 3/10 servers; late: ")


def test_without_the_result_at_hand_it_still_says_the_round_was_published():
    assert summarise_early_round(None, LATE[:1]) == \
        "published before these servers answered; late: dead.example.org:123 failed: timeout"
