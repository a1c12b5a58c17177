"""``chronotick-ntp hub`` (issue #26): chronyd's configuration, the hub's arguments, and its supervision.

The supervision runs for real: a :class:`TimeHub` on a free loopback port, with the chronyd that
scripts/bootstrap unpacks and the hub node's real worker on the test's redis-server; chronyd is killed and must
come back and answer again; stopping the hub stops both.  The restart back-off is tested apart, on a tiny
``python -c`` child that exits, through :meth:`TimeHub._look_after` with the delays made short.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import timehub
from orchestrator.timehub import Child, HubError, TimeHub, chrony_conf, find_chronyd, parse_allow
from simulator.ntpserver import free_udp_ports
from simulator.processes import chronyd_binary
from workers import config as config_mod
from workers import heartbeat
from workers.app import queue_for
from workers.keys import Keys

from ..conftest import WAIT_S, wait_for

HUB_NODE = "head"


def _write_config(tmp_path: Path, *, port: int, key_prefix: str = "chronotick", redis_url: str | None = None,
                  hub: bool = True) -> Path:
    service: dict = {"key_prefix": key_prefix, "nodes": [HUB_NODE, "n1"]}
    if redis_url is not None:
        service["redis_url"] = redis_url
    if hub:
        service["hub"] = {"address": f"127.0.0.1:{port}", "node": HUB_NODE}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"clock_measurement": {"ntp": {"servers": ["127.0.0.1:9"]}},
                                    "ntp_service": service}))
    return path


def _hub(tmp_path: Path, *, port: int = 12345, chronyd: str = "/nonexistent/chronyd", bind: str = "127.0.0.1",
         hub: bool = True, **config) -> TimeHub:
    path = _write_config(tmp_path, port=port, hub=hub, **config)
    # As root (chronyd's need), the hub runs its worker as --worker-user: root here, named, since the test's
    # config and run directory are root's alone.
    return TimeHub(str(path), config_mod.load(path, environ={}), bind=bind, allow=parse_allow(["127.0.0.1/32"]),
                   chronyd=chronyd, run_dir=tmp_path / "run", worker_user="root" if os.geteuid() == 0 else None)


# -- chronyd's configuration -------------------------------------------------------------------------------


def test_chronyd_asks_no_server_and_serves_the_lan_without_a_control_port(tmp_path):
    allow = parse_allow(["10.0.0.0/24", "fd00::/64"])
    text = chrony_conf(bind="10.0.0.1", port=8123, allow=allow, run_dir=tmp_path)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    directives = [line.split()[0] for line in lines]
    # chronyd itself sends nothing to the public servers: the hub node's rounds are the cluster's only requests.
    assert not {"server", "pool", "peer", "refclock", "initstepslew"} & set(directives)
    assert "ratelimit" not in directives  # warm-ups poll it every second, from every node
    assert "cmdport 0" in lines
    assert "port 8123" in lines and "bindaddress 10.0.0.1" in lines
    assert [line for line in lines if line.startswith("allow ")] == ["allow 10.0.0.0/24", "allow fd00::/64"]
    assert f"local stratum {timehub.LOCAL_STRATUM}" in lines
    assert f"pidfile {tmp_path / 'chronyd.pid'}" in lines
    assert f"driftfile {tmp_path / 'drift'}" in lines and f"logdir {tmp_path}" in lines
    once = [d for d in directives if d != "allow"]
    assert len(once) == len(set(once))  # no directive twice
    assert text.endswith("\n")


def test_parse_allow_takes_networks_and_names_what_is_not_one():
    assert parse_allow(["10.0.0.0/24", "10.1.2.3/16", "::1/128", "192.168.1.7"]) == [
        ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("::1/128"), ipaddress.ip_network("192.168.1.7/32")]
    assert parse_allow([]) == []
    for bad in ("10.0.0.0/33", "lan", "10.0.0/24x", ""):
        with pytest.raises(HubError) as caught:
            parse_allow(["10.0.0.0/24", bad])
        assert str(caught.value) == f"--allow {bad}: not a network (CIDR such as 10.0.0.0/24)"


def test_find_chronyd_refuses_a_path_that_is_not_an_executable_file(tmp_path):
    script = tmp_path / "chronyd"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    for path in (script, tmp_path / "missing", tmp_path):
        with pytest.raises(HubError) as caught:
            find_chronyd(str(path))
        assert str(caught.value) == f"--chronyd {path}: not an executable file"
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert find_chronyd(str(script)) == str(script)


def test_find_chronyd_without_a_path_looks_on_path_then_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "chronyd").write_text("#!/bin/sh\n")
    (tmp_path / "chronyd").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chronyd(None) == str(tmp_path / "chronyd")
    if os.access("/usr/sbin/chronyd", os.X_OK):
        return  # Debian's is the fallback here: nothing to refuse
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HubError, match="no chronyd on PATH or in /usr/sbin: install chrony"):
        find_chronyd(None)


# -- the hub's arguments -----------------------------------------------------------------------------------


def test_the_hub_writes_chronyds_configuration_and_its_two_children(tmp_path):
    hub = _hub(tmp_path, port=8124)
    conf = tmp_path / "run" / "chrony.conf"
    assert conf.read_text() == chrony_conf(bind="127.0.0.1", port=8124, allow=parse_allow(["127.0.0.1/32"]),
                                           run_dir=tmp_path / "run")
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    chronyd, worker = hub.children
    assert chronyd.name == "chronyd" and worker.name == f"worker {HUB_NODE}"
    assert chronyd.argv[0] == "/nonexistent/chronyd" and chronyd.argv[-2:] == ["-f", str(conf)]
    assert "-x" in chronyd.argv and "-d" in chronyd.argv  # never the clock; in the foreground
    if os.geteuid() == 0:
        assert chronyd.argv[chronyd.argv.index("-u") + 1] in ("_chrony", "chrony", "nobody")
    else:
        assert "-u" not in chronyd.argv
    assert worker.argv[:3] == [sys.executable, "-m", "orchestrator.cli"]
    assert worker.argv[3:] == ["worker", "--config", str(tmp_path / "config.yaml"), "--node", HUB_NODE,
                               "--loglevel", "INFO"]


def test_a_hub_needs_a_hub_section_and_an_address_to_bind(tmp_path):
    with pytest.raises(HubError, match=r"ntp_service.hub: missing \(address and node\)"):
        _hub(tmp_path, hub=False)
    with pytest.raises(HubError) as caught:
        _hub(tmp_path, bind="localhost")
    assert str(caught.value) == "--bind 'localhost': not an IP address (chronyd binds one address)"


# -- supervision -------------------------------------------------------------------------------------------


def _look_after_until(hub: TimeHub, child: Child, restarts: int, *, timeout_s: float = WAIT_S) -> None:
    """Run the hub's loop body on ``child`` until it has been restarted ``restarts`` times."""
    deadline = time.monotonic() + timeout_s
    while child.restarts < restarts:
        assert time.monotonic() < deadline, f"{child.name}: {child.restarts} restarts, not {restarts}"
        hub._look_after(child)
        time.sleep(0.01)


