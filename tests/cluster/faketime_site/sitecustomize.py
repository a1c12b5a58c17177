"""Loaded only by the cluster bed's workers under libfaketime (tests/cluster/test_hub.py), never on the service's
path.  Two artefacts of faking a node's clock in user space, each undone here:

- ``time.sleep`` fails with EINVAL (libfaketime 0.9.10 and an absolute ``clock_nanosleep`` on the true
  monotonic clock): a failed sleep sleeps with ``select`` instead.
- The kernel's receive timestamps are the *true* time while the worker's clock is faked.  Mixed with a faked
  send time they are off by the fake offset; the client's check (a receive time between the send and the
  read) catches that only while the read comes sooner than the offset, and a busy machine reads later.
  Reading t4 in user space instead costs the LAN legs their precision (milliseconds of scheduling).  A real
  node's kernel stamps packets on its own clock: so here the kernel's time is moved by the fake offset
  (``FAKETIME``), as the node's own kernel would have stamped it.
"""

import os
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

def _fake_offset_ns() -> int:
    """``FAKETIME``'s offset ("+0.005s", "-0.0025s") in ns; 0 for anything else."""
    spec = os.environ.get("FAKETIME", "").strip()
    if len(spec) > 2 and spec[0] in "+-" and spec.endswith("s"):
        try:
            return round(float(spec[:-1]) * 1e9)
        except ValueError:
            return 0
    return 0


_OFFSET_NS = _fake_offset_ns()
if _OFFSET_NS:
    try:
        from workers.ntp import client as _client
    except ImportError:  # not the project's interpreter
        pass
    else:
        _kernel_rx_ns = _client.kernel_rx_ns

        def _on_the_nodes_clock(ancdata):
            true_ns = _kernel_rx_ns(ancdata)
            return None if true_ns is None else true_ns + _OFFSET_NS

        _client.kernel_rx_ns = _on_the_nodes_clock
