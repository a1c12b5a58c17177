"""workers/retry.py: the one retry policy, against a slow, obvious oracle, and everyone who asks it agreeing.

The oracle below re-derives each answer the long way from the settings as docs/design.md states them --
``max_retries`` attempts in all, waits ``retry_delay`` doubled each time between the attempts' *starts*
counted from the first one's, no attempt that cannot end by the round's deadline, a kiss or a spent budget
never retried -- and the policy must give the same answer over thousands of seeded random configurations,
every :class:`Reason`, and deadlines on and either side of each boundary.  Then the query task (its retries,
countdowns and what it tells the tracker), the round (its jobs and deadline) and the early decider (which
servers it takes as still to be retried) are each run and held to the same answers.
"""

from __future__ import annotations

import math
import random

import pytest

from workers import config as config_mod
from workers.contracts import Reason
from workers.retry import (
    ACTED_ON,
    ADVANCED_SAMPLE_SPACING_S,
    MAX_RATE_BACKOFF_S,
    RATE_BACKOFF_INTERVALS,
    NotRetried,
    RetryPolicy,
    rate_backoff_for,
)

SEED = 20270127

# -- the oracle: each rule spelt out by hand ---------------------------------------------------------

#: The reasons never retried, and the rule each falls under, written out by hand.
ORACLE_NOT_RETRIED = {
    "kod_rate": "kiss_of_death", "kod_deny": "kiss_of_death", "kod_rstr": "kiss_of_death",
    "kod_backoff": "kiss_of_death", "kod_demobilised": "kiss_of_death",
    "politeness_limit": "politeness",
    "wrong_node": "wrong_node",
    "round_deadline": "past_deadline",
    "no_result": "not_a_query_failure", "falseticker": "not_a_query_failure",
    "not_authenticated": "not_a_query_failure", "over_strict_thresholds": "not_a_query_failure",
    "over_relaxed_thresholds": "not_a_query_failure", "other_timescale": "not_a_query_failure",
}
#: Every reason a failure can carry: the named ones, kisses not acted on, and one nobody has named yet.
ALL_REASONS = [*(r.value for r in Reason), "kod_init", "kod_step", "kod_ntsn", "kod_xyzw", "a_reason_from_the_future"]


def oracle_attempts(max_retries: int) -> int:
    if max_retries == 0:
        return 1
    return max_retries


def oracle_starts(max_retries: int, retry_delay: float) -> list[float]:
    """Attempt k's start after the first's: the waits, each double the last, added one by one."""
    starts = [0.0]
    wait = retry_delay
    while len(starts) < oracle_attempts(max_retries):
        starts.append(starts[-1] + wait)
        wait = wait + wait
    return starts


def oracle_samples(mode: str, advanced_samples: int) -> int:
    if mode == "advanced":
        return advanced_samples
    return 1


def oracle_attempt_s(timeout: float, samples: int) -> float:
    """A look-up and every exchange each taking their whole timeout, the burst's gaps between them."""
    return timeout * (samples + 1) + ADVANCED_SAMPLE_SPACING_S * (samples - 1)


def oracle_latest_starts(starts: list[float], attempt_s: float) -> list[float]:
    latest = []
    for k, planned in enumerate(starts):
        if k == 0:
            latest.append(planned)
        elif latest[k - 1] + attempt_s > planned:
            latest.append(latest[k - 1] + attempt_s)
        else:
            latest.append(planned)
    return latest


def oracle_next(starts, attempt_s, k, *, first, now, deadline, reason):
    """``(rule, start)`` of what follows attempt ``k`` (from 1) failing at ``now`` with ``reason``."""
    if reason is not None and reason in ORACLE_NOT_RETRIED:
        return ORACLE_NOT_RETRIED[reason], None
    if k + 1 > len(starts):
        return "last_attempt", None
    start = first + starts[k]  # attempt k + 1's place in the schedule
    if now > start:
        start = now  # its place is past: at once
    if start + attempt_s > deadline:
        return "past_deadline", None
    return None, start