def _reap(child: Child) -> None:
    if child.proc is not None and child.proc.poll() is None:
        os.killpg(child.proc.pid, signal.SIGKILL)  # its own session (start_new_session): its group
        child.proc.wait()


def test_a_child_that_exits_is_started_again_after_a_doubling_back_off(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timehub, "MAX_RESTART_DELAY_S", 0.16)
    hub = _hub(tmp_path)
    child = Child("flaky", [sys.executable, "-c", "raise SystemExit(3)"], restart_delay_s=0.02)
    delays = []
    started = []
    real_wait = hub._stop.wait

    def wait(seconds):
        delays.append(seconds)
        return real_wait(seconds)

    monkeypatch.setattr(hub._stop, "wait", wait)
    try:
        child.start()
        started.append(child.proc)
        for n in range(1, 6):
            _look_after_until(hub, child, n)
            started.append(child.proc)
        # 0.02, doubling, capped at MAX_RESTART_DELAY_S.
        assert delays == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.16])
        assert child.restarts == 5 and child.restart_delay_s == pytest.approx(0.16)
        assert len({id(p) for p in started}) == 6  # a new process each time
        assert all(p.returncode == 3 for p in started[:-1])
        err = capsys.readouterr().err
        assert "hub: flaky exited (exit code 3); starting it again in 0.02 s" in err
        assert "hub: flaky exited (exit code 3); starting it again in 0.16 s" in err
    finally:
        _reap(child)


