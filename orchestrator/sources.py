"""Each server of a node as ``chronyc sources`` shows it: state, reach, last sample.  Pure: data in, data out.

The reach register is chrony's (``sources.c``): eight bits, one per round,
the newest in bit 0, set where the server gave a usable reply -- one that
passed RFC 5905's checks, whether or not selection then used it (a
falseticker is reachable, and shown as a falseticker).  It is kept in Redis
per node and server (:meth:`orchestrator.store.Store.reach`); everything else
here is read from the node's round records.  An ``outage`` round -- no server
asked or reached, the node's worker or path being the cause -- shifts no bit
into any register and sets no server's state.

A server's **state** is its part in the newest round that heard from it:

=============== ===================================================================
``ok``          a truechimer through the gate in force (chosen, combined or accepted)
``late``        answered, after the round had been decided without it
``falseticker`` its interval missed the one a majority agreed on
``refused``     its reply was refused: a sanity check, the gate, or authentication
``kod``         it sent a Kiss-o'-Death, and is left alone for a while
``unreachable`` no usable reply in the last eight rounds (reach 0): asked once a
                round, never retried, until it answers
``failing``     no reply in its newest round, but reachable in the eight before
``unknown``     in no round yet
=============== ===================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from workers.contracts import KOD_PREFIX

from .counting import NO_REPLY_REASONS
from .outcomes import Quality, ServerStatus


class ServerState(StrEnum):
    OK = "ok"
    LATE = "late"
    FALSETICKER = "falseticker"
    REFUSED = "refused"
    KOD = "kod"
    UNREACHABLE = "unreachable"
    FAILING = "failing"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Reach:
    """chrony's reach register: bit 0 the newest round, 1 where the server gave a usable reply."""

    register: int
    rounds: int  # rounds shifted in, up to 8

    #: Rounds of misses after which a server is unreachable (the register is a byte).
    SIZE = 8

    @classmethod
    def decode(cls, value: int) -> Reach:
        return cls(value % 256, min(cls.SIZE, value // 256))

    @classmethod
    def registers(cls, raw: dict) -> dict[str, Reach]:
        """A node's reach hash as Redis returns it (text: :func:`workers.redisurl.connect`): server -> register."""
        return {k: cls.decode(int(v)) for k, v in raw.items()}

    @property
    def unreachable(self) -> bool:
        """Eight rounds without a usable reply: probed once a round, without retries, until it answers."""
        return self.rounds >= self.SIZE and self.register == 0


def state_of(entry: dict[str, Any] | None, reach: Reach | None) -> ServerState:
    """The state of one server from its entry in its newest round and its reach register."""
    if entry is None:
        return ServerState.UNKNOWN
    status = entry["status"]
    if status in (ServerStatus.CHOSEN, ServerStatus.COMBINED, ServerStatus.ACCEPTED):
        return ServerState.OK
    if status == ServerStatus.FALSETICKER:
        return ServerState.FALSETICKER
    if status == ServerStatus.REJECTED:
        return ServerState.REFUSED
    if status == ServerStatus.LATE and entry.get("sample"):
        return ServerState.LATE
    reason = entry.get("reason")
    # A kiss, or staying away after one: every such reason is ``kod_...``.
    if entry.get("kiss_code") or str(reason or "").startswith(KOD_PREFIX):
        return ServerState.KOD
    if reason is not None and reason not in NO_REPLY_REASONS:
        return ServerState.REFUSED  # a reply came, and a check refused it
    if reach is not None and reach.unreachable:
        return ServerState.UNREACHABLE
    return ServerState.FAILING


def report(node: str, servers: list[str], records: list[dict[str, Any]],
           reach: dict[str, Reach], *, now: float) -> dict[str, Any]:
    """``{"node", "servers": [...], "reachable", "majority"}`` from ``records`` (oldest first).

    ``reach``: server -> its register.  Each server's entry:
    ``server``, ``state``, ``reach`` (0-255), ``rounds`` (of the register
    filled, up to 8), ``offset_s``, ``delay_s``, ``uncertainty_s`` (its last
    usable sample, or ``None``), ``last_good_at`` and ``last_good_age_s`` (when
    that sample's round finished), ``failures`` (reason -> attempts that failed
    with it, over ``records``) and ``rounds_seen``.
    """
    newest: dict[str, dict] = {}
    last_good: dict[str, tuple[dict, float]] = {}
    failures: dict[str, dict[str, int]] = {name: {} for name in servers}
    seen: dict[str, int] = {name: 0 for name in servers}
    for record in records:
        for entry in record["servers"]:
            name = entry["server"]
            if name not in failures:
                continue  # no longer configured
            seen[name] += 1
            if record["quality"] == Quality.OUTAGE:
                pass  # asked no server (or none could be reached): says nothing of any, as its reach bit
            elif entry["status"] != ServerStatus.LATE or entry.get("sample") or entry.get("reason"):
                newest[name] = entry
            if entry.get("sample"):
                last_good[name] = (entry["sample"], record["finished_at"])
            for attempt in entry.get("history", []):
                if attempt.get("reason"):
                    failures[name][attempt["reason"]] = failures[name].get(attempt["reason"], 0) + 1
    out = []
    for name in servers:
        register = reach.get(name)
        sample, at = last_good.get(name, (None, None))
        out.append({
            "server": name,
            "state": state_of(newest.get(name), register),
            "reach": register.register if register is not None else 0,
            "rounds": register.rounds if register is not None else 0,
            "offset_s": None if sample is None else sample["offset_s"],
            "delay_s": None if sample is None else sample["delay_s"],
            "uncertainty_s": None if sample is None else sample["uncertainty_s"],
            "last_good_at": at,
            "last_good_age_s": None if at is None else max(0.0, now - at),
            "failures": dict(sorted(failures[name].items())),
            "rounds_seen": seen[name],
        })
    reachable = sum(1 for s in out if s["reach"])
    return {"node": node, "servers": out, "reachable": reachable, "majority": len(servers) // 2 + 1,
            "rounds": len(records)}
