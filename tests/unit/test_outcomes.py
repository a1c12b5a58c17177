"""orchestrator/outcomes.py: when a round that published nothing is an outage, and the round's metadata.

An outage (no NTP server asked: the node's worker, its path, a policy) takes no reach bit and is not NTP
starvation; dead servers, an upstream blocking NTP or misspelt names are starvation, and must reach its
alerts.  Each rule of :func:`outage_of` once, on round-record entries as the selection writes them (the
records the rules produce: tests/unit/test_selection.py).  Then :class:`RoundMeta`, as it crosses Celery.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.outcomes import RoundMeta, outage_of
from workers import config as config_mod
from workers.contracts import Reason
from workers.quality import Thresholds


def failed(server: str, *reasons: str, kiss_code: str | None = None, refusals: tuple[str, ...] = ()) -> dict:
    """A ``failed`` entry whose attempts failed with ``reasons`` (the last is the entry's)."""
    history = [{"attempt": i + 1, "reason": r} for i, r in enumerate(reasons)]
    if refusals:
        history[-1]["refusals"] = [{"reason": r} for r in refusals]
    return {"server": server, "status": "failed", "reason": reasons[-1], "kiss_code": kiss_code,
            "attempts": len(reasons), "history": history}


def test_no_servers_is_not_an_outage():
    assert outage_of([]) is None


def test_nobody_took_the_tasks_is_an_outage():
    said = outage_of([failed("a:123", Reason.NO_RESULT), failed("b:123", Reason.ROUND_DEADLINE)])
    assert said is not None and said.startswith("no server was asked (no_result x1, round_deadline x1)"), said


def test_a_policy_refusal_is_an_outage_not_starvation():
    said = outage_of([failed("a:123", Reason.KOD_RATE, kiss_code="RATE"), failed("b:123", Reason.KOD_BACKOFF),
                      failed("c:123", Reason.POLITENESS_LIMIT), failed("d:123", Reason.NO_RESULT)])
    assert said is not None and "a policy refusal" in said, said


def test_one_host_answering_port_unreachable_is_an_outage():
    """A relay's ports, all on one host: one ICMP refusal, the rest the refusals rate-limited into timeouts."""
    said = outage_of([failed("10.77.0.1:8123", Reason.PORT_UNREACHABLE), failed("10.77.0.1:8124", Reason.TIMEOUT),
                      failed("10.77.0.1:8125", Reason.TIMEOUT, Reason.TIMEOUT)])
    assert said is not None and "nothing listens at 10.77.0.1" in said, said


@pytest.mark.parametrize(("servers", "why"), [
    ([failed("10.0.0.1:123", Reason.PORT_UNREACHABLE), failed("10.0.0.2:123", Reason.TIMEOUT)],
     "refusals from several hosts: dead servers"),
    ([failed("10.77.0.1:8123", Reason.TIMEOUT), failed("10.77.0.1:8124", Reason.TIMEOUT)],
     "one host only timing out: a relay that runs and cannot forward"),
    ([failed("a:123", Reason.DNS_ERROR), failed("b:123", Reason.NO_RESULT)], "a misspelt name"),
    ([failed("a:123", Reason.NO_RESULT), {"server": "b:123", "status": "failed", "reason": "no_result",
                                          "sample": {"offset_s": 0.0}, "history": []}], "a sample came"),
    ([failed("a:123", Reason.NO_RESULT), {**failed("b:123", Reason.NO_RESULT), "status": "late"}],
     "a server still out"),
    ([failed("a:123", Reason.KOD_DENY, kiss_code="DENY")], "a DENY kiss: the server refuses us"),
    ([failed("a:123", Reason.NO_RESULT, refusals=(Reason.BOGUS_ORIGIN,))], "a burst's reply refused"),
    ([failed("10.77.0.1:8123", Reason.PORT_UNREACHABLE), failed("10.77.0.1:8124", Reason.KOD_RATE,
                                                                kiss_code="RATE")],
     "a host that answered (RATE) is listening"),
])
def test_what_servers_failing_look_like_is_starvation(servers, why):
    assert outage_of(servers) is None, why


def _config(**ntp) -> config_mod.Config:
    return config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["a:8123", "b:8123"], **ntp}},
                                    "ntp_service": {"key_prefix": "pfx", "history_length": 77}}, environ={})


def test_a_rounds_metadata_takes_every_setting_from_the_config():
    config = _config(max_delay=0.3, max_acceptable_uncertainty=0.2)
    meta = RoundMeta.for_round(config, round_id="r1", node="n1", dispatched_at=10.0, deadline_at=40.0)
    assert (meta.key_prefix, meta.history_length) == ("pfx", 77), "ntp_service's settings"
    assert meta.servers == ["a:8123", "b:8123"], "the node's servers"
    assert meta.strict == Thresholds(0.3, 0.2, config.ntp.min_stratum, config.ntp.max_stratum), "the strict gate"
    assert meta.stale_after_s == config.stale_after_s("n1"), "the node's staleness limit"


def test_a_rounds_metadata_crosses_celery_as_json_unchanged():
    meta = RoundMeta.for_round(_config(selection="best", server_groups={"g": ["a:8123", "b:8123"]}), round_id="r1",
                               node="n1", dispatched_at=10.0, deadline_at=40.0)
    assert RoundMeta.from_dict(json.loads(json.dumps(meta.as_dict()))) == meta