def oracle_refused(k, *, now, deadline, decided):
    if now > deadline:
        return "past_deadline"
    if k >= 2 and decided:
        return "round_decided"
    return None


def oracle_backoff(code: str, count: int, rate_s: float) -> float:
    if code in ("DENY", "RSTR"):
        return math.inf
    if code != "RATE":
        return 0.0
    backoff = rate_s
    for _ in range(count - 1):
        backoff = backoff * 2
    return min(backoff, 86_400.0)


def random_settings(rng: random.Random) -> dict:
    mode = rng.choice(["simple", "advanced"])
    return {"servers": ["a.example"], "max_retries": rng.randint(0, 6),
            "retry_delay": rng.choice([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 7.5, 600.0, rng.uniform(0.01, 30.0)]),
            "timeout_seconds": rng.choice([0.05, 0.3, 1.0, 2.0, 5.0, 60.0, rng.uniform(0.01, 10.0)]),
            "measurement_mode": mode, "advanced_samples": rng.randint(1, 8)}


# -- the policy against the oracle ---------------------------------------------------------------------

def test_the_policy_answers_as_the_oracle_over_thousands_of_random_configs():
    rng = random.Random(SEED)
    seen_rules: set[str | None] = set()
    checked = 0
    for case in range(3000):
        raw = random_settings(rng)
        ntp = config_mod.ntp_from_mapping(raw)
        rate_s = rng.choice([0.0, 1.0, 480.0, rng.uniform(0.0, 50_000.0)])
        policy = RetryPolicy.from_settings(ntp, rate_backoff_s=rate_s)
        where = f"case {case}: {raw}"
        starts = oracle_starts(raw["max_retries"], raw["retry_delay"])
        samples = oracle_samples(raw["measurement_mode"], raw["advanced_samples"])
        attempt_s = oracle_attempt_s(raw["timeout_seconds"], samples)
        assert policy.attempts == oracle_attempts(raw["max_retries"]) == len(starts), where
        assert policy.offsets_s == starts, where
        assert policy.samples == samples and policy.attempt_s == attempt_s, where
        assert policy.latest_starts_s == oracle_latest_starts(starts, attempt_s), where
        assert policy.server_budget_s == pytest.approx(starts[-1] + len(starts) * attempt_s), where
        assert RetryPolicy.from_job(policy.as_job()) == policy, where  # what the job carries is the policy
        probe = policy.probe()
        assert (probe.attempts, probe.samples, probe.timeout_s) == (1, 1, policy.timeout_s), where

        first = rng.uniform(1e9, 2e9)
        for _ in range(12):
            k = rng.randint(1, policy.attempts + 1)
            now = first + rng.choice([0.0, rng.uniform(0.0, starts[min(k, len(starts) - 1)] + 3 * attempt_s)])
            planned = max(now, first + starts[k]) if k < len(starts) else now
            deadline = rng.choice([
                planned + attempt_s,  # the next attempt just ends by it
                math.nextafter(planned + attempt_s, math.inf),
                math.nextafter(planned + attempt_s, -math.inf),  # a hair short
                first + rng.uniform(-5.0, starts[-1] + (len(starts) + 1) * attempt_s),
            ])
            reason = rng.choice([None, *ALL_REASONS])
            rule, start = oracle_next(starts, attempt_s, k, first=first, now=now, deadline=deadline, reason=reason)
            answer = policy.next_attempt(k, first_started_at=first, now=now, deadline_at=deadline, reason=reason)
            assert (answer.rule, answer.starts_at) == (rule, start), (where, k, now - first, deadline - first, reason)
            assert answer.retried == (rule is None)
            if answer.retried:
                assert answer.countdown_s(now) == start - now >= 0
                decided = answer.given(round_decided=True)
                assert (decided.rule, decided.starts_at) == (NotRetried.ROUND_DECIDED, None)
            assert answer.given(round_decided=False) == answer
            seen_rules.add(rule)
            decided = rng.random() < 0.5
            assert policy.start_refused(k, now=now, deadline_at=deadline, round_decided=decided) == oracle_refused(
                k, now=now, deadline=deadline, decided=decided), (where, k)
            code = rng.choice(["RATE", "DENY", "RSTR", "INIT", "STEP"])
            count = rng.randint(1, 40)
            assert policy.kiss_backoff_s(code, count) == oracle_backoff(code, count, rate_s), (where, code, count)
            checked += 1
    assert checked == 36_000
    assert seen_rules == {None, *NotRetried} - {NotRetried.ROUND_DECIDED}  # that one is Retry.given's


