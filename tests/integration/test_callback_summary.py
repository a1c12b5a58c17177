"""The callback of a round published early: what Flower shows for it leads with the round's result.

Flower shows a task's result as Celery's task-succeeded event carries it,
and :mod:`orchestrator.flowerconfig` cuts the cell to its ``summary``.  Every
such callback used to read "late, after the round was published: ...", never
what the round published.  The callback runs here in this process, on the
test Redis, after the round was published early as a worker publishes it.
"""

import time
import uuid

import pytest

from orchestrator import rounds, selection
from orchestrator.callback import finish, finish_round
from orchestrator.flowerconfig import format_task
from orchestrator.outcomes import ClosedBy
from orchestrator.store import Store
from workers import config as config_mod

from ..conftest import write_config
from ..unit.samples import failed, ok

pytestmark = pytest.mark.integration


class _Task:
    def __init__(self, result):
        self.result = result


def test_the_callback_of_a_round_decided_early_summarises_its_result_first(redis_client, tmp_path, key_prefix):
    node = f"sum-{uuid.uuid4().hex[:6]}"
    servers = ["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:11"]
    config = config_mod.load(write_config(tmp_path, servers, key_prefix=key_prefix))
    _, meta = rounds.build_round(config, node)
    store = Store(redis_client, prefix=key_prefix)
    store.open_round(node, meta.round_id, {"meta": meta.as_dict(), "callback_id": "test"}, close_at=time.time() + 60)
    answered = [ok(servers[0], delay=0.010, unc=0.005, offset=0.0031), ok(servers[1], delay=0.012, unc=0.006,
                                                                       offset=0.0032)]
    picked = selection.select(answered, meta.strict, enable_fallback=True, method="best")
    record = finish(meta, answered, store, closed_by=ClosedBy.EARLY, picked=picked, late=(servers[2],))
    latest = record["latest"]
    assert record["closed_by"] == "early" and latest is not None

    result = finish_round.run([*answered, failed(servers[2], attempts=1)], rounds.round_reference(meta))

    summary = result["summary"]
    assert summary == (f"strict: {latest['server']} {latest['offset'] * 1e3:+.3f} ms "
                       f"±{latest['uncertainty'] * 1e3:.3f} ms, 2/3 servers; late: {servers[2]} failed: timeout")
    assert format_task(_Task(repr(result))).result == summary  # what Flower's tasks page shows
    assert store.round_state(node, meta.round_id) == "complete"
