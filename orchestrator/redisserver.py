"""A private ``redis-server``: its command line and configuration, started and waited for.

The one place a ``redis-server`` is started: ``chronotick-ntp up``'s private Redis (:mod:`orchestrator.supervisor`:
an append-only file fsynced every second, a password) and the demo's, the tests' and the benchmarks'
(:class:`simulator.processes.RedisProcess`: no persistence, or an append-only file fsynced before each write is
acknowledged; a replica).  Whatever the caller, the server

- listens on loopback only (``bind 127.0.0.1``, ``protected-mode yes``);
- writes no RDB snapshot (``save ""``): the append-only file, when there is one, is the data;
- never evicts (``maxmemory-policy noeviction``): a write refused is said, a record dropped would not be;
- reads what must not be on its command line -- the password, ``requirepass`` -- from its stdin
  (``redis-server -``), which ``ps`` and ``/proc/<pid>/cmdline`` do not show.

Started is not ready: :func:`wait_for_redis` waits until *this* process answers on its port (``INFO``'s
``process_id``), not another Redis that holds the port.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from workers import redisurl

#: The address every private Redis listens on.
HOST = "127.0.0.1"


class Fsync(StrEnum):
    """When the append-only file is fsynced (Redis' ``appendfsync``)."""

    #: Before each write is acknowledged: a SIGKILL loses nothing acknowledged (the tests' restarts).
    ALWAYS = "always"
    #: Once a second: at most a second of writes lost to a power cut, at a fraction of the cost (``up``).
    EVERYSEC = "everysec"


@dataclass(frozen=True)
class RedisServer:
    """One private ``redis-server``: :meth:`argv` and :meth:`config` say how it runs, :meth:`start` starts it."""

    port: int
    #: Its working directory: the append-only file (and a replica's copy) go there.
    directory: Path
    #: ``None``: no append-only file, nothing kept across a restart.
    append_fsync: Fsync | None = None
    #: ``requirepass``, given on stdin; ``None``: none.
    password: str | None = None
    #: The loopback port of the primary this server replicates; ``None``: a primary.
    replica_of: int | None = None
    #: Name its files after its port (``appendonly-<port>.aof`` in ``aof-<port>/``, ``dump-<port>.rdb``), so
    #: that several servers share one directory (a primary and its replica); else Redis' default names.
    files_by_port: bool = False

    @property
    def url(self) -> str:
        """Its URL, without the password (the service adds ``$CHRONOTICK_REDIS_PASSWORD``'s)."""
        return f"redis://{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        """The command line: everything but the password, which :meth:`config` gives on stdin (the ``-``)."""
        argv = ["redis-server", "-", "--port", str(self.port), "--bind", HOST, "--protected-mode", "yes",
                "--dir", str(self.directory), "--save", "",
                "--appendonly", "no" if self.append_fsync is None else "yes",
                *(["--appendfsync", str(self.append_fsync)] if self.append_fsync is not None else []),
                "--maxmemory-policy", "noeviction"]
        if self.replica_of is not None:
            argv += ["--replicaof", HOST, str(self.replica_of)]
        if self.files_by_port:
            argv += ["--dbfilename", f"dump-{self.port}.rdb", "--appendfilename", f"appendonly-{self.port}.aof",
                     "--appenddirname", f"aof-{self.port}"]
        return argv

    def config(self) -> str:
        """What it reads on stdin: the lines kept off its command line."""
        return f"requirepass {redis_quoted(self.password)}\n" if self.password else ""

    def start(self, *, popen: Callable[..., subprocess.Popen] = subprocess.Popen, **options: Any) -> subprocess.Popen:
        """Start it, its :meth:`config` written to its stdin and stdin closed; not yet ready (:meth:`wait`).

        ``popen``: what starts the process (``up``'s puts it in its own session); ``options``: more of
        ``Popen``'s (``stdout``, ``stderr``).  Raises ``FileNotFoundError`` when there is no ``redis-server``.
        """
        proc = popen(self.argv(), stdin=subprocess.PIPE, **options)
        assert proc.stdin is not None
        try:
            with proc.stdin as stdin:
                stdin.write(self.config().encode())
        except BrokenPipeError:  # it exited at once: wait() sees it
            pass
        return proc

    def wait(self, process: subprocess.Popen, *, timeout_s: float, stop: Callable[[], bool] | None = None) -> bool:
        """Whether ``process`` (this server, started) answers within ``timeout_s``: :func:`wait_for_redis`."""
        return wait_for_redis(self.port, process, timeout_s=timeout_s, password=self.password, stop=stop)


def wait_for_redis(port: int, process: subprocess.Popen, *, timeout_s: float, password: str | None = None,
                   stop: Callable[[], bool] | None = None) -> bool:
    """Whether the redis-server ``process`` answers on loopback ``port`` within ``timeout_s``.

    Only ``process`` itself counts (``INFO``'s ``process_id``): another Redis answering on the port is
    not it.  False as soon as the process has exited, ``stop()`` is true, or at the deadline.
    """
    url = f"redis://{HOST}:{port}/0"
    client = redisurl.connect(redisurl.with_password(url, password) if password else url, timeout_s=2, retry=False)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if int(client.info("server")["process_id"]) == process.pid:
                    return True
            except redis.RedisError:  # not listening yet, or another server without our password
                pass
            if process.poll() is not None or time.monotonic() > deadline or (stop is not None and stop()):
                return False
            time.sleep(0.05)
    finally:
        client.close()


def redis_quoted(text: str) -> str:
    """``text`` as one argument of a Redis config line: double-quoted, every byte escaped."""
    return '"' + "".join(f"\\x{byte:02x}" for byte in text.encode()) + '"'