@pytest.mark.parametrize("reason", ALL_REASONS)
def test_every_reason_is_retried_or_not_by_a_named_rule(reason):
    assert RetryPolicy.rule_for_reason(reason) == ORACLE_NOT_RETRIED.get(reason)


def test_chronoticks_config_asks_again_at_5_and_15_s_and_a_rate_kiss_keeps_a_server_away_8_minutes():
    ntp = config_mod.ntp_from_mapping({"servers": ["a.example"]})  # max_retries 3, retry_delay 5 s, timeout 2 s
    policy = RetryPolicy.from_settings(ntp, rate_backoff_s=rate_backoff_for(120.0))
    assert policy.offsets_s == [0.0, 5.0, 15.0]
    assert policy.rate_backoff_s == RATE_BACKOFF_INTERVALS * 120.0 == 480.0
    assert [policy.kiss_backoff_s("RATE", n) for n in (1, 2, 3)] == [480.0, 960.0, 1920.0]
    assert policy.kiss_backoff_s("RATE", 30) == MAX_RATE_BACKOFF_S
    assert {code: policy.kiss_backoff_s(code, 1) for code in ACTED_ON - {"RATE"}} == {"DENY": math.inf,
                                                                                      "RSTR": math.inf}


# -- the round asks it -----------------------------------------------------------------------------------

def test_the_rounds_jobs_carry_the_policy_and_its_deadline_allows_every_servers_schedule():
    from orchestrator import rounds
    from orchestrator.sources import Reach

    rng = random.Random(SEED + 1)
    for case in range(200):
        raw = random_settings(rng)
        raw["servers"] = [f"10.0.0.{i}" for i in range(1, rng.randint(2, 5))]
        raw["parallel_queries"] = rng.random() < 0.7
        interval = rng.choice([16.0, 64.0, 120.0])
        config = config_mod.from_mapping({"clock_measurement": {"ntp": raw, "timing": {
            "normal_operation": {"measurement_interval": interval}}}}, environ={})
        unreachable = raw["servers"][0]
        header, _, meta = rounds.plan_round(config, "n1", now=1000.0,
                                            reach={unreachable: Reach(0, Reach.SIZE)})
        jobs = [sig.kwargs["job"] for sig in header] if raw["parallel_queries"] else [
            task.kwargs["job"] for task in header[0].tasks]
        starts = oracle_starts(raw["max_retries"], raw["retry_delay"])
        attempt_s = oracle_attempt_s(raw["timeout_seconds"], oracle_samples(raw["measurement_mode"],
                                                                            raw["advanced_samples"]))
        per_server = starts[-1] + len(starts) * attempt_s
        turns = 1 if raw["parallel_queries"] else len(raw["servers"])
        assert meta.deadline_at - 1000.0 == pytest.approx(per_server * turns + rounds.DISPATCH_SLACK_S), case
        assert meta.deadline_at == 1000.0 + rounds.round_budget_s(config)
        policy = RetryPolicy.from_settings(config.ntp, rate_backoff_s=4 * interval)
        for job in jobs:
            carried = RetryPolicy.from_job(job)
            assert carried == (policy.probe() if job["server"] == unreachable else policy), (case, job["server"])
            assert job["deadline_at"] == meta.deadline_at


# -- the task does what it says, and the early decider hears it ---------------------------------------------

class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Retried(Exception):
    """What the task raised where Celery would retry it."""

    def __init__(self, kwargs: dict, countdown: float, max_retries: int):
        super().__init__("retried")
        self.kwargs, self.countdown, self.max_retries = kwargs, countdown, max_retries


