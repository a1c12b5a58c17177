"""Warm-up on demand: a node gets rounds at the warm-up interval when someone starts to need them.

ChronoTick's collector measured every ``warm_up.measurement_interval`` for
``warm_up.duration_seconds`` after *it* started, and its pipeline then wants
ten measurements at once (``real_data_pipeline.py``, ``_mark_warm_up_complete``).
A cluster's beat runs for months, so a warm-up tied to the beat's age would
serve only the first minute of the cluster.  Instead a warm-up is asked for:

- by a consumer starting collection for node N (:class:`orchestrator.reader.ClockMeasurementSource`);
- by N's worker starting while N has no fresh measurement (:mod:`workers.worker_hooks`);
- by a beat taking the lease, for its nodes that have none.

Warm-ups are bounded (issue #26 item 5), and the bounds are the *service's*:
a consumer loads its own config (ChronoTick's YAML, which may say
``duration_seconds: 86400`` and list no nodes), so the authority is in Redis.
The leading beat publishes its :class:`Policy` -- its nodes, the hub node,
its warm-up length, the cooldown and the staleness limit -- to
``<prefix>:ntp:warm_up_policy`` when it takes the lease, and keeps the key
alive at each of its polls; it lapses a while after no beat leads.  Every
request runs one Lua script (:data:`_REQUEST`) that judges it atomically on
*Redis'* clock (``TIME``), so no two hosts' clocks are ever compared, and
answers with an :class:`Answer`:

- ``joined``: N's warm-up is running; the request joins it (consumers on one
  node share one warm-up) and does not extend it;
- ``started``: a warm-up of the policy's length, whatever was asked (a
  short ask would start one of no rounds, then a cooldown for everyone);
- ``refused`` with a named reason: ``no_policy`` (no beat has published one:
  none would run the warm-up), ``unknown_node`` (not among the policy's nodes:
  a misspelt node is told so), ``hub`` (the hub node measures the public
  servers and never warms up), ``disabled`` (the service's length is 0),
  ``fresh`` (N's ``latest`` is younger than the staleness limit) or
  ``cooldown`` (N's last warm-up ended less than the cooldown ago; the answer
  says when it may run again).

Running warm-ups are in ``<prefix>:ntp:warm_up``, a sorted set node -> end (ms
on Redis' clock) that expires with the last warm-up in it; the last end of each
node is in ``<prefix>:ntp:warm_up_ended`` for the cooldown, which drops nodes
whose cooldown is over and expires a cooldown after the last end.  Both hold at
most one member per node of the policy, whatever the number of requests.  The
leading beat reads the running warm-ups once a second (:func:`poll`: one script
call, whatever the number of nodes) and runs each listed node at the warm-up
interval until its end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

import redis

from . import config as config_mod
from .keys import Keys
from .redisclock import is_stale, latest_age_s, stale_after_s, time_of

log = logging.getLogger(__name__)

#: What a request's :class:`Answer` says happened.
STARTED, JOINED, REFUSED = "started", "joined", "refused"

#: Why a request was refused (:attr:`Answer.reason`).
NO_POLICY = "no_policy"
UNKNOWN_NODE = "unknown_node"
HUB = "hub"
DISABLED = "disabled"
FRESH = "fresh"
COOLDOWN = "cooldown"
REASONS = (NO_POLICY, UNKNOWN_NODE, HUB, DISABLED, FRESH, COOLDOWN)

#: The policy key outlives the leader's last poll by at least this long (s), and by three lease times: a
#: standby taking over finds it still there.
POLICY_TTL_MIN_S = 60.0


def policy_ttl_s(service: config_mod.ServiceSettings) -> float:
    """How long the published policy lives without a leader's poll (s)."""
    return max(POLICY_TTL_MIN_S, 3 * service.beat_lease_seconds)


@dataclass(frozen=True)
class Policy:
    """The leading beat's warm-up rules, as published in ``<prefix>:ntp:warm_up_policy``."""

    #: The nodes the beat runs rounds for; a request for any other is refused (``unknown_node``).
    nodes: tuple[str, ...]
    #: The service's warm-up length (s): a request gets at most this; 0 refuses every request (``disabled``).
    duration_s: float
    #: No new warm-up of a node until this long after its last one ended (s).
    cooldown_s: float
    #: A node whose ``latest`` is at most this old (published, on Redis' clock) is fresh: no warm-up (s).
    stale_after_s: float
    #: The hub node (``ntp_service.hub.node``), which never warms up; ``""`` without a hub.
    hub: str = ""

    @classmethod
    def of(cls, config: config_mod.Config, nodes: list[str] | tuple[str, ...]) -> Policy:
        """The policy of a beat running ``config`` for ``nodes``."""
        hub = config.service.hub
        return cls(nodes=tuple(nodes), duration_s=config.timing.warm_up_duration_s,
                   cooldown_s=config.service.warm_up_cooldown_seconds,
                   stale_after_s=config.stale_after_s(),  # any node's but the hub's, which never warms up
                   hub=hub.node if hub is not None else "")

    def to_json(self) -> str:
        return json.dumps({"nodes": list(self.nodes), "hub": self.hub, "duration_ms": _ms(self.duration_s),
                           "cooldown_ms": _ms(self.cooldown_s), "stale_after_ms": _ms(self.stale_after_s)},
                          separators=(",", ":"))


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


