"""``chronotick-ntp up``: one box in one command, and every way it stops or refuses to start.

Real processes throughout: ``up`` runs in its own session, as a shell runs a foreground job, so a
terminal's Ctrl-C is SIGINT to that process group and systemd's stop is SIGTERM to every process of
the unit (``os.killpg`` here).  Its children must get neither: ``up`` stops the services first, then
Redis, so the worker can hand back the messages it holds.  Exit codes are the CLI's own constants,
the ones docs/contract.md lists.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from celery import Celery

from orchestrator.cli import EXIT_IN_USE, EXIT_OK, EXIT_SERVICE_FAILED, EXIT_USAGE
from orchestrator.reader import NtpReader
from simulator.ntpserver import Behaviour
from simulator.processes import RedisProcess, free_tcp_port, stop_process
from workers import config as config_mod
from workers import redisurl

from ..conftest import REPO, wait_for

pytestmark = pytest.mark.integration

NODE = "upnode"
#: How long ``up`` may take to refuse to start (s): no child is started, so only its own start-up.
REFUSE_S = 20.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _in_sessions(sessions: set[int]) -> list[int]:
    """Every live process whose session is one of ``sessions``: a child's own children included."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sessions:  # state, ppid, pgrp, session
            found.append(int(entry.name))
    return found


def _config(tmp_path: Path, servers: list[str]) -> Path:
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": servers, "timeout_seconds": 0.3, "retry_delay": 0.2,
                                      "max_retries": 2},
                              "timing": {"warm_up": {"duration_seconds": 3, "measurement_interval": 0.5},
                                         "normal_operation": {"measurement_interval": 2}}},
        "ntp_service": {"key_prefix": "box"}}))
    return path


def _environ(**extra: str) -> dict[str, str]:
    """The test's environment with no Redis configured (conftest points $CHRONOTICK_REDIS_URL at its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (config_mod.ENV_REDIS_URL, config_mod.ENV_CONFIG, config_mod.ENV_REDIS_PASSWORD)}
    return {**env, "PYTHONPATH": str(REPO), **extra}


class Up:
    """``chronotick-ntp up`` as a foreground job: its own process group, stdout read here, stderr to ``log``."""

    def __init__(self, config: Path, data_dir: Path, log: Path, *, redis_port: int = 0,
                 exporter_port: int | None = None, env: dict[str, str] | None = None):
        self.log = log
        argv = [sys.executable, "-m", "orchestrator.cli", "up", "--config", str(config), "--node", NODE,
                "--data-dir", str(data_dir), "--redis-port", str(redis_port),
                "--exporter-port", str(exporter_port or free_tcp_port())]
        self.proc = subprocess.Popen(argv, env=env or _environ(), cwd=str(REPO), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        self.out = self.proc.stdout
        self.stdout: list[str] = []

    def started(self, password: str | None = None) -> tuple[str, int, dict[str, int]]:
        """Once ``up`` says everything runs: its private Redis' URL (no password), pid, and ``{service: pid}``.

        Redis' pid is Redis' own word (``INFO``), not ``up``'s.
        """
        url = None
        while True:
            line = self.out.readline()
            assert line, f"up exited ({self.proc.wait()}): {self.stderr()[-3000:]}"
            self.stdout.append(line)
            if m := re.match(r"up: Redis at (\S+) \((private|configured)", line):
                assert m.group(2) == "private", line
                url = m.group(1)
            elif line.startswith("up: worker"):
                services = {name: int(pid) for name, pid in re.findall(r"(\w+) pid (\d+)", line)}
                assert url and set(services) == {"worker", "beat", "exporter"}, self.stdout
                client = redis.Redis.from_url(url, password=password)
                redis_pid = int(client.info("server")["process_id"])
                client.close()
                return url, redis_pid, services

    def stderr(self) -> str:
        return self.log.read_text()

    def rest_of_stdout(self) -> str:
        return "".join(self.stdout) + self.out.read()

    def close(self) -> None:
        """Whatever a failed test left: SIGTERM ``up`` (it stops its children), SIGKILL its group at worst."""
        stop_process(self.proc, timeout_s=60)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.out.close()


def _refused(up: Up) -> tuple[int, str]:
    """``up``'s exit code and stderr, when it is expected to refuse at once."""
    try:
        code = up.proc.wait(timeout=REFUSE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"up did not refuse; it runs: {up.rest_of_stdout() if up.proc.poll() is not None else ''}"
                    f"{up.stderr()[-2000:]}")
    return code, up.stderr()


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


class Deaths:
    """Watches Redis and the services from outside: the order in which they disappear."""

    def __init__(self, redis_pid: int, services: dict[str, int]):
        self.pids = {"redis-server": redis_pid, **services}
        self.gone: dict[str, int] = {}
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        sweep, deadline = 0, time.monotonic() + 90
        while len(self.gone) < len(self.pids) and time.monotonic() < deadline:
            sweep += 1
            # Redis first in each sweep: a service seen alive after Redis was seen gone outlived it.
            for name, pid in self.pids.items():
                if name not in self.gone and not _alive(pid):
                    self.gone[name] = sweep
            time.sleep(0.002)  # a sampling period, not a wait for anything

    def result(self) -> dict[str, int]:
        self._thread.join(timeout=90)
        return self.gone


