"""Local processes for the demo, the tests and the benchmarks: a private Redis, Sentinels, stopping a child.

Development tooling: the service never imports this module.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

#: How long to wait for a private Redis to come up (s).
STARTUP_TIMEOUT_S = 30.0


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
    """A private ``redis-server`` on a free loopback port.

    Nothing is saved to disk, unless ``append_only``: then every write goes to
    an append-only file, fsynced before it is acknowledged (``appendfsync
    always``), so :meth:`kill_and_restart` loses nothing that was acknowledged.
    """

    def __init__(self, directory: Path, *, port: int | None = None, append_only: bool = False,
                 replica_of: int | None = None):
        self.directory = directory
        self.port = port or free_tcp_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.append_only = append_only
        #: The loopback port of the primary this server replicates, if any.
        self.replica_of = replica_of
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        import redis

        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.append_only
                       else ["--appendonly", "no"])
        if self.replica_of:
            persistence += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.directory), "--maxmemory-policy", "noeviction",
             "--dbfilename", f"dump-{self.port}.rdb", "--appendfilename", f"appendonly-{self.port}.aof",
             "--appenddirname", f"aof-{self.port}"],
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

    def kill_and_restart(self) -> None:
        """SIGKILL the server (no shutdown, no final save), then start it again on the same port and data."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.start()

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SentinelGroup:
    """Redis Sentinel on loopback: a primary, a replica and three Sentinels watching them.

    The Sentinels are ``redis-server <conf> --sentinel``, each with its own
    throwaway config file (Sentinel rewrites it).  They call the primary down
    after ``down_after_ms`` without an answer and elect one of them to
    promote the replica: a majority (two of three) must agree.
    """

    def __init__(self, directory: Path, *, master_name: str = "mymaster", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000):
        self.directory = directory
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.primary = RedisProcess(directory)
        self.replica = RedisProcess(directory, replica_of=self.primary.port)
        self.sentinel_ports = [free_tcp_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """The service's ``redis_url`` for this group: every Sentinel, Celery's form."""
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.directory}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port} 2",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master_name} 1", ""]))
            self.sentinels.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait(self._ready, "the Sentinels to find the replica and each other")
        return self

    def master_port(self) -> int | None:
        """The master's port as a majority of the Sentinels name it, or ``None``."""
        import redis

        named: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                address = redis.Redis(port=port, socket_timeout=0.5).sentinel_get_master_addr_by_name(
                    self.master_name)
            except redis.RedisError:
                continue
            if isinstance(address, tuple | list):
                named[int(address[1])] = named.get(int(address[1]), 0) + 1
        best = max(named.items(), key=lambda item: item[1], default=None)
        return best[0] if best and best[1] >= 2 else None

    def kill_primary(self) -> None:
        """SIGKILL the primary: no shutdown, no goodbye to the replica."""
        if self.primary.process and self.primary.process.poll() is None:
            self.primary.process.kill()
            self.primary.process.wait()

    def stop(self) -> None:
        for proc in self.sentinels:
            stop_process(proc)
        self.replica.stop()
        self.primary.stop()

    def _ready(self) -> bool:
        import redis

        for port in self.sentinel_ports:
            try:
                client = redis.Redis(port=port, socket_timeout=0.5)
                replicas = client.sentinel_slaves(self.master_name)
                peers = client.sentinel_sentinels(self.master_name)
                if not isinstance(replicas, list) or not replicas or not isinstance(peers, list) or len(peers) < 2:
                    return False
            except redis.RedisError:
                return False
        return True

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not predicate():
            if any(p.poll() is not None for p in self.sentinels) or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_tcp_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
