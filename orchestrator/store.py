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
    Hash of counters: rounds, strict, relaxed, starvation, outlier, outage, queries
    (attempts, retries included; an advanced-mode attempt is a burst), requests
    (request packets sent), retries, replies (reply packets received), rejected
    (replies refused), falsetickers, early, late, plus ``rejected:<reason>`` and
    ``failed:<reason>`` per reason (docs/contract.md says how each is counted).
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
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, cast

import redis

from workers import redisurl
from workers.config import ServiceSettings
from workers.contracts import Reason
from workers.keys import Keys
from workers.redisclock import clock_for

from . import records
from .counting import COUNTERS, duration_fields, late_counters, round_counters
from .outcomes import Quality, ServerStatus
from .sources import Reach

log = logging.getLogger(__name__)

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
        A ``redis.Redis`` that reads text (``decode_responses``), as every
        client :func:`workers.redisurl.connect` makes.
    prefix:
        The key prefix (``ntp_service.key_prefix``).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "chronotick"):
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("a Store reads Redis' replies as text: give it a client made by "
                             "workers.redisurl.connect (decode_responses=True)")
        self.client = client
        self.keys = Keys(prefix)
        self._skipped: OrderedDict[tuple[str, str], None] = OrderedDict()  # bad entries warned about

    def record_round(self, node: str, round_id: str, build: Callable[[list[list[float]], int, float], dict], *,
                     history_length: int, window_size: int, history_hours: float = DEFAULT_HISTORY_HOURS,
                     detail: str = records.COMPACT) -> dict | None:
        """Finish a round once, atomically: claim it and publish it in one transaction.

        ``build(window, consecutive_outliers, finished_at)`` makes the record
        from the node's temporal-filter state; ``finished_at`` is Redis' clock,
        read in the same round trip.  The claim key is WATCHed: if anyone
        claims the round first (a redelivered callback, the deadline closer,
        the worker that decided it early), this returns ``None`` and writes
        nothing.  Otherwise the claim, ``latest``, the history entry, the
        counters and the ``updates`` message go in one MULTI/EXEC -- all of
        them or none, so a connection lost on the way leaves the round
        unclaimed for the closer to publish.

        A record with ``late`` servers (published early, :mod:`orchestrator.early`)
        leaves the round open: its claim says ``published`` and which servers
        are late, until :meth:`complete_round` records what they said.
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
                late = [s["server"] for s in record["servers"] if s["status"] == ServerStatus.LATE]
                pipe.multi()
                # Published early: the claim keeps what was published until the late outcomes come, for the
                # callback's summary (Flower's result column: :meth:`published_result`).
                state = ({"state": PUBLISHED, "late": late, "result": brief_result(record)} if late
                         else {"state": COMPLETE})
                pipe.set(claim, json.dumps(state), ex=ROUND_CLAIM_TTL_S)
                self._queue_publish(pipe, record, history_length=history_length, window_size=window_size,
                                    history_hours=history_hours, detail=detail, complete=not late)
                if record["quality"] != Quality.OUTAGE:  # an outage asked no server: no bit from any
                    self._queue_reach(pipe, node, {s["server"]: s.get("sample") is not None
                                                   for s in record["servers"] if s["status"] != ServerStatus.LATE
                                                   and not _not_asked(s)})
                # The whole record, for whoever waits for this round (``measure``): the history keeps less.
                pipe.publish(self.keys.round_events(node), json.dumps({"round_id": round_id, "state": state["state"],
                                                                       "record": record}))
                pipe.execute()
            except redis.WatchError:
                # Someone claimed it first -- or the connection broke while watching (redis-py says
                # WatchError for both).  Only the claim tells them apart.
                if self.client.exists(claim):
                    return None
                raise redis.ConnectionError(f"lost Redis while finishing round {round_id}; nothing was "
                                            "written, the round stays open for the closer") from None
        return record

    def complete_round(self, node: str, round_id: str, outcomes: list[dict], *, history_length: int,
                       history_hours: float = DEFAULT_HISTORY_HOURS) -> list[dict] | None:
        """Record what a round published early heard after it; ``None`` unless it is waiting for that.

        ``outcomes``: every outcome the round has (from its chord, or as reported),
        one per server (:func:`orchestrator.selection.unique_by_server`, the
        caller's); those of its late servers are kept in the ``late`` stream, counted
        (``late``, and their queries, retries, replies and failures), and fill
        their reach bit.  A late server with no outcome here counts as
        ``no_result``.  Once, atomically, as :meth:`record_round`.
        """
        claim = self.keys.round_claim(node, round_id)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(claim)
                # The claim and Redis' clock in one round trip, after the WATCH (as in record_round).
                with self.client.pipeline(transaction=False) as reads:
                    reads.get(claim)
                    reads.time()
                    raw, (seconds, micros) = reads.execute()
                state = _claim_state(raw)
                if state.get("state") != PUBLISHED:
                    return None
                by_server = {o["server"]: o for o in outcomes}
                late = [records.late_entry(by_server.get(server), server) for server in state["late"]]
                pipe.multi()
                pipe.set(claim, json.dumps({"state": COMPLETE}), ex=ROUND_CLAIM_TTL_S)
                stored = [records.compact_server(entry, None) for entry in late]
                _queue_capped_add(pipe, self.keys.late(node),
                                  {"round": round_id, "servers": json.dumps(stored, separators=(",", ":"))},
                                  now=int(seconds) + int(micros) / 1e6, hours=history_hours, length=history_length)
                for name, amount in late_counters(late).items():
                    pipe.hincrby(self.keys.stats(node), name, amount)
                self._queue_reach(pipe, node, {e["server"]: e.get("sample") is not None for e in late
                                               if not _not_asked(e)})
                self._queue_close(pipe, node, round_id)
                pipe.publish(self.keys.round_events(node), json.dumps({"round_id": round_id, "state": COMPLETE,
                                                                       "late": late}))
                pipe.execute()
            except redis.WatchError:
                if _claim_state(self.client.get(claim)).get("state") == COMPLETE:
                    return None
                raise redis.ConnectionError(f"lost Redis while completing round {round_id}; nothing was "
                                            "written") from None
        return late

    def published_result(self, node: str, round_id: str) -> dict | None:
        """What a round published early published (:func:`brief_result`), until its late outcomes come.

        ``None`` once :meth:`complete_round` has recorded them, or for a round
        not published early: read it before completing the round.
        """
        raw = self.client.get(self.keys.round_claim(node, round_id))
        return None if raw is None else _claim_state(raw).get("result")

    def round_state(self, node: str, round_id: str) -> str | None:
        """``published`` (early; late outcomes to come), ``complete``, or ``None`` (not finished)."""
        raw = self.client.get(self.keys.round_claim(node, round_id))
        return None if raw is None else _claim_state(raw).get("state")

    def _queue_reach(self, pipe, node: str, usable: dict[str, bool]) -> None:
        """Shift one round into each server's reach register: 1 for a usable reply (chrony's ``reach``)."""
        if usable:
            args = [item for server, ok in sorted(usable.items()) for item in (server, int(ok))]
            pipe.eval(SHIFT_REACH, 1, self.keys.reach(node), *args)

    def reach(self, node: str) -> dict[str, Reach]:
        """Every server's reach register for ``node`` (none until its first round)."""
        return Reach.registers(self.client.hgetall(self.keys.reach(node)))

    def server_state(self, node: str) -> tuple[dict[str, float], dict[str, Reach]]:
        """What planning a round reads, in one round trip: each server's last delay and its reach."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.server_delay(node))
            pipe.hgetall(self.keys.reach(node))
            delays, reach = pipe.execute()
        return {str(k): float(v) for k, v in delays.items()}, Reach.registers(reach)

    def late_outcomes(self, node: str, round_id: str, *, search: int = 50) -> dict[str, dict]:
        """The late servers' entries (by server) of a recent round published early (empty: none recorded)."""
        for _, fields in self.client.xrevrange(self.keys.late(node), count=search) or ():
            found, said = records.late_of(fields or {})
            if found == round_id:
                return said
        return {}

    def publish_round(self, record: dict, *, history_length: int, window_size: int,
                      history_hours: float = DEFAULT_HISTORY_HOURS, detail: str = records.COMPACT) -> None:
        """Store a round's record (and measurement) without a claim: for tools and tests."""
        pipe = self.client.pipeline(transaction=True)
        self._queue_publish(pipe, record, history_length=history_length, window_size=window_size,
                            history_hours=history_hours, detail=detail)
        pipe.execute()

    def _queue_publish(self, pipe, record: dict, *, history_length: int, window_size: int,
                       history_hours: float, detail: str, complete: bool = True) -> None:
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
        _queue_capped_add(pipe, self.keys.history(node),
                          {"record": json.dumps(stored, sort_keys=True, separators=(",", ":"))},
                          now=record["finished_at"], hours=history_hours, length=history_length)
        pipe.sadd(self.keys.nodes(), node)
        if complete:  # else it stays open, its reports kept, until its late outcomes are recorded
            self._queue_close(pipe, node, record["round_id"])
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

    def _queue_close(self, pipe, node: str, round_id: str) -> None:
        """Queue what ends a round's open life: its entry, its index member, its reported outcomes."""
        pipe.hdel(self.keys.open_rounds(node), round_id)
        pipe.zrem(self.keys.open_by_close_time(), _open_member(node, round_id))
        pipe.delete(self.keys.outcomes(node, round_id))

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
        return {str(k): json.loads(v) for k, v in self.client.hgetall(self.keys.open_rounds(node)).items()}

    def overdue_open_rounds(self, now: float) -> list[tuple[str, str, dict | None]]:
        """``(node, round_id, entry)`` of every open round of any node due to be closed by ``now``.

        One ZRANGEBYSCORE and one pipelined read of the entries that are due:
        a beat asks this every second whatever the number of nodes.  ``entry``
        is ``None`` for a round finished meanwhile.
        """
        due = [str(m).split(" ", 1) for m in self.client.zrangebyscore(self.keys.open_by_close_time(), "-inf", now)]
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
        """A recent round's record, looked up by id in the history stream, with its late outcomes if any."""
        record = next((r for r in self.history(node, count=search) if r["round_id"] == round_id), None)
        if record is not None and any(s["status"] == ServerStatus.LATE for s in record["servers"]):
            records.with_late(record, self.late_outcomes(node, round_id, search=search))
        return record

    def latest(self, node: str) -> dict | None:
        raw = self.client.get(self.keys.latest(node))
        return json.loads(raw) if raw else None

    def stats(self, node: str) -> dict[str, int]:
        raw = self.client.hgetall(self.keys.stats(node))
        counts = {str(k): int(v) for k, v in raw.items()}
        return {**{name: 0 for name in COUNTERS}, **counts}

    def history(self, node: str, *, count: int = 10) -> list[dict]:
        """The newest ``count`` round records, newest first (an entry that is none is skipped: :meth:`records`)."""
        return self._newest(node, "-", count)

    def nodes(self) -> list[str]:
        return sorted(str(n) for n in self.client.smembers(self.keys.nodes()))

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
            key = self.keys.history(node)
            records = self.records_in(key, self.client.xrange(key, min=low))
        else:
            records = list(reversed(self._newest(node, low, limit)))
        if since_redis is not None:
            records = [r for r in records if r["finished_at"] >= since_redis]
        return self._with_late(node, records, low)

    def records_in(self, stream: str, entries: Any) -> list[dict]:
        """The round records of ``stream``'s ``entries``, in their order; an entry that is none is skipped.

        Skipped with one warning per entry (per store) that names the stream,
        the entry's id and why (:class:`BadRecord`): one bad entry costs its
        readers only itself, never the entries around it (issue #24).
        """
        return records_of(entries, stream=stream, skip=self._skip)

    def _skip(self, stream: str, bad: BadRecord) -> None:
        seen = (stream, bad.entry_id)
        if seen in self._skipped:
            return
        self._skipped[seen] = None
        if len(self._skipped) > SKIPPED_REMEMBERED:
            self._skipped.popitem(last=False)
        log.warning("skipping %s entry %s: %s", stream, bad.entry_id, bad.reason)

    def _newest(self, node: str, low: str, count: int) -> list[dict]:
        """The newest ``count`` round records from id ``low`` on, newest first, reading past any skipped entry."""
        key = self.keys.history(node)
        found: list[dict] = []
        high = "+"
        while len(found) < count:
            wanted = count - len(found)
            entries = self.client.xrevrange(key, max=high, min=low, count=wanted) or []
            found += self.records_in(key, entries)
            if len(entries) < wanted:
                break  # the stream's start (or ``low``)
            high = "(" + str(entries[-1][0])  # exclusive: Redis 6.2 and later
        return found

    def _with_late(self, node: str, history: list[dict], low: str = "-") -> list[dict]:
        """``history`` with the late servers' outcomes in place of their ``late`` entries (one XRANGE)."""
        if not any(s["status"] == ServerStatus.LATE for r in history for s in r["servers"]):
            return history
        key = self.keys.late(node)
        late = {}
        for entry_id, fields in self.client.xrange(key, min=low) or ():
            try:
                round_id, said = records.late_of(fields or {})
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                self._skip(key, BadRecord(str(entry_id), f"not a round's late outcomes ({type(exc).__name__}: "
                                                           f"{exc})"))
                continue
            late[round_id] = said
        for record in history:
            records.with_late(record, late.get(record["round_id"], {}))
        return history

    def server_delays(self, node: str) -> dict[str, float]:
        return {str(k): float(v) for k, v in self.client.hgetall(self.keys.server_delay(node)).items()}


