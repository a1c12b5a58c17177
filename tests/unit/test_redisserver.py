"""orchestrator.redisserver: the one way a private redis-server is started, ``up``'s and the tests' alike."""

from __future__ import annotations

import subprocess

import pytest
import redis

from orchestrator.redisserver import Fsync, RedisServer, redis_quoted, wait_for_redis
from simulator.processes import RedisProcess, free_tcp_port, stop_process
from workers import redisurl

#: A password no shell, URL or Redis config line would take as it is.
AWKWARD = 'p a"s\'s\\w\u00f6rd\n#x'


def _option(argv: list[str], name: str) -> list[str]:
    """The values of ``--name`` in ``argv`` (up to the next option)."""
    i = argv.index(name) + 1
    values = []
    while i < len(argv) and not argv[i].startswith("--"):
        values.append(argv[i])
        i += 1
    return values


def test_ups_server_keeps_an_append_only_file_under_redis_names_and_its_password_off_the_command_line(tmp_path):
    server = RedisServer(6390, tmp_path, append_fsync=Fsync.EVERYSEC, password=AWKWARD)
    argv = server.argv()
    assert argv[:2] == ["redis-server", "-"]  # the rest of the configuration on stdin
    assert (_option(argv, "--bind"), _option(argv, "--protected-mode"), _option(argv, "--port")) == (
        ["127.0.0.1"], ["yes"], ["6390"])
    assert (_option(argv, "--appendonly"), _option(argv, "--appendfsync"), _option(argv, "--save")) == (
        ["yes"], ["everysec"], [""])
    assert _option(argv, "--maxmemory-policy") == ["noeviction"] and _option(argv, "--dir") == [str(tmp_path)]
    assert "--appendfilename" not in argv and "--replicaof" not in argv  # an existing data directory's names
    assert not any("requirepass" in a or "w\u00f6rd" in a for a in argv)
    assert server.config() == f"requirepass {redis_quoted(AWKWARD)}\n" and server.url == "redis://127.0.0.1:6390/0"


def test_a_test_server_names_its_files_after_its_port_and_may_replicate(tmp_path):
    argv = RedisServer(7001, tmp_path, replica_of=7000, files_by_port=True).argv()
    assert _option(argv, "--appendonly") == ["no"] and "--appendfsync" not in argv
    assert _option(argv, "--replicaof") == ["127.0.0.1", "7000"]
    assert (_option(argv, "--dbfilename"), _option(argv, "--appendfilename"), _option(argv, "--appenddirname")) == (
        ["dump-7001.rdb"], ["appendonly-7001.aof"], ["aof-7001"])
    assert RedisServer(7001, tmp_path, append_fsync=Fsync.ALWAYS).argv().count("always") == 1
    assert RedisServer(7001, tmp_path).config() == ""


def test_the_password_given_on_stdin_is_the_one_required(tmp_path):
    server = RedisServer(free_tcp_port(), tmp_path, password=AWKWARD)
    proc = server.start(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.wait(proc, timeout_s=20)
        assert "w\u00f6rd" not in open(f"/proc/{proc.pid}/cmdline", encoding="utf-8").read()
        client = redisurl.connect(redisurl.with_password(server.url, AWKWARD), retry=False)
        assert client.ping()
        client.close()
        stranger = redisurl.connect(server.url, retry=False)
        with pytest.raises(redis.AuthenticationError):
            stranger.ping()
        stranger.close()
    finally:
        stop_process(proc)


def test_waiting_counts_only_the_process_started_not_another_redis_on_its_port(tmp_path, redis_server):
    """A server whose port another Redis holds exits; the other one answering does not make it ready."""
    server = RedisServer(redis_server.port, tmp_path)
    proc = server.start(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert not server.wait(proc, timeout_s=10)
        assert proc.poll() is not None
    finally:
        stop_process(proc)
    assert not wait_for_redis(redis_server.port, proc, timeout_s=0.2)


def test_the_tests_redis_process_keeps_its_api_and_runs_as_up_runs_its_own(tmp_path):
    with RedisProcess(tmp_path, append_only=True) as primary:
        assert primary.url == f"redis://127.0.0.1:{primary.port}/0"
        assert primary.process is not None and primary.process.args == primary.server.argv()
        client = redisurl.connect(primary.url)
        client.set("k", "v")
        primary.kill_and_restart()  # appendfsync always: nothing acknowledged is lost
        assert client.get("k") == "v"
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        client.close()
    assert primary.process.poll() is not None
