"""Secure defaults: JSON only, loopback binds, no secrets in files or argv."""

import os
import uuid

import pytest
from kombu import Connection

from orchestrator import cli
from simulator.processes import stop_process
from workers import config as config_mod

from ..conftest import REPO, wait_for, write_config
from .test_cluster import cli_process, queue_has_worker

pytestmark = pytest.mark.integration


class _Exploit:
    """Unpickling this runs a shell command: what a pickle-accepting worker would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_task_is_refused_unread(redis_url, tmp_path):
    node = "picklenode"
    path = write_config(tmp_path, ["127.0.0.1:9"])
    log = tmp_path / "worker.log"
    worker = cli_process(["worker", "--config", str(path), "--node", node], redis_url, log)
    marker = tmp_path / "pwned"
    try:
        wait_for(lambda: queue_has_worker(redis_url, node), what="the worker")
        task_id = str(uuid.uuid4())
        with Connection(redis_url) as connection:
            connection.Producer().publish(
                [[_Exploit(marker)], {}, {}], routing_key=f"ntp.{node}", serializer="pickle",
                headers={"lang": "py", "task": "chronotick.query_server", "id": task_id, "root_id": task_id,
                         "parent_id": None, "group": None, "argsrepr": "()", "kwargsrepr": "{}"})
        wait_for(lambda: "Refusing to deserialize untrusted content of type pickle" in log.read_text(),
                 what="the worker to refuse the pickle")
    finally:
        stop_process(worker)
    assert not marker.exists()


def test_everything_listens_on_loopback_by_default():
    parser = cli._parser()
    assert parser.parse_args(["flower", "--config", "f"]).address == "127.0.0.1"
    assert config_mod.DEFAULT_REDIS_URL.startswith("redis://127.0.0.1:")
    from simulator.ntpserver import NtpSimulator

    assert NtpSimulator({}).host == "127.0.0.1"


def _leaves(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def test_shipped_configs_hold_no_secrets():
    from urllib.parse import urlsplit

    import yaml

    for path in (REPO / "configs").glob("*.yaml"):
        for where, value in _leaves(yaml.safe_load(path.read_text())):
            assert not any(word in where.lower() for word in ("password", "secret", "token")), (path, where)
            if isinstance(value, str) and "://" in value:
                assert urlsplit(value).password is None, (path, where)


def test_no_setting_shows_the_redis_password_to_flower_or_inspect(tmp_path, monkeypatch):
    """Flower's Config tab and ``celery inspect conf`` show the worker's settings: the password is masked in all."""
    import json

    import redis as redis_py
    from celery import Celery

    from simulator.processes import RedisProcess, start_node_worker

    secret = f"pw-{uuid.uuid4().hex}"
    (tmp_path / "redis").mkdir()
    with RedisProcess(tmp_path / "redis") as proc:
        redis_py.Redis.from_url(proc.url).config_set("requirepass", secret)
        monkeypatch.setenv(config_mod.ENV_REDIS_URL, proc.url)
        monkeypatch.setenv(config_mod.ENV_REDIS_PASSWORD, secret)
        config = config_mod.from_mapping({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}}})
        assert secret in config.service.redis_url  # the worker really connects with it
        # Started and asked through an app of its own: the shared app's broker pool stays on the session's
        # Redis, not on this one, which is gone when the test ends.
        probe = Celery("probe", set_as_current=False)
        worker = start_node_worker(config, "secretnode", tmp_path / "worker.log", celery_app=probe)
        try:
            replies = wait_for(lambda: probe.control.inspect(timeout=2).conf(), what="the worker's settings")
            shown = json.dumps(replies)
            assert "broker_url" in shown and "chronotick_redis_master_name" in shown
            assert secret not in shown, [k for reply in replies.values() for k, v in reply.items()
                                         if secret in json.dumps(v)]
            from celery.app.utils import bugreport
            assert secret not in bugreport(probe)  # what `celery report` prints, for an app on this Redis
        finally:
            probe.close()
            stop_process(worker)
