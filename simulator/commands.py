"""The simulator's commands in ``chronotick-ntp``: ``demo`` and ``simulate``.

Registered as ``chronotick_ntp.commands`` entry points in ``pyproject.toml`` (:mod:`orchestrator.commands`),
so the CLI finds them without naming this package.  The CLI loads this module at every start: it imports only
what declaring the commands needs, and each command imports its work when it runs.
"""

from __future__ import annotations

import argparse
import signal
import time

from orchestrator.commands import EXIT_NO_WORKER, EXIT_OK, EXIT_STARVATION, EXIT_USAGE, CliError, Command

from . import DEMO_CONFIG

#: The rounds the demo runs unless told (``--rounds``).
DEMO_ROUNDS = 4


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"demo config (default {DEMO_CONFIG})")
    parser.add_argument("--rounds", type=int, default=DEMO_ROUNDS, help="rounds to run (default %(default)s)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the demo's rounds to this PNG")


def _run_demo(args: argparse.Namespace) -> int:
    """``chronotick-ntp demo``: 0 when its last round published a measurement, 1 when not; 2 when a tool is
    missing, 3 when its worker did not start."""
    from .demo import DemoError, run_demo

    try:
        published = run_demo(args.config, rounds_to_run=args.rounds, plot=args.plot)
    except DemoError as exc:
        raise CliError(str(exc), EXIT_USAGE if exc.missing_tool else EXIT_NO_WORKER) from None
    return EXIT_OK if published else EXIT_STARVATION


def _run_simulate(args: argparse.Namespace) -> int:
    """``chronotick-ntp simulate``: serve the config's ``simulator:`` section until SIGTERM or Ctrl-C."""
    from workers import config as config_mod

    from .ntpserver import from_config

    config = config_mod.load(args.config)
    section = config.extra.get("simulator")
    if not isinstance(section, dict):
        raise config_mod.ConfigError(args.config, "simulator", "missing section (ports and behaviours)")
    try:
        sim = from_config(section, source=args.config)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    with sim:
        print(f"simulating {len(sim.behaviours)} NTP servers: {', '.join(sim.servers())}", flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return EXIT_OK


demo = Command("demo", "offline demo: local Redis, simulated servers, a worker, a few rounds", _run_demo,
               _demo_arguments, config=False)
simulate = Command("simulate", "serve the config's simulated NTP servers on loopback", _run_simulate, node=False)