#: A round's claim says one of these: published early with late outcomes to come, or complete.
PUBLISHED, COMPLETE = "published", "complete"


def brief_result(record: dict) -> dict:
    """A round's result in brief: quality, servers used and total, and the server, offset and uncertainty
    published (``None`` each when nothing was).  Kept in the claim of a round published early."""
    latest = record.get("latest") or {}
    return {"quality": record["quality"], "servers_used": record["servers_used"],
            "servers_total": record["servers_total"], "server": latest.get("server"),
            "offset": latest.get("offset"), "uncertainty": latest.get("uncertainty")}


#: Shifts a round into reach registers: KEYS[1] the hash, ARGV server, bit, server, bit, ...  A value is
#: ``256 * rounds + reach``: rounds (up to 8) tells a register never filled from one of eight misses.
SHIFT_REACH = """
for i = 1, #ARGV, 2 do
  local value = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  local reach = value % 256
  local rounds = math.min(8, math.floor(value / 256) + 1)
  redis.call('HSET', KEYS[1], ARGV[i], rounds * 256 + (reach * 2 + tonumber(ARGV[i + 1])) % 256)
end
return #ARGV / 2
"""


def _queue_capped_add(pipe, stream: str, fields: dict, *, now: float, hours: float, length: int) -> None:
    """XADD to ``stream``, bounded by age and by count.

    By age with MINID: stream ids are Redis' milliseconds, and ``now`` is Redis' clock (a round finishes
    on it, whoever finished it).
    """
    pipe.xadd(stream, fields, minid=max(0, int((now - hours * 3600) * 1000)), approximate=False)
    pipe.xtrim(stream, maxlen=length, approximate=False)


