"""The offline demo: everything on this machine, nothing from the Internet.

Starts a private ``redis-server`` on a free loopback port (never touching a
Redis someone else runs), the config's simulated NTP servers, and a worker for
this node; runs a few rounds and prints each one, then what a consumer reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers import config as config_mod

#: The demo's configuration, relative to the repository.
DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "config_local_demo.yaml"

#: How long to wait for the private Redis and the worker to come up (s).
STARTUP_TIMEOUT_S = 30.0


def run_demo(config_path: str | None, *, rounds: int = 4, plot: str | None = None) -> int:
    from simulator.server import from_config

    from . import cli

    path = str(config_path or DEFAULT_DEMO_CONFIG)
    config = config_mod.load(path)
    if shutil.which("redis-server") is None:
        raise cli.CliError("redis-server is not installed (Debian: apt-get install redis-server)", cli.EXIT_USAGE)
    node = config_mod.resolve_node(None)
    with tempfile.TemporaryDirectory(prefix="chronotick-demo-") as tmp, \
            RedisProcess(Path(tmp)) as redis_proc, \
            from_config(config.extra["simulator"], source=path) as sim:
        env = {**os.environ, config_mod.ENV_REDIS_URL: redis_proc.url, config_mod.ENV_NODE: node}
        os.environ.update({config_mod.ENV_REDIS_URL: redis_proc.url})
        config = config_mod.load(path)  # again: the Redis URL is resolved from the environment at load
        from workers.app import app, configure, queue_for

        configure(app, config.service)
        print(f"demo: Redis at {redis_proc.url}; {len(sim.behaviours)} simulated servers; node {node!r}")
        log = open(Path(tmp) / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--config", path,
                                   "--node", node], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not cli.workers_for_queue(queue_for(node), timeout_s=0.5):
                if worker.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    print((Path(tmp) / "worker.log").read_text(), file=sys.stderr)
                    raise cli.CliError("the demo worker did not start", cli.EXIT_NO_WORKER)
            from . import rounds as rounds_mod

            for i in range(rounds):
                handle = rounds_mod.dispatch(config, node)
                record = handle.wait()
                print(f"\n--- round {i + 1} of {rounds} ---")
                print(cli.format_round(record) if record else f"round {handle.round_id} did not finish")
            print("\n--- what ChronoTick reads from Redis ---")
            code = cli.main(["latest", "--config", path, "--node", node])
            print("\n--- chronotick-ntp status: ChronoTick's targets (the demo's servers are faulty on purpose) ---")
            cli.main(["status", "--config", path, "--node", node, "--hours", "1"])
            if plot:
                print()
                cli.main(["plot", "--config", path, "--node", node, "--hours", "1", "-o", plot])
            return code
        finally:
            stop_process(worker)
            log.close()


def stop_process(proc: subprocess.Popen, *, timeout_s: float = 15.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisProcess:
    """A private ``redis-server`` on a free loopback port, nothing saved to disk."""

    def __init__(self, directory: Path, *, port: int | None = None):
        self.directory = directory
        self.port = port or free_tcp_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisProcess":
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)

    def __enter__(self) -> "RedisProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_tcp_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
