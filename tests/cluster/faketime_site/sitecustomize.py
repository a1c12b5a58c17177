"""Loaded only by the cluster bed's workers under libfaketime (tests/cluster/test_hub.py): ``time.sleep``
fails with EINVAL there (libfaketime 0.9.10 and an absolute ``clock_nanosleep`` on the true monotonic
clock), so a failed sleep sleeps with ``select`` instead.  Never on the service's own path."""

import select
import time

_sleep = time.sleep


def _sleep_or_select(seconds: float) -> None:
    try:
        _sleep(seconds)
    except OSError:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            select.select([], [], [], left)


time.sleep = _sleep_or_select