def _probe(url: str, password: str | None = None) -> Celery:
    app = Celery("up-probe", broker=redisurl.with_password(url, password) if password else url)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"],
                    broker_transport_options={"ack_emulation": False})
    return app


def _held(app: Celery) -> set[str]:
    """The ids of the ETA messages the box's worker holds (in memory, unacknowledged, as a retry is)."""
    replies = app.control.inspect(timeout=1.0, limit=1).scheduled() or {}
    return {entry["request"]["id"] for entries in replies.values() for entry in entries}


def _check_running_box(url: str, exporter_port: int, held: str, *, first: bool, history_before: int) -> int:
    """The box measures, serves metrics and holds the message ``held``; its history's length."""
    reader, probe = NtpReader(url, prefix="box"), _probe(url)
    try:
        if first:
            wait_for(lambda: len(reader.history(NODE)) >= 3, timeout_s=60, what="the box's first rounds")
            metrics = wait_for(lambda: _scrape(exporter_port), what="the exporter")
            assert "chronotick_ntp_redis_up 1.0" in metrics and f'node="{NODE}"' in metrics
            # A message the worker holds in memory until its time comes, as it holds a retry: a warm
            # shutdown hands it back to Redis, which must still be there to take it.
            probe.send_task("chronotick.query_server", kwargs={}, queue=f"ntp.{NODE}", countdown=3600, task_id=held)
        else:
            assert len(reader.history(NODE)) >= history_before, "the history from before the restart is gone"
        wait_for(lambda: held in _held(probe), what=f"the worker to hold {held}")
        return len(reader.history(NODE))
    finally:
        reader.close()
        probe.close()


def test_ctrl_c_and_sigterm_to_the_group_stop_services_then_redis_losing_nothing(tmp_path, simulator):
    _, servers = simulator({f"s{i}": Behaviour(offset_s=0.002, delay_s=0.002 * (i + 1)) for i in range(3)})
    path, data_dir = _config(tmp_path, list(servers.values())), tmp_path / "data"
    held = f"held-{uuid.uuid4().hex}"
    before = 0
    # Ctrl-C, then SIGTERM to the group (each followed by a restart), then the terminal hanging up.
    for run, how in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
        exporter_port = free_tcp_port()
        up = Up(path, data_dir, tmp_path / f"up{run}.log", exporter_port=exporter_port)
        try:
            url, redis_pid, services = up.started()
            before = _check_running_box(url, exporter_port, held, first=run == 0, history_before=before)
            deaths = Deaths(redis_pid, services)
            os.killpg(up.proc.pid, how)  # a terminal's Ctrl-C; kill -TERM -PGID; a terminal closed
            code = up.proc.wait(timeout=60)
            assert code == EXIT_OK, up.stderr()[-3000:]
            assert "up: stopped" in up.rest_of_stdout()
            gone = deaths.result()
            assert set(gone) == {"redis-server", *services}, gone
            assert all(gone["redis-server"] >= gone[name] for name in services), f"Redis was not last: {gone}"
            assert not _in_sessions({redis_pid, *services.values()}), "a child outlived up"
            log = up.stderr()
            assert "UNABLE TO RESTORE" not in log, log[-3000:]
            redis_log = (data_dir / "redis.log").read_text()
            assert redis_log.count("User requested shutdown") == run + 1, redis_log[-2000:]  # SHUTDOWN, by up
            assert not re.search(r"Received SIG(INT|TERM)", redis_log), redis_log[-2000:]  # never the signal
        finally:
            up.close()
    assert any(data_dir.rglob("*.aof*"))


def test_the_children_of_a_killed_up_stop_too(tmp_path, simulator):
    _, servers = simulator({"s0": Behaviour(offset_s=0.001, delay_s=0.002)})
    up = Up(_config(tmp_path, list(servers.values())), tmp_path / "data", tmp_path / "up.log")
    try:
        _, redis_pid, services = up.started()
        up.proc.kill()  # no chance to stop anything: the kernel's parent-death signal does
        up.proc.wait()
        wait_for(lambda: not _in_sessions({redis_pid, *services.values()}), what="up's children to stop")
    finally:
        up.close()


def test_only_a_password_set_runs_a_private_redis_with_that_password(tmp_path, simulator):
    _, servers = simulator({"s0": Behaviour(offset_s=0.001, delay_s=0.002)})
    password = f"pw-{uuid.uuid4().hex}"
    up = Up(_config(tmp_path, list(servers.values())), tmp_path / "data", tmp_path / "up.log",
            env=_environ(**{config_mod.ENV_REDIS_PASSWORD: password}))
    try:
        url, redis_pid, services = up.started(password)
        port = int(re.search(r":(\d+)/", url).group(1))
        assert port != 6379 and password not in url
        # The children were told the private Redis, and the password travels beside it, as given.
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{services['worker']}/environ").read_text().split("\0") if "=" in item)
        assert environ[config_mod.ENV_REDIS_URL] == f"redis://127.0.0.1:{port}/0"
        assert environ[config_mod.ENV_REDIS_PASSWORD] == password
        # It is up's own Redis, it requires the password, and the password is not on its command line.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert password not in Path(f"/proc/{redis_pid}/cmdline").read_text()
        reader = NtpReader(redisurl.with_password(url, password), prefix="box")
        wait_for(lambda: reader.history(NODE), timeout_s=60, what="a round in the private Redis")
        reader.close()
        os.killpg(up.proc.pid, signal.SIGTERM)
        assert up.proc.wait(timeout=60) == EXIT_OK, up.stderr()[-3000:]
    finally:
        up.close()


