"""What every bench sets up, tears down and prints with: one place, so that a bench holds only what it measures.

Run a bench from the repository's root, as a module of this package::

    .venv/bin/python -m bench.round_latency --rounds 15

A bench's **bed** (:func:`bed`) is a temporary directory and, unless told
otherwise, a private ``redis-server`` on a free loopback port
(:class:`simulator.processes.RedisProcess`, nothing saved to disk unless
``append_only``), with ``$CHRONOTICK_REDIS_URL`` pointed at it so that every
config this process loads, and every process it starts, uses it and no other.
On it, a bench starts simulated NTP servers (:meth:`Bed.servers`,
:mod:`simulator.ntpserver`), writes config files (:meth:`Bed.config`), starts
real node workers as the README does (:meth:`Bed.worker`,
:func:`simulator.processes.start_node_worker`) and other processes (a beat, a
relay: :meth:`Bed.process`).  Leaving the bed stops all of it, newest first
(workers before the servers they query, Redis last), whatever happened; a
:meth:`Bed.scope` is a bed within it, for what one part of a bench starts.

For its table a bench takes :func:`quantile` (one definition of a percentile
for every bench), :func:`machine` (the line saying where it ran), and
:func:`cpu_s` / :func:`rss_mb` for a process' CPU time and memory.

Development tooling, as :mod:`simulator` is: the service never imports it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis
import yaml

from simulator.ntpserver import Behaviour, NtpSimulator
from simulator.processes import RedisProcess, start_node_worker, stop_process
from workers import config as config_mod
from workers import redisurl
from workers.keys import Keys

#: The repository: where the benches' child processes run, and where configs/ and docs/ are.
REPO = Path(__file__).resolve().parent.parent

#: Clock ticks per second of /proc/<pid>/stat's CPU times.
TICKS = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


class Bed:
    """A bench's directory, private Redis, servers, configs and processes; made by :func:`bed`."""

    def __init__(self, tmp: Path, redis_process: RedisProcess | None, stack: ExitStack):
        #: The bench's directory: its configs and its processes' logs.
        self.tmp = tmp
        #: The private Redis (``None`` for a bed without one): :meth:`RedisProcess.kill_and_restart`, its pid.
        self.redis = redis_process
        self._stack = stack

    @property
    def url(self) -> str:
        """The private Redis' URL."""
        if self.redis is None:
            raise RuntimeError("this bed has no Redis (bed(redis=False))")
        return self.redis.url

    def servers(self, behaviours: Iterable[Behaviour], *, seed: int | None = None) -> NtpSimulator:
        """Simulated NTP servers on free loopback ports, one per behaviour, started; stopped on leaving."""
        sim = NtpSimulator.on_free_ports(list(behaviours), seed=seed).start()
        self._stack.callback(sim.stop)
        return sim

    def config(self, name: str, servers: Sequence[str], *, ntp: Mapping[str, Any] | None = None,
               timing: Mapping[str, Any] | None = None, service: Mapping[str, Any] | None = None,
               environ: Mapping[str, str] | None = None) -> config_mod.Config:
        """Write ``name`` in the bed's directory -- ``clock_measurement.ntp`` (``servers`` and ``ntp``),
        ``clock_measurement.timing`` if given, ``ntp_service`` -- and load it, on this bed's Redis.

        ``environ``: the environment it is loaded with (default: this process', whose Redis is this bed's).
        """
        measurement: dict[str, Any] = {"ntp": {"servers": list(servers), **(ntp or {})}}
        if timing is not None:
            measurement["timing"] = dict(timing)
        return self.write_config(name, {"clock_measurement": measurement, "ntp_service": dict(service or {})},
                                 environ=environ)

    def write_config(self, name: str, document: Mapping[str, Any], *,
                     environ: Mapping[str, str] | None = None) -> config_mod.Config:
        """Write a whole config ``document`` as ``name`` in the bed's directory and load it (as :meth:`config`)."""
        path = self.tmp / name
        path.write_text(yaml.safe_dump(dict(document)))
        if environ is None and self.redis is not None:
            environ = {**os.environ, config_mod.ENV_REDIS_URL: self.redis.url}
        return config_mod.load(path, environ=environ)

    def worker(self, config: config_mod.Config, node: str, *, log: str = "worker.log",
               **options: Any) -> subprocess.Popen:
        """A plain ``celery -A workers.app worker`` for ``node``'s queue, once it beats; stopped on leaving.

        ``options``: :func:`simulator.processes.start_node_worker`'s (``instance``, ``nodes``, ``events``, ...).
        """
        worker = start_node_worker(config, node, self.tmp / log, **options)
        self._stack.callback(stop_process, worker)
        return worker

    def process(self, argv: Sequence[str], *, log: str | None = None, cwd: Path = REPO,
                env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen:
        """``argv`` as a child process (``python`` is this interpreter), stderr to ``log`` in the bed's directory
        (or as ``popen`` says); stopped on leaving.  ``env``: default :func:`child_env`."""
        argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
        if log is not None:
            with open(self.tmp / log, "ab") as stderr:
                proc = subprocess.Popen(argv, cwd=str(cwd), env=dict(env or child_env()),
                                        **{"stdout": subprocess.DEVNULL, "stderr": stderr, **popen})
        else:
            proc = subprocess.Popen(argv, cwd=str(cwd), env=dict(env or child_env()), **popen)
        self._stack.callback(stop_process, proc)
        return proc

    def client(self) -> redis.Redis:
        """A client of the private Redis, as the service makes them (:func:`workers.redisurl.connect`: replies
        as text), closed on leaving."""
        client = redisurl.connect(self.url)
        self._stack.callback(client.close)
        return client

    def updates(self, config: config_mod.Config, node: str) -> Any:
        """A subscriber to ``node``'s ``updates`` channel (the contract's, under the config's prefix), subscribed."""
        pubsub = self.client().pubsub()
        pubsub.subscribe(Keys(config.service.key_prefix).updates(node))
        pubsub.get_message(timeout=1)  # the subscription's confirmation
        self._stack.callback(pubsub.close)
        return pubsub

    @contextmanager
    def scope(self) -> Iterator[Bed]:
        """A bed within this one, on the same directory and Redis: what is started on it stops on leaving it."""
        with ExitStack() as stack:
            yield Bed(self.tmp, self.redis, stack)

    def enter(self, context: AbstractContextManager[T]) -> T:
        """Enter ``context`` (a :class:`simulator.processes.ChronydNts`, say) for as long as the bed lasts."""
        return self._stack.enter_context(context)


@contextmanager
def bed(prefix: str = "ct-bench-", *, redis: bool = True, append_only: bool = False,
        directory: Path | None = None) -> Iterator[Bed]:
    """A bench's bed: a temporary directory (or ``directory``), a private Redis unless not ``redis``.

    ``append_only``: Redis writes an append-only file, fsynced before it acknowledges
    (:meth:`RedisProcess.kill_and_restart` loses nothing acknowledged).  Everything started on
    the bed is stopped on leaving it, newest first; the directory, if made here, removed.
    """
    with ExitStack() as stack:
        tmp = directory if directory is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix=prefix)))
        proc = None
        if redis:
            proc = stack.enter_context(RedisProcess(tmp, append_only=append_only))
            previous = os.environ.get(config_mod.ENV_REDIS_URL)
            os.environ[config_mod.ENV_REDIS_URL] = proc.url
            stack.callback(_restore_environ, config_mod.ENV_REDIS_URL, previous)
        yield Bed(tmp, proc, stack)


def _restore_environ(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def child_env(**extra: str) -> dict[str, str]:
    """This process' environment for a child that imports the project from :data:`REPO` (``PYTHONPATH``)."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def parser(file: str, doc: str | None) -> argparse.ArgumentParser:
    """A bench's argument parser: its docstring's first line, and its name as it is run (``python -m bench.NAME``)."""
    return argparse.ArgumentParser(prog=f"python -m bench.{Path(file).stem}", description=(doc or "").splitlines()[0])


# -- the table ---------------------------------------------------------------------------------------------

def quantile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by nearest rank: the value with ``q`` of the others below it."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    """Where a bench ran, for the line above its table: architecture, cores, Python."""
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    """A process' resident set size (MB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
