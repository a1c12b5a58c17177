"""One record, every road (issue #27): a measurement read back is the ``latest`` key's, every field equal.

Rounds of each kind a node publishes -- ``best`` with NTS and a leap
indicator, a ``combine`` of three servers, a node through the hub (its
``legs``, the hub's leap indicator), a round decided early whose late server
answers after, a starvation round between them -- are finished as the
callback finishes them (:func:`orchestrator.callback.finish`, and
:func:`orchestrator.callback.complete` for the late server) through a real
:class:`orchestrator.store.Store` on a real ``redis-server``: no Celery worker
is needed for that.  Each is then read back by every road a reader has, in
both stored forms (``record_detail: compact`` and ``verbose``):

- the ``latest`` key (``Store.latest``) against the round's own record;
- the history (``Store.history``, ``NtpReader.history``): every field of each
  round's ``latest``, bit for bit as JSON;
- the reader (``NtpReader.latest``) against the history's measurement and
  ChronoTick's drop-in (``ClockMeasurementSource``, which reads the history):
  one :class:`orchestrator.reader.Measurement`, every field.

Before issue #24 the history gave ``leap`` 0, ``root_delay`` 0 and ``address``
"" where ``latest`` had the real values.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis
import yaml

from orchestrator import callback, selection
from orchestrator.outcomes import ClosedBy, RoundMeta
from orchestrator.reader import Measurement, NtpReader
from orchestrator.records import LATEST_KEYS
from orchestrator.store import Store
from workers import config as config_mod
from workers.config import DEFAULT_STALE_AFTER_S

from ..conftest import wait_for

pytestmark = pytest.mark.integration

#: How long the drop-in may take to read what was published (s): it polls every 0.25 s.
FOLLOW_WAIT_S = 8.0

SERVERS = ["s1.example", "s2.example", "s3.example"]


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return int(seconds) + int(micros) / 1e6


def _ok(name: str, *, offset: float, delay: float, at: float, leap: int = 0, nts: bool = False) -> dict:
    """A query task's outcome with a sample, as :func:`workers.tasks.query_server` returns one."""
    sample = {"server": name, "address": f"192.0.2.{SERVERS.index(name) + 1 if name in SERVERS else 9}",
              "port": 123, "offset_s": offset, "delay_s": delay, "uncertainty_s": delay / 2 + 0.000123456789,
              "stratum": 2, "leap": leap, "root_delay_s": 0.00031234567, "root_dispersion_s": 0.00017654321,
              "precision_s": 2 ** -20, "ref_id": "GPS", "t1_ns": int((at - delay / 2) * 1e9),
              "t4_ns": int((at + delay / 2) * 1e9), "kernel_rx_timestamp": True, "nts": nts, "measured_at": at}
    return {"summary": "ok", "status": "ok", "server": name, "sample": sample, "attempts": 1,
            "history": [{"attempt": 1, "started_at": at - 0.01, "reason": None}], "worker": "w@host"}


def _failed(name: str, at: float) -> dict:
    return {"summary": "failed", "status": "failed", "server": name, "reason": "timeout", "detail": "no reply in 2 s",
            "kiss_code": None, "attempts": 1, "history": [{"attempt": 1, "started_at": at, "reason": "timeout"}],
            "worker": "w@host"}


def _meta(prefix: str, node: str, servers: list[str], *, detail: str, selection_method: str, now: float,
          hub_node: str | None = None) -> RoundMeta:
    ntp = config_mod.ntp_from_mapping({"servers": servers, "selection": selection_method})
    return RoundMeta(round_id=f"{node}-{uuid.uuid4().hex[:8]}", node=node, dispatched_at=now - 0.2,
                     deadline_at=now + 30.0, key_prefix=prefix, history_length=100, ntp=ntp, record_detail=detail,
                     hub=None if hub_node is None else {"node": hub_node, "max_drift_ppm": 15.0,
                                                        "stale_after_s": DEFAULT_STALE_AFTER_S},
                     stale_after_s=DEFAULT_STALE_AFTER_S)


