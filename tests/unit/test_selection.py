"""Selection is pure: strict, then relaxed from the same samples, then starvation."""

import json

from orchestrator import selection
from orchestrator.callback import build_record
from orchestrator.counting import round_counters
from orchestrator.outcomes import Quality, RoundMeta
from workers import config as config_mod
from workers.contracts import Selection
from workers.quality import Thresholds

from .samples import failed, ok

STRICT = Thresholds(max_delay_s=0.100, max_uncertainty_s=0.010, min_stratum=1, max_stratum=15)


def test_strict_picks_lowest_uncertainty_not_lowest_delay():
    result = selection.select([ok("a", delay=0.010, unc=0.009), ok("b", delay=0.014, unc=0.007),
                               ok("c", delay=0.2, unc=0.1)], STRICT, enable_fallback=True, method=Selection.BEST)
    assert result["quality"] == Quality.STRICT
    assert result["chosen"]["server"] == "b"
    assert result["servers_used"] == 2
    status = {s["server"]: s["status"] for s in result["servers"]}
    assert status == {"a": "accepted", "b": "chosen", "c": "rejected"}


def test_ties_prefer_the_lower_stratum():
    result = selection.select([ok("s3", delay=0.01, unc=0.005, stratum=3),
                               ok("s1", delay=0.01, unc=0.005,
                                  stratum=1)], STRICT, enable_fallback=False, method=Selection.BEST)
    assert result["chosen"]["server"] == "s1"


def test_stratum_range_is_honoured_and_never_relaxed():
    result = selection.select([ok("far", delay=0.01, unc=0.001, stratum=14)],
                              Thresholds(0.1, 0.01, 1, 13), enable_fallback=True, method=Selection.BEST)
    assert result["quality"] == Quality.STARVATION
    assert "stratum 14 outside 1-13" in result["servers"][0]["detail"]


def test_relaxed_fallback_reuses_the_same_samples():
    outcomes = [ok("a", delay=0.150, unc=0.012), ok("b", delay=0.120, unc=0.015), ok("c", delay=0.25, unc=0.01)]
    result = selection.select(outcomes, STRICT, enable_fallback=True, method=Selection.BEST)
    assert result["quality"] == Quality.RELAXED
    assert result["chosen"]["server"] == "a"
    c = next(s for s in result["servers"] if s["server"] == "c")
    assert c["status"] == "rejected" and c["reason"] == "over_relaxed_thresholds"


def test_no_fallback_means_starvation():
    result = selection.select([ok("a", delay=0.150, unc=0.012)], STRICT, enable_fallback=False, method=Selection.BEST)
    assert result["quality"] == Quality.STARVATION and result["chosen"] is None


def test_all_failed_is_starvation_with_reasons():
    result = selection.select([failed("a"), failed("b", "kod_rate", 1)], STRICT, enable_fallback=True,
                              method=Selection.BEST)
    assert result["quality"] == Quality.STARVATION
    assert [s["reason"] for s in result["servers"]] == ["timeout", "kod_rate"]


def test_duplicate_outcomes_count_once():
    outcomes = [ok("a", delay=0.01, unc=0.005), ok("a", delay=0.01, unc=0.004), failed("b"),
                ok("b", delay=0.02, unc=0.006)]
    result = selection.select(outcomes, STRICT, enable_fallback=True, method=Selection.BEST)
    assert len(result["servers"]) == 2
    assert result["servers_used"] == 2  # b's success wins over its duplicate failure


def test_sequential_chain_results_are_flattened():
    assert len(selection.flatten([[ok("a", delay=0.01, unc=0.001), failed("b")]])) == 2


