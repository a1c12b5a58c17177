"""The Redis contract consumers read (documented in docs/contract.md).

With prefix ``chronotick`` and node ``n1``:

``chronotick:ntp:n1:latest``
    JSON string: the node's current best measurement.
``chronotick:ntp:n1:history``
    Stream, one entry per round (starvation rounds too), field ``record``
    holding the round record as JSON; capped at ``history_length`` entries.
``chronotick:ntp:n1:updates``
    Pub/sub channel: each new ``latest`` as it is published.
``chronotick:ntp:n1:stats``
    Hash of counters: rounds, strict, relaxed, starvation, outlier, queries
    (requests sent, retries included), retries, replies (replies received),
    rejected (replies refused), falsetickers, plus ``rejected:<reason>`` and
    ``failed:<reason>`` per reason.
``chronotick:ntp:n1:round_duration``
    Hash: a cumulative histogram of round times (dispatch to finish) --
    ``le:<bound>`` counts per bound of :data:`orchestrator.counting.ROUND_DURATION_BUCKETS_S`,
    ``count`` and ``sum`` (s) -- so an exporter can serve a Prometheus
    histogram without keeping state of its own.
``chronotick:ntp:nodes``
    Set of the node names seen.
``chronotick:ntp:n1:server_delay``, ``...:filter_window``, ``...:filter_state``, ``...:round:<id>``, ``...:open``,
``...:outcomes:<id>``
    Internal (not part of the contract): each server's last delay, so the
    next round sends its slowest query first; the temporal filter's state;
    the mark that a round has been finished; the rounds still open; the
    outcomes a round's query tasks have reported so far.

One round's writes go in one MULTI/EXEC transaction, so a reader never sees a
``latest`` without its history entry and counters.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, cast

import redis

from workers import redisurl
from workers.config import ServiceSettings
from workers.keys import Keys
from workers.redisclock import clock_for

from . import records
from .counting import COUNTERS, duration_fields, round_counters

#: How long round records are kept by default (h): ``ntp_service.history_hours``'s own default.
DEFAULT_HISTORY_HOURS = ServiceSettings.history_hours

#: How long a round's "already finished" mark is kept (s): twice the broker's
#: visibility timeout (workers.app.VISIBILITY_TIMEOUT_S, 1 h), after which an
#: unacknowledged callback could at the latest be delivered again.
ROUND_CLAIM_TTL_S = 7_200



class Store:
    """Reads and writes the contract for one prefix.

    Parameters
    ----------
    client:
        A ``redis.Redis`` (``decode_responses`` either way).
    prefix:
        The key prefix (``ntp_service.key_prefix``).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "chronotick"):
        self.client = client
        self.keys = Keys(prefix)

    def finish_round(self, node: str, round_id: str, build: Callable[[list[list[float]], int, float], dict], *,
                     history_length: int, window_size: int, history_hours: float = DEFAULT_HISTORY_HOURS,
                     detail: str = records.COMPACT) -> dict | None:
        """Finish a round once, atomically: claim it and publish it in one transaction.

        ``build(window, consecutive_outliers, finished_at)`` makes the record
        from the node's temporal-filter state; ``finished_at`` is Redis' clock,
        read in the same round trip.  The claim key is WATCHed: if anyone
        claims the round first (a redelivered callback, the deadline closer),
        this returns ``None`` and writes nothing.  Otherwise the claim,
        ``latest``, the history entry, the counters and the ``updates``
        message go in one MULTI/EXEC -- all of them or none, so a connection
        lost on the way leaves the round unclaimed for the closer to publish.
        """
        claim = self.keys.round_claim(node, round_id)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(claim)
                # The reads in one round trip, on another connection: they come after the WATCH, so
                # a claim set before it is seen here and one set after it fails the EXEC.
                with self.client.pipeline(transaction=False) as reads:
                    reads.exists(claim)
                    reads.lrange(self.keys.filter_window(node), 0, -1)
                    reads.hget(self.keys.filter_state(node), "consecutive_outliers")
                    reads.time()  # the round finishes on Redis' clock, whoever's clock runs this
                    claimed, raw_window, raw_consecutive, (seconds, micros) = reads.execute()
                if claimed:
                    return None
                record = build([json.loads(item) for item in raw_window], int(raw_consecutive or 0),
                               int(seconds) + int(micros) / 1e6)
                pipe.multi()
                pipe.set(claim, "1", ex=ROUND_CLAIM_TTL_S)
                self._queue_publish(pipe, record, history_length=history_length, window_size=window_size,
                                    history_hours=history_hours, detail=detail)
                pipe.execute()
            except redis.WatchError:
                # Someone claimed it first -- or the connection broke while watching (redis-py says
                # WatchError for both).  Only the claim tells them apart.
                if self.client.exists(claim):
                    return None
                raise redis.ConnectionError(f"lost Redis while finishing round {round_id}; nothing was "
                                            "written, the round stays open for the closer") from None
        return record

    def publish_round(self, record: dict, *, history_length: int, window_size: int,
                      history_hours: float = DEFAULT_HISTORY_HOURS, detail: str = records.COMPACT) -> None:
        """Store a round's record (and measurement) without a claim: for tools and tests."""
        pipe = self.client.pipeline(transaction=True)
        self._queue_publish(pipe, record, history_length=history_length, window_size=window_size,
                            history_hours=history_hours, detail=detail)
        pipe.execute()

    def _queue_publish(self, pipe, record: dict, *, history_length: int, window_size: int,
                       history_hours: float, detail: str) -> None:
        """Queue a finished round's writes: its record always, its measurement if it has one.

        ``record["latest"]`` is the new ``latest`` value, or ``None`` on
        starvation -- then the previous ``latest`` stays untouched, with its
        own timestamps, so a consumer can see how old it is.
        """
        node = record["node"]
        latest = record.get("latest")
        if latest is not None:
            payload = json.dumps(latest, sort_keys=True)
            pipe.set(self.keys.latest(node), payload)
            pipe.publish(self.keys.updates(node), payload)
        stored = record if detail == records.VERBOSE else records.compact(record)
        history = self.keys.history(node)
        # Bounded by age (MINID: stream ids are Redis' milliseconds, and finished_at is Redis' clock,
        # whoever finished the round) and by count.
        oldest_ms = max(0, int((record["finished_at"] - history_hours * 3600) * 1000))
        pipe.xadd(history, {"record": json.dumps(stored, sort_keys=True, separators=(",", ":"))},
                  minid=oldest_ms, approximate=False)
        pipe.xtrim(history, maxlen=history_length, approximate=False)
        pipe.sadd(self.keys.nodes(), node)
        pipe.hdel(self.keys.open_rounds(node), record["round_id"])
        pipe.zrem(self.keys.open_by_close_time(), _open_member(node, record["round_id"]))
        pipe.delete(self.keys.outcomes(node, record["round_id"]))
        delays = expected_delays(record)
        if delays:
            pipe.hset(self.keys.server_delay(node), mapping=cast("Mapping[Any, Any]", delays))
        verdict = record.get("filter") or {}
        if latest is not None:
            if verdict.get("reset"):
                pipe.delete(self.keys.filter_window(node))
            pipe.rpush(self.keys.filter_window(node), json.dumps([latest["measured_at"], latest["offset"]]))
            pipe.ltrim(self.keys.filter_window(node), -window_size, -1)
            pipe.hset(self.keys.filter_state(node), "consecutive_outliers", 0)
        elif verdict.get("outlier"):
            pipe.hincrby(self.keys.filter_state(node), "consecutive_outliers", 1)
        for name, amount in round_counters(record).items():
            pipe.hincrby(self.keys.stats(node), name, amount)
        duration_key = self.keys.round_duration(node)
        for field in duration_fields(record["duration_s"]):
            pipe.hincrby(duration_key, field, 1)
        pipe.hincrbyfloat(duration_key, "sum", record["duration_s"])

    def open_round(self, node: str, round_id: str, entry: dict, *, close_at: float) -> None:
        """Remember a dispatched round until it is finished (see :func:`orchestrator.rounds.close`).

        ``close_at`` (Unix s): when a closer may close it if nobody finished it.
        """
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.open_rounds(node), round_id, json.dumps(entry))
            pipe.zadd(self.keys.open_by_close_time(), {_open_member(node, round_id): close_at})
            pipe.execute()

    def open_round_entry(self, node: str, round_id: str) -> dict | None:
        """One open round's entry (``None`` once it is finished: finishing removes it)."""
        raw = self.client.hget(self.keys.open_rounds(node), round_id)
        return json.loads(raw) if raw else None

    def open_round_entries(self, node: str) -> dict[str, dict]:
        return {_text(k): json.loads(v) for k, v in self.client.hgetall(self.keys.open_rounds(node)).items()}

    def overdue_open_rounds(self, now: float) -> list[tuple[str, str, dict | None]]:
        """``(node, round_id, entry)`` of every open round of any node due to be closed by ``now``.

        One ZRANGEBYSCORE and one pipelined read of the entries that are due:
        a beat asks this every second whatever the number of nodes.  ``entry``
        is ``None`` for a round finished meanwhile.
        """
        due = [_text(m).split(" ", 1) for m in self.client.zrangebyscore(self.keys.open_by_close_time(), "-inf", now)]
        if not due:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for node, round_id in due:
                pipe.hget(self.keys.open_rounds(node), round_id)
            raw = pipe.execute()
        return [(node, round_id, json.loads(value) if value else None)
                for (node, round_id), value in zip(due, raw, strict=True)]

    def reported_outcomes(self, node: str, round_id: str) -> list[dict]:
        """The outcomes a round's query tasks have reported so far (none once the round is published)."""
        return [json.loads(v) for v in self.client.hvals(self.keys.outcomes(node, round_id))]

    def forget_open_round(self, node: str, round_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.open_rounds(node), round_id)
            pipe.zrem(self.keys.open_by_close_time(), _open_member(node, round_id))
            pipe.execute()

    def round_finished(self, node: str, round_id: str) -> bool:
        """Whether someone finished this round (its claim is set in the same transaction as its record)."""
        return bool(self.client.exists(self.keys.round_claim(node, round_id)))

    def round_record(self, node: str, round_id: str, *, search: int = 50) -> dict | None:
        """A recent round's record, looked up by id in the history stream."""
        return next((r for r in self.history(node, count=search) if r["round_id"] == round_id), None)

    def latest(self, node: str) -> dict | None:
        raw = self.client.get(self.keys.latest(node))
        return json.loads(raw) if raw else None

    def stats(self, node: str) -> dict[str, int]:
        raw = self.client.hgetall(self.keys.stats(node))
        counts = {_text(k): int(v) for k, v in raw.items()}
        return {**{name: 0 for name in COUNTERS}, **counts}

    def history(self, node: str, *, count: int = 10) -> list[dict]:
        """The newest ``count`` round records, newest first."""
        return records_of(self.client.xrevrange(self.keys.history(node), count=count))

    def nodes(self) -> list[str]:
        return sorted(_text(n) for n in self.client.smembers(self.keys.nodes()))

    def history_since(self, node: str, since: float | None = None, *, limit: int | None = None) -> list[dict]:
        """Round records finished at or after ``since`` (Unix s on *this* host's clock), oldest first.

        With ``limit``, the newest ``limit`` of them.  Records finish on Redis'
        clock and stream ids are its milliseconds: ``since`` is read on Redis'
        clock too (:mod:`workers.redisclock`), so no host's clock error moves
        the window.
        """
        clock = clock_for(self.client)
        # Within the estimate's error (half a round trip), a record counts as inside the window.
        since_redis = None if since is None else clock.from_local(since) - (clock.error_s or 0.0)
        low = "-" if since_redis is None else str(max(0, int(since_redis * 1000)))
        if limit is None:
            records = records_of(self.client.xrange(self.keys.history(node), min=low))
        else:
            records = list(reversed(records_of(self.client.xrevrange(self.keys.history(node), min=low, count=limit))))
        if since_redis is not None:
            records = [r for r in records if r["finished_at"] >= since_redis]
        return records

    def server_delays(self, node: str) -> dict[str, float]:
        return {_text(k): float(v) for k, v in self.client.hgetall(self.keys.server_delay(node)).items()}


