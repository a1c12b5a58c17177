"""What the orchestrator writes and passes through Celery: round qualities, server statuses, round metadata.

``StrEnum``: JSON as plain strings, equal to the strings they decode back to.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from workers.config import Config, ConfigError, NtpSettings, ServiceSettings, ntp_from_mapping, parse_server
from workers.contracts import Reason
from workers.quality import Thresholds


class Quality(StrEnum):
    """How a round ended: which gate its measurement passed, or why there is none."""

    STRICT = "strict"          # passed the configured thresholds
    RELAXED = "relaxed"        # passed only the 2x fallback
    STARVATION = "starvation"  # nothing passed any gate (or no majority agreed)
    OUTLIER = "outlier"        # the temporal filter refused the candidate
    OUTAGE = "outage"          # no server could be asked or reached: the node's worker or path, not NTP
                               # (:func:`outage_of`)


class ClosedBy(StrEnum):
    """Who finished a round (``closed_by`` in its record)."""

    CALLBACK = "callback"  # the chord's callback, with every server's outcome
    DEADLINE = "deadline"  # a closer, at the deadline, with what the tasks had reported
    EARLY = "early"        # the node's worker, once the outcomes in hand decided it (orchestrator.early)


class ServerStatus(StrEnum):
    """One server's part in a round record."""

    CHOSEN = "chosen"             # the one published (``best``) or the primary of a combination
    COMBINED = "combined"         # part of a published combination
    ACCEPTED = "accepted"         # a truechimer that passed the gate in force, not used
    REJECTED = "rejected"         # a truechimer that failed the gate in force
    FALSETICKER = "falseticker"   # its interval misses the one a majority agrees on
    FAILED = "failed"             # no usable reply after every attempt
    LATE = "late"                 # still out when the round was published early; its outcome is in ``late``



#: Failures that say no request reached the server, or none was sent: nobody took the server's task
#: (``no_result``: the worker gone, the node cut off from Redis), it started after the round's
#: deadline (``round_deadline``).  Alone, these make an outage.
NOT_ASKED_REASONS = frozenset({Reason.NO_RESULT, Reason.ROUND_DEADLINE})

#: Failures that are a policy saying "not now", not a server failing: a RATE Kiss-o'-Death (from the
#: server, or from the relay when its per-upstream budget is spent), the back-off that follows it,
#: and the hub's own politeness budget (``politeness_limit``, :mod:`workers.politeness`).  Alone, with
#: the not-asked ones, these make an outage: a policy refusal is not NTP starvation (issue #26).
POLICY_REASONS = frozenset({Reason.KOD_RATE, Reason.KOD_BACKOFF, Reason.POLITENESS_LIMIT})



#: Failures with no reply that, at a host that refused at least once (``port_unreachable``: ICMP says
#: nothing listens there), make every server on that host unasked: a relay or a hub's NTP server down.
SILENT_REASONS = frozenset({Reason.TIMEOUT, Reason.PORT_UNREACHABLE})


def outage_of(servers: list[dict[str, Any]]) -> str | None:
    """Why a round that published nothing is an outage, not NTP starvation; ``None`` if it is starvation.

    ``servers``: the round record's server entries.  An outage is a round in
    which no NTP server was asked, so it says nothing about the servers and
    takes no reach bit.  Every entry ``failed``, and either

    - every attempt's reason is in :data:`NOT_ASKED_REASONS`: no worker took
      the round's tasks, the node was cut off from Redis, or its tasks started
      past the deadline; or
    - every attempt's reason is one of those or a policy refusal
      (:data:`POLICY_REASONS`: RATE, its back-off, the hub's budget); or
    - every server is on one host (the configured name: a relay's ports, or
      the hub), every attempt got no reply (:data:`SILENT_REASONS`, or one of
      the above) and that host answered at least one request with ICMP port
      unreachable: nothing listens there -- the relay or the hub's NTP server
      is down -- and the timeouts beside it are the refusals the kernel's
      ICMP rate limit did not send.

    Servers silent on several hosts (timeouts, socket or name errors) are
    *not* an outage: that is what dead servers, an upstream that blocks NTP or
    misspelt names look like, and those must reach the starvation and
    reachability alerts.  Nor is a host that only times out: a relay that
    runs but cannot forward looks like that (its report and
    ``ChronotickNtpRelayNotForwarding`` say so).
    """
    if not servers:
        return None
    reasons: dict[str, int] = {}
    hosts: set[str] = set()
    for entry in servers:
        if entry.get("sample") or entry.get("status") != ServerStatus.FAILED or entry.get("kiss_code") not in (
                None, "RATE"):
            return None
        # Each attempt's reason, and an advanced-mode burst's refusals before its last request.
        seen = [str(r.get("reason")) for a in entry.get("history", []) for r in [a, *a.get("refusals", [])]]
        known = NOT_ASKED_REASONS | SILENT_REASONS | POLICY_REASONS
        if any(r not in known for r in [str(entry.get("reason")), *seen]):
            return None
        for reason in seen or [str(entry.get("reason"))]:
            reasons[reason] = reasons.get(reason, 0) + 1
        hosts.add(_host_of(str(entry.get("server"))))
    said = ", ".join(f"{reason} x{count}" for reason, count in sorted(reasons.items()))
    if all(reason in NOT_ASKED_REASONS for reason in reasons):
        return f"no server was asked ({said}): no worker took the round's tasks in time"
    if all(reason in NOT_ASKED_REASONS or reason in POLICY_REASONS for reason in reasons):
        return (f"no server was asked beyond its budget ({said}): a policy refusal -- a RATE kiss from the server "
                "or the relay, the back-off after one, or the hub's politeness budget -- not NTP starvation")
    if len(hosts) == 1 and Reason.PORT_UNREACHABLE in reasons and not reasons.keys() & POLICY_REASONS:
        return (f"no server was asked ({said}): nothing listens at {next(iter(hosts))}, the one host every "
                "server is reached through (its relay or NTP server is down)")
    return None