@pytest.fixture
def task_bench(monkeypatch):
    """The query task with Redis' clock, the attempt, the Kiss-o'-Death memory, the tracker and Celery's
    retry replaced, and the orchestrator's decider installed, its ``early.decide`` reporting what it is given."""
    from orchestrator import callback, early
    from orchestrator.outcomes import RoundMeta
    from workers import inflight, kod, measure, tasks
    from workers.ntp.client import QueryFailed
    from workers.ntp.sanity import Rejection

    clock = Clock(1.7e9)
    bench = type("Bench", (), {})()
    bench.clock = clock
    bench.tracker = inflight.Tracker(clock=clock)
    bench.tracker._schedule = lambda due, key: None  # no timer thread: the test asks when it wants to
    bench.given: list[tuple[str, early.Outstanding]] = []  # (why asked, the target as the decider got it)
    bench.plan = []  # per attempt: (duration_s, reason or None for a sample)
    bench.attempts_made: list[float] = []
    bench.decided_after = None  # the round is published as this attempt fails
    bench.decide_while_waiting = None  # ... or while the retry of this one waits
    monkeypatch.setattr(tasks, "service_now", clock)
    monkeypatch.setattr(inflight, "tracker", bench.tracker)
    monkeypatch.setattr(kod, "memory", kod.KissMemory(clock=clock, wall_clock=clock))
    monkeypatch.delenv(config_mod.ENV_NODE, raising=False)

    def fake_retry(*, kwargs, countdown, max_retries, **_):
        return Retried(kwargs, countdown, max_retries)

    monkeypatch.setattr(tasks.query_server, "retry", fake_retry)

    def fake_decide(outcomes, outstanding, **_):
        for item in outstanding:
            if item.server == bench.target:
                bench.given.append((bench.asking, item))
        return early.Decision(False, "held by the test", needed_uncertainty_s=1.0)

    monkeypatch.setattr(early, "decide", fake_decide)

    def fake_attempt(job, *, on_exchange=None, on_done=None):
        duration_s, reason = bench.plan[len(bench.attempts_made)]
        bench.attempts_made.append(clock.now)
        start = clock.now
        for i in range(job["samples"]):
            clock.now = start + i * ADVANCED_SAMPLE_SPACING_S
            on_exchange(i)
            bench.asking = f"request {i} of attempt {len(bench.attempts_made)}"
            bench.tracker._evaluate(("t", "n1", bench.round_id))
            on_done(i, None)
        bench.asking = "its attempt failed"  # what the task tells the tracker next
        clock.now = start + duration_s
        if bench.decided_after == len(bench.attempts_made):
            bench.tracker._rounds[("t", "n1", bench.round_id)].published = True
        if reason is None:
            return {"server": job["server"], "offset_s": 0.001, "uncertainty_s": 0.002}
        code = reason[len("kod_"):].upper() if reason.startswith("kod_") else None
        raise QueryFailed(Rejection(reason, "the test's", kiss_code=code))

    monkeypatch.setattr(measure, "attempt", fake_attempt)

    def decider(view):
        if "meta" not in view.context:
            view.context.update(meta=bench.meta, servers=bench.meta.servers,
                                nts={s.name: s.nts for s in bench.meta.ntp.servers}, strict=bench.meta.strict)
        return callback.decide_early(view)

    bench.tracker.install(decider)

    def start_round(config, round_id: str, *, forget_kisses: bool = True):
        """Three helpers answered already (so that the decider weighs the target), the target's job."""
        bench.round_id, bench.asking = round_id, "the helpers' outcomes"
        if forget_kisses:
            kod.memory = kod.KissMemory(clock=clock, wall_clock=clock)
        deadline_at = clock.now + 1e6
        bench.meta = RoundMeta.for_round(config, round_id=round_id, node="n1", dispatched_at=clock.now,
                                         deadline_at=deadline_at)
        jobs = [measure.make_job(server=s, node="n1", round_id=round_id, ntp=config.ntp, deadline_at=deadline_at,
                                 rate_backoff_s=480.0, key_prefix="t") for s in config.ntp.servers]
        bench.target = jobs[0]["server"]
        for job in jobs[1:]:
            bench.tracker.outcome(job, {"server": job["server"], "status": "ok", "sample": {"server": job["server"]}})
        return jobs[0]

    def run(job: dict) -> tuple[dict, list[Retried], list[float]]:
        """The task and its retries, each started at its countdown plus its message's lateness."""
        history, retries, lateness = None, [], []
        while True:
            try:
                return tasks.query_server(job=job, history=history), retries, lateness
            except Retried as retried:
                retries.append(retried)
                history = retried.kwargs["history"]
                late_s = bench.rng.choice([0.0, 0.0, bench.rng.uniform(0.0, 3.0), bench.rng.uniform(0.0, 30.0)])
                lateness.append(late_s)
                clock.now += retried.countdown + late_s
                if bench.decide_while_waiting == len(history):
                    bench.tracker._rounds[("t", "n1", bench.round_id)].published = True

    bench.start_round, bench.run = start_round, run
    return bench