def test_record_fills_in_servers_that_never_reported_and_counts():
    ntp = config_mod.ntp_from_mapping({"servers": ["a", "b", "c"], "max_delay": STRICT.max_delay_s,
                                       "max_acceptable_uncertainty": STRICT.max_uncertainty_s})
    meta = RoundMeta(round_id="r1", node="n", dispatched_at=0.0, deadline_at=10.0, key_prefix="t",
                     history_length=10, ntp=ntp)
    assert RoundMeta.from_dict(json.loads(json.dumps(meta.as_dict()))) == meta  # what crosses Celery
    outcomes = [ok("a", delay=0.01, unc=0.005), failed("b", "bogus_origin", 3)]
    record = build_record(meta, outcomes, finished_at=1.5)
    assert record["latest"]["server"] == "a" and record["latest"]["servers_total"] == 3
    assert {s["server"]: s.get("reason") for s in record["servers"]}["c"] == "no_result"
    counts = round_counters(record)
    assert counts["queries"] == 4 and counts["retries"] == 2
    assert counts["rejected"] == 3 and counts["rejected:bogus_origin"] == 3
    assert counts["replies"] == 4  # a's reply and b's three refused ones
    assert counts["strict"] == 1 and counts["failed:no_result"] == 1


def test_a_round_closed_at_its_deadline_counts_servers_that_never_reported_as_unknown_votes():
    """Issue #24: a beat whose clock jumped closed a round with only a fast liar in hand; taken as failures,
    the two honest servers still out made the liar a majority of one, published strict."""
    ntp = config_mod.ntp_from_mapping({"servers": ["liar", "h1", "h2"], "max_delay": STRICT.max_delay_s,
                                       "max_acceptable_uncertainty": STRICT.max_uncertainty_s})
    meta = RoundMeta(round_id="r1", node="n", dispatched_at=0.0, deadline_at=10.0, key_prefix="t",
                     history_length=10, ntp=ntp)
    liar = [ok("liar", delay=0.002, unc=0.001, offset=1000.0)]
    closed = build_record(meta, liar, finished_at=12.0, unreported_unknown=True)
    # Undecided only because servers never reported (issue #25's review: a node cut off mid-round): an
    # outage, not NTP starvation, and the liar is not left marked chosen in a round that published nothing.
    assert closed["latest"] is None and closed["quality"] == "outage"
    assert "2 servers never reported" in closed["agreement"]["undecided"]
    assert "never reported" in closed["agreement"]["outage"]
    assert {s["status"] for s in closed["servers"] if s["server"] == "liar"} == {"accepted"}
    assert "starvation" not in round_counters(closed)
    assert {s["server"]: s.get("reason") for s in closed["servers"]} == {"liar": None, "h1": "no_result",
                                                                         "h2": "no_result"}
    # With enough in hand to outvote them, it is published as any round is.
    honest = [ok(f"h{i}", delay=0.01, unc=0.005) for i in range(1, 4)]
    meta4 = RoundMeta(round_id="r2", node="n", dispatched_at=0.0, deadline_at=10.0, key_prefix="t",
                      history_length=10, ntp=config_mod.ntp_from_mapping(
                          {"servers": ["h1", "h2", "h3", "x"], "max_delay": STRICT.max_delay_s,
                           "max_acceptable_uncertainty": 0.05}))
    record = build_record(meta4, honest, finished_at=12.0, unreported_unknown=True)
    assert record["latest"] is not None
    assert {s["server"]: s.get("reason") for s in record["servers"]}["x"] == "no_result"


def _nts(outcome):
    outcome["sample"]["nts"] = True
    return outcome


def test_auth_select_require_prefer_mix():
    from orchestrator.selection import select
    from workers.quality import Thresholds

    strict = Thresholds(max_delay_s=0.1, max_uncertainty_s=0.01, min_stratum=1, max_stratum=15)
    plain_tight = ok("plain", delay=0.002, unc=0.001)
    nts_wide = _nts(ok("nts", delay=0.004, unc=0.005))
    nts_wider = _nts(ok("nts2", delay=0.006, unc=0.006))
    outcomes = [plain_tight, nts_wide, nts_wider]
    assert select(outcomes, strict, enable_fallback=True,
                  method=Selection.BEST)["chosen"]["server"] == "plain"  # mix: alike
    assert select(outcomes, strict, enable_fallback=True, method=Selection.BEST,
                  auth_select="ignore")["chosen"]["server"] == "plain"
    assert select(outcomes, strict, enable_fallback=True, method=Selection.BEST,
                  auth_select="prefer")["chosen"]["server"] == "nts"
    required = select(outcomes, strict, enable_fallback=True, method=Selection.BEST, auth_select="require")
    assert required["chosen"]["server"] == "nts"
    plain = next(s for s in required["servers"] if s["server"] == "plain")
    assert (plain["status"], plain["reason"]) == ("rejected", "not_authenticated")
    # prefer: plain samples when no authenticated one passes; require: never.
    only_plain = [plain_tight, failed("nts")]
    assert select(only_plain, strict, enable_fallback=True, method=Selection.BEST,
                  auth_select="prefer")["chosen"]["server"] == "plain"
    assert select(only_plain, strict, enable_fallback=True, method=Selection.BEST,
                  auth_select="require")["quality"] == "starvation"


