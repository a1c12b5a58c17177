"""A cluster on one machine: network namespaces for a head node, compute nodes and an "Internet".

Topology (``P`` is a per-run prefix, ``ct`` + 6 hex digits, so concurrent runs never meet)::

    P-inet  10.78.0.2  wan0 --- wan0 10.78.0.1  P-head  10.77.0.1 lan0 ---+
            simulator servers (20 ms)            redis-server (AOF,       |
            + chronyd -x                          requirepass), beat,     |    P-switch
                                                  relay, exporter         +--- br0 (bridge)
                                                                          |
                                    P-node1 10.77.0.11 lan0 --------------+
                                    P-node2 10.77.0.12 lan0 --------------+
                                    P-node3 10.77.0.13 lan0 --------------+
                                    (P-ops  10.77.0.5  lan0, when added) -+

The LAN is a bridge in its own namespace (``P-switch``), never in the root
namespace: nothing of the bed is visible to, or collides with, this machine's
own interfaces, and a bridge port is a switch port a test can pull
(:meth:`Bed.cut`).  The head has a second link to ``P-inet`` and forwards
nothing (``net.ipv4.ip_forward=0``), so compute nodes reach only the head, as
on ARES: NTP goes through the head's relay, Redis is the head's.  Every
address exists only inside namespaces the bed made.

Services start the way docs/operations.md tells an operator: each gets the
environment of ``/etc/chronotick-ntp/env`` (the bed's ``env`` file, parsed as
systemd's ``EnvironmentFile``), the same YAML everywhere, and the command line
of its systemd unit (``chronotick-ntp worker --config F --node N`` with
``CHRONOTICK_NODE=N``, ``beat``, ``exporter``, ``relay --bind --allow``).
Redis runs from a config file as a packaged redis-server would.  The test
process sees Redis through a Unix socket in the bed's directory (a window only
the bed has; the services use TCP) and reaches into a namespace with
:meth:`Bed.call_in` (a thread that joins it) or :meth:`Bed.run`.

Everything the bed makes it deletes in :meth:`Bed.teardown`: its processes,
every process left in its namespaces, the namespaces (their links and the
bridge go with them) and its directory.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from simulator.processes import chronyd_binary
from workers.keys import Keys

REPO = Path(__file__).resolve().parents[2]

#: The cluster LAN (head, nodes, extra hosts) and the head's uplink to the "Internet".
LAN_PREFIX = "10.77.0"
LAN_CIDR = f"{LAN_PREFIX}.0/24"
HEAD_ADDRESS = f"{LAN_PREFIX}.1"
WAN_HEAD_ADDRESS = "10.78.0.1"
INET_ADDRESS = "10.78.0.2"
REDIS_PORT = 6379
EXPORTER_PORT = 9124
#: The relay's first port (ChronoTick's ARES head node: 8123-8132), one per upstream.
RELAY_FIRST_PORT = 8123
#: The simulated public servers' first port in the "Internet", and their round trip (s).
SIMULATOR_FIRST_PORT = 12301
SIMULATOR_DELAY_S = 0.02
SIMULATED_SERVERS = 5
#: chronyd -x in the "Internet" serves NTP on the standard port.
CHRONYD_PORT = 123
KEY_PREFIX = "chronotick"

#: How long a service may take to start, and a namespace command to finish (s).
START_S = 60.0
COMMAND_S = 30.0
#: SIGTERM, then this long, then SIGKILL (s).
STOP_S = 15.0

_CLONE_NEWNET = 0x40000000


class BedError(RuntimeError):
    """The bed could not be built or a service did not start; the message says what and shows its log."""


class NamespacesUnavailable(BedError):
    """``ip netns add`` failed: not root, or no CAP_NET_ADMIN / CAP_SYS_ADMIN here."""


class LogMark:
    """The lines a service logs from now on."""

    def __init__(self, service):
        self.service = service
        self.offset = len(service.log())

    def lines(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.service.log()[self.offset:].splitlines() if regex.search(line)]

    def text(self, chars: int = 4000) -> str:
        return self.service.log()[self.offset:][-chars:]


def poll(predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that; BedError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BedError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def ip_binary() -> str | None:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")


def chronotick_argv() -> list[str]:
    """The installed ``chronotick-ntp`` command (the venv's), as an operator runs it."""
    script = Path(sys.executable).parent / "chronotick-ntp"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orchestrator.cli"]


@dataclass
class Service:
    """One process the bed started in one of its hosts."""

    name: str
    host: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen
    started_at: float = field(default_factory=time.time)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, pattern: str) -> list[str]:
        """Lines of the log matching the regular expression ``pattern``."""
        regex = re.compile(pattern)
        return [line for line in self.log().splitlines() if regex.search(line)]

    def tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]


