"""workers.measure: the job, a burst keeping its minimum-delay sample (RFC 5905's clock filter idea) with its
jitter and spread, the burst's refusals and kisses, and one attempt against a loopback server.

The burst's rule is checked against an oracle on random bursts (:func:`_oracle_best`); the attempt runs
against :class:`tests.unit.loopback_ntp.LoopbackNtp` on 127.0.0.1.
"""

from __future__ import annotations

import math
import random
import threading
import time

import pytest

from workers import config as config_mod
from workers import inflight, measure
from workers.contracts import Reason
from workers.ntp.client import QueryFailed, Sample
from workers.ntp.sanity import Rejection
from workers.retry import RetryPolicy

from .loopback_ntp import LoopbackNtp, good, reply_to

SEED = 20270302


def _sample(rng: random.Random, i: int, *, delay_s: float | None = None, offset_s: float | None = None) -> Sample:
    t1_ns = 1_795_998_582_000_000_000 + i * 100_000_000 + rng.randint(0, 1000)
    delay = rng.uniform(0.001, 0.1) if delay_s is None else delay_s
    return Sample(server="s", address="192.0.2.1", port=123,
                  offset_s=rng.uniform(-0.01, 0.01) if offset_s is None else offset_s, delay_s=delay,
                  uncertainty_s=delay / 2 + rng.uniform(0, 0.002), stratum=2, leap=0, precision_s=2 ** -20,
                  root_delay_s=0.001, root_dispersion_s=0.001, ref_id="GPS", t1_ns=t1_ns,
                  t4_ns=t1_ns + round(delay * 1e9), kernel_rx_timestamp=True)


def _oracle_best(samples: list[Sample]) -> dict:
    """What a burst keeps, written out: the first sample of least delay; jitter the RMS of the others'
    offsets from it (RFC 5905 section 10's psi); spread max - min offset; uncertainty widened by the jitter."""
    least = min(s.delay_s for s in samples)
    best = next(s for s in samples if s.delay_s == least)
    others = [s for s in samples if s is not best]
    jitter = math.sqrt(sum((s.offset_s - best.offset_s) ** 2 for s in others) / len(others)) if others else 0.0
    return {**best.as_dict(), "samples_taken": len(samples), "burst_delays_s": [s.delay_s for s in samples],
            "jitter_s": jitter, "spread_s": max(s.offset_s for s in samples) - min(s.offset_s for s in samples),
            "uncertainty_s": best.uncertainty_s + jitter}


def _assert_same(got: dict, want: dict, case) -> None:
    assert got.keys() == want.keys(), case
    for key, value in want.items():
        if isinstance(value, float | list):
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (case, key)
        else:
            assert got[key] == value, (case, key)


def test_a_burst_keeps_its_minimum_delay_sample_widened_by_its_jitter_on_random_bursts():
    rng = random.Random(SEED)
    for case in range(500):
        n = rng.randint(1, 8)
        samples = [_sample(rng, i) for i in range(n)]
        if n > 1 and rng.random() < 0.2:  # a tie: the first of them is kept
            samples[-1] = _sample(rng, n - 1, delay_s=min(s.delay_s for s in samples))
        got = measure._best_of(samples)
        _assert_same(got, _oracle_best(samples), case)
        assert got["jitter_s"] >= 0 and got["spread_s"] >= 0
        assert got["uncertainty_s"] >= got["jitter_s"]


def test_one_sample_has_no_jitter_and_no_spread():
    sample = _sample(random.Random(SEED + 1), 0)
    best = measure._best_of([sample])
    assert (best["jitter_s"], best["spread_s"], best["samples_taken"]) == (0.0, 0.0, 1)
    assert best["uncertainty_s"] == sample.uncertainty_s


def test_a_burst_gives_up_on_a_request_slower_than_the_ratio_allows():
    burst = measure._Burst()
    assert burst.give_up_at(100.0) is None, "no sample yet: wait to the timeout"
    burst.taken(0.03)
    burst.taken(0.01)
    burst.taken(0.02)  # not better: kept 0.01
    assert burst.best_delay_s == 0.01
    assert burst.give_up_at(100.0) == pytest.approx(100.0 + measure.BURST_DELAY_RATIO * 0.01
                                                    + inflight.HOLD_ALLOWANCE_S)


