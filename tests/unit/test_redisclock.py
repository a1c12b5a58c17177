"""RedisClock (pure): Redis' clock estimated on this host's monotonic clock, whatever its wall clock does.

A fake host (true time, a monotonic clock, a wall clock that can be stepped)
and a fake Redis whose ``TIME`` reads its own clock halfway through a round
trip on that host.  Before the fix the estimate was ``time.time()`` plus an
offset measured every minute: a step of the host's wall clock moved it by the
step until the next measurement.
"""

from __future__ import annotations

import time

import pytest
import redis

from workers import redisclock
from workers.redisclock import REFRESH_S, RETRY_S, SAMPLES, RedisClock

#: Redis' clock minus true time, and this host's wall clock minus true time, before any step (s).
REDIS_OFF_S = 0.25
WALL_OFF_S = -3.5
START_S = 1_800_000_000.0


class Host:
    """True time, and this host's clocks on it: ``monotonic`` (its own origin and rate) and a steppable wall."""

    CLOCK_MONOTONIC_RAW = 4  # stands in for the time module in workers.redisclock

    def __init__(self, *, monotonic_ppm: float = 0.0):
        self.true = START_S
        self.wall_off = WALL_OFF_S
        self.monotonic_ppm = monotonic_ppm
        self._mono_origin = START_S - 1234.5

    def advance(self, seconds: float) -> None:
        self.true += seconds

    def step(self, seconds: float) -> None:
        self.wall_off += seconds

    def time(self) -> float:
        return self.true + self.wall_off

    def monotonic(self) -> float:
        return (self.true - self._mono_origin) * (1 + self.monotonic_ppm * 1e-6)

    def clock_gettime(self, clock_id: int) -> float:
        assert clock_id == self.CLOCK_MONOTONIC_RAW
        return self.monotonic()


class FakeRedis:
    """``TIME`` on Redis' clock, read after ``legs[0]`` of the round trip; ``down``: every command fails."""

    def __init__(self, host: Host, legs: list[tuple[float, float]] | None = None):
        self.host = host
        self.legs = legs or [(0.0005, 0.0005)]
        self.calls = 0
        self.down = False

    def truth(self) -> float:
        return self.host.true + REDIS_OFF_S

    def time(self) -> tuple[int, int]:
        out, back = self.legs[self.calls % len(self.legs)]
        self.calls += 1
        if self.down:
            raise redis.ConnectionError("Redis is down")
        self.host.advance(out)
        now = self.truth()
        self.host.advance(back)
        seconds = int(now)
        return seconds, round((now - seconds) * 1e6)


@pytest.fixture
def host(monkeypatch) -> Host:
    """The host the clock runs on: its ``time.time`` and its monotonic clock (``redisclock.ticks``)."""
    fake = Host()
    monkeypatch.setattr(redisclock, "time", fake)
    monkeypatch.setattr(redisclock, "ticks", fake.monotonic, raising=False)  # (the old clock had none)
    return fake


def test_the_monotonic_clock_is_the_raw_one_where_there_is_one():
    """CLOCK_MONOTONIC_RAW: a slew of the wall clock (chrony's, up to 8 %) moves CLOCK_MONOTONIC, not it."""
    if hasattr(time, "CLOCK_MONOTONIC_RAW"):
        a = time.clock_gettime(time.CLOCK_MONOTONIC_RAW)
        assert a <= redisclock.ticks() <= time.clock_gettime(time.CLOCK_MONOTONIC_RAW)
    else:
        assert redisclock.ticks is time.monotonic


def test_it_estimates_redis_clock_from_one_measurement(host):
    fake = FakeRedis(host)
    clock = RedisClock(fake)
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6)
    assert fake.calls == SAMPLES
    assert clock.error_s == pytest.approx(0.0005, abs=1e-6)
    assert clock.offset_s == pytest.approx(REDIS_OFF_S - WALL_OFF_S, abs=2e-6)
    host.advance(30.0)
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6) and fake.calls == SAMPLES  # no new measurement


@pytest.mark.parametrize("step_s", [7200.0, -7200.0])
def test_a_step_of_the_wall_clock_does_not_move_the_estimate(host, step_s):
    """The beat's deadlines, a worker's ``service_now``, a reader's ages: none moves with the host's step."""
    fake = FakeRedis(host)
    clock = RedisClock(fake)
    clock.now()
    host.advance(10.0)
    offset_before = clock.offset_s
    host.step(step_s)
    host.advance(0.001)
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6)
    # The reader's form (orchestrator.reader): the wall clock plus the offset, which follows the step.
    assert clock.offset_s == pytest.approx(offset_before - step_s, abs=1e-5)
    assert host.time() + clock.offset_s == pytest.approx(fake.truth(), abs=2e-6)
    # A host time read after the step converts to the Redis time it was read at; one read 5 s earlier, 5 s earlier.
    assert clock.from_local(host.time()) == pytest.approx(fake.truth(), abs=2e-6)
    assert clock.from_local(host.time() - 5.0) == pytest.approx(fake.truth() - 5.0, abs=2e-6)
    host.advance(REFRESH_S - 11.0)  # to just before the next measurement: still right
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6)
    assert fake.calls == SAMPLES  # right without measuring again


