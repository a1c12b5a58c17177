"""One box in one command (``chronotick-ntp up``): Redis, the node's worker, the beat and the exporter.

For a single machine, a homelab or a first try: what docker-compose.yml runs, without Docker.

- **Which Redis.** A private ``redis-server`` on loopback, unless ``$CHRONOTICK_REDIS_URL`` or the config's
  ``ntp_service.redis_url`` names one.  ``$CHRONOTICK_REDIS_PASSWORD`` alone never means "the machine's
  Redis": it becomes the private Redis' ``requirepass`` (given on its stdin, never its command line), and
  the services add it to the private URL as they add it to any.
- **Nothing starts unless everything can.**  The data directory is made and locked (``flock`` on
  ``up.lock`` inside it, held for ``up``'s life: one Redis per append-only file), then the private Redis'
  port and the exporter's are bound and released: one in use (by anything: a Redis that would otherwise
  have been used, a second ``up``) is refused, naming the process that holds it when ``/proc`` tells.
- **Children in their own sessions.**  A terminal's Ctrl-C (SIGINT to the foreground process group) and
  systemd's stop (SIGTERM to every process of the unit) reach only ``up``, which then stops the services
  (SIGTERM: the worker's warm shutdown hands back to Redis the messages it holds) and, once they have
  exited, Redis (``SHUTDOWN``: the append-only file is fsynced).  A child whose ``up`` dies unannounced
  (SIGKILL) gets SIGTERM from the kernel (Linux' parent-death signal), so none is left behind.
- **A service that exits by itself** stops the box the same way, and ``up`` names it.

Every refusal is a :class:`SupervisorError` (or a subclass) with a one-line message; the CLI maps each class to
an exit code (``chronotick-ntp up --help``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis
import yaml

from workers import config as config_mod
from workers import redisurl

from . import defaults
from .redisserver import Fsync, RedisServer

#: The file in the data directory that ``up`` holds a lock on (and writes its pid to).
LOCK_FILE = "up.lock"
#: The private Redis' log, in the data directory.
REDIS_LOG = "redis.log"

#: How long Redis may take to answer after it starts (s).
REDIS_START_S = 20.0

#: How long the services get to stop after SIGTERM before SIGKILL (s): a worker's warm shutdown.  Redis
#: then gets as long again.  Both within systemd's default TimeoutStopSec (90 s).
STOP_S = 20.0

#: The signals that ask ``up`` to stop: a terminal's Ctrl-C, systemd's (or kill's) SIGTERM, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: How often :meth:`Supervisor.wait` looks at the children when no signal wakes it (s).
POLL_S = 0.5


class SupervisorError(RuntimeError):
    """``up`` cannot run as asked (a bad data directory, no redis-server): what is wrong, in one line."""


class InUse(SupervisorError):
    """A port ``up`` needs, or its data directory, is held by another process."""


class ServiceFailed(SupervisorError):
    """A service or Redis exited by itself (or Redis did not come up); ``up`` stopped the rest."""


@dataclass
class Supervisor:
    """The processes of one box: :meth:`run` starts them, waits for a stop signal or a death, and stops them."""

    config_path: str
    node: str
    data_dir: Path
    exporter_port: int | None = None
    #: The private Redis' port (0: any free one).
    redis_port: int = defaults.REDIS_PORT
    #: The URL the services are given (the private Redis': no password in it), or the configured one.
    redis_url: str = ""
    redis_process: subprocess.Popen | None = None
    #: Redis's exit code if it had already exited when the services were stopped (a group-wide SIGTERM).
    redis_gone_first: int | None = None
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    #: The stop signal received, if any.
    stop_signal: int | None = None
    _password: str | None = None
    _lock: IO[str] | None = None
    _wake: socket.socket | None = None
    _wake_writer: socket.socket | None = None

    # -- the whole life -------------------------------------------------------------------------------

    def run(self, config: config_mod.Config, environ: dict[str, str]) -> None:
        """Start everything, wait for a stop signal (return) or a death (:class:`ServiceFailed`), stop all.

        Raises :class:`SupervisorError` (or :class:`InUse`) before anything has started when it cannot start.
        """
        self._catch_stop_signals()
        exited = None
        try:
            private = self._prepare(config, environ)
            if private and self.stop_signal is None:
                pid = self._start_redis().pid
                _say(f"up: Redis at {self.redis_url} (private, pid {pid}"
                     f"{', password required' if self._password else ''}; append-only file in {self.data_dir})")
            elif not private:
                _say(f"up: Redis at {redisurl.redact(self.redis_url)} (configured)")
            if self.stop_signal is None:
                self._start_services(config, environ, private=private)
                pids = ", ".join(f"{name} pid {proc.pid}" for name, proc in self.children.items())
                _say(f"up: worker for {self.node}, beat, exporter ({pids}); Ctrl-C stops all")
            exited = self.wait()
        finally:
            if self.stop_signal is not None:
                _say(f"up: {signal.Signals(self.stop_signal).name}: stopping the services, then Redis")
            self.stop()
        if exited is not None:
            name, code = exited
            raise ServiceFailed(f"{name} exited on its own ({_how_it_ended(code)}); up stopped the rest")
        if self.redis_gone_first is not None:
            # SIGTERM to the whole group (systemd's KillMode=control-group): Redis went with the services,
            # so what they handed back may not have reached it.  Not a clean stop; run up with KillMode=mixed.
            raise ServiceFailed(f"redis-server stopped before the services ({_how_it_ended(self.redis_gone_first)}): "
                                "messages they handed back may be lost; signal up alone (systemd: KillMode=mixed)")
        _say("up: stopped")

    def request_stop(self, signum: int, _frame: object = None) -> None:
        """The stop signals' handler: only notes the first (:meth:`wait` acts on it)."""
        if self.stop_signal is None:
            self.stop_signal = signum

    def wait(self) -> tuple[str, int] | None:
        """Until a stop signal (``None``), or until a child exits by itself: ``(its name, its exit code)``."""
        while self.stop_signal is None:
            for name, proc in self._everyone():
                code = proc.poll()
                if code is not None:
                    return name, code
            self._sleep(POLL_S)
        return None

    def stop(self) -> None:
        """The services first (each may finish its work and hand back its messages), then Redis, then the lock."""
        deadline = time.monotonic() + STOP_S
        for proc in self.children.values():
            _signal_group(proc, signal.SIGTERM)
        for proc in self.children.values():
            _reap(proc, deadline)
        if self.redis_process is not None:
            self.redis_gone_first = self.redis_process.poll()
            self._shutdown_redis()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    # -- before anything starts -----------------------------------------------------------------------

    def _prepare(self, config: config_mod.Config, environ: dict[str, str]) -> bool:
        """Which Redis; for a private one, the data directory locked and its port free; the exporter's port free.

        True for a private Redis.  Starts nothing.
        """
        from .exporter import listen_address

        private = not _redis_configured(self.config_path, environ)
        if private:
            self._lock_data_dir()
            if self.redis_port:
                _check_free("127.0.0.1", self.redis_port, "the private Redis' port",
                            f"choose another with --redis-port, or set ${config_mod.ENV_REDIS_URL} to use that "
                            "Redis")
            self._password = environ.get(config_mod.ENV_REDIS_PASSWORD) or None
        else:
            self.redis_url = config.service.redis_url
        try:  # where the exporter will listen: --exporter-port, else as it decides ($CHRONOTICK_EXPORTER_ADDRESS)
            host, port = listen_address(None, self.exporter_port, environ)
        except ValueError as exc:
            raise SupervisorError(str(exc)) from None
        _check_free(host, port, "the exporter's port", "choose another with --exporter-port")
        return private

    def _lock_data_dir(self) -> None:
        where = self.data_dir
        if where.exists() and not where.is_dir():
            raise SupervisorError(f"--data-dir {where} is not a directory")
        try:
            where.mkdir(parents=True, exist_ok=True)
            fd = os.open(where / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SupervisorError(f"--data-dir {where}: {exc.strerror or exc}") from None
        if not os.access(where, os.W_OK | os.X_OK):  # Redis makes its files there
            os.close(fd)
            raise SupervisorError(f"--data-dir {where}: not writable")
        lock = os.fdopen(fd, "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "?"
            lock.close()
            raise InUse(f"--data-dir {where} is in use by another up (pid {holder}): one Redis per data "
                        "directory; stop it, or give this one another --data-dir") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    # -- starting -------------------------------------------------------------------------------------

    def _start_redis(self) -> subprocess.Popen:
        port = self.redis_port or _free_port()
        data = self.data_dir.resolve()
        # The append-only file, fsynced every second; the password on stdin, never the command line.
        server = RedisServer(port, data, append_fsync=Fsync.EVERYSEC, password=self._password)
        log = open(data / REDIS_LOG, "ab")
        logged_before = log.tell()
        try:
            proc = self.redis_process = server.start(popen=_popen, stdout=log, stderr=log)
        except FileNotFoundError:
            raise SupervisorError("redis-server is not installed (apt-get install redis-server), and no Redis is "
                           f"configured (${config_mod.ENV_REDIS_URL})") from None
        finally:
            log.close()
        self.redis_url = server.url
        if server.wait(proc, timeout_s=REDIS_START_S, stop=lambda: self.stop_signal is not None) \
                or self.stop_signal is not None:
            return proc
        said = _said_since(data / REDIS_LOG, logged_before)
        if any("Address already in use" in line for line in said):
            raise InUse(f"the private Redis' port 127.0.0.1:{port} was taken as Redis started (another Redis, "
                        "another up?): choose another with --redis-port")
        code = proc.poll()
        raise ServiceFailed(f"redis-server did not start on 127.0.0.1:{port} "
                            f"({f'no answer in {REDIS_START_S:g} s' if code is None else _how_it_ended(code)}): "
                            f"{said[-1] if said else 'nothing logged'} (its log: {data / REDIS_LOG})")

    def _start_services(self, config: config_mod.Config, environ: dict[str, str], *, private: bool) -> None:
        env = dict(environ)
        env.pop(config_mod.ENV_CONFIG, None)
        if private:  # the services add $CHRONOTICK_REDIS_PASSWORD to it, as to any URL
            env[config_mod.ENV_REDIS_URL] = self.redis_url
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
            if self.stop_signal is not None:
                return
            self.children[name] = _popen(argv, env=env, cwd=os.getcwd(), stdin=subprocess.DEVNULL)

    # -- stopping -------------------------------------------------------------------------------------

    def _shutdown_redis(self) -> None:
        proc = self.redis_process
        assert proc is not None
        if proc.poll() is None:
            url = redisurl.with_password(self.redis_url, self._password) if self._password else self.redis_url
            client = redisurl.connect(url, timeout_s=STOP_S, retry=False)
            try:
                client.ping()  # (redis-py takes "connection refused" for SHUTDOWN's expected goodbye)
                client.shutdown()  # fsyncs the append-only file, then exits
            except redis.RedisError:  # not answering yet, or SHUTDOWN refused: Redis' own clean shutdown
                proc.send_signal(signal.SIGTERM)
            finally:
                client.close()
        _reap(proc, time.monotonic() + STOP_S)

    # -- signals --------------------------------------------------------------------------------------

    def _catch_stop_signals(self) -> None:
        """From here on a stop signal only sets :attr:`stop_signal`, and wakes :meth:`wait` at once."""
        self._wake_writer, self._wake = socket.socketpair()
        for sock in (self._wake_writer, self._wake):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wake_writer.fileno(), warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.request_stop)

    def _sleep(self, seconds: float) -> None:
        if self._wake is None:
            time.sleep(seconds)
            return
        select.select([self._wake], [], [], seconds)
        try:
            self._wake.recv(4096)
        except BlockingIOError:
            pass

    def _everyone(self) -> list[tuple[str, subprocess.Popen]]:
        return [*self.children.items(), *([("redis-server", self.redis_process)] if self.redis_process else [])]


# -- helpers ------------------------------------------------------------------------------------------

def _say(line: str) -> None:
    try:
        print(line, flush=True)
    except OSError:  # the terminal went away (SIGHUP); up still stops everything
        pass


def _redis_configured(config_path: str, environ: dict[str, str]) -> bool:
    """Whether a Redis is named: ``$CHRONOTICK_REDIS_URL``, or ``ntp_service.redis_url`` in the file.

    Not the resolved URL, which ``$CHRONOTICK_REDIS_PASSWORD`` alone changes from the default.
    """
    if environ.get(config_mod.ENV_REDIS_URL):
        return True
    document = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))  # already loaded once: valid
    service = document.get("ntp_service") if isinstance(document, dict) else None
    return isinstance(service, dict) and service.get("redis_url") is not None