def _meta(servers):
    ntp = config_mod.ntp_from_mapping({"servers": servers, "max_delay": STRICT.max_delay_s,
                                       "max_acceptable_uncertainty": STRICT.max_uncertainty_s})
    return RoundMeta(round_id="r1", node="n", dispatched_at=0.0, deadline_at=10.0, key_prefix="t",
                     history_length=10, ntp=ntp)


def test_a_round_no_server_was_asked_in_is_an_outage_not_starvation():
    """Issue #25: a node cut off for a minute -- rounds closed at their deadline with nothing reported were
    counted as NTP starvation ("no server passed any gate (6 servers)") though no server was asked."""
    meta = _meta(["a", "b", "c"])
    closed = build_record(meta, [], finished_at=12.0, unreported_unknown=True)
    assert closed["quality"] == "outage" and closed["latest"] is None
    assert "no server was asked" in closed["agreement"]["outage"]
    counts = round_counters(closed)
    assert counts["outage"] == 1 and "starvation" not in counts and counts["failed:no_result"] == 3
    # Tasks that started after the deadline sent nothing either; one server alone, likewise.
    late = [failed(name, "round_deadline", 1) for name in ("a", "b", "c")]
    assert build_record(meta, late, finished_at=12.0)["quality"] == "outage"
    assert build_record(_meta(["a"]), [], finished_at=12.0, unreported_unknown=True)["quality"] == "outage"


def test_every_server_silent_is_starvation_not_an_outage():
    """Dead servers, an upstream blocking NTP, misspelt names look just like this: they must reach the
    starvation and reachability alerts (an adversarial review: as an outage they took no reach bit)."""
    meta = _meta(["a", "b", "c"])
    record = build_record(meta, [failed("a"), failed("b", "socket_error"), failed("c", "dns_error")],
                          finished_at=1.0)
    assert record["quality"] == "starvation"
    # Some reported timeouts, the rest never reported: the timeouts were asked, so not an outage either.
    closed = build_record(meta, [failed("a")], finished_at=12.0, unreported_unknown=True)
    assert closed["quality"] == "starvation"
    # Nobody asked at all: an outage.
    assert build_record(meta, [], finished_at=12.0, unreported_unknown=True)["quality"] == "outage"