class Answer(NamedTuple):
    """The service's answer to a warm-up request.

    Its first two fields are what :func:`request` returned before refusals
    existed, ``(started, seconds remaining)``, so ``answer[0]`` and
    ``answer[1]`` still read the same.
    """

    #: Whether this request started the node's warm-up.
    started: bool
    #: Seconds of warm-up left (started or joined); 0 when refused.
    remaining_s: float
    #: :data:`STARTED`, :data:`JOINED` or :data:`REFUSED`.
    outcome: str
    node: str
    #: One of :data:`REASONS` when refused, else ``None``.
    reason: str | None = None
    #: ``cooldown``: seconds until a warm-up may run again; ``fresh``: until the node goes stale without a round.
    retry_in_s: float | None = None
    #: ``cooldown``: when a warm-up may run again (Unix s on Redis' clock).
    retry_at: float | None = None
    #: ``fresh``: the age of the node's ``latest`` (s, on Redis' clock); ``unknown_node``: unused.
    age_s: float | None = None
    #: ``fresh``: the staleness limit (s); ``unknown_node``: how many nodes the policy lists.
    limit: float | None = None

    @property
    def refused(self) -> bool:
        return self.outcome == REFUSED

    @property
    def message(self) -> str:
        """The answer in words, for a log line."""
        node = self.node
        if self.outcome == STARTED:
            return f"warm-up of {node} started: {self.remaining_s:.0f} s of rounds at the warm-up interval"
        if self.outcome == JOINED:
            return f"joined the running warm-up of {node}: {self.remaining_s:.0f} s left"
        why = {
            NO_POLICY: "no beat has published the warm-up policy (is a beat running and holding the lease?); "
                       "none would run the warm-up",
            UNKNOWN_NODE: f"{node!r} is not one of the {int(self.limit or 0)} node(s) the beat runs rounds for "
                          "(ntp_service.nodes): check the node's name ($CHRONOTICK_NODE, --node); nothing is "
                          "published for it",
            HUB: f"{node} is the hub node: it measures the public servers, at most every "
                 "hub.measurement_interval, and never warms up",
            DISABLED: "the service's warm_up.duration_seconds is 0",
            FRESH: f"{node} is fresh (its latest measurement is {self.age_s or 0:.0f} s old, stale after "
                   f"{self.limit or 0:.0f} s): no warm-up while it is",
            COOLDOWN: f"{node} warmed up less than the cooldown ago (ntp_service.warm_up_cooldown_seconds); "
                      f"the next may run in {self.retry_in_s or 0:.0f} s, at {_utc(self.retry_at)}",
        }.get(self.reason or "", f"refused ({self.reason})")
        return f"warm-up of {node} refused ({self.reason}): {why}"


def _utc(unix_s: float | None) -> str:
    if unix_s is None:
        return "?"
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


#: Judge a warm-up request, atomically, on Redis' clock.
#: KEYS: policy, running warm-ups (node -> end ms), last ends (node -> end ms), the node's ``latest``.
#: ARGV: node.  The length is always the policy's.
#: Returns {outcome, reason, a, b, now ms}: started/joined: a = ms remaining; fresh: a = age ms, b = limit ms;
#: cooldown: a = ms until it may run, b = when (ms); unknown_node: a = nodes in the policy.
_REQUEST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node = ARGV[1]
local raw = redis.call('GET', KEYS[1])
if not raw then
    return {'refused', 'no_policy', 0, 0, now}
end
local ok, policy = pcall(cjson.decode, raw)
if not ok or type(policy) ~= 'table' or type(policy['nodes']) ~= 'table' then
    return {'refused', 'no_policy', 0, 0, now}
end
local known = false
for _, name in ipairs(policy['nodes']) do
    if name == node then
        known = true
        break
    end