def test_a_child_up_for_a_while_has_its_back_off_reset(tmp_path, monkeypatch):
    monkeypatch.setattr(timehub, "STABLE_AFTER_S", 0.3)
    monkeypatch.setattr(timehub, "FIRST_RESTART_DELAY_S", 0.01)
    hub = _hub(tmp_path)
    child = Child("steady", [sys.executable, "-c", "import time; time.sleep(60)"], restart_delay_s=8.0)
    try:
        child.start()
        hub._look_after(child)
        assert child.restart_delay_s == 8.0 and child.restarts == 0  # up, but not for long yet
        time.sleep(0.35)
        hub._look_after(child)
        assert child.restart_delay_s == 0.01 and child.restarts == 0  # up long enough: the back-off starts over
        assert child.proc is not None and child.proc.poll() is None   # and it was left alone
        child.proc.kill()
        child.proc.wait()
        _look_after_until(hub, child, 1)
        assert child.restart_delay_s == pytest.approx(0.02)
    finally:
        _reap(child)


def test_a_hub_stopping_during_a_back_off_starts_nothing(tmp_path):
    hub = _hub(tmp_path)
    child = Child("gone", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                  restart_delay_s=30.0)
    child.start()
    assert child.proc is not None
    child.proc.wait()
    threading.Timer(0.2, hub.stop).start()
    began = time.monotonic()
    hub._look_after(child)
    assert time.monotonic() - began < 5.0  # the 30 s back-off was cut short by the stop
    assert child.restarts == 0 and child.proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("code, how", [(0, "exit code 0"), (2, "exit code 2"), (-9, "killed by SIGKILL"),
                                       (-15, "killed by SIGTERM"), (None, "still running"),
                                       (-200, "killed by signal 200")])
def test_how_a_child_ended_is_said_plainly(code, how):
    assert timehub._how(code) == how


def test_stopping_a_child_terminates_it_and_an_ended_one_is_left_alone():
    child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    child.start()
    try:
        began = time.monotonic()
        child.stop()
        assert child.proc is not None and child.proc.returncode == -signal.SIGTERM
        assert time.monotonic() - began < 5.0
        child.stop()  # already ended: nothing to do
        Child("never", ["true"]).stop()  # never started: nothing to do
    finally:
        _reap(child)


def _ntp_answer(port: int):
    from workers.ntp.client import QueryFailed, exchange

    try:
        return exchange(f"127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port), timeout_s=0.2)
    except QueryFailed:
        return None


def test_the_hub_runs_chronyd_and_the_hub_nodes_worker_restarts_chronyd_and_stops_both(
        tmp_path, monkeypatch, redis_client, redis_url, key_prefix):
    binary = chronyd_binary()
    if binary is None:
        pytest.fail("no chronyd: run scripts/bootstrap (it unpacks one into .venv/chrony)")
    port = free_udp_ports(1)[0]
    monkeypatch.setenv(config_mod.ENV_REDIS_URL, redis_url)  # the worker child's Redis: the test's
    monkeypatch.delenv(config_mod.ENV_CONFIG, raising=False)
    monkeypatch.delenv(config_mod.ENV_NODE, raising=False)
    hub = _hub(tmp_path, port=port, chronyd=find_chronyd(binary), key_prefix=key_prefix, redis_url=redis_url)
    chronyd, worker = hub.children
    chronyd.restart_delay_s = 0.1
    runner = threading.Thread(target=hub.run, name="hub", daemon=True)
    runner.start()
    try:
        first = wait_for(lambda: _ntp_answer(port), what="the hub's chronyd to answer")
        assert first.stratum == timehub.LOCAL_STRATUM  # its own clock, at the local stratum it is told
        assert first.leap == 0
        wait_for(lambda: heartbeat.live_workers(redis_client, Keys(key_prefix), queue_for(HUB_NODE)),
                 what="the hub node's worker to beat")
        assert worker.proc is not None and worker.proc.poll() is None
        # chronyd dies: it is started again after its back-off, and serves again.
        assert chronyd.proc is not None
        killed = chronyd.proc
        killed.kill()
        wait_for(lambda: chronyd.restarts == 1 and chronyd.proc is not killed, what="chronyd to be started again")
        assert killed.returncode == -signal.SIGKILL
        assert wait_for(lambda: _ntp_answer(port), what="the new chronyd to answer")
        assert worker.restarts == 0  # the worker was left alone
        began = time.monotonic()
        hub.stop()
        runner.join(WAIT_S)
        assert not runner.is_alive()
        stopped_in = time.monotonic() - began
        assert worker.proc.poll() is not None and chronyd.proc.poll() is not None
        assert stopped_in < timehub.STOP_GRACE_S, f"the hub took {stopped_in:.1f} s to stop"
        assert worker.proc.returncode == 0  # a warm shutdown, not a kill
        assert _ntp_answer(port) is None
    finally:
        hub.stop()
        runner.join(WAIT_S)
        for child in hub.children:
            _reap(child)