def expected_delays(record: dict) -> dict[str, float]:
    """How long each server of a round kept its query busy (s); a failure counts as very long."""
    delays = {}
    for server in record["servers"]:
        sample = server.get("sample")
        delays[server["server"]] = sample["delay_s"] if sample else UNANSWERED_DELAY_S
    return delays


#: The expected delay of a server that did not answer: it will hold its
#: query for a whole timeout, so it is sent among the first.
UNANSWERED_DELAY_S = 1e6


@lru_cache(maxsize=8)
def client_for(url: str, master_name: str = redisurl.DEFAULT_MASTER_NAME) -> redis.Redis:
    """One shared client (and connection pool) per Redis location in this process.

    ``url`` may list Sentinels (:mod:`workers.redisurl`); the client then
    follows the master they name.
    """
    return redisurl.connect(url, master_name, health_check_interval_s=30)


def service_client(service: ServiceSettings) -> redis.Redis:
    """The shared client for the Redis ``ntp_service`` names."""
    return client_for(service.redis_url, service.redis_master_name)


def store_for(service: ServiceSettings) -> Store:
    """The contract store of the service ``ntp_service`` describes."""
    return Store(service_client(service), prefix=service.key_prefix)


def _open_member(node: str, round_id: str) -> str:
    """A round's member in :meth:`Keys.open_by_close_time` (node names hold no spaces)."""
    return f"{node} {round_id}"


def records_of(entries: Any) -> list[dict[str, Any]]:
    """The round records of stream entries (``[(id, {"record": json})]``)."""
    return [records.expand(json.loads(_text(fields.get(b"record", fields.get("record")))))
            for _, fields in entries or ()]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
