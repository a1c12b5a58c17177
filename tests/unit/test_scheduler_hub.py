"""The beat's schedule, driven on a simulated clock: warm-up rounds keep each node's phase, and the hub node keeps
its own interval and never warms up (issue #26 items 1 and 5).

The real :meth:`Scheduler.run` loop runs in the test's thread; the scheduler's monotonic clock and its waits are
a simulation (a wait moves the clock on by what the scheduler asked to wait), and Redis' clock is that plus an
offset.  So every dispatch happens at exactly the time the scheduler chose, with no sleep and no thread.
"""

from __future__ import annotations

import dataclasses
import types

import pytest

from orchestrator import rounds
from orchestrator import scheduler as scheduler_mod
from orchestrator.scheduler import HUB_SEND_SLACK_S, HUB_SPACING_S, Scheduler
from workers import config as config_mod

#: Redis' clock minus the simulated monotonic one: an arbitrary Unix time, not a multiple of any interval.
REDIS_OFFSET = 1_800_000_000.0 + 12.345


class Sim:
    """A monotonic clock that moves only when the scheduler waits, and Redis' clock at an offset from it."""

    def __init__(self, until: float):
        self.mono = 1000.0
        self.offset = REDIS_OFFSET
        self.until = until
        #: (monotonic time, offset from then on): Redis' clock stepping (a failover to a Redis whose clock is off).
        self.steps: list[tuple[float, float]] = []

    def monotonic(self) -> float:
        return self.mono

    def redis(self) -> float:
        while self.steps and self.mono >= self.steps[0][0]:
            self.offset = self.steps.pop(0)[1]
        return self.mono + self.offset

    # The scheduler's stop event.
    def is_set(self) -> bool:
        return self.mono >= self.until

    def wait(self, seconds: float) -> bool:
        self.mono += seconds
        return self.is_set()

    def set(self) -> None:
        self.until = self.mono


@dataclasses.dataclass(frozen=True)
class _Done(rounds.RoundHandle):
    """A round that has finished by its node's next slot."""

    def release(self):
        pass

    def ready(self):
        return True


def _config(*, normal_s: float, warm_up_s: float = 0.0, warm_up_every_s: float = 1.0, nodes=(), hub=None):
    service: dict = {"nodes": list(nodes)}
    if hub is not None:
        service["hub"] = hub
    return config_mod.from_mapping({"clock_measurement": {
        "ntp": {"servers": ["127.0.0.1:9"]},
        "timing": {"warm_up": {"duration_seconds": warm_up_s, "measurement_interval": warm_up_every_s},
                   "normal_operation": {"measurement_interval": normal_s}}},
        "ntp_service": service}, environ={})


def _run(monkeypatch, config, nodes, *, for_s: float, warm_ups=None, steps=(), rounds_now=None):
    """Run the beat for ``for_s`` simulated seconds; ``[(Redis time, monotonic time, node)]`` of each dispatch.

    ``warm_ups``: ``{node: (start, end)}`` in simulated monotonic seconds from the start: what Redis lists.
    """
    sim = Sim(until=1000.0 + for_s)
    sim.steps = [(1000.0 + at, REDIS_OFFSET + by) for at, by in steps]
    monkeypatch.setattr(scheduler_mod, "time", types.SimpleNamespace(monotonic=sim.monotonic))
    sent: list[tuple[float, float, str]] = []

    def dispatch(cfg, node):
        sent.append((sim.redis(), sim.mono, node))
        return _Done(round_id=f"r{len(sent)}", node=node, deadline_at=sim.redis() + 1e6, callback_id="")

    listed = {node: (1000.0 + a, 1000.0 + b) for node, (a, b) in (warm_ups or {}).items()}

    def read_warm_ups(cfg):
        return {node: end - sim.mono for node, (start, end) in listed.items() if start <= sim.mono < end}

    asked = sorted((1000.0 + at, node) for node, at in (rounds_now or {}).items())

    def read_rounds_now(cfg):
        taken = [node for at, node in asked if at <= sim.mono]
        asked[:] = [(at, node) for at, node in asked if at > sim.mono]
        return taken

    beat = Scheduler(config, list(nodes), dispatch=dispatch, overdue_handles=lambda cfg, now: [],
                     warm_ups=read_warm_ups, on_lead=lambda cfg, n: [], clock=sim.redis,
                     waiting_without_worker=lambda cfg, node: 0, mark_without_worker=lambda *a: None,
                     rounds_now=read_rounds_now)
    beat._stop = sim  # type: ignore[assignment]
    beat.run()
    return beat, sent


def _phase_error(t: float, index: int, count: int, every: float, *, spacing_s: float | None = None) -> float:
    """How far ``t`` is from node ``index``'s phase: i/n of the interval, or ``index * spacing_s`` (through a hub)."""
    phase = every * index / count if spacing_s is None else (index * spacing_s) % every
    off = (t - phase) % every
    return min(off, every - off)


# -- warm-up rounds keep the phase -------------------------------------------------------------------------------

