"""workers.worker_hooks: what a worker asks of the service by itself, against a real redis-server.

At start, a warm-up for each of its nodes with nothing fresh; back on Redis after an outage, a round at once.
The hook is connected by importing the Celery app, as ``celery -A workers.app worker`` and ``chronotick-ntp
worker`` both do, while :mod:`workers.warmup` (which the reader imports) loads no Celery.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from workers import config as config_mod
from workers import redisurl, warmup, worker_hooks

from ..conftest import REPO


@pytest.fixture
def worker_config(tmp_path, key_prefix, monkeypatch):
    """``$CHRONOTICK_CONFIG`` naming a config with the test's key prefix, as the ``worker`` command sets it."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}},
                                    "ntp_service": {"key_prefix": key_prefix}}))
    monkeypatch.setenv(config_mod.ENV_CONFIG, str(path))
    return path


@pytest.fixture
def client(redis_url):
    """A client of the service's kind (:func:`workers.redisurl.connect`)."""
    client = redisurl.connect(redis_url)
    yield client
    client.close()


def _worker(redis_url: str, *queues: str) -> SimpleNamespace:
    """What the hook reads of Celery's worker: the queues it consumes and its app's Redis."""
    conf = SimpleNamespace(broker_url=redis_url, chronotick_redis_master_name="mymaster")
    return SimpleNamespace(task_consumer=SimpleNamespace(queues=[SimpleNamespace(name=q) for q in queues]),
                           app=SimpleNamespace(conf=conf))


def test_loading_the_celery_app_connects_the_start_hook_and_the_warm_up_module_loads_no_celery():
    code = ("import sys; import workers.warmup; assert not [m for m in sys.modules if m.split('.')[0] == 'celery']; "
            "from celery import signals; import workers.app; "
            "hooks = [(f.__module__, f.__name__) for f in (ref() for _, ref in signals.worker_ready.receivers) if f]; "
            "assert ('workers.worker_hooks', '_warm_up_on_start') in hooks, hooks")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_worker_starting_asks_a_warm_up_for_its_nodes_with_nothing_fresh(redis_url, client, key_prefix,
                                                                           worker_config):
    warmup.publish_policy(client, key_prefix, warmup.Policy(nodes=("n1", "n2"), duration_s=60.0,
                                                                  cooldown_s=600.0, stale_after_s=360.0))
    worker_hooks._warm_up_on_start(sender=_worker(redis_url, "ntp.n1", "celery"))  # a queue not a node's: none
    assert list(warmup.active(client, key_prefix)) == ["n1"]


def test_a_worker_back_on_redis_asks_a_round_at_once_for_its_nodes(redis_url, client, key_prefix,
                                                                   worker_config):
    assert worker_hooks.round_now_after_outage(redis_url, "mymaster", ["ntp.n1", "ntp.n2", "celery"]) == ["n1", "n2"]
    assert sorted(warmup.rounds_asked_now(client, key_prefix)) == ["n1", "n2"]
    assert worker_hooks.round_now_after_outage(redis_url, "mymaster", ["celery"]) == []


def test_a_worker_that_cannot_ask_says_so_and_goes_on(worker_config, caplog):
    dead = "redis://127.0.0.1:1/0"
    assert worker_hooks.round_now_after_outage(dead, "mymaster", ["ntp.n1"]) == []
    assert "[CATCH-UP] n1: could not ask for a round at once" in caplog.text