def test_one_host_refusing_with_icmp_is_an_outage_several_silent_hosts_are_not():
    """Issue #25: the relay every server is reached through, killed: nothing listens on its ports.  The
    kernel's ICMP rate limit answers some requests and not others, so timeouts sit beside the refusals."""
    relay = [f"10.77.0.1:{port}" for port in (8123, 8124, 8125)]
    meta = _meta(relay)
    down = [failed(relay[0], "port_unreachable", 2), failed(relay[1]), failed(relay[2])]
    record = build_record(meta, down, finished_at=1.0)
    assert record["quality"] == "outage" and record["latest"] is None
    assert "nothing listens at 10.77.0.1" in record["agreement"]["outage"]
    counts = round_counters(record)
    assert counts["outage"] == 1 and "starvation" not in counts and counts["failed:port_unreachable"] == 1
    # A refusal only inside an advanced-mode burst (its last request timed out) says the same.
    burst = failed(relay[0], "timeout", 1)
    burst["history"][0]["refusals"] = [{"reason": "port_unreachable", "detail": ""}]
    assert build_record(meta, [burst, failed(relay[1]), failed(relay[2])], finished_at=1.0)["quality"] == "outage"
    # The same host, only timeouts: a relay that runs and forwards nothing -- its own alert; starvation here.
    assert build_record(meta, [failed(n) for n in relay], finished_at=1.0)["quality"] == "starvation"
    # Refusals from one host among servers on several: dead servers, not a path down.
    mixed = _meta([relay[0], "time.example.org", "10.78.0.2:123"])
    several = [failed(relay[0], "port_unreachable"), failed("time.example.org"),
               failed("10.78.0.2:123", "port_unreachable")]
    assert build_record(mixed, several, finished_at=1.0)["quality"] == "starvation"
    # A reply refused, a socket error or a kiss from the host: something answered or failed otherwise.
    for other in ("bogus_origin", "socket_error", "kod_rate"):
        assert build_record(meta, [failed(relay[0], "port_unreachable"), failed(relay[1], other, 1),
                                   failed(relay[2])], finished_at=1.0)["quality"] == "starvation", other
    # One attempt refused, a later one answered with a refused reply: a reply came.
    answered = failed(relay[0], "port_unreachable", 2)
    answered["history"][1]["reason"] = "bogus_origin"
    assert build_record(meta, [answered, failed(relay[1]), failed(relay[2])], finished_at=1.0)["quality"] \
        == "starvation"
    # The hub: one server, refusing.  IPv6 and port-less names group by host too.
    assert build_record(_meta(["[fd00::1]:123"]), [failed("[fd00::1]:123", "port_unreachable")],
                        finished_at=1.0)["quality"] == "outage"


def test_every_server_refused_by_policy_is_an_outage_not_starvation():
    """Issue #26: over-budget requests -- the relay's RATE kiss, the back-off after it, the hub's own
    budget -- are policy refusals, counted apart from NTP starvation; DENY and timeouts are not."""
    meta = _meta(["a", "b", "c"])
    rate = failed("a", "kod_rate", 1)
    rate["kiss_code"] = "RATE"
    record = build_record(meta, [rate, failed("b", "kod_backoff", 0), failed("c", "politeness_limit", 0)],
                          finished_at=1.0)
    assert record["quality"] == "outage" and "policy refusal" in record["agreement"]["outage"]
    assert "starvation" not in round_counters(record)
    deny = failed("a", "kod_deny", 1)
    deny["kiss_code"] = "DENY"
    assert build_record(meta, [deny, failed("b", "kod_backoff", 0), failed("c", "kod_backoff", 0)],
                        finished_at=1.0)["quality"] == "starvation"
    assert build_record(meta, [rate, failed("b"), failed("c", "kod_backoff", 0)],
                        finished_at=1.0)["quality"] == "starvation"


def test_starvation_stays_starvation_when_any_server_answered_or_only_one_timed_out():
    meta = _meta(["a", "b", "c"])
    # A refused reply, a kiss: the path works, the servers said no.
    assert build_record(meta, [failed("a"), failed("b", "bogus_origin"), failed("c")],
                        finished_at=1.0)["quality"] == "starvation"
    assert build_record(meta, [failed("a"), failed("b", "kod_rate", 1), failed("c")],
                        finished_at=1.0)["quality"] == "starvation"
    # A server that replied on one attempt and timed out on the next: a reply came.
    mixed = failed("c")
    mixed["history"][0]["reason"] = "bogus_origin"
    assert build_record(meta, [failed("a"), failed("b"), mixed], finished_at=1.0)["quality"] == "starvation"
    # Replies that failed the gates.
    assert build_record(meta, [ok(n, delay=5.0, unc=5.0) for n in ("a", "b", "c")],
                        finished_at=1.0)["quality"] == "starvation"
    # One server timing out is that server's business.
    assert build_record(_meta(["a"]), [failed("a")], finished_at=1.0)["quality"] == "starvation"
    # The worker's own error is not the path.
    assert build_record(meta, [failed(n, "query_error", 1) for n in ("a", "b", "c")],
                        finished_at=1.0)["quality"] == "starvation"