def test_nodes_warming_up_together_are_staggered_at_their_phases_of_the_warm_up_interval(monkeypatch):
    nodes = [f"n{i}" for i in range(5)]
    config = _config(normal_s=600.0, warm_up_s=20.0, warm_up_every_s=1.0, nodes=nodes)
    beat, sent = _run(monkeypatch, config, nodes, for_s=30.0, warm_ups={n: (0.0, 20.0) for n in nodes})
    in_warm_up = [(t, mono, node) for t, mono, node in sent if mono < 1020.0]
    for i, node in enumerate(nodes):
        times = [t for t, _, n in in_warm_up if n == node]
        assert len(times) >= 19, (node, len(times))  # a round every second for 20 s
        assert all(_phase_error(t, i, len(nodes), 1.0) < 1e-6 for t in times), (node, [t % 1 for t in times])
        assert all(b - a == pytest.approx(1.0) for a, b in zip(times, times[1:], strict=False))
        assert beat.warm_ups_started[node] == 1
    # No two nodes in the same instant: 5 nodes, 1 s apart each, 0.2 s between neighbours.
    instants = sorted(t for t, _, _ in in_warm_up)
    assert min(b - a for a, b in zip(instants, instants[1:], strict=False)) == pytest.approx(0.2)


def test_a_warm_up_starts_within_one_warm_up_interval_and_ends_back_at_the_normal_phase(monkeypatch):
    nodes = ["a", "b", "c"]
    config = _config(normal_s=60.0, warm_up_s=10.0, warm_up_every_s=2.0, nodes=nodes)
    _, sent = _run(monkeypatch, config, nodes, for_s=200.0, warm_ups={"b": (100.3, 110.3)})
    b = [(t, mono) for t, mono, n in sent if n == "b"]
    warm = [(t, mono) for t, mono in b if 1100.3 <= mono < 1110.3]
    # Read within a poll (a second), then its first warm-up slot: within one warm-up interval.
    assert warm and warm[0][1] - 1100.3 <= scheduler_mod.ADOPT_EVERY_S + 2.0
    assert all(_phase_error(t, 1, 3, 2.0) < 1e-6 for t, _ in warm)
    after = [t for t, mono in b if mono >= 1110.3]
    assert after and all(_phase_error(t, 1, 3, 60.0) < 1e-6 for t in after)
    for i, node in ((0, "a"), (2, "c")):  # the others untouched: every round at their normal phase
        assert all(_phase_error(t, i, 3, 60.0) < 1e-6 for t, _, n in sent if n == node)


def test_warm_up_rounds_follow_redis_clock_when_its_estimate_moves(monkeypatch):
    """Phases are on Redis' clock (every beat computes the same); a moved estimate re-anchors the next round."""
    nodes = ["a", "b"]
    config = _config(normal_s=600.0, warm_up_s=40.0, warm_up_every_s=1.0, nodes=nodes)
    _, sent = _run(monkeypatch, config, nodes, for_s=40.0, warm_ups={n: (0.0, 40.0) for n in nodes},
                   steps=[(20.0, 0.3)])
    for i, node in enumerate(nodes):
        late = [t for t, mono, n in sent if n == node and 1021.5 <= mono < 1040.0]
        assert len(late) >= 17 and all(_phase_error(t, i, 2, 1.0) < 1e-6 for t in late), [t % 1 for t in late]


# -- the hub node ---------------------------------------------------------------------------------------------------

HUB = {"address": "10.0.0.1", "node": "head", "measurement_interval": 64}


def test_the_hub_node_runs_at_its_own_interval_at_its_phase(monkeypatch):
    nodes = ["head", "a", "b", "c"]
    config = _config(normal_s=20.0, nodes=nodes, hub=HUB)
    beat, sent = _run(monkeypatch, config, nodes, for_s=1000.0)
    assert beat.hub_node == "head" and beat.intervals == {"head": 64.0, "a": 20.0, "b": 20.0, "c": 20.0}
    head = [t for t, _, n in sent if n == "head"]
    assert len(head) == pytest.approx(1000 / 64, abs=1)
    assert all(b - a == pytest.approx(64.0) for a, b in zip(head, head[1:], strict=False)), head
    assert all(_phase_error(t, 0, 4, 64.0) < 1e-6 for t in head)
    for i, node in enumerate(nodes[1:], start=1):
        times = [t for t, _, n in sent if n == node]
        assert all(b - a == pytest.approx(20.0) for a, b in zip(times, times[1:], strict=False)), node
        # Through the hub, the nodes HUB_SPACING_S apart, not over the interval: measured close together.
        assert all(_phase_error(t, i, 4, 20.0, spacing_s=HUB_SPACING_S) < 1e-6 for t in times), node


def test_a_normal_interval_longer_than_the_hubs_is_kept():
    config = _config(normal_s=120.0, nodes=["head", "a"], hub=HUB)
    beat = Scheduler(config, ["head", "a"], warm_ups=lambda cfg: {}, on_lead=lambda cfg, n: [], clock=lambda: 0.0)
    assert beat.intervals == {"head": 120.0, "a": 120.0}


