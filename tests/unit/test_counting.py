"""What each counter of a node's ``stats`` hash counts (orchestrator/counting.py), as docs/contract.md says.

``queries`` counts attempts, ``replies`` reply packets: in advanced mode an
attempt is a burst of ``advanced_samples`` requests, so replies outnumbered
"queries" (904 against 324) and nothing counted the requests themselves.
``requests`` does, and the older counters keep their meaning.
"""

import re
from pathlib import Path

from orchestrator.counting import COUNTERS, NO_REPLY_REASONS, NO_REQUEST_REASONS, late_counters, round_counters

REPO = Path(__file__).resolve().parents[2]


def _sample(server, taken):
    return {"server": server, "offset_s": 0.001, "delay_s": 0.01, "uncertainty_s": 0.005, "stratum": 2,
            "samples_taken": taken}


def _server(server, status, history, *, sample=None, reason=None):
    entry = {"server": server, "status": status, "attempts": len(history), "history": history}
    if sample is not None:
        entry["sample"] = sample
    if reason is not None:
        entry["reason"] = reason
    return entry


def _record(*servers):
    return {"quality": "strict", "servers": list(servers)}


def test_advanced_mode_counts_attempts_requests_and_replies_apart():
    record = _record(
        # One burst of 3, all answered.
        _server("a", "chosen", [{"attempt": 1, "reason": None}], sample=_sample("a", 3)),
        # A burst of 3 with one timed out and one refused, then the kept sample.
        _server("b", "accepted", [{"attempt": 1, "reason": None,
                                   "refusals": [{"reason": "timeout"}, {"reason": "bogus_origin"}]}],
                sample=_sample("b", 1)),
        # Two bursts of 3 that all timed out: two attempts, six requests, no reply.
        _server("c", "failed", [{"attempt": 1, "reason": "timeout", "refusals": [{"reason": "timeout"}] * 2},
                                {"attempt": 2, "reason": "timeout", "refusals": [{"reason": "timeout"}] * 2}],
                reason="timeout"),
        # An attempt that never sent a packet: the name did not resolve.
        _server("d", "failed", [{"attempt": 1, "reason": "dns_error"}], reason="dns_error"),
    )
    counts = round_counters(record)
    assert counts["queries"] == 5  # attempts: a 1, b 1, c 2, d 1
    assert counts["retries"] == 1  # c's second
    assert counts["requests"] == 3 + 3 + 6 + 0  # packets sent
    assert counts["replies"] == 3 + 2  # a's three, b's kept one and its refused one
    assert counts["rejected"] == 1 and counts["rejected:bogus_origin"] == 1
    assert counts["replies"] <= counts["requests"]


def test_simple_mode_sends_one_request_per_attempt():
    record = _record(_server("a", "chosen", [{"attempt": 1, "reason": "timeout"}, {"attempt": 2, "reason": None}],
                             sample=_sample("a", 1)),
                     _server("b", "rejected", [{"attempt": 1, "reason": "unsynchronised_leap"}],
                             reason="unsynchronised_leap"),
                     _server("c", "failed", [{"attempt": 1, "reason": "socket_error"}], reason="socket_error"))
    counts = round_counters(record)
    assert counts["queries"] == counts["requests"] == 4
    assert counts["replies"] == 2


def test_a_failure_before_any_request_counts_no_reply_and_no_rejection():
    """No request left (a job for another node, no name, kept away after a kiss, ...): so no reply came either."""
    for reason in sorted(NO_REQUEST_REASONS):
        record = _record(_server("a", "failed", [{"attempt": 1, "reason": reason}], reason=reason))
        counts = round_counters(record)
        assert (counts["queries"], counts["requests"], counts["replies"]) == (1, 0, 0), reason
        assert counts.get("rejected", 0) == 0 and f"rejected:{reason}" not in counts, reason
    assert NO_REQUEST_REASONS <= NO_REPLY_REASONS


def test_late_servers_count_their_requests_when_their_outcomes_come():
    late = [_server("a", "late", [{"attempt": 1, "reason": None}], sample=_sample("a", 3)),
            _server("b", "late", [{"attempt": 1, "reason": "timeout"}], reason="timeout")]
    counts = late_counters(late)
    assert counts["late"] == 2 and counts["queries"] == 2 and counts["requests"] == 4 and counts["replies"] == 3


def test_every_counter_is_documented_in_the_contract():
    contract = (REPO / "docs" / "contract.md").read_text()
    counters = contract.split("The counters, each as it is counted", 1)[1].split("\n\n", 1)[0]
    for name in COUNTERS:
        assert f"`{name}`" in counters, name
    row = next(line for line in contract.splitlines() if line.startswith("| `chronotick:ntp:<node>:stats`"))
    assert all(re.search(rf"\b{name}\b", row) for name in COUNTERS)
