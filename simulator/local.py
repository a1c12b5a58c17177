"""Local processes for the demo, the tests and the benchmarks: a private Redis, stopping a child.

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

    def __init__(self, directory: Path, *, port: int | None = None, append_only: bool = False):
        self.directory = directory
        self.port = port or free_tcp_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.append_only = append_only
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        import redis

        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.append_only
                       else ["--appendonly", "no"])
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.directory), "--maxmemory-policy", "noeviction"],
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


def free_tcp_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