def test_a_second_up_on_the_data_dir_is_refused_and_a_dead_service_stops_the_box(tmp_path, simulator):
    _, servers = simulator({"s0": Behaviour(offset_s=0.001, delay_s=0.002)})
    path, data_dir = _config(tmp_path, list(servers.values())), tmp_path / "data"
    first = Up(path, data_dir, tmp_path / "first.log")
    second = None
    try:
        _, redis_pid, services = first.started()
        second = Up(path, data_dir, tmp_path / "second.log")
        code, stderr = _refused(second)
        assert code == EXIT_IN_USE, stderr
        line = _one_line(stderr)
        assert str(data_dir) in line and f"pid {first.proc.pid}" in line, line
        assert not second.rest_of_stdout(), "the second up started something"
        assert all(_alive(pid) for pid in (redis_pid, *services.values())), "the first box was disturbed"

        deaths = Deaths(redis_pid, services)
        os.kill(services["beat"], signal.SIGKILL)  # a service dies on its own
        code = first.proc.wait(timeout=60)
        assert code == EXIT_SERVICE_FAILED, first.stderr()[-3000:]
        assert re.search(r"^error: .*\bbeat\b.*exited", first.stderr(), re.M), first.stderr()[-3000:]
        gone = deaths.result()
        assert all(gone["redis-server"] >= gone[name] for name in services), f"Redis was not last: {gone}"
        assert not _in_sessions({redis_pid, *services.values()})
        assert "User requested shutdown" in (data_dir / "redis.log").read_text()
    finally:
        first.close()
        if second is not None:
            second.close()


@pytest.mark.parametrize("held_by", ["a Redis on the Redis port", "a listener on the exporter port"])
def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, held_by):
    data_dir = tmp_path / "data"
    path = _config(tmp_path, ["127.0.0.1:9"])
    if held_by.startswith("a Redis"):
        # The case: another Redis on the port; up ran the worker and beat against it.
        (tmp_path / "decoy").mkdir()
        holder = RedisProcess(tmp_path / "decoy").start()
        port, who = holder.port, f"redis-server (pid {holder.process.pid})"
        up = Up(path, data_dir, tmp_path / "up.log", redis_port=port)
    else:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port, who = holder.getsockname()[1], f"pid {os.getpid()}"
        up = Up(path, data_dir, tmp_path / "up.log", exporter_port=port)
    try:
        code, stderr = _refused(up)
        assert code == EXIT_IN_USE, stderr
        line = _one_line(stderr)
        assert f"127.0.0.1:{port}" in line and "in use" in line and who in line, line
        assert not up.rest_of_stdout(), "up started something"
        assert not (data_dir / "appendonlydir").exists(), "up started its Redis"
        if isinstance(holder, RedisProcess):
            assert redis.Redis(port=port).dbsize() == 0, "something wrote into the other Redis"
    finally:
        up.close()
        holder.stop() if isinstance(holder, RedisProcess) else holder.close()


@pytest.mark.parametrize("kind", ["a file", "under a file", "not writable"])
def test_a_bad_data_dir_is_one_line_and_exit_2(tmp_path, kind):
    if kind == "not writable" and os.geteuid() == 0:
        pytest.skip("root writes to any directory")
    data_dir = {"a file": tmp_path / "data", "under a file": tmp_path / "data" / "sub",
                "not writable": tmp_path / "ro" / "data"}[kind]
    if kind == "not writable":
        (tmp_path / "ro").mkdir(mode=0o500)
    else:
        (tmp_path / "data").write_text("not a directory\n")
    up = Up(_config(tmp_path, ["127.0.0.1:9"]), data_dir, tmp_path / "up.log")
    try:
        code, stderr = _refused(up)
        assert code == EXIT_USAGE, stderr
        assert str(data_dir) in _one_line(stderr)
        assert not up.rest_of_stdout()
    finally:
        up.close()


def test_a_bad_config_is_one_line_and_exit_2(tmp_path):
    path = _config(tmp_path, ["127.0.0.1:9"])
    path.write_text(path.read_text().replace("key_prefix:", "key_prefx:"))  # a misspelt key
    up = Up(path, tmp_path / "data", tmp_path / "up.log")
    try:
        code, stderr = _refused(up)
        assert code == EXIT_USAGE, stderr
        assert _one_line(stderr).startswith("config error:")
        assert not up.rest_of_stdout() and not (tmp_path / "data").exists()
    finally:
        up.close()


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return reply.read().decode()
    except OSError:
        return None
