"""A host whose wall clock is stepped keeps its estimate of Redis' clock (:class:`workers.redisclock.RedisClock`).

The process runs under libfaketime with its offset read from a file on every
call (``FAKETIME_TIMESTAMP_FILE``, ``FAKETIME_NO_CACHE=1``), and the monotonic
clocks left true (``FAKETIME_DONT_FAKE_MONOTONIC=1``), as a real step leaves
them; the process steps its own wall clock 2 h forward, then 2 h back, and
reads the estimate right after each step, long before the estimate's next
measurement (:data:`workers.redisclock.REFRESH_S`).  Redis (the session's
``redis-server``) keeps the true time.

Before the fix the estimate was ``time.time()`` plus an offset measured once a
minute: it jumped with the step, so for up to a minute the beat closed every
open round as 2 h overdue, a worker refused every query as past its deadline,
and a reader's ages were 2 h off.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.integration

#: How far the estimate may be from Redis' ``TIME`` read between two estimates (s), beyond half that
#: read's round trip: a loaded 2-core test machine, and the child's own scheduling.
SLACK_S = 0.005

STEP_S = 7200.0

CHILD = r"""
import json, select, sys, time

import redis

from workers import redisclock

url, stamp, step = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = redis.Redis.from_url(url)
clock = redisclock.clock_for(client)  # what the beat and rounds use; the worker's service_now() is a RedisClock too


def wall_minus_monotonic():
    return time.time() - time.monotonic()


def read(tag):
    # Redis' own TIME, bracketed by the estimates before and after it (and timed on the monotonic clock).
    before, sent = clock.now(), time.monotonic()
    exact = redisclock.redis_now(client)
    took = time.monotonic() - sent
    after = clock.now()
    wall = time.time()
    return {"tag": tag, "before": before, "exact": exact, "after": after, "took": took,
            "reader": wall + clock.offset_s,  # how orchestrator.reader reads it: time.time() + offset_s
            "from_local": clock.from_local(wall), "wall": wall, "error_s": clock.error_s}


def step_to(offset_s):
    base = wall_minus_monotonic()
    with open(stamp, "w") as f:
        f.write(f"{offset_s:+f}s\n")
    deadline = time.monotonic() + 5
    while abs(wall_minus_monotonic() - base) < STEP / 2:  # libfaketime reads the file on every call
        if time.monotonic() > deadline:
            raise SystemExit("libfaketime did not step the clock")
        select.select([], [], [], 0.001)


STEP = abs(step)
out = [read("before the steps")]
measured = clock.error_s
step_to(step)
out.append(read(f"right after {step:+g} s"))
step_to(0.0)
out.append(read("right after stepping back"))
out.append({"measured_once": clock.error_s == measured, "refresh_s": clock.refresh_s})
print(json.dumps(out))
"""


def _libfaketime() -> str:
    """The thread-safe libfaketime (Debian's ``faketime`` package), preloaded directly for a timestamp file."""
    found = sorted(
        glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
        + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed (Debian package faketime); run scripts/bootstrap")
    return found[0]


@pytest.mark.parametrize("step_s", [STEP_S, -STEP_S])
def test_a_stepped_wall_clock_does_not_move_the_estimate_of_redis_clock(step_s, redis_url, tmp_path):
    stamp = tmp_path / "faketime"
    stamp.write_text("+0s\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LD_PRELOAD": _libfaketime(),
           "FAKETIME_TIMESTAMP_FILE": str(stamp), "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, redis_url, str(stamp), str(step_s)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *reads, summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["measured_once"], summary  # every read below came from the first measurement: no refresh
    for r in reads:
        bound = r["took"] / 2 + (r["error_s"] or 0.0) + SLACK_S
        where = json.dumps(r, indent=1)
        assert r["before"] - bound <= r["exact"] <= r["after"] + bound, where  # beat, rounds, worker: now()
        assert abs(r["reader"] - r["exact"]) <= r["after"] - r["before"] + bound, where  # the reader's offset_s
        assert abs(r["from_local"] - r["exact"]) <= r["after"] - r["before"] + bound, where
    stepped = reads[1]
    assert abs(stepped["wall"] - stepped["exact"] - step_s) < 1.0, stepped  # the host's clock did step