def _claim_state(raw) -> dict:
    """A claim's value: JSON, or the ``1`` of a claim set before rounds could be published early."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"state": COMPLETE}
    return value if isinstance(value, dict) else {"state": COMPLETE}


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


#: How many bad entries a :class:`Store` remembers having warned about, so that a reader polling
#: the history (the exporter, ``status``) names each one once, not on every read.
SKIPPED_REMEMBERED = 1000


class BadRecord(ValueError):
    """A history entry that is not a round record: its stream id and why (a reader skips it)."""

    def __init__(self, entry_id: str, reason: str):
        super().__init__(f"entry {entry_id}: {reason}")
        self.entry_id = entry_id
        self.reason = reason


def record_of(entry: Any) -> dict[str, Any]:
    """The round record of one history stream entry (``(id, {"record": json})``), in the usual shape.

    Raises :class:`BadRecord`, naming the entry and the reason, for an entry
    whose ``record`` is missing, is not JSON, is JSON but not an object
    (``[]``, ``null``), or lacks what every round record has (``round_id``,
    ``node``, a numeric ``finished_at``, ``servers`` with a server and status
    each, ``latest`` an object or null).  Any stored form reads:
    :func:`orchestrator.records.expand`.
    """
    entry_id, fields = entry
    raw = fields.get("record") if isinstance(fields, Mapping) else None
    if raw is None:
        raise BadRecord(entry_id, "it has no 'record' field")
    try:
        stored = json.loads(raw)
    except ValueError as exc:
        raise BadRecord(entry_id, f"its record is not JSON ({exc})") from None
    if not isinstance(stored, dict):
        raise BadRecord(entry_id, f"its record is {_json_kind(stored)}, not an object")
    try:
        record = records.expand(stored)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadRecord(entry_id, f"its record cannot be read ({type(exc).__name__}: {exc})") from None
    problem = _shape_problem(record)
    if problem is not None:
        raise BadRecord(entry_id, problem)
    return record


def records_of(entries: Iterable[Any] | None, *, stream: str = "history",
               skip: Callable[[str, BadRecord], None] | None = None) -> list[dict[str, Any]]:
    """The round records of stream entries (``[(id, {"record": json})]``), in order, bad ones skipped.

    ``skip(stream, bad)`` hears of each entry skipped; by default it is logged
    as a warning naming ``stream``, the entry's id and the reason.
    """
    found = []
    for entry in entries or ():
        try:
            found.append(record_of(entry))
        except BadRecord as bad:
            if skip is None:
                log.warning("skipping %s entry %s: %s", stream, bad.entry_id, bad.reason)
            else:
                skip(stream, bad)
    return found


def _shape_problem(record: dict[str, Any]) -> str | None:
    """What a round record lacks that every reader relies on (``None``: nothing)."""
    for key in ("round_id", "node"):
        if not isinstance(record.get(key), str):
            return f"its record has no {key}"
    finished_at = record.get("finished_at")
    if isinstance(finished_at, bool) or not isinstance(finished_at, int | float) or not math.isfinite(finished_at):
        return f"its finished_at is not a time ({finished_at!r})"
    servers = record.get("servers")
    if not isinstance(servers, list) or not all(isinstance(s, dict) and "server" in s and "status" in s
                                                for s in servers):
        return "its servers are not a list of server entries"
    latest = record.get("latest")
    if latest is not None and not isinstance(latest, dict):
        return f"its latest is {_json_kind(latest)}, neither an object nor null"
    return None


def _json_kind(value: Any) -> str:
    """What kind of JSON value ``value`` is, for a warning."""
    if value is None:
        return "null"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _not_asked(entry: dict) -> bool:
    """A server entry whose server was never asked (no outcome reported, or started past the deadline):
    it says nothing of the server's reachability, so it shifts no bit into its reach register (RFC 5905's
    reach counts polls sent; issue #25's adversarial review: a node cut off mid-round cost reach bits)."""
    return entry.get("sample") is None and entry.get("reason") in (Reason.NO_RESULT, Reason.ROUND_DEADLINE) and all(
        a.get("reason") in (Reason.NO_RESULT, Reason.ROUND_DEADLINE) for a in entry.get("history", []))
