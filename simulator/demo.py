"""The offline demo: everything on this machine, nothing from the Internet.

Starts a private ``redis-server`` on a free loopback port (never touching a
Redis someone else runs), the config's simulated NTP servers, and a worker for
this node; runs a few rounds and prints each one, then what a consumer reads
and the node's figures against ChronoTick's targets.

Development tooling: it drives the service from outside, as a user would.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from orchestrator import display, rounds, sources, targets
from orchestrator.store import store_for
from workers import config as config_mod
from workers.app import app, configure

from . import DEMO_CONFIG
from .ntpserver import Behaviour, NtpSimulator, from_config
from .processes import RedisProcess, start_node_worker, stop_process

#: The demo's configuration, in the repository.
DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parent.parent / DEMO_CONFIG

#: How long to wait for the worker to come up (s).
STARTUP_TIMEOUT_S = 30.0


class DemoError(Exception):
    """The demo could not run; ``missing_tool`` when something must be installed first."""

    def __init__(self, message: str, *, missing_tool: bool = False):
        super().__init__(message)
        self.missing_tool = missing_tool


def deliberately_bad(sim: NtpSimulator, config: config_mod.Config) -> dict[str, str]:
    """The demo's servers that misbehave on purpose (server -> how), from their simulated behaviour.

    A fault field away from an honest server's default, an offset away from the honest ones' (a
    falseticker), or a path too long for the strict gate.
    """
    honest = Behaviour()
    offsets = sorted(b.offset_s for b in sim.behaviours.values())
    median = offsets[len(offsets) // 2]
    strict_delay_s = config.ntp.max_delay
    found = {}
    for port, behaviour in sim.behaviours.items():
        faults = [name for name in FAULTS if getattr(behaviour, name) != getattr(honest, name)]
        if behaviour.leap == 3:
            faults.append("leap 3")
        if abs(behaviour.offset_s - median) > 0.1:
            faults.append("falseticker")
        if behaviour.delay_s > strict_delay_s:
            faults.append(f"{behaviour.delay_s * 1e3:.0f} ms away")
        if faults:
            found[f"{sim.host}:{port}"] = ", ".join(faults)
    return found


#: Behaviour fields that make a server misbehave (any other value than an honest server's).
FAULTS = ("loss", "kod", "bad_origin", "bad_origin_first", "spoofed_ahead_s", "zero_transmit",
          "receive_after_transmit", "truncate", "garbage", "wrong_port", "stale_reference", "future_reference",
          "claimed_hold_s")


def explain_misses(figures: dict, without: dict, bad: dict[str, str]) -> list[str]:
    """One line per target missed only because of the deliberately bad servers (``without``: the figures
    without them)."""
    lines = []
    for target in targets.TARGETS:
        if figures["targets"][target.name]["ok"] or not without["targets"][target.name]["ok"]:
            continue
        value = without["targets"][target.name]["value"]
        shown = f"{value * 100:.1f} %" if target.unit == "rate" else f"{value:g}"
        lines.append(f"  {target.doc}: missed only because of the demo's {len(bad)} deliberately bad servers "
                     f"({'; '.join(f'{s} {why}' for s, why in sorted(bad.items()))}); without them {shown}")
    return lines


def run_demo(config_path: str | None, *, rounds_to_run: int, plot: str | None = None) -> bool:
    """Run the demo (``rounds_to_run``: ``chronotick-ntp demo --rounds``); True if the last round published a
    measurement."""
    path = str(config_path or DEFAULT_DEMO_CONFIG)
    config = config_mod.load(path)
    if shutil.which("redis-server") is None:
        raise DemoError("redis-server is not installed (Debian: apt-get install redis-server)", missing_tool=True)
    node = config_mod.resolve_node(None)
    with tempfile.TemporaryDirectory(prefix="chronotick-demo-") as tmp, \
            RedisProcess(Path(tmp)) as redis_proc, \
            from_config(config.extra["simulator"], source=path) as sim:
        os.environ.update({config_mod.ENV_REDIS_URL: redis_proc.url})
        config = config_mod.load(path)  # again: the Redis URL is resolved from the environment at load
        configure(app, config.service)
        print(f"demo: Redis at {redis_proc.url}; {len(sim.behaviours)} simulated servers; node {node!r}")
        try:
            worker = start_node_worker(config, node, Path(tmp) / "worker.log", timeout_s=STARTUP_TIMEOUT_S,
                                       environ={config_mod.ENV_NODE: node})
        except RuntimeError as exc:
            raise DemoError(f"the demo worker did not start: {exc}") from None
        try:
            record = None
            for i in range(rounds_to_run):
                handle = rounds.dispatch(config, node)
                # Published as soon as the replies in hand decide it; shown with what the late servers said.
                record = handle.wait(complete=True)
                print(f"\n--- round {i + 1} of {rounds_to_run} ---")
                print(display.format_round(record) if record else f"round {handle.round_id} did not finish")
            store = store_for(config.service)
            print("\n--- what ChronoTick reads from Redis (chronotick-ntp latest) ---")
            latest = store.latest(node)
            print(display.format_latest(latest, now=time.time()) if latest else "nothing published")
            print("\n--- chronotick-ntp status: ChronoTick's targets (the demo's servers are faulty on purpose) ---")
            now = time.time()
            records = store.history_since(node, now - 3600)
            stale_after_s = config.stale_after_s(node)
            figures = targets.node_report(records, latest, now=now, stale_after_s=stale_after_s)
            print(display.format_status({node: figures}, hours=1, color=sys.stdout.isatty()))
            bad = deliberately_bad(sim, config)
            without = targets.node_report(records, latest, now=now, stale_after_s=stale_after_s,
                                          excluding=frozenset(bad))
            for line in explain_misses(figures, without, bad):
                print(line)
            print("\n--- chronotick-ntp servers: each server's state and reach ---")
            print(display.format_servers(sources.report(node, [s.name for s in config.ntp.servers], records,
                                                        store.reach(node), now=now)))
            if plot:
                from orchestrator.plot import plot_node

                plot_node(records, node=node, output=plot, hours=1)
                print(f"\n{plot}: {len(records)} rounds of {node}")
            return bool(record and record["latest"])
        finally:
            stop_process(worker)
