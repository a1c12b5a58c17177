"""Local processes for the demo, the tests and the benchmarks: a private Redis, Sentinels, stopping a child.

Development tooling: the service never imports this module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.redisserver import Fsync, RedisServer

REPO = Path(__file__).resolve().parent.parent

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
    """A private ``redis-server`` on a free loopback port, started as ``up`` starts its own
    (:mod:`orchestrator.redisserver`).

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

    @property
    def server(self) -> RedisServer:
        """How it runs (:class:`orchestrator.redisserver.RedisServer`, as ``up``'s): its files named after its
        port, so that a primary and its replica share the directory."""
        return RedisServer(self.port, self.directory, append_fsync=Fsync.ALWAYS if self.append_only else None,
                           replica_of=self.replica_of or None, files_by_port=True)

    def start(self) -> RedisProcess:
        server = self.server
        self.process = server.start(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not server.wait(self.process, timeout_s=STARTUP_TIMEOUT_S):
            raise RuntimeError(f"redis-server on port {self.port} did not start")
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


def chronyd_binary() -> str | None:
    """chronyd on PATH, Debian's, or the copy scripts/bootstrap unpacks into .venv/chrony (``None``: none)."""
    candidates = (shutil.which("chronyd"), "/usr/sbin/chronyd", str(REPO / ".venv/chrony/usr/sbin/chronyd"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


def make_certificate(directory: Path, *, name: str = "localhost", address: str = "127.0.0.1",
                     stem: str = "server") -> tuple[Path, Path]:
    """A self-signed EC certificate for ``name`` and ``address`` (its own CA): ``(cert, key)`` PEM files.

    World-readable, in a world-readable directory: chronyd reads them after
    dropping its privileges.  A throwaway key for loopback tests only.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address(address))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for path in (cert_path, key_path):
        path.chmod(0o644)
    return cert_path, key_path


class ChronydNts:
    """``chronyd -x`` on loopback as an NTP and NTS server; it never touches the clock.

    NTP on ``127.0.0.1:ntp_port``, NTS-KE on ``ke_port``.  With ``ntp_server``
    set, NTS-KE tells clients to send NTP there instead (``ntsntpserver``):
    where a test puts something on the NTP path.
    """

    def __init__(self, binary: str, *, ntp_server: str | None = None):
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="ct-chronyd-nts-"))
        self.directory.chmod(0o755)
        dump = self.directory / "dump"
        dump.mkdir()
        dump.chmod(0o777)
        self.cert, self.key = make_certificate(self.directory)
        self.ntp_port, self.ke_port = free_tcp_port(), free_tcp_port()
        self.ntp_server = ntp_server
        self.conf = self.directory / "chrony.conf"
        self.conf.write_text("\n".join([
            f"port {self.ntp_port}", "bindaddress 127.0.0.1", "allow 127.0.0.0/8", "local stratum 8",
            "cmdport 0", f"ntsport {self.ke_port}", f"ntsserverkey {self.key}", f"ntsservercert {self.cert}",
            f"ntsdumpdir {dump}", f"pidfile {self.directory}/chronyd.pid", f"driftfile {dump}/drift",
            f"logdir {dump}", *([f"ntsntpserver {ntp_server}"] if ntp_server else []), ""]))
        self._as_root = os.geteuid() == 0
        self.process: subprocess.Popen | None = None

    def start(self) -> ChronydNts:
        # As root, drop to nobody: an unpacked chronyd (scripts/bootstrap) has no _chrony user to drop to.
        user = ["-u", "nobody"] if self._as_root else []
        self.process = subprocess.Popen([self.binary, "-x", "-d", "-4", *user, "-f", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=open(self.directory / "chronyd.log", "wb"))
        from workers.ntp import nts

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                nts.key_exchange("127.0.0.1", self.ke_port, ca_file=str(self.cert), timeout_s=1.0)
                return self
            except nts.NtsError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "chronyd.log").read_text()
                    self.stop()
                    raise RuntimeError(f"chronyd did not serve NTS-KE on {self.ke_port}:\n{log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ChronydNts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_node_worker(config, node: str, log_path: Path, *, loglevel: str = "WARNING", timeout_s: float = 60.0,
                      instance: int = 0, concurrency: int | None = None, events: bool = False,
                      nodes: list[str] | None = None, hostname: str | None = None,
                      environ: dict[str, str] | None = None, celery_app=None) -> subprocess.Popen:
    """A plain ``celery -A workers.app worker`` for ``node``'s queue, as the README starts one; returns once it beats.

    The one way the tests, the demo and the benches start a worker.  It points this process's
    Celery app at the config's Redis too, so rounds can be sent from here, and gives the worker
    the config file (``$CHRONOTICK_CONFIG``, when the config came from one): its key prefix, and
    so its heartbeat, are the config's.  ``instance`` > 0 starts another process on the same
    queue, under its own name; ``nodes`` serves several nodes' queues from one process (under
    ``hostname``); ``environ``: more environment for the worker.  ``celery_app``: the app to point at the
    config's Redis and ask with, instead of the shared one (a test whose Redis ends with it keeps the shared
    app's broker pool off that Redis).
    """
    from workers import config as config_mod
    from workers.app import app, configure, queue_for, worker_argv, workers_for_queue

    configure(celery_app or app, config.service)
    env = {**os.environ, "PYTHONPATH": str(REPO), **(environ or {})}
    if Path(config.source).is_file():
        env[config_mod.ENV_CONFIG] = str(Path(config.source).resolve())
    argv = worker_argv(config, node, concurrency=concurrency, events=events, loglevel=loglevel)
    if nodes:
        argv[argv.index("--queues") + 1] = ",".join(queue_for(n) for n in nodes)
    if instance or hostname:
        argv[argv.index("--hostname") + 1] = hostname or f"{node}-{instance}@%h"
    log = open(log_path, "ab")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", *argv], env=env, cwd=str(REPO),
                              stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    deadline = time.monotonic() + timeout_s
    while len(workers_for_queue(queue_for(node), timeout_s=0.5, key_prefix=config.service.key_prefix,
                                through=celery_app)) < instance + 1:
        if time.monotonic() > deadline or worker.poll() is not None:
            stop_process(worker)
            raise RuntimeError(f"the worker for {node} did not start (exit {worker.returncode}): "
                               f"{Path(log_path).read_text()[-3000:]}")
    return worker