def test_the_task_retries_as_the_policy_says_and_the_early_decider_sees_the_same(task_bench):
    bench = task_bench
    rng = bench.rng = random.Random(SEED + 2)
    seen = {"retried": 0, "final": 0, "not final": 0, "waiting": 0, "published as it failed": 0,
            "published while waiting": 0}
    outcomes: dict[str, int] = {}
    for case in range(800):
        raw = random_settings(rng)
        raw["servers"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        config = config_mod.from_mapping({"clock_measurement": {"ntp": raw}}, environ={})
        job = bench.start_round(config, f"r{case}")
        first = bench.clock.now
        starts = oracle_starts(raw["max_retries"], raw["retry_delay"])
        samples = oracle_samples(raw["measurement_mode"], raw["advanced_samples"])
        attempt_s = oracle_attempt_s(raw["timeout_seconds"], samples)
        job["deadline_at"] = deadline = first + rng.uniform(0.0, starts[-1] + len(starts) * attempt_s + 1.0)
        plan = []
        for _ in range(len(starts)):
            reason = rng.choice(["timeout"] * 6 + ["bogus_origin", "kod_rate", "kod_deny", "kod_init",
                                                    "nts_ke_failed", "socket_error", None])
            plan.append((rng.uniform(ADVANCED_SAMPLE_SPACING_S * (samples - 1), attempt_s), reason))
        bench.plan, bench.attempts_made, bench.given = plan, [], []
        # The round is published as attempt k fails, or while its retry waits (or by nobody here).
        decided_after = bench.decided_after = rng.choice([None, None, rng.randint(1, len(starts))])
        bench.decide_while_waiting = None if decided_after else rng.choice([None, rng.randint(1, len(starts))])
        if decided_after is not None:
            plan[decided_after - 1] = (plan[decided_after - 1][0], plan[decided_after - 1][1] or "timeout")
        outcome, retries, lateness = bench.run(job)
        where = (case, raw, deadline - first)

        # The oracle's run: attempt by attempt, each start, its finality, and what ends it.
        expected_starts, expected_countdowns, expected_given = [], [], []
        t, k, end = first, 1, None
        while end is None:
            if t > deadline:
                end = ("failed", "round_deadline")
                break
            if k >= 2 and bench.decide_while_waiting == k - 1:
                end = ("failed", plan[k - 2][1])  # the last attempt's reason: not retried, the round published
                seen["published while waiting"] += 1
                break
            expected_starts.append(t)
            final = oracle_next(starts, attempt_s, k, first=first, now=t, deadline=deadline, reason=None)[0] is not None
            expected_given += [(f"request {i} of attempt {k}", not final) for i in range(samples)]
            duration_s, reason = plan[k - 1]
            failed_at = t + duration_s
            if reason is None:
                end = ("ok", None)
                break
            rule, start = oracle_next(starts, attempt_s, k, first=first, now=failed_at, deadline=deadline,
                                      reason=reason)
            if rule is None and decided_after == k:
                rule = "round_decided"  # and the decider, the round published, is not asked again
                seen["published as it failed"] += 1
            if rule is None:
                expected_given.append(("its attempt failed", True))  # a retry to come: told as it failed
            if rule is not None:
                end = ("failed", reason)
                break
            expected_countdowns.append(start - failed_at)
            t = start + lateness[k - 1]
            k += 1

        assert (outcome["status"], outcome.get("reason")) == end, where
        assert outcome["attempts"] == len(expected_starts) == len(bench.attempts_made), where
        assert [h["started_at"] for h in outcome["history"]] == expected_starts == bench.attempts_made, where
        assert [r.countdown for r in retries] == pytest.approx(expected_countdowns, abs=1e-9), where
        assert all(r.max_retries == len(starts) - 1 for r in retries), where
        # The decider took the target as still to be asked again exactly when the policy said a retry follows.
        got = [(why, item.retrying) for why, item in bench.given if why != "the helpers' outcomes"]
        assert got == expected_given, (where, got, expected_given)
        assert all(item.bound_s == 0.0 for _, item in bench.given if item.retrying), where
        seen["retried"] += len(retries)
        seen["final"] += sum(1 for _, retrying in got if not retrying)
        seen["not final"] += sum(1 for why, retrying in got if retrying and why.startswith("request"))
        seen["waiting"] += sum(1 for why, _ in got if why == "its attempt failed")
        outcomes[f"{end[0]}:{end[1]}"] = outcomes.get(f"{end[0]}:{end[1]}", 0) + 1
    assert min(seen.values()) > 30, seen
    assert min(outcomes.get(end, 0) for end in ("ok:None", "failed:round_deadline", "failed:kod_rate",
                                                 "failed:kod_init", "failed:timeout")) > 10, outcomes


def test_a_kiss_ends_the_task_and_keeps_the_server_away_as_long_as_the_policy_says(task_bench):
    bench = task_bench
    bench.rng = random.Random(SEED + 3)
    config = config_mod.from_mapping({"clock_measurement": {"ntp": {
        "servers": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], "timeout_seconds": 0.5}}}, environ={})
    policy = RetryPolicy.from_settings(config.ntp, rate_backoff_s=480.0)
    job = bench.start_round(config, "kissed")
    bench.plan, bench.attempts_made, bench.given = [(0.1, "kod_rate")], [], []
    outcome, retries, _ = bench.run(job)
    assert (outcome["reason"], outcome["attempts"], retries) == ("kod_rate", 1, [])  # RFC 5905 7.4: no retry
    kissed_at = bench.clock.now
    for elapsed_s, reason in ((policy.kiss_backoff_s("RATE", 1) - 1.0, "kod_backoff"),
                              (policy.kiss_backoff_s("RATE", 1) + 1.0, None)):
        bench.clock.now = kissed_at + elapsed_s
        job = bench.start_round(config, f"later-{elapsed_s}", forget_kisses=False)
        bench.plan, bench.attempts_made = [(0.1, None)], []
        outcome, retries, _ = bench.run(job)
        assert outcome.get("reason") == reason and retries == []
        if reason is not None:  # refused before any packet: not an attempt, and not retried by its rule
            assert outcome["attempts"] == 0 and RetryPolicy.rule_for_reason(reason) == NotRetried.KISS_OF_DEATH


def test_a_job_for_another_node_is_not_measured_nor_retried(task_bench, monkeypatch):
    bench = task_bench
    bench.rng = random.Random(SEED + 4)
    config = config_mod.from_mapping({"clock_measurement": {"ntp": {
        "servers": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]}}}, environ={})
    job = bench.start_round(config, "stray")
    bench.plan, bench.attempts_made = [(0.1, None)], []
    monkeypatch.setenv(config_mod.ENV_NODE, "another-node")
    outcome, retries, _ = bench.run(job)
    assert (outcome["reason"], outcome["attempts"], retries, bench.attempts_made) == ("wrong_node", 0, [], [])
    assert RetryPolicy.rule_for_reason(outcome["reason"]) == NotRetried.WRONG_NODE