def _host_of(server: str) -> str:
    """The host part of a configured server name (``host[:port]``, ``[v6]:port``, ``nts://...``)."""
    try:
        return parse_server(server).host
    except ConfigError:
        return server


@dataclass(frozen=True)
class RoundMeta:
    """What finishing a round needs: sent to the chord callback, kept with the round while it is open.

    It carries the whole ``clock_measurement.ntp`` section as its YAML mapping
    (:meth:`workers.config.NtpSettings.as_mapping`), validated again on arrival,
    so an option the callback uses needs no key of its own here and no default
    copied by hand.
    """

    round_id: str
    node: str
    dispatched_at: float
    deadline_at: float
    key_prefix: str
    history_length: int
    ntp: NtpSettings
    history_hours: float = ServiceSettings.history_hours  # the service's defaults, not copies of them
    record_detail: str = ServiceSettings.record_detail
    #: A node measured through the hub (issue #26): ``{"node", "max_drift_ppm", "stale_after_s"}`` -- the
    #: hub node whose ``latest`` is the second leg, the drift bound, and when that leg is too old to use.
    hub: dict[str, Any] | None = None
    #: The node's staleness limit (s, 3 of its normal intervals): the temporal filter's window is not
    #: extrapolated over a longer gap (:func:`orchestrator.outliers.judge`'s ``max_gap_s``).
    stale_after_s: float | None = None

    @classmethod
    def for_round(cls, config: Config, *, round_id: str, node: str, dispatched_at: float,
                  deadline_at: float) -> RoundMeta:
        """A round's metadata, every setting from the validated config (``ntp_service`` and ``ntp``)."""
        service = config.service
        hub = config.hub_leg_of(node)
        leg = None if hub is None else {
            "node": hub.node, "max_drift_ppm": hub.max_drift_ppm,
            "stale_after_s": config.stale_after_s(hub.node)}
        return cls(round_id=round_id, node=node, dispatched_at=dispatched_at, deadline_at=deadline_at,
                   key_prefix=service.key_prefix, history_length=service.history_length,
                   history_hours=service.history_hours, record_detail=service.record_detail,
                   ntp=config.for_node(node).ntp, hub=leg,
                   stale_after_s=config.stale_after_s(node))

    @property
    def servers(self) -> list[str]:
        return [s.name for s in self.ntp.servers]

    @property
    def strict(self) -> Thresholds:
        return Thresholds.from_settings(self.ntp)

    def as_dict(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "node": self.node, "dispatched_at": self.dispatched_at,
                "deadline_at": self.deadline_at, "key_prefix": self.key_prefix,
                "history_length": self.history_length, "history_hours": self.history_hours,
                "record_detail": self.record_detail, "hub": self.hub, "stale_after_s": self.stale_after_s,
                "ntp": self.ntp.as_mapping()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundMeta:
        return cls(round_id=data["round_id"], node=data["node"], dispatched_at=data["dispatched_at"],
                   deadline_at=data["deadline_at"], key_prefix=data["key_prefix"],
                   history_length=data["history_length"], history_hours=data["history_hours"],
                   record_detail=data["record_detail"], hub=data.get("hub"), stale_after_s=data.get("stale_after_s"),
                   ntp=ntp_from_mapping(data["ntp"], source=f"round {data['round_id']}"))