def _publish_every_kind(store: Store, client: redis.Redis, prefix: str, detail: str) -> dict[str, list[dict]]:
    """Finish rounds of every kind, a node for each; the records as published, by node, oldest first."""
    published: dict[str, list[dict]] = {}

    def finish(meta: RoundMeta, outcomes: list[dict], **early) -> dict:
        record = callback.finish(meta, outcomes, store, closed_by=ClosedBy.EARLY if early else ClosedBy.CALLBACK,
                                 **early)
        assert record is not None
        published.setdefault(meta.node, []).append(record)
        return record

    for i in range(3):
        now = _redis_now(client)
        # best: NTS-authenticated servers announcing a leap second; the least uncertain one published.
        meta = _meta(prefix, "rt-best", SERVERS, detail=detail, selection_method="best", now=now)
        finish(meta, [_ok(s, offset=0.0042 + 1e-6 * k + 1e-7 * i, delay=0.004 + 0.001 * k, at=now - 0.1, leap=1,
                          nts=True) for k, s in enumerate(SERVERS)])
        if i == 1:  # starvation between two rounds: nothing published, the reader skips it
            finish(_meta(prefix, "rt-best", SERVERS, detail=detail, selection_method="best", now=now),
                   [_failed(s, now - 0.1) for s in SERVERS])
        # combine: three servers averaged, the combination's own delay, stratum and bound.
        meta = _meta(prefix, "rt-combine", SERVERS, detail=detail, selection_method="combine", now=now)
        finish(meta, [_ok(s, offset=-0.0017 + 3e-6 * k, delay=0.006 + 0.0013 * k, at=now - 0.1 + 0.01 * k)
                      for k, s in enumerate(SERVERS)])
        # the hub node, then a node through the hub: its LAN leg composed with the hub's (``legs``, its leap).
        meta = _meta(prefix, "rt-head", SERVERS, detail=detail, selection_method="combine", now=now)
        finish(meta, [_ok(s, offset=0.25 + 2e-6 * k, delay=0.02, at=now - 0.1, leap=1) for k, s in enumerate(SERVERS)])
        meta = _meta(prefix, "rt-lan", ["10.0.0.1"], detail=detail, selection_method="combine", now=now,
                     hub_node="rt-head")
        lan = finish(meta, [_ok("10.0.0.1", offset=0.0012345678, delay=0.0004, at=now - 0.05)])
        assert lan["latest"]["legs"]["hub"]["node"] == "rt-head" and lan["latest"]["leap"] == 1
        # decided early with s3 still out; s3's answer recorded after (the ``late`` stream).
        meta = _meta(prefix, "rt-early", SERVERS, detail=detail, selection_method="combine", now=now)
        in_hand = [_ok(s, offset=0.0008 + 1e-6 * k, delay=0.005, at=now - 0.1) for k, s in enumerate(SERVERS[:2])]
        picked = selection.select(in_hand, meta.strict, enable_fallback=True, method="combine")
        finish(meta, in_hand, picked=picked, late=("s3.example",))
        late = callback.complete(meta, in_hand + [_ok("s3.example", offset=0.0009, delay=0.005, at=now)], store)
        assert late is not None and late[0]["sample"]["offset_s"] == 0.0009
    return published


def _as_stored(value):
    """A value as Redis gives it back: JSON, a float's repr exact."""
    return json.loads(json.dumps(value))


def _drop_in_config(tmp_path, prefix: str, node: str):
    """The drop-in's config: ``prefix``'s keys, no warm-up."""
    path = tmp_path / f"{node}.yaml"
    path.write_text(yaml.safe_dump({
        "clock_measurement": {"ntp": {"servers": ["127.0.0.1"]}, "timing": {"warm_up": {"duration_seconds": 0}}},
        "ntp_service": {"key_prefix": prefix}}))
    return path


@pytest.mark.parametrize("detail", ["compact", "verbose"])
def test_every_field_of_latest_comes_back_the_same_by_every_road(detail, redis_url, redis_client, key_prefix,
                                                                  drop_in, tmp_path):
    store = Store(redis_client, prefix=key_prefix)
    published = _publish_every_kind(store, redis_client, key_prefix, detail)
    seen_kinds = set()
    for node, built in published.items():
        measured = [r for r in built if r["latest"] is not None]
        latest_key = store.latest(node)

        # The latest key is the last round's measurement, every field of the one record type.
        assert latest_key == _as_stored(measured[-1]["latest"]), node
        assert set(latest_key) - {"combined", "legs"} == set(LATEST_KEYS) - {"combined", "legs"}, node

        # The history: each round's measurement, every field bit for bit; the last one is the latest key.
        history = list(reversed(store.history(node, count=20)))
        assert [r["round_id"] for r in history] == [r["round_id"] for r in built], node
        for read, made in zip(history, built, strict=True):
            assert read.get("detail") == ("compact" if detail == "compact" else None)  # as it was stored
            expected = _as_stored(made["latest"])
            assert json.dumps(read["latest"], sort_keys=True) == json.dumps(expected, sort_keys=True), (
                node, {k: (read["latest"].get(k), v) for k, v in (expected or {}).items()
                       if read["latest"].get(k) != v})
        assert history[-1]["latest"] == latest_key or history[-1]["latest"] is None

        # The reader: the latest key and the history make one measurement, every field.
        with NtpReader(redis_url, prefix=key_prefix, stale_after_s=DEFAULT_STALE_AFTER_S) as reader:
            direct = reader.latest(node)
            through_history = [Measurement.from_latest({"round_id": r["round_id"], **r["latest"]},
                                                       stale_after_s=DEFAULT_STALE_AFTER_S)
                               for r in reader.history(node) if r["latest"] is not None]
        assert direct is not None and through_history[-1] == direct and through_history[-1].raw == direct.raw
        assert (direct.leap, direct.root_delay, direct.address) == (latest_key["leap"], latest_key["root_delay"],
                                                                    latest_key["address"])
        assert direct.address and direct.root_delay > 0 and direct.selection == latest_key["selection"]

        # ChronoTick's drop-in, which reads the history stream: the same measurements, in order.
        source = drop_in(_drop_in_config(tmp_path, key_prefix, node), node)
        wait_for(lambda: len(source._snapshot()[0]) == len(measured), timeout_s=FOLLOW_WAIT_S,  # noqa: B023
                 what=f"the drop-in to read {node}'s rounds")
        held = source._snapshot()[0]
        assert [m.round_id for m in held] == [r["round_id"] for r in measured]
        assert held == through_history and [m.raw for m in held] == [m.raw for m in through_history]
        assert held[-1] == direct and source.get_latest_measurement() == direct.as_chronotick()
        seen_kinds |= {key for key in ("nts", "legs", "combined") if latest_key.get(key)} | (
            {"leap"} if latest_key["leap"] else set())
    assert seen_kinds == {"nts", "legs", "combined", "leap"}  # every kind was there to be read