def test_the_best_delay_is_the_least_whatever_the_threads_order():
    rng = random.Random(SEED + 2)
    delays = [rng.uniform(0.001, 1.0) for _ in range(400)]
    burst = measure._Burst()
    threads = [threading.Thread(target=lambda chunk=delays[i::8]: [burst.taken(d) for d in chunk]) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert burst.best_delay_s == min(delays)


# -- the burst, with its exchanges replaced ------------------------------------------------------------------

def _run(plan: list, monkeypatch) -> dict:
    """:func:`measure._run_burst` where exchange ``i`` does ``plan[i]``: a Sample, a Rejection (refused), or
    ``("request", rejection)`` (its request could not be prepared: an NTS-KE failure)."""
    monkeypatch.setattr(measure, "ADVANCED_SAMPLE_SPACING_S", 0.002)

    def request(i):
        step = plan[i]
        if isinstance(step, tuple):
            raise QueryFailed(step[1])
        return None, ("127.0.0.1", 123)

    def one(i, protected, where):
        step = plan[i]
        if isinstance(step, Rejection):
            raise QueryFailed(step)
        return step

    return measure._run_burst({"samples": len(plan)}, request, one)


def test_random_bursts_keep_their_best_and_say_what_was_refused(monkeypatch):
    rng = random.Random(SEED + 3)
    seen = {"kept": 0, "all refused": 0, "kissed": 0}
    for case in range(60):
        n = rng.randint(1, 6)
        plan: list = []
        for i in range(n):
            roll = rng.random()
            if roll < 0.55:
                plan.append(_sample(rng, i))
            elif roll < 0.8:
                plan.append(Rejection(rng.choice([Reason.BOGUS_ORIGIN, Reason.TIMEOUT, Reason.UNSYNCHRONISED_LEAP]),
                                      f"refusal {i}"))
            elif roll < 0.9:
                plan.append(("request", Rejection(Reason.NTS_KE_FAILED, f"ke {i}")))
            else:
                plan.append(Rejection(Reason.KOD_RATE, f"kiss {i}", kiss_code="RATE"))
        refusals = [p[1] if isinstance(p, tuple) else p for p in plan if not isinstance(p, Sample)]
        samples = [p for p in plan if isinstance(p, Sample)]
        kisses = [r for r in refusals if r.kiss_code]
        if kisses:
            with pytest.raises(measure.BurstFailed) as failed:
                _run(plan, monkeypatch)
            assert failed.value.rejection.kiss_code == "RATE", case  # a kiss: no more packets this attempt
            assert all(r in refusals and not r.kiss_code for r in failed.value.earlier), case
            seen["kissed"] += 1
        elif not samples:
            with pytest.raises(measure.BurstFailed) as failed:
                _run(plan, monkeypatch)
            named = [failed.value.rejection, *failed.value.earlier]
            assert sorted(named, key=repr) == sorted(refusals, key=repr), case  # every refusal, once
            seen["all refused"] += 1
        else:
            result = _run(plan, monkeypatch)
            said = result.pop("refusals", [])
            _assert_same(result, _oracle_best(sorted(samples, key=lambda s: s.t1_ns)), case)
            assert sorted(said, key=lambda r: r["detail"]) == sorted(
                ({"reason": r.reason, "detail": r.detail} for r in refusals), key=lambda r: r["detail"]), case
            seen["kept"] += 1
    assert min(seen.values()) >= 5, seen


def test_replies_in_any_order_are_kept_in_the_order_sent(monkeypatch):
    rng = random.Random(SEED + 4)
    samples = [_sample(rng, i) for i in range(5)]
    monkeypatch.setattr(measure, "ADVANCED_SAMPLE_SPACING_S", 0.001)

    def one(i, protected, where):
        time.sleep(0.02 * (5 - i))  # the last sent answers first
        return samples[i]

    result = measure._run_burst({"samples": 5}, lambda i: (None, None), one)
    assert result["burst_delays_s"] == [s.delay_s for s in samples]


# -- the job --------------------------------------------------------------------------------------------------

def test_a_job_is_plain_json_carrying_the_retry_policy_or_its_probe():
    rng = random.Random(SEED + 5)
    for case in range(100):
        raw = {"servers": ["10.0.0.1", "nts://nts.example:4461", "[2001:db8::1]:1234"],
               "timeout_seconds": rng.choice([0.5, 1.0, 2.0]), "max_retries": rng.randint(1, 4),
               "retry_delay": rng.choice([1.0, 5.0]), "measurement_mode": rng.choice(["simple", "advanced"]),
               "advanced_samples": rng.randint(2, 8), "max_root_delay": rng.uniform(0.1, 1.0),
               "max_root_dispersion": rng.uniform(0.1, 1.0)}
        ntp = config_mod.ntp_from_mapping(raw)
        retry = rng.random() < 0.7
        for server in ntp.servers:
            job = measure.make_job(server=server, node="n1", round_id="r1", ntp=ntp, deadline_at=1234.5,
                                   rate_backoff_s=480.0, report_to="p:outcomes", key_prefix="p", retry=retry)
            policy = RetryPolicy.from_settings(ntp, rate_backoff_s=480.0)
            assert RetryPolicy.from_job(job) == (policy if retry else policy.probe()), case
            assert (job["server"], job["host"], job["port"], job["nts"]) == (server.name, server.host, server.port,
                                                                             server.nts)
            assert (job["node"], job["round_id"], job["deadline_at"], job["report_to"], job["key_prefix"]) == (
                "n1", "r1", 1234.5, "p:outcomes", "p")
            assert (job["max_root_delay_s"], job["max_root_dispersion_s"], job["config_id"]) == (
                ntp.max_root_delay, ntp.max_root_dispersion, ntp.config_id)
            assert job["nts_ca_file"] == (ntp.nts_ca_file if server.nts else None)
            assert all(isinstance(v, str | int | float | bool | list | type(None)) for v in job.values())


# -- resolving ------------------------------------------------------------------------------------------------

def test_an_address_literal_is_resolved_without_the_resolver(monkeypatch):
    monkeypatch.setattr(measure.client, "resolve", lambda *a: pytest.fail("the resolver was asked"))
    family, address = measure._resolve("127.0.0.1", 123, timeout_s=0.1)
    assert address == ("127.0.0.1", 123)
    assert measure._resolve("::1", 123, timeout_s=0.1)[1][:2] == ("::1", 123)


def test_a_hung_resolver_costs_the_timeout_not_the_task(monkeypatch):
    monkeypatch.setattr(measure.client, "resolve", lambda host, port: time.sleep(0.5))
    started = time.monotonic()
    with pytest.raises(QueryFailed) as failed:
        measure._resolve("hangs.example", 123, timeout_s=0.05)
    assert failed.value.rejection.reason == Reason.DNS_ERROR and "longer than 0.05 s" in failed.value.rejection.detail
    assert time.monotonic() - started < 0.4


def test_a_name_no_resolver_can_answer_is_a_dns_error():
    with pytest.raises(QueryFailed) as failed:
        measure._resolve("a" * 64 + ".invalid", 123, timeout_s=0.1)
    assert failed.value.rejection.reason == Reason.DNS_ERROR


# -- one attempt against a loopback server --------------------------------------------------------------------

def _job(port: int, *, samples: int) -> dict:
    return {"server": f"127.0.0.1:{port}", "host": "127.0.0.1", "port": port, "timeout_s": 0.5, "samples": samples,
            "max_root_delay_s": 1.0, "max_root_dispersion_s": 1.0, "nts": False}


def test_a_simple_attempt_takes_one_sample_and_tells_its_exchange():
    told = []
    with LoopbackNtp(good(offset_s=0.25)) as server:
        result = measure.attempt(_job(server.port, samples=1), on_exchange=lambda i: told.append(("out", i)),
                                 on_done=lambda i, delay_s: told.append(("done", i, delay_s)))
    assert result["offset_s"] == pytest.approx(0.25, abs=0.05)
    assert (result["samples_taken"], result["jitter_s"], result["burst_delays_s"]) == (1, 0.0, [result["delay_s"]])
    assert told == [("out", 0), ("done", 0, result["delay_s"])]


def test_an_advanced_attempt_keeps_the_quickest_reply_gives_up_on_slow_ones_and_records_refusals(monkeypatch):
    """Five requests: answered after 30, 2 and 20 ms (each with its own offset); one after 450 ms, past
    :data:`measure.BURST_DELAY_RATIO` times the best so far (given up: a timeout); one refused.  (The ratio is
    raised to 40 so that a loaded machine's timer jitter cannot change which reply is quickest or given up.)"""
    monkeypatch.setattr(measure, "ADVANCED_SAMPLE_SPACING_S", 0.04)
    monkeypatch.setattr(measure, "BURST_DELAY_RATIO", 40.0)
    plan = [(0.03, 1.0), (0.002, 2.0), (0.02, 3.0), (0.45, 4.0), None]
    def answer(i, request, received_ns):
        if plan[i] is None:
            return [(0.0, reply_to(request, received_ns=received_ns, leap=3))]
        wait_s, offset_s = plan[i]
        return [(wait_s, reply_to(request, received_ns=received_ns, offset_s=offset_s))]

    done: list = []
    with LoopbackNtp(answer) as server:
        result = measure.attempt(_job(server.port, samples=5),
                                 on_done=lambda i, delay_s: done.append((i, delay_s)))
    assert result["offset_s"] == pytest.approx(2.0, abs=0.002), "the 2-ms reply is kept"
    assert result["samples_taken"] == 3 and len(result["burst_delays_s"]) == 3
    assert result["spread_s"] == pytest.approx(2.0, abs=0.05)
    assert sorted(r["reason"] for r in result["refusals"]) == [Reason.TIMEOUT, Reason.UNSYNCHRONISED_LEAP]
    assert sorted(i for i, _ in done) == [0, 1, 2, 3, 4]
    assert dict(done)[3] is None and dict(done)[4] is None and dict(done)[1] == result["delay_s"]


def test_an_attempt_whose_every_reply_is_refused_fails_naming_them_all():
    with LoopbackNtp(good(leap=3)) as server:
        with pytest.raises(measure.BurstFailed) as failed:
            measure.attempt(_job(server.port, samples=1))
    assert failed.value.rejection.reason == Reason.UNSYNCHRONISED_LEAP and failed.value.earlier == []
