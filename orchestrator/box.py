"""One box in one command (``chronotick-ntp up``): Redis, the node's worker, the beat and the exporter.

For a single machine, a homelab or a first try: what docker-compose.yml runs,
without Docker.  Unless a Redis is configured (``$CHRONOTICK_REDIS_URL`` or
``ntp_service.redis_url``), a private ``redis-server`` runs on a free loopback
port, keeping an append-only file under the data directory, so a restart of
``up`` finds ``latest``, history and counters where they were.  Each service is
a ``chronotick-ntp`` child process with the same config; Ctrl-C (or SIGTERM)
stops them all, the services first and Redis last.  If any service exits by
itself, ``up`` stops the rest and says which.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from workers import config as config_mod

#: Where ``up`` keeps Redis' data when not told (relative to the working directory).
DEFAULT_DATA_DIR = "chronotick-data"

#: The private Redis' port unless told (loopback only): not 6379, which a system Redis may hold.
#: Other commands reach it with CHRONOTICK_REDIS_URL=redis://127.0.0.1:6390/0.
DEFAULT_REDIS_PORT = 6390

#: How long Redis may take to answer after it starts (s).
REDIS_START_S = 20.0

#: How long each child gets to stop after SIGTERM before SIGKILL (s): a worker's warm shutdown.
STOP_S = 20.0


class BoxError(RuntimeError):
    """``up`` cannot run: what is missing or wrong, in words."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Box:
    """The processes of one box; :meth:`start`, then :meth:`wait` until stopped, then :meth:`stop`."""

    config_path: str
    node: str
    data_dir: Path
    exporter_port: int | None = None
    #: The private Redis' port (0: any free one).
    redis_port: int = DEFAULT_REDIS_PORT
    #: The Redis URL the services use (set by :meth:`start`).
    redis_url: str = ""
    redis_process: subprocess.Popen | None = None
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, config: config_mod.Config, environ: dict[str, str]) -> None:
        configured = environ.get(config_mod.ENV_REDIS_URL) or (
            config.service.redis_url if config.service.redis_url != config_mod.DEFAULT_REDIS_URL else "")
        self.redis_url = configured or self._start_redis()
        env = {**environ, config_mod.ENV_REDIS_URL: self.redis_url}
        env.pop(config_mod.ENV_CONFIG, None)
        me = [sys.executable, "-m", "orchestrator.cli"]
        beat = [*me, "beat", "--config", self.config_path]
        if not config.service.nodes:
            beat += ["--node", self.node]
        exporter = [*me, "exporter", "--config", self.config_path]
        if self.exporter_port is not None:
            exporter += ["--port", str(self.exporter_port)]
        commands = {"worker": [*me, "worker", "--config", self.config_path, "--node", self.node],
                    "beat": beat, "exporter": exporter}
        for name, argv in commands.items():
            self.children[name] = subprocess.Popen(argv, env=env, cwd=os.getcwd())

    def _start_redis(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = self.redis_port or _free_port()
        try:
            self.redis_process = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                 "--dir", str(self.data_dir.resolve()), "--save", "", "--appendonly", "yes",
                 "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            raise BoxError("redis-server is not installed (apt-get install redis-server), and no Redis is "
                           f"configured (${config_mod.ENV_REDIS_URL})") from None
        if not wait_for_redis(port, self.redis_process, timeout_s=REDIS_START_S):
            raise BoxError(f"redis-server did not start on 127.0.0.1:{port} with its data in {self.data_dir}")
        return f"redis://127.0.0.1:{port}/0"

    def request_stop(self, *_) -> None:
        self._stop.set()

    def wait(self) -> str | None:
        """Until stopped (``None``), or until a service exits by itself (its name)."""
        while not self._stop.wait(0.5):
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    return name
            if self.redis_process is not None and self.redis_process.poll() is not None:
                return "redis-server"
        return None

    def stop(self) -> None:
        """The services first (each may finish its work), then Redis (which writes its file)."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.children.values():
            _reap(proc)
        if self.redis_process is not None:
            if self.redis_process.poll() is None:
                self.redis_process.send_signal(signal.SIGTERM)  # redis-server shuts down cleanly on SIGTERM
            _reap(self.redis_process)


def wait_for_redis(port: int, process: subprocess.Popen, *, timeout_s: float) -> bool:
    """Whether the redis-server ``process`` answers PING on loopback ``port`` within ``timeout_s``.

    False as soon as the process has exited, or at the deadline.
    """
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return True
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        client.close()


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