end
if not known then
    return {'refused', 'unknown_node', #policy['nodes'], 0, now}
end
if policy['hub'] == node then
    return {'refused', 'hub', 0, 0, now}
end
local ends = tonumber(redis.call('ZSCORE', KEYS[2], node) or '0')
if ends > now then
    return {'joined', '', ends - now, 0, now}
end
local duration = math.floor(tonumber(policy['duration_ms']) or 0)
if duration <= 0 then
    return {'refused', 'disabled', 0, 0, now}
end
local stale_after = math.floor(tonumber(policy['stale_after_ms']) or 0)
local latest = redis.call('GET', KEYS[4])
if latest then
    local decoded, value = pcall(cjson.decode, latest)
    if decoded and type(value) == 'table' and type(value['published_at']) == 'number' then
        local age = math.floor(now - value['published_at'] * 1000)
        if age <= stale_after then
            return {'refused', 'fresh', age, stale_after, now}
        end
    end
end
local cooldown = math.floor(tonumber(policy['cooldown_ms']) or 0)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - cooldown)
local last = tonumber(redis.call('ZSCORE', KEYS[3], node) or '')
if last and last + cooldown > now then
    return {'refused', 'cooldown', last + cooldown - now, last + cooldown, now}
end
redis.call('ZADD', KEYS[2], now + duration, node)
if redis.call('PTTL', KEYS[2]) < duration then
    redis.call('PEXPIRE', KEYS[2], duration)
end
redis.call('ZADD', KEYS[3], now + duration, node)
if redis.call('PTTL', KEYS[3]) < duration + cooldown then
    redis.call('PEXPIRE', KEYS[3], duration + cooldown)
end
return {'started', '', duration, 0, now}
"""

#: Drop finished warm-ups; return {policy present (1/0), node, ms remaining, ...} for the running ones.
#: With KEYS[2] (the policy) and ARGV[1] (ms), the policy's expiry is renewed: the leader's poll keeps it alive.
_ACTIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {1}
if KEYS[2] then
    out[1] = redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
local found = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #found, 2 do
    out[#out + 1] = found[i]
    out[#out + 1] = tostring(math.floor(tonumber(found[i + 1]) - now))
end
return out
"""


def publish_policy(client: redis.Redis, prefix: str, policy: Policy, ttl_s: float = POLICY_TTL_MIN_S) -> None:
    """Publish ``policy`` as the one every warm-up request is judged by, for ``ttl_s`` unless renewed
    (:func:`poll`).  Raises redis' errors."""
    client.set(Keys(prefix).warm_up_policy(), policy.to_json(), px=_ms(ttl_s))


def _answer(node: str, reply) -> Answer:
    outcome, reason, a, b = reply[0], reply[1], int(reply[2]), int(reply[3])
    if outcome in (STARTED, JOINED):
        return Answer(outcome == STARTED, a / 1000, outcome, node)
    if reason == FRESH:
        return Answer(False, 0.0, REFUSED, node, FRESH, retry_in_s=max(0.0, (b - a) / 1000), age_s=a / 1000,
                      limit=b / 1000)
    if reason == COOLDOWN:
        return Answer(False, 0.0, REFUSED, node, COOLDOWN, retry_in_s=a / 1000, retry_at=b / 1000)
    if reason == UNKNOWN_NODE:
        return Answer(False, 0.0, REFUSED, node, UNKNOWN_NODE, limit=float(a))
    return Answer(False, 0.0, REFUSED, node, reason)


def _request_keys(prefix: str, node: str) -> list[str]:
    keys = Keys(prefix)
    return [keys.warm_up_policy(), keys.warm_up(), keys.warm_up_ended(), keys.latest(node)]


def request(client: redis.Redis, prefix: str, node: str, duration_s: float | None = None) -> Answer:
    """Ask for a warm-up of ``node``: always the service's length (``duration_s``, the caller's wish, only checked).

    Judged by the published :class:`Policy` on Redis' clock (:data:`_REQUEST`):
    the answer is ``started`` (for the service's length, whatever ``duration_s``
    asks: the caller logs a difference), ``joined``
    (a warm-up of ``node`` runs; not extended) or ``refused`` with a named
    reason (:data:`REASONS`).  Raises redis' errors only.
    """
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"a warm-up of {duration_s:g} s: ask for more than 0 s, or None for the service's length")
    reply = client.register_script(_REQUEST)(keys=_request_keys(prefix, node), args=[node])
    return _answer(node, reply)


def request_many(client: redis.Redis, prefix: str, nodes: list[str],
                 duration_s: float | None = None) -> dict[str, Answer]:
    """:func:`request` for each of ``nodes``, in one round trip: ``{node: answer}``.  Raises redis' errors."""
    if not nodes:
        return {}
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"a warm-up of {duration_s:g} s: ask for more than 0 s, or None for the service's length")
    script = client.register_script(_REQUEST)
    with client.pipeline(transaction=False) as pipe:
        for node in nodes:
            script(keys=_request_keys(prefix, node), args=[node], client=pipe)
        replies = pipe.execute()
    return {node: _answer(node, reply) for node, reply in zip(nodes, replies, strict=True)}


