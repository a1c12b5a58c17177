"""``chronotick-ntp hub``: what the head node runs for the cluster as its time hub (issue #26).

Two supervised children:

- **chronyd**, the LAN's NTP server (``ntp_service.hub.address``): chrony is
  the well-kept choice, so this module writes its configuration and keeps it
  running, and writes no NTP server of its own.  It is started with ``-x``
  (it never adjusts the clock: it serves the head's clock as it is, which is
  exactly what the hub node's rounds measure against UTC), ``-d`` (in the
  foreground, supervised here), ``local stratum`` (it serves though it has no
  source) and *no* ``server`` lines: chronyd itself sends nothing to the
  public servers, so the hub node's rounds are the only requests they get
  from the cluster (:mod:`workers.politeness` keeps those within budget).
  ``cmdport 0``: no control socket.  No ``ratelimit``: warm-ups poll it every
  second, from every node.
- **the hub node's worker** (``chronotick-ntp worker --node <hub.node>``):
  its rounds measure ``clock_measurement.ntp.servers``, the public ones.
  chronyd will not start unless root (it then drops to ``_chrony``), so the
  hub is started as root and runs its worker as ``--worker-user`` (default
  ``chronotick``): never root unless named.

A child that exits is logged loudly and started again after a back-off (1 s,
doubling to 30 s, reset after a minute up).  SIGTERM or SIGINT stops the
worker first (a warm shutdown: running rounds finish), then chronyd.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers import config as config_mod

from . import defaults

log = logging.getLogger(__name__)

#: The stratum chronyd serves its (unsynchronised, local) clock at: the head's clock is measured
#: against UTC by the hub node's rounds, not by chronyd.
LOCAL_STRATUM = 2
#: A child that died is started again after this, doubling up to :data:`MAX_RESTART_DELAY_S` (s).
FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
#: A child up this long has its back-off reset (s).
STABLE_AFTER_S = 60.0
#: How long a stopping child gets before SIGKILL (s): the worker finishes its running tasks.
STOP_GRACE_S = 20.0

class HubError(RuntimeError):
    """A hub that cannot start: the message names what is wrong."""


def find_chronyd(explicit: str | None) -> str:
    """``--chronyd PATH``, else ``chronyd`` on PATH, else :data:`defaults.CHRONYD`."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise HubError(f"--chronyd {explicit}: not an executable file")
        return explicit
    found = shutil.which("chronyd") or (defaults.CHRONYD if os.access(defaults.CHRONYD, os.X_OK) else None)
    if found is None:
        raise HubError(f"no chronyd on PATH or in {os.path.dirname(defaults.CHRONYD)}: install chrony "
                       "(apt install chrony) or give --chronyd PATH")
    return found


def parse_allow(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``--allow CIDR ...``: the LAN networks chronyd answers."""
    nets = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise HubError(f"--allow {value}: not a network (CIDR such as 10.0.0.0/24)") from None
    return nets


def chrony_conf(*, bind: str, port: int, allow: list, run_dir: Path) -> str:
    """chronyd's configuration for the hub: serve the head's clock on the LAN, ask nobody."""
    lines = [
        "# Written by chronotick-ntp hub; rewritten at every start.",
        f"port {port}",
        f"bindaddress {bind}",
        *(f"allow {net}" for net in allow),
        f"local stratum {LOCAL_STRATUM}",
        "cmdport 0",
        f"pidfile {run_dir / 'chronyd.pid'}",
        f"driftfile {run_dir / 'drift'}",
        f"logdir {run_dir}",
        "",
    ]
    return "\n".join(lines)


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    #: Run as this user (the parent is root), with its groups; ``None``: as the parent.
    user: str | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_delay_s: float = FIRST_RESTART_DELAY_S
    restarts: int = 0

    def start(self) -> None:
        drop: dict = {}
        if self.user is not None and self.user != "root":
            entry = pwd.getpwnam(self.user)
            drop = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, **drop)
        self.started_at = time.monotonic()
        log.info("[HUB] %s started (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.error("[HUB] %s did not stop within %g s: killed", self.name, STOP_GRACE_S)
            proc.kill()
            proc.wait()


@dataclass
class TimeHub:
    """The head node's hub: chronyd for the LAN and the hub node's worker, each restarted when it dies."""

    config_path: str
    config: config_mod.Config
    bind: str
    allow: list
    chronyd: str
    run_dir: Path
    chronyd_user: str | None = None
    #: Started as root (chronyd insists on it), the hub node's worker runs as this user: ``chronotick`` by
    #: default; ``root`` only when named (said once in the log).
    worker_user: str | None = None
    children: list[Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        hub = self.config.service.hub
        if hub is None:
            raise HubError(f"{self.config.source}: ntp_service.hub: missing (address and node)")
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise HubError(f"--bind {self.bind!r}: not an IP address (chronyd binds one address)") from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / "chrony.conf"
        conf.write_text(chrony_conf(bind=self.bind, port=hub.server.port, allow=self.allow, run_dir=self.run_dir))
        conf.chmod(0o644)
        chronyd_argv = [self.chronyd, "-x", "-d", "-f", str(conf)]
        if os.geteuid() == 0:
            user = self.chronyd_user or _unprivileged_user()
            entry = pwd.getpwnam(user)
            os.chown(self.run_dir, entry.pw_uid, entry.pw_gid)
            chronyd_argv[1:1] = ["-u", user]
        worker_argv = [sys.executable, "-m", "orchestrator.cli", "worker", "--config", self.config_path,
                       "--node", hub.node, "--loglevel", "INFO"]
        worker = Child(f"worker {hub.node}", worker_argv)
        if os.geteuid() == 0:
            worker.user = _worker_user(self.worker_user)
        self.children = [Child("chronyd", chronyd_argv), worker]

    def run(self) -> None:
        """Start both children and keep them running until :meth:`stop`."""
        for child in self.children:
            child.start()
        while not self._stop.wait(0.2):
            for child in self.children:
                self._look_after(child)
        for child in reversed(self.children):  # the worker first, then chronyd
            child.stop()

    def stop(self, *_: object) -> None:
        self._stop.set()

    def _look_after(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is None:
            if proc is not None and time.monotonic() - child.started_at >= STABLE_AFTER_S:
                child.restart_delay_s = FIRST_RESTART_DELAY_S
            return
        code = proc.returncode
        log.error("[HUB] %s exited (%s); starting it again in %g s", child.name, _how(code), child.restart_delay_s)
        print(f"hub: {child.name} exited ({_how(code)}); starting it again in {child.restart_delay_s:g} s",
              file=sys.stderr, flush=True)
        if self._stop.wait(child.restart_delay_s):
            return
        child.restart_delay_s = min(MAX_RESTART_DELAY_S, child.restart_delay_s * 2)
        child.restarts += 1
        child.start()


def _unprivileged_user() -> str:
    """The user chronyd drops to when started as root: the first of :data:`defaults.CHRONYD_USERS` that exists."""
    for name in defaults.CHRONYD_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise HubError("no unprivileged user for chronyd (_chrony or nobody): give --chronyd-user")


def _worker_user(named: str | None) -> str:
    """Who the hub node's worker runs as when the hub is started as root: never root unless named."""
    name = named or defaults.HUB_WORKER_USER
    if name == "root":
        log.warning("[HUB] the hub node's worker runs as root, as --worker-user root asks")
        return name
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise HubError(f"--worker-user {name}: no such user (started as root, the hub runs its worker as an "
                       "unprivileged user: create `chronotick` as docs/operations.md shows, or name one)") from None
    return name


def _how(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