def _check_free(host: str, port: int, what: str, advice: str) -> None:
    """Refuse a ``port`` that cannot be bound on ``host`` now (as its server will bind it: SO_REUSEADDR)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise SupervisorError(f"{what} {where}: {exc.strerror or exc}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise SupervisorError(f"{what} {where}: {exc.strerror or exc}") from None
            holder = _listener(port)
            raise InUse(f"{what} {where} is in use{f' by {holder}' if holder else ''}: {advice}") from None


def _listener(port: int) -> str | None:
    """``"name (pid N)"`` of a process listening on TCP ``port``, when /proc says (Linux, our own or as root)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return f"{(proc / 'comm').read_text().strip()} (pid {proc.name})"
        except OSError:
            continue
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _said_since(path: Path, offset: int) -> list[str]:
    """The lines a log got after ``offset`` (what this start of Redis said)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _how_it_ended(code: int) -> str:
    """``exit 1``, ``killed by SIGKILL``: a Popen return code in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


# -- children -----------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None] | None:
    """For a child (between fork and exec): SIGTERM when ``up`` dies, so a SIGKILLed ``up`` leaves no orphan."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0),
              ctypes.c_ulong(0), ctypes.c_ulong(0))
        if os.getppid() != parent:  # up died before the line above could matter
            os._exit(1)

    return in_child


def _popen(argv: list[str], **options) -> subprocess.Popen:
    """A child in its own session: no terminal signal and no group-wide kill meant for ``up`` reaches it."""
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=_parent_death_signal(), **options)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)  # the child leads its own group: its own children too
        except ProcessLookupError:
            pass


def _reap(proc: subprocess.Popen, deadline: float) -> None:
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