def _running(flat) -> dict[str, float]:
    return {flat[i]: int(flat[i + 1]) / 1000 for i in range(1, len(flat), 2)}


def active(client: redis.Redis, prefix: str) -> dict[str, float]:
    """``{node: seconds of warm-up remaining}`` for every node warming up now.  Raises redis' errors."""
    return _running(client.eval(_ACTIVE, 1, Keys(prefix).warm_up()))


def poll(client: redis.Redis, prefix: str, policy: Policy, ttl_s: float = POLICY_TTL_MIN_S) -> dict[str, float]:
    """The leading beat's poll: :func:`active`, renewing the policy's expiry in the same script call.

    When the policy is gone (Redis restarted without its data, or emptied), it is published again.
    Raises redis' errors.
    """
    keys = Keys(prefix)
    flat = client.eval(_ACTIVE, 2, keys.warm_up(), keys.warm_up_policy(), _ms(ttl_s))
    if not int(flat[0]):
        log.warning("[WARM-UP] the warm-up policy was gone from Redis; published it again")
        publish_policy(client, prefix, policy, ttl_s)
    return _running(flat)


def nodes_without_fresh_measurement(client: redis.Redis, prefix: str, nodes: list[str],
                                    stale_after: float) -> list[str]:
    """Those of ``nodes`` whose ``latest`` is missing or older than ``stale_after`` (s: a node's
    :meth:`workers.config.Config.stale_after_s`: :data:`workers.redisclock.STALE_INTERVALS` of its normal intervals).

    One MGET and one TIME in one round trip, whatever the number of nodes:
    the age is judged on Redis' clock (:func:`latest_age_s`), so the beat and
    a node's own worker agree whatever either host's clock says.
    """
    if not nodes:
        return []
    keys = Keys(prefix)
    with client.pipeline(transaction=False) as pipe:
        pipe.mget([keys.latest(node) for node in nodes])
        pipe.time()
        values, now = pipe.execute()
    service_now = time_of(now)
    stale = []
    for node, raw in zip(nodes, values, strict=True):
        try:
            latest = json.loads(raw) if raw is not None else None
        except ValueError:
            latest = None
        if is_stale(latest_age_s(latest if isinstance(latest, dict) else None, service_now), stale_after):
            stale.append(node)
    return stale


def warm_up_if_not_fresh(client: redis.Redis, prefix: str, nodes: list[str],
                         timing: config_mod.TimingSettings) -> dict[str, Answer]:
    """Ask for a warm-up of each of ``nodes`` without a fresh measurement: ``{node: the service's answer}``.

    ``timing`` is the caller's: its staleness limit picks the nodes to ask for
    (one MGET, :func:`nodes_without_fresh_measurement`), and its warm-up length
    is asked for; the published policy decides (:func:`request`).
    """
    if timing.warm_up_duration_s <= 0:
        return {}
    stale = nodes_without_fresh_measurement(client, prefix, nodes, stale_after_s(timing.normal_interval_s))
    return request_many(client, prefix, stale, timing.warm_up_duration_s)


def log_answer(logger: logging.Logger, answer: Answer, before: str = "", after: str = "", *,
               granted_level: int = logging.INFO) -> None:
    """Say what became of a warm-up request: started and joined at ``granted_level``, refusals at WARNING, an
    unknown node at ERROR (someone expects rounds for a node nobody measures)."""
    text = f"[WARM-UP] {before}{answer.message}{after}"
    if answer.reason == UNKNOWN_NODE:
        logger.error("%s", text)
    elif answer.refused:
        logger.warning("%s", text)
    else:
        logger.log(granted_level, "%s", text)


#: A catch-up round asked for and never taken (no beat leads) is forgotten after this (s).
ROUND_NOW_TTL_S = 60

#: Take every node asked for, emptying the set.
_TAKE_ROUNDS_NOW = """
local nodes = redis.call('ZRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return nodes
"""


def ask_round_now(client: redis.Redis, prefix: str, nodes: list[str]) -> None:
    """Ask the leading beat for one round of each of ``nodes`` at once, then their phase as before.

    A worker whose link to Redis came back after an outage asks this (issue #25: its next slot may be a
    whole interval away, 120 s on ARES, and its node published nothing while it was cut off).  Asking
    again before the beat took it is one ask.  Raises redis' errors.
    """
    if not nodes:
        return
    key = Keys(prefix).round_now()
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(key, {node: 0 for node in nodes})
        pipe.expire(key, ROUND_NOW_TTL_S)
        pipe.execute()


def rounds_asked_now(client: redis.Redis, prefix: str) -> list[str]:
    """The nodes asked for by :func:`ask_round_now` since the last call (the set emptied).  Raises redis' errors."""
    return list(client.eval(_TAKE_ROUNDS_NOW, 1, Keys(prefix).round_now()))
