"""workers.tasks: the query task's outcomes -- their shape, their one-line summaries, the sequential chain's
carrying -- and the politeness budget's refusal, with the task body run in-process (no worker, no Redis).

Retries, deadlines and the early decider's view of them: tests/unit/test_retry.py.
"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import redis

from workers import config as config_mod
from workers import inflight, kod, measure, politeness, tasks
from workers.contracts import OutcomeStatus, Reason
from workers.ntp.client import QueryFailed
from workers.ntp.sanity import Rejection

SEED = 20270303

#: The outcome's keys, as the task's docstring promises them (the chord's join and the closer read them).
OK_KEYS = {"summary", "status", "server", "sample", "attempts", "history", "worker"}
FAILED_KEYS = {"summary", "status", "server", "reason", "detail", "kiss_code", "attempts", "history", "worker"}


def test_summaries_say_the_outcome_at_a_glance_on_random_outcomes():
    rng = random.Random(SEED)
    for _ in range(500):
        offset_s, unc_s, attempts = rng.uniform(-2.0, 2.0), rng.uniform(0.0, 0.5), rng.randint(1, 5)
        text = tasks.summarise_ok({"offset_s": offset_s, "uncertainty_s": unc_s}, attempts)
        found = re.fullmatch(r"ok ([+-]\d+\.\d{3}) ms ±(\d+\.\d{3}) ms(?: \(attempt (\d+)\))?", text)
        assert found, text
        assert float(found[1]) == pytest.approx(offset_s * 1e3, abs=5e-4)
        assert float(found[2]) == pytest.approx(unc_s * 1e3, abs=5e-4)
        assert (int(found[3]) if found[3] else 1) == attempts and (found[3] is None) == (attempts == 1)
        reason = rng.choice(list(Reason))
        assert tasks.summarise_failure(reason, attempts) == f"failed: {reason}" + (
            f" x{attempts}" if attempts > 1 else "")


def test_flower_is_shown_the_job_in_brief():
    job = {"server": "time.example", "node": "n1", "round_id": "n1-r", "deadline_at": 1.0, "samples": 4}
    assert tasks.describe(job) == "{server=time.example, node=n1, round=n1-r}"
    assert tasks.describe(job, attempt=3) == "{server=time.example, node=n1, round=n1-r, attempt=3}"


def test_a_sequential_chain_carries_every_outcome_before_it():
    a, b, c = {"server": "a"}, {"server": "b"}, {"server": "c"}
    assert tasks._carry((), c) is c
    assert tasks._carry((a,), c) == [a, c]  # the first task of the chain returned one outcome
    assert tasks._carry(([a, b],), c) == [a, b, c]


# -- the task body, in-process ------------------------------------------------------------------------------

@pytest.fixture
def bench(monkeypatch):
    """The task with a fixed clock, its attempt scripted, its reports kept here, no kisses remembered."""
    state = SimpleNamespace(now=1.7e9, plan=[], reports=[])
    monkeypatch.setattr(tasks, "service_now", lambda: state.now)
    monkeypatch.setattr(inflight, "tracker", inflight.Tracker(clock=lambda: state.now))
    monkeypatch.setattr(kod, "memory", kod.KissMemory(clock=lambda: state.now, wall_clock=lambda: state.now))
    monkeypatch.setattr(tasks, "reporter", SimpleNamespace(report=lambda job, outcome: state.reports.append(
        (job["server"], outcome))))
    monkeypatch.delenv(config_mod.ENV_NODE, raising=False)

    def attempt(job, *, on_exchange=None, on_done=None):
        step = state.plan.pop(0)
        if isinstance(step, Rejection):
            raise QueryFailed(step)
        if isinstance(step, Exception):
            raise step
        return dict(step)

    monkeypatch.setattr(measure, "attempt", attempt)
    return state


def _job(*, retries: int = 0, polite=None) -> dict:
    ntp = config_mod.ntp_from_mapping({"servers": ["192.0.2.1"], "max_retries": retries + 1, "retry_delay": 1.0})
    job = measure.make_job(server=ntp.servers[0], node="n1", round_id="n1-r", ntp=ntp, deadline_at=1.7e9 + 60,
                           rate_backoff_s=480.0, key_prefix="t")
    if polite:
        job["polite"] = polite
    return job


def test_an_answer_is_an_ok_outcome_of_the_promised_shape(bench):
    sample = {"server": "192.0.2.1", "offset_s": 0.0012, "uncertainty_s": 0.0003, "delay_s": 0.01,
              "refusals": [{"reason": "bogus_origin", "detail": "..."}]}
    bench.plan = [sample]
    outcome = tasks.query_server(job=_job())
    assert outcome.keys() == OK_KEYS and list(outcome)[0] == "summary"  # first: Flower's result column
    assert (outcome["status"], outcome["server"], outcome["attempts"]) == (OutcomeStatus.OK, "192.0.2.1", 1)
    assert outcome["summary"] == "ok +1.200 ms ±0.300 ms"
    assert "refusals" not in outcome["sample"], "the burst's refusals move to the attempt's history entry"
    assert outcome["history"] == [{"attempt": 1, "started_at": bench.now, "reason": None,
                                   "refusals": [{"reason": "bogus_origin", "detail": "..."}]}]
    assert bench.reports == [("192.0.2.1", outcome)], "reported to the round, for a closer"


def test_random_failures_end_in_a_failed_outcome_of_the_promised_shape(bench):
    rng = random.Random(SEED + 1)
    for case in range(100):
        reason = rng.choice([Reason.TIMEOUT, Reason.BOGUS_ORIGIN, Reason.UNSYNCHRONISED_LEAP, Reason.KOD_RATE])
        code = "RATE" if reason == Reason.KOD_RATE else None
        kod.memory = kod.KissMemory(clock=lambda: bench.now, wall_clock=lambda: bench.now)
        earlier = [Rejection(Reason.TIMEOUT, f"earlier {i}") for i in range(rng.randint(0, 2))]
        bench.plan = [measure.BurstFailed(Rejection(reason, f"case {case}", kiss_code=code), earlier)]
        bench.reports.clear()
        outcome = tasks.query_server(job=_job())  # one attempt: max_retries 1, so no retry
        assert outcome.keys() == FAILED_KEYS and list(outcome)[0] == "summary", case
        assert (outcome["status"], outcome["reason"], outcome["detail"], outcome["kiss_code"],
                outcome["attempts"]) == (OutcomeStatus.FAILED, reason, f"case {case}", code, 1), case
        assert outcome["summary"] == f"failed: {reason}"
        (entry,) = outcome["history"]
        assert (entry["attempt"], entry["reason"], entry["detail"], entry["kiss_code"]) == (
            1, reason, f"case {case}", code), case
        assert entry.get("refusals", []) == [{"reason": r.reason, "detail": r.detail} for r in earlier], case
        assert bench.reports == [("192.0.2.1", outcome)], case


def test_an_unexpected_error_is_a_query_error_not_a_crashed_task(bench):
    bench.plan = [ZeroDivisionError("boom")]
    outcome = tasks.query_server(job=_job())
    assert (outcome["status"], outcome["reason"], outcome["detail"]) == (
        OutcomeStatus.FAILED, Reason.QUERY_ERROR, "ZeroDivisionError: boom")


@pytest.mark.parametrize(("code", "reason", "then"), [("DENY", Reason.KOD_DENY, Reason.KOD_DEMOBILISED),
                                                     ("RATE", Reason.KOD_RATE, Reason.KOD_BACKOFF)])
def test_a_kissed_server_is_not_asked_again_and_its_refusal_is_no_attempt(bench, code, reason, then):
    bench.plan = [Rejection(reason, f"Kiss-o'-Death {code}", kiss_code=code)]
    first = tasks.query_server(job=_job(retries=2))  # not retried either (RFC 5905 section 7.4)
    second = tasks.query_server(job=_job(retries=2))  # no step left in the plan: it must send nothing
    assert (first["kiss_code"], first["attempts"]) == (code, 1)
    assert (second["reason"], second["attempts"], second["history"]) == (then, 0, [])
    assert second["summary"] == f"failed: {then}"


def test_the_sequential_chain_returns_the_outcomes_before_it_with_its_own(bench):
    bench.plan = [{"server": "192.0.2.1", "offset_s": 0.0, "uncertainty_s": 0.001}]
    before = {"server": "other", "status": "ok"}
    outcomes = tasks.query_server(before, job=_job())
    assert [o["server"] for o in outcomes] == ["other", "192.0.2.1"]


def test_a_budget_spent_or_unreadable_sends_nothing(monkeypatch, bench):
    monkeypatch.setattr(tasks, "app", SimpleNamespace(backend=SimpleNamespace(client="the backend's client")))
    budget = politeness.Budget(2, 10)
    asked = []

    def take(client, prefix, server, requests, given, *, holder):
        asked.append((client, prefix, server, requests, given, holder))
        return answers.pop(0)

    monkeypatch.setattr(politeness, "take", take)
    answers = [politeness.Answer(True, 1, 1, 0.0)]
    assert tasks._over_budget(_job(polite=budget.as_job()), 1) is None
    assert tasks._over_budget(_job(), 1) is None and len(asked) == 1, "only a hub node's jobs carry a budget"
    client, prefix, server, requests, given, holder = asked[0]
    assert (client, prefix, server, requests, given) == ("the backend's client", "t", "192.0.2.1", 1, budget)
    assert holder.startswith("n1:n1-r:1:")

    answers = [politeness.Answer(False, 2, 9, 42.0)]
    reason, detail = tasks._over_budget(_job(polite=budget.as_job()), 2)
    assert reason == Reason.POLITENESS_LIMIT and "2 of 2 requests" in detail and "no request sent" in detail

    def unreachable(*a, **k):
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(politeness, "take", unreachable)
    reason, detail = tasks._over_budget(_job(polite=budget.as_job()), 1)
    assert reason == Reason.POLITENESS_LIMIT and "could not be checked (ConnectionError)" in detail
    bench.plan = []  # the task sends nothing either
    outcome = tasks.query_server(job=_job(polite=budget.as_job()))
    assert (outcome["reason"], outcome["attempts"]) == (Reason.POLITENESS_LIMIT, 0)