def test_the_estimate_is_measured_again_every_refresh_to_follow_drift(host):
    """This host's monotonic clock runs 300 ppm fast: 18 ms in a minute, then measured again."""
    host.monotonic_ppm = 300.0
    fake = FakeRedis(host)
    clock = RedisClock(fake)
    clock.now()
    host.advance(REFRESH_S * 0.99)
    assert clock.now() - fake.truth() == pytest.approx(300e-6 * REFRESH_S * 0.99, rel=0.01)
    assert fake.calls == SAMPLES
    host.advance(REFRESH_S * 0.02)
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6)
    assert fake.calls == 2 * SAMPLES


def test_while_redis_does_not_answer_the_estimate_runs_on_the_monotonic_clock(host):
    fake = FakeRedis(host)
    clock = RedisClock(fake)
    clock.now()
    error = clock.error_s
    fake.down = True
    host.advance(REFRESH_S + 5.0)
    host.step(7200.0)
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6)  # one failed measurement, the estimate runs on
    assert clock.error_s == error
    assert clock.measure() == pytest.approx(fake.truth() - host.time(), abs=2e-6)  # the offset, now
    calls = fake.calls
    host.advance(RETRY_S / 2)
    clock.now()
    assert fake.calls == calls  # not before RETRY_S
    host.advance(RETRY_S)
    fake.down = False
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6)
    assert fake.calls == calls + SAMPLES


def test_before_redis_ever_answers_it_is_the_hosts_clock(host):
    fake = FakeRedis(host)
    fake.down = True
    clock = RedisClock(fake)
    assert clock.now() == host.time()
    assert clock.offset_s == 0.0 and clock.error_s is None
    assert clock.from_local(host.time() - 2.0) == pytest.approx(host.time() - 2.0)


def test_the_quickest_exchange_is_kept(host):
    """Slow exchanges with lopsided legs would put the midpoint off; the quickest (2 ms, symmetric) is used."""
    fake = FakeRedis(host, legs=[(0.009, 0.001), (0.001, 0.001), (0.0005, 0.0055)])
    clock = RedisClock(fake)
    clock.measure()
    assert clock.error_s == pytest.approx(0.001, abs=1e-6)
    assert clock.now() == pytest.approx(fake.truth(), abs=2e-6)


def test_an_injected_monotonic_clock_is_used(host):
    """``monotonic=``: the clock a caller (a test) keeps the estimate on, not the module's."""
    fake = FakeRedis(host)
    other = Host()
    clock = RedisClock(fake, monotonic=other.monotonic)
    clock.now()
    other.advance(30.0)  # only the injected clock runs: the estimate moves with it
    assert clock.now() - fake.truth() == pytest.approx(30.0, abs=0.01)  # the exchanges took no time on it


# -- reading Redis' clock, and ages on it ------------------------------------------------------------------

def test_a_time_reply_is_unix_seconds_whatever_types_redis_py_gives():
    assert redisclock.time_of((1_800_000_000, 250_000)) == 1_800_000_000.25
    assert redisclock.time_of((b"1800000000", b"5")) == pytest.approx(1_800_000_000.000005), "in a pipeline: bytes"


def test_redis_now_is_the_servers_time_command(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        before = redisclock.time_of(client.time())
        now = redisclock.redis_now(client)
        assert before <= now <= redisclock.time_of(client.time()), "read with TIME, between two TIMEs"
    finally:
        client.close()


def test_one_clock_per_client_in_a_process():
    client, other = redis.Redis(port=1), redis.Redis(port=2)
    assert redisclock.clock_for(client) is redisclock.clock_for(client), "every thread reads one estimate"
    assert redisclock.clock_for(other) is not redisclock.clock_for(client), "another Redis, another clock"


def test_an_age_is_redis_now_minus_published_at_never_measured_at():
    """The measuring node's own clock (``measured_at``) may be hours off: it never enters an age."""
    latest = {"published_at": 1000.0, "measured_at": 1000.0 - 7200.0}
    assert redisclock.latest_age_s(latest, 1030.0) == 30.0
    assert redisclock.latest_age_s(None, 1030.0) is None, "no measurement: no age"
    assert redisclock.latest_age_s({"measured_at": 1000.0}, 1030.0) is None, "no published_at: no age"
    assert redisclock.latest_age_s({"published_at": "soon"}, 1030.0) is None, "an unreadable one: no age"


def test_stale_is_past_the_limit_or_no_age_at_all():
    assert not redisclock.is_stale(360.0, 360.0), "at the limit: still fresh"
    assert redisclock.is_stale(360.001, 360.0)
    assert redisclock.is_stale(None, 360.0), "no measurement is stale"