class Bed:
    """Namespaces, links and services of one test cluster.

    ``Bed(directory, nodes=("node1", "node2", "node3")).build()`` makes the
    namespaces and links; :meth:`start_cluster` starts every service of the
    default layout (head: Redis, relay, beat, exporter; each node: its
    worker; "Internet": simulated servers and chronyd) and waits until every
    node has published.  A test then cuts and restores links
    (:meth:`cut`, :meth:`restore`), moves or restarts services
    (:meth:`start_beat`, :meth:`start_exporter`, :meth:`stop`, :meth:`kill`),
    adds hosts (:meth:`add_host`), reads Redis (:meth:`redis`, :meth:`latest`,
    :meth:`redis_time`) and scrapes (:meth:`scrape`).
    """

    def __init__(self, directory: Path, *, nodes: tuple[str, ...] = ("node1", "node2", "node3"),
                 prefix: str | None = None):
        self.directory = directory
        self.nodes = tuple(nodes)
        self.prefix = prefix or f"ct{secrets.token_hex(3)}"
        self.ip = ip_binary() or "ip"
        self.password = secrets.token_hex(16)
        #: LAN host -> its address; "head" first.
        self.lan: dict[str, str] = {}
        self.namespaces: list[str] = []
        self.services: dict[str, Service] = {}
        self.config_path = directory / "etc" / "config.yaml"
        self.env_path = directory / "etc" / "env"
        self.proxy_path = directory / "etc" / "ntp_proxy_config.yaml"
        self.redis_socket = directory / "redis" / "redis.sock"
        self._client: redis.Redis | None = None

    # -- names ----------------------------------------------------------------

    def ns(self, host: str) -> str:
        """The namespace of ``host`` ("head", "inet", "switch", a node, an added host)."""
        return f"{self.prefix}-{host}"

    @property
    def hosts(self) -> list[str]:
        return list(self.lan)

    @property
    def redis_url(self) -> str:
        """The URL every service is given (``CHRONOTICK_REDIS_URL``; the password comes separately)."""
        return f"redis://{HEAD_ADDRESS}:{REDIS_PORT}/0"

    @property
    def servers(self) -> list[str]:
        """The NTP servers a node is configured with: the head's relay ports."""
        return [f"{HEAD_ADDRESS}:{RELAY_FIRST_PORT + i}" for i in range(SIMULATED_SERVERS + 1)]

    # -- namespaces and links ---------------------------------------------------

    def build(self) -> Bed:
        """Make the namespaces, the bridge, the links and addresses; lo up everywhere."""
        for sub in ("etc", "redis", "logs", "inet"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self._add_namespace("switch")  # raises NamespacesUnavailable where namespaces cannot be made
        self._ip("switch", "link", "add", "br0", "type", "bridge")
        self._ip("switch", "link", "set", "br0", "up")
        self._add_namespace("head")
        self._add_namespace("inet")
        self._lan_host("head", HEAD_ADDRESS)
        for i, node in enumerate(self.nodes):
            self._add_namespace(node)
            self._lan_host(node, f"{LAN_PREFIX}.{11 + i}")
        # The head's uplink: a point-to-point link to the "Internet", nothing forwarded between them.
        self._ip("head", "link", "add", "wan0", "type", "veth", "peer", "name", "wan0", "netns", self.ns("inet"))
        self._ip("head", "addr", "add", f"{WAN_HEAD_ADDRESS}/24", "dev", "wan0")
        self._ip("inet", "addr", "add", f"{INET_ADDRESS}/24", "dev", "wan0")
        self._ip("head", "link", "set", "wan0", "up")
        self._ip("inet", "link", "set", "wan0", "up")
        self.run("head", ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"])  # a host, not a router
        return self

    def add_host(self, host: str, last_octet: int) -> str:
        """Another host on the cluster LAN (e.g. a service host for a standby beat); its address."""
        self._add_namespace(host)
        return self._lan_host(host, f"{LAN_PREFIX}.{last_octet}")

    def cut(self, host: str, *, at: str = "switch") -> None:
        """Pull ``host``'s LAN cable: its switch port down (``at="switch"``), or its own interface (``"host"``).

        At the switch, the host's interface loses its carrier and every packet
        either way is dropped silently, as with a dead cable or switch port.
        At the host, its interface is administratively down: its LAN route goes
        and new connections fail at once ("Network is unreachable").
        """
        self._link(host, at, "down")

    def restore(self, host: str, *, at: str = "switch") -> None:
        """Plug the cable back (the same side :meth:`cut` took down)."""
        self._link(host, at, "up")

    def _link(self, host: str, at: str, state: str) -> None:
        if at == "switch":
            self._ip("switch", "link", "set", self._port(host), state)
        elif at == "host":
            self._ip(host, "link", "set", "lan0", state)
        else:
            raise ValueError(f"cut at 'switch' or 'host', not {at!r}")

    def _port(self, host: str) -> str:
        return f"p-{host}"[:15]

    def _add_namespace(self, host: str) -> None:
        name = self.ns(host)
        result = subprocess.run([self.ip, "netns", "add", name], capture_output=True, text=True,
                                timeout=COMMAND_S)
        if result.returncode != 0:
            raise NamespacesUnavailable(f"`ip netns add {name}` failed: {result.stderr.strip() or result.returncode}")
        self.namespaces.append(name)
        self._ip(host, "link", "set", "lo", "up")

    def _lan_host(self, host: str, address: str) -> str:
        self._ip(host, "link", "add", "lan0", "type", "veth", "peer", "name", self._port(host),
                 "netns", self.ns("switch"))
        self._ip("switch", "link", "set", self._port(host), "master", "br0")
        self._ip("switch", "link", "set", self._port(host), "up")
        self._ip(host, "addr", "add", f"{address}/24", "dev", "lan0")
        self._ip(host, "link", "set", "lan0", "up")
        self.lan[host] = address
        return address

    def _ip(self, host: str, *args: str) -> None:
        result = subprocess.run([self.ip, "-n", self.ns(host), *args], capture_output=True, text=True,
                                timeout=COMMAND_S)
        if result.returncode != 0:
            raise BedError(f"`ip -n {self.ns(host)} {' '.join(args)}` failed: {result.stderr.strip()}")

    # -- running things in a host ------------------------------------------------

    def run(self, host: str, argv: list[str], *, timeout_s: float = COMMAND_S,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host``'s namespace (``ip netns exec``) and wait; raise BedError if it fails."""
        result = subprocess.run([self.ip, "netns", "exec", self.ns(host), *argv], capture_output=True, text=True,
                                timeout=timeout_s, env=env)
        if result.returncode != 0:
            raise BedError(f"in {host}: {' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def call_in(self, host: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in a thread that joined ``host``'s network namespace.

        Sockets it opens live in that namespace (a scrape of a service bound to
        the host's loopback, an NTP query from the head).  Only that thread
        moves (setns(2) with CLONE_NEWNET is per thread), and it ends with the call.
        """
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise OSError(errno, f"setns into {self.ns(host)}: {os.strerror(errno)}")
                finally:
                    os.close(fd)
                outcome["value"] = function(*args, **kwargs)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, name=f"in-{host}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def environment(self, **extra: str) -> dict[str, str]:
        """A service's environment: a plain PATH and locale, the env file's variables, then ``extra``.

        Nothing is inherited from the test process (which may point at another Redis).
        """
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8", "HOME": str(self.directory), "PYTHONUNBUFFERED": "1",
               # The code of the tree these tests belong to, whatever the venv was installed from.
               "PYTHONPATH": str(REPO)}
        env.update(read_env_file(self.env_path))
        env.update(extra)
        return env

    def start(self, name: str, host: str, argv: list[str], *, env: dict[str, str] | None = None,
              ready: Callable[[Service], bool] | None = None, timeout_s: float = START_S) -> Service:
        """Start ``argv`` in ``host`` as the service ``name``, its output to ``logs/<name>.log``.

        ``ready(service)``: wait until it returns True (BedError with the log if
        the process exits first or the deadline passes).
        """
        if name in self.services and self.services[name].alive():
            raise BedError(f"{name} is already running")
        log_path = self.directory / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen([self.ip, "netns", "exec", self.ns(host), *argv], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env if env is not None else self.environment(),
                                       cwd=str(self.directory), start_new_session=True)
        service = Service(name, host, argv, log_path, process)
        self.services[name] = service
        if ready is not None:
            deadline = time.monotonic() + timeout_s
            while not ready(service):
                if not service.alive():
                    raise BedError(f"{name} in {host} exited {process.returncode}:\n{service.tail()}")
                if time.monotonic() > deadline:
                    raise BedError(f"{name} in {host} not ready after {timeout_s:g} s:\n{service.tail()}")
                time.sleep(0.1)
        return service

    def stop(self, name: str, *, timeout_s: float = STOP_S) -> None:
        """SIGTERM the service, then SIGKILL after ``timeout_s``."""
        service = self.services.get(name)
        if service is None or not service.alive():
            return
        service.process.terminate()
        try:
            service.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()

    def kill(self, name: str) -> None:
        """SIGKILL the service: no shutdown, as a crashed host would leave it."""
        service = self.services.get(name)
        if service is not None and service.alive():
            service.process.kill()
            service.process.wait()

    def crash(self, name: str) -> None:
        """SIGKILL the service's whole process group (it runs in a session of its own), as a crash would leave it
        under systemd (``KillMode=control-group`` then takes what the main process started)."""
        service = self.services.get(name)
        if service is None or not service.alive():
            return
        try:
            os.killpg(service.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        service.process.wait()

    def restart(self, name: str, start: Callable[[], Service]) -> Service:
        """Start a stopped service again with ``start()``, its log from here on only (``logs/<name>.log``
        is appended to: a ready check reading the old lines would pass at once)."""
        service = self.services.get(name)
        if service is not None and service.alive():
            raise BedError(f"{name} is still running")
        if service is not None and service.log_path.exists():
            service.log_path.rename(service.log_path.with_suffix(f".{int(time.time() * 1000)}.log"))
        return start()

    # -- configuration files ------------------------------------------------------

    def write_files(self, **ntp_overrides: Any) -> None:
        """The operator's files: env (secrets), the YAML every process shares, the relay's proxy file."""
        self.env_path.write_text("\n".join([
            "# /etc/chronotick-ntp/env of this bed (deploy/systemd/env.example's variables)",
            f"CHRONOTICK_REDIS_URL={self.redis_url}",
            f"CHRONOTICK_REDIS_PASSWORD={self.password}",
            f"FLOWER_BASIC_AUTH=ops:{secrets.token_hex(8)}",
            f"RELAY_BIND={HEAD_ADDRESS}",
            f"RELAY_ALLOW={LAN_CIDR}",
            ""]))
        self.env_path.chmod(0o600)
        # configs/config_ares_relay_2min_ntp.yaml's shape -- nodes query the head's relay ports -- on a
        # test's timing: a round every 2 s (warm-up every 1 s for 4 s), exchanges of 0.5 s.
        ntp = {"servers": self.servers, "timeout_seconds": 0.5, "max_retries": 2, "retry_delay": 0.2,
               "max_acceptable_uncertainty": 0.1, "max_delay": 0.1, "measurement_mode": "simple",
               "selection": "combine", **ntp_overrides}
        self.config_path.write_text(yaml.safe_dump({
            "clock_measurement": {
                "ntp": ntp,
                "timing": {"warm_up": {"duration_seconds": 4, "measurement_interval": 1},
                           "normal_operation": {"measurement_interval": 2}}},
            # No cooldown between a node's warm-ups: the bed's tests restart the same node's worker (production
            # keeps the 10-minute default, issue #26).
            "ntp_service": {"key_prefix": KEY_PREFIX, "nodes": list(self.nodes), "history_length": 2000,
                            "warm_up_cooldown_seconds": 0}}))
        upstreams = [(INET_ADDRESS, SIMULATOR_FIRST_PORT + i) for i in range(SIMULATED_SERVERS)]
        upstreams.append((INET_ADDRESS, CHRONYD_PORT))
        self.proxy_path.write_text(yaml.safe_dump({"proxy_mappings": [
            # The nodes together poll each upstream every second or so: keep the relay's upstream cap out
            # of the way (it has its own tests), as an operator sizing it for this cluster would.
            {"listen_port": RELAY_FIRST_PORT + i, "ntp_server": host, "ntp_port": port, "min_interval_s": 0.05,
             "upstream_burst": 400}
            for i, (host, port) in enumerate(upstreams)]}))

    def redis_conf(self) -> str:
        """The head's redis.conf, as docs/operations.md has an operator install it.

        The shipped ``configs/redis-head-node.conf`` (an append-only file, ``noeviction``,
        ``protected-mode``), then this head's own lines, which win: the cluster address besides
        loopback (never the uplink), the password (an operator includes a root-only file), the
        bed's directory.  Without the shipped file, its settings are written out here.  The Unix
        socket is the bed's window for the test process.
        """
        data = self.directory / "redis"
        auth = data / "auth.conf"
        auth.write_text(f"requirepass {self.password}\n")
        auth.chmod(0o600)
        shipped = REPO / "configs" / "redis-head-node.conf"
        base = [f"include {shipped}"] if shipped.is_file() else [
            "protected-mode yes", "appendonly yes", "appendfsync everysec", 'save ""',
            "maxmemory-policy noeviction", "tcp-keepalive 60", 'logfile ""']
        return "\n".join([
            *base,
            f"bind {HEAD_ADDRESS} 127.0.0.1",
            f"port {REDIS_PORT}",
            f"dir {data}",
            f"pidfile {data}/redis.pid",
            f"unixsocket {self.redis_socket}",
            "unixsocketperm 700",
            "daemonize no",
            f"include {auth}",
            ""])

    # -- services -------------------------------------------------------------------

    def start_cluster(self) -> None:
        """Every service of the default layout, then wait until every node has published a round."""
        self.write_files()
        self.start_inet()
        self.start_redis()
        self.start_relay()
        for node in self.nodes:
            self.start_worker(node)
        self.start_beat()
        self.start_exporter()
        for node in self.nodes:
            self.wait_published(node, after=0.0, timeout_s=START_S)

    def start_inet(self) -> None:
        """The "Internet": simulated public servers (20 ms away) and a ``chronyd -x``, in ``inet``."""
        sim = self.directory / "inet" / "simulator.yaml"
        sim.write_text(yaml.safe_dump({
            "clock_measurement": {"ntp": {"servers": [f"{INET_ADDRESS}:{SIMULATOR_FIRST_PORT}"]}},
            "simulator": {"host": INET_ADDRESS, "servers": [
                {"port": SIMULATOR_FIRST_PORT + i, "delay_s": SIMULATOR_DELAY_S, "jitter_s": 0.001}
                for i in range(SIMULATED_SERVERS)]}}))
        self.start("simulator", "inet", [*chronotick_argv(), "simulate", "--config", str(sim)],
                   env=self.environment(), ready=lambda s: "simulating" in s.log())
        binary = chronyd_binary()
        if binary is None:
            raise BedError("no chronyd: run scripts/bootstrap (it unpacks one into .venv/chrony)")
        run = self.directory / "inet" / "chronyd"
        run.mkdir(exist_ok=True)
        run.chmod(0o777)
        conf = run / "chrony.conf"
        conf.write_text("\n".join([
            f"port {CHRONYD_PORT}", f"bindaddress {INET_ADDRESS}", "allow 10.78.0.0/24", "local stratum 2",
            "cmdport 0", f"pidfile {run}/chronyd.pid", f"driftfile {run}/drift", f"logdir {run}", ""]))
        conf.chmod(0o644)
        # -x: never touch the clock (every namespace shares it); -d: in the foreground, supervised here;
        # as root it drops to nobody (an unpacked chronyd has no _chrony user).
        self.start("chronyd", "inet", [binary, "-x", "-d", "-4", "-u", "nobody", "-f", str(conf)])

    def start_redis(self) -> None:
        conf = self.directory / "redis" / "redis.conf"
        conf.write_text(self.redis_conf())
        conf.chmod(0o600)
        self.start("redis", "head", ["redis-server", str(conf)], env=self.environment(),
                   ready=lambda s: self._redis_answers())

    def _redis_answers(self) -> bool:
        try:
            return bool(self.redis().ping())
        except redis.RedisError:
            return False

    def start_relay(self) -> Service:
        """``chronotick-ntp relay`` as its unit runs it: ``--bind ${RELAY_BIND} --allow ${RELAY_ALLOW}``."""
        return self.start("relay", "head", [*chronotick_argv(), "relay", "--config", str(self.proxy_path),
                                            "--bind", HEAD_ADDRESS, "--allow", LAN_CIDR],
                          ready=lambda s: "answering" in s.log())

    def start_worker(self, node: str, *, name: str | None = None) -> Service:
        """``chronotick-ntp-worker@NODE``: ``CHRONOTICK_NODE=NODE``, ``worker --config F --node NODE``."""
        queue = f"ntp.{node}"
        return self.start(name or f"worker-{node}", node,
                          [*chronotick_argv(), "worker", "--config", str(self.config_path), "--node", node],
                          env=self.environment(CHRONOTICK_NODE=node),
                          ready=lambda s: bool(self._live_workers(queue)))

    def start_beat(self, host: str = "head", *, name: str = "beat") -> Service:
        """``chronotick-ntp-beat``: ``beat --config F``."""
        return self.start(name, host, [*chronotick_argv(), "beat", "--config", str(self.config_path)],
                          ready=lambda s: "beat:" in s.log())

    def start_exporter(self, host: str = "head", *, name: str = "exporter") -> Service:
        """``chronotick-ntp-exporter``: ``exporter --config F`` on the host's 127.0.0.1:9124."""
        return self.start(name, host, [*chronotick_argv(), "exporter", "--config", str(self.config_path)],
                          ready=lambda s: self._scrapes(host))

    def _scrapes(self, host: str) -> bool:
        try:
            return "chronotick_ntp_redis_up" in self.scrape(host, timeout_s=5)
        except OSError:
            return False

    def _live_workers(self, queue: str) -> list[str]:
        from workers.heartbeat import live_workers

        try:
            return live_workers(self.redis(), Keys(KEY_PREFIX), queue)
        except redis.RedisError:
            return []

    # -- what the test process reads ----------------------------------------------------

    def redis(self) -> redis.Redis:
        """A client on the head's Redis through the bed's Unix socket (not through any link a test cuts)."""
        if self._client is None:
            self._client = redis.Redis(unix_socket_path=str(self.redis_socket), password=self.password,
                                       socket_timeout=5, decode_responses=True)
        return self._client

    def redis_time(self) -> float:
        """Redis' clock now (``TIME``): the service's clock, the one ``published_at`` is on."""
        seconds, micros = self.redis().time()
        return seconds + micros / 1e6

    def latest(self, node: str) -> dict | None:
        raw = self.redis().get(Keys(KEY_PREFIX).latest(node))
        return json.loads(raw) if raw else None

    def published_at(self, node: str) -> float:
        """When ``node``'s ``latest`` was published (Redis' clock), 0 if never."""
        latest = self.latest(node)
        return float(latest["published_at"]) if latest else 0.0

    def wait_published(self, node: str, *, after: float, timeout_s: float) -> float:
        """Wait for a ``latest`` of ``node`` published after ``after`` (Redis' clock); its ``published_at``."""
        def newer() -> float:
            at = self.published_at(node)
            return at if at > after else 0.0

        return float(poll(newer, timeout_s=timeout_s, what=f"{node} to publish after {after:.3f}", interval_s=0.05))

    def scrape(self, host: str, *, port: int = EXPORTER_PORT, timeout_s: float = 10.0) -> str:
        """``GET http://127.0.0.1:PORT/metrics`` from inside ``host`` (Prometheus' default timeout: 10 s)."""
        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as reply:
                return reply.read().decode()
        return str(self.call_in(host, get))

    # -- teardown -------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Stop every service, any process left in the bed's namespaces, delete them; the problems met."""
        problems: list[str] = []
        if self._client is not None:
            self._client.close()
            self._client = None
        # Services first, then what they stand on (the relay, Redis, the "Internet"): a worker finishes
        # what it holds and hands back the rest.
        order = sorted(self.services, key=lambda n: n in ("relay", "redis", "simulator", "chronyd"))
        for name in order:
            try:
                self.stop(name)
            except Exception as exc:  # keep tearing down
                problems.append(f"stopping {name}: {exc}")
        for name in reversed(self.namespaces):
            try:
                pids = subprocess.run([self.ip, "netns", "pids", name], capture_output=True, text=True,
                                      timeout=COMMAND_S).stdout.split()
                for pid in pids:  # only processes inside a namespace this bed made: started by it
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    problems.append(f"killed pid {pid} left in {name}")
                result = subprocess.run([self.ip, "netns", "del", name], capture_output=True, text=True,
                                        timeout=COMMAND_S)
                if result.returncode != 0:
                    problems.append(f"`ip netns del {name}`: {result.stderr.strip()}")
            except Exception as exc:
                problems.append(f"deleting {name}: {exc}")
        self.namespaces.clear()
        return problems


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, ``#`` comments, as systemd's ``EnvironmentFile`` reads the simple cases."""
    env = {}
    if not path.is_file():
        return env
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip().strip('"')
    return env