def test_the_hub_node_never_warms_up_even_when_listed(monkeypatch, caplog):
    nodes = ["head", "a"]
    config = _config(normal_s=20.0, warm_up_s=30.0, warm_up_every_s=1.0, nodes=nodes, hub=HUB)
    caplog.set_level("WARNING", logger="orchestrator.scheduler")
    beat, sent = _run(monkeypatch, config, nodes, for_s=300.0,
                      warm_ups={"head": (10.0, 40.0), "a": (10.0, 40.0)})
    head = [t for t, _, n in sent if n == "head"]
    assert min(b - a for a, b in zip(head, head[1:], strict=False)) == pytest.approx(64.0)
    assert beat.warm_ups_started == {"head": 0, "a": 1}
    assert len([t for t, mono, n in sent if n == "a" and 1010 <= mono < 1040]) >= 29
    said = [r.getMessage() for r in caplog.records if "is the hub node" in r.getMessage()]
    assert len(said) == 1, said


def test_a_step_of_redis_clock_never_brings_the_hubs_rounds_closer(monkeypatch):
    """A failover to a Redis whose clock is 30 s ahead moves every phase; the hub waits for a slot an interval on."""
    nodes = ["head", "a"]
    config = _config(normal_s=20.0, nodes=nodes, hub=HUB)
    _, sent = _run(monkeypatch, config, nodes, for_s=1000.0, steps=[(300.0, 30.0), (600.0, -50.0)])
    head = [(t, mono) for t, mono, n in sent if n == "head"]
    gaps = [b[1] - a[1] for a, b in zip(head, head[1:], strict=False)]  # on the beat's own (monotonic) clock
    assert min(gaps) >= 64.0 - HUB_SEND_SLACK_S, gaps
    assert max(gaps) <= 2 * 64.0, gaps
    # On Redis' clock, back at its phase from the slot after the one already planned when the clock stepped.
    settled = [t for t, mono in head if not any(1000 + at <= mono < 1000 + at + 64 + 64 for at in (300, 600))]
    assert len(settled) >= len(head) - 4 and all(_phase_error(t, 0, 2, 64.0) < 1e-6 for t in settled)


# -- a worker back from an outage gets a round at once (issue #25) ----------------------------------------------

def test_a_worker_back_on_redis_gets_a_round_within_a_poll_then_its_phase_again(monkeypatch):
    """ARES' 120-s interval: a node whose link returns 10 s after its slot would wait 110 s for the next; its
    worker asks, and the beat sends one round at its next poll (a second), then keeps the node's phase.  The
    hub node's rounds stay an interval apart, and a second ask within an interval gets nothing."""
    nodes = ["head", "a", "b"]
    config = _config(normal_s=120.0, nodes=nodes, hub={"address": "10.0.0.1:123", "node": "head"})
    beat, sent = _run(monkeypatch, config, nodes, for_s=400.0,
                      rounds_now={"a": 130.2, "head": 131.0, "b": 250.0})
    times = {node: [mono - 1000.0 for _, mono, n in sent if n == node] for node in nodes}
    catch_up = {"a": (130.2, 131.5), "b": (250.0, 251.5), "head": (0.0, 0.0)}
    assert len([t for t in times["a"] if catch_up["a"][0] <= t < catch_up["a"][1]]) == 1, times["a"]
    assert len([t for t in times["b"] if catch_up["b"][0] <= t < catch_up["b"][1]]) == 1, times["b"]
    for i, node in enumerate(nodes):  # every other round at the node's phase of its interval
        low, high = catch_up[node]
        regular = [t for t, mono, n in sent if n == node and not low <= mono - 1000.0 < high]
        assert len(regular) >= 2, (node, regular)
        spacing = None if node == "head" else HUB_SPACING_S
        assert all(_phase_error(t, i, len(nodes), beat.intervals[node], spacing_s=spacing) < 1e-6
                   for t in regular), (node, regular)
    # The hub node asked too: nothing extra, its rounds stay at least its interval apart.
    gaps = [b - a for a, b in zip(times["head"], times["head"][1:], strict=False)]
    assert all(g >= beat.intervals["head"] - 1.0 for g in gaps), gaps


def test_the_hub_node_with_nothing_fresh_gets_a_round_at_once_then_keeps_its_interval(monkeypatch):
    """Every other node's rounds need the hub's leg: a beat taking the lease while the hub node has nothing
    fresh asks a round of it at once (its slot may be an interval away), and its rounds stay an interval apart."""
    nodes = ["a", "head"]
    config = _config(normal_s=2.0, nodes=nodes, hub={"address": "10.0.0.1:123", "node": "head",
                                                       "measurement_interval": 20.0})
    beat, sent = _run(monkeypatch, config, nodes, for_s=70.0, rounds_now={"head": 0.3})
    head = [mono - 1000.0 for _, mono, n in sent if n == "head"]
    assert head and head[0] < 1.5, head  # not at its phase slot, 10 s in
    assert all(b - a >= 20.0 - HUB_SEND_SLACK_S for a, b in zip(head, head[1:], strict=False)), head
