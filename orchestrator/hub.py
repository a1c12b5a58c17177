"""Two legs through the hub: a node's offset to UTC is its LAN leg composed with the hub's (issue #26).

With ``ntp_service.hub`` the head node measures the public servers for the
whole cluster and serves its own clock on the LAN (chronyd, ``chronotick-ntp
hub``); every other node measures only that LAN server.  This is the NTP
hierarchy (RFC 5905 section 3: a stratum-n+1 client of a stratum-n server)
made explicit, so that each leg's error can be told apart:

    node -> hub   the node's LAN round: o_lan = hub clock - node clock, bound u_lan
                  (half the LAN round trip plus chronyd's dispersion: sub-millisecond)
    hub  -> UTC   the hub node's latest round: o_hub = UTC - hub clock, bound u_hub
                  (half a WAN round trip: 10-50 ms), measured age_s before

    offset       = o_lan + o_hub
    uncertainty  = u_lan + u_hub + max_drift * apart_s

The last term is RFC 5905's PHI: the hub's clock may have drifted between
its sample and the node's at the drift bound (15 ppm by default), so the
truth stays inside the bound however old the hub's round is, up to its
staleness limit, past which nothing is published.  ``apart_s`` is read on
the *hub's* clock, the one both samples can be put on: the hub's sample at
its ``measured_at``, the node's at its own ``measured_at`` plus its LAN
offset (node clock + (hub clock - node clock)) -- never one host's clock
against another's.  It is at least the leg's age on Redis' clock (a round
finished later than its sample).  Bounds add (they are worst cases, not
variances).

Node-to-node time needs only the LAN legs: node a's clock minus node b's is
``o_lan(b) - o_lan(a)``, the hub's leg cancelling, bounded by the two LAN
bounds plus both clocks' drift over the time between the two measurements
(:func:`relative`).  Against the hub node itself there is no second LAN leg:
its clock *is* the hub's.

Pure: no Redis, no Celery (the reader uses :func:`relative`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.config import HubSettings

#: ppm as a fraction.
PPM = 1e-6
#: How near a leap second two samples' UTC times may come before a leg is refused across it (s): their
#: times are known to the legs' bounds, far under this.
LEAP_MARGIN_S = 1.0
#: RFC 5905's PHI, the frequency tolerance (ppm): ``ntp_service.hub.max_drift_ppm``'s default.
DEFAULT_MAX_DRIFT_PPM: float = HubSettings.max_drift_ppm


@dataclass(frozen=True)
class Composed:
    """A node's published offset through the hub, and what each leg contributed (the record's ``legs``)."""

    offset_s: float
    uncertainty_s: float
    legs: dict[str, Any]


def hub_age_s(hub_latest: Mapping[str, Any], now: float) -> float:
    """How old the hub's measurement is at ``now`` (Redis' clock), never less than the truth.

    ``now - published_at`` is on Redis' clock alone; the round's own length
    (``published_at - measured_at``, the head's clock against Redis', both on
    the head) is added, so the age covers the whole time since the sample.
    """
    published = float(hub_latest["published_at"])
    return max(0.0, now - published) + max(0.0, published - float(hub_latest["measured_at"]))


def compose(*, lan_offset_s: float, lan_uncertainty_s: float, lan_measured_at: float, lan_round_id: str,
            lan_server: str, hub_node: str, hub_latest: Mapping[str, Any] | None, now: float, max_drift_ppm: float,
            stale_after_s: float, leap_seconds: Sequence[float] = (), stepping: bool = True) -> Composed | str:
    """The node's offset to UTC through the hub, or why there is none (a sentence).

    ``lan_measured_at``: the LAN sample's time on the node's own clock.
    ``hub_latest``: the hub node's ``latest`` (``None``: it has none).  A hub
    measurement older than ``stale_after_s`` (Redis' clock) is not used: the
    node publishes nothing rather than a bound grown past what its consumers
    expect.  The drift term covers the larger of that age and the time
    between the two samples on the hub's clock (the module's docstring),
    padded by the LAN leg's own error in that time (``lan_uncertainty_s``)
    and by the hub clock's rate over it.

    **A leap second between the two samples** (``stepping``: UTC steps; a
    smeared timescale does not) makes the hub's leg wrong by a whole second:
    neither clock (chronyd ``-x`` serves the head's clock as it is) nor the
    leg has stepped with UTC.  So a leg is not used across one -- from
    ``leap_seconds`` (Unix times, the ``leap-seconds.list`` instants), or, as
    the hub's own reply says, when its leap indicator announces one and the
    two samples lie on different UTC days -- until the hub measures again.
    """
    if hub_latest is None:
        return f"no hub leg: the hub node {hub_node} has no measurement of UTC"
    try:
        age_s = hub_age_s(hub_latest, now)
        hub_offset_s = float(hub_latest["offset"])
        hub_uncertainty_s = float(hub_latest["uncertainty"])
        # Both samples on the hub's clock: the node's LAN sample is node clock + (hub clock - node clock).
        apart_s = abs(lan_measured_at + lan_offset_s - float(hub_latest["measured_at"]))
    except (KeyError, TypeError, ValueError) as exc:
        return f"no hub leg: the hub node {hub_node}'s latest is unreadable ({type(exc).__name__}: {exc})"
    if stepping:
        t_hub = float(hub_latest["measured_at"]) + hub_offset_s            # the hub's sample, in UTC
        t_lan = lan_measured_at + lan_offset_s + hub_offset_s              # the node's, in UTC
        low, high = min(t_hub, t_lan) - LEAP_MARGIN_S, max(t_hub, t_lan) + LEAP_MARGIN_S
        announced = int(hub_latest.get("leap") or 0) in (1, 2) and int(low // 86400) != int(high // 86400)
        if announced or any(low <= at <= high for at in leap_seconds):
            return (f"no hub leg: a leap second lies between the hub node {hub_node}'s sample and this one; "
                    "the leg is not used across it until the hub measures again")
    if age_s > stale_after_s:
        return (f"no hub leg: the hub node {hub_node}'s measurement of UTC is {age_s:.1f} s old "
                f"(stale after {stale_after_s:g} s)")
    # The gap as read is short by at most the LAN leg's error, and by the hub clock's own rate over it.
    phi = max_drift_ppm * PPM
    drift_s = phi * max(age_s, (apart_s + lan_uncertainty_s) * (1 + 2 * phi))
    legs = {
        "lan": {"round_id": lan_round_id, "server": lan_server, "offset": lan_offset_s,
                "uncertainty": lan_uncertainty_s},
        "hub": {"node": hub_node, "round_id": hub_latest.get("round_id"), "offset": hub_offset_s,
                "uncertainty": hub_uncertainty_s, "measured_at": hub_latest.get("measured_at"),
                "age": age_s, "apart": apart_s, "drift": drift_s, "leap": hub_latest.get("leap", 0)},
    }
    return Composed(offset_s=lan_offset_s + hub_offset_s,
                    uncertainty_s=lan_uncertainty_s + hub_uncertainty_s + drift_s, legs=legs)


@dataclass(frozen=True)
class Relative:
    """Node ``node``'s clock against ``reference``'s: ``offset_to_reference`` = reference clock - node clock."""

    node: str
    reference: str
    offset_to_reference: float
    uncertainty: float
    measured_at: float

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "offset_to_reference": self.offset_to_reference,
                "uncertainty": self.uncertainty, "measured_at": self.measured_at}


def lan_leg(latest: Mapping[str, Any], *, hub_node: str | None) -> tuple[float, float, float]:
    """``(offset, uncertainty, when)`` of a node's clock against the hub's, from its ``latest``.

    ``when`` is the sample's time on the hub's clock (the node's ``measured_at`` plus its LAN offset), so
    two nodes' samples compare on one clock.  A node measured through the hub: its LAN leg.  The hub node:
    exactly 0, at its own ``measured_at`` (its clock is the hub's).  Raises ``ValueError`` for a ``latest``
    with neither (:func:`relative` then compares offsets to UTC).
    """
    measured_at = float(latest["measured_at"])
    legs = latest.get("legs")
    if isinstance(legs, Mapping) and isinstance(legs.get("lan"), Mapping):
        lan = legs["lan"]
        offset = float(lan["offset"])
        return offset, float(lan["uncertainty"]), measured_at + offset
    if hub_node is not None and latest.get("node") == hub_node:
        return 0.0, 0.0, measured_at
    raise ValueError(f"{latest.get('node')!r} has no LAN leg")


def utc_leg(latest: Mapping[str, Any]) -> tuple[float, float, float]:
    """``(offset, uncertainty, when)`` against UTC: the whole published offset, at its sample's UTC time."""
    offset = float(latest["offset"])
    return offset, float(latest["uncertainty"]), float(latest["measured_at"]) + offset


def hub_node_of(latest: Mapping[str, Any]) -> str | None:
    """The hub node a ``latest`` was measured through (its ``legs``), if any."""
    legs = latest.get("legs")
    if isinstance(legs, Mapping) and isinstance(legs.get("hub"), Mapping):
        node = legs["hub"].get("node")
        return str(node) if node else None
    return None


def relative(node_latest: Mapping[str, Any], reference_latest: Mapping[str, Any], *, hub_node: str | None,
             max_drift_ppm: float) -> Relative:
    """Node's clock against the reference's, bounded by the two LAN legs plus their time apart.

    offset_to_reference = reference clock - node clock = o_lan(node) - o_lan(reference)
    (each ``o_lan`` = hub clock - that node's clock).  The two legs were
    measured some time apart -- on the hub's clock, where both can be put
    (:func:`lan_leg`), never one node's clock against another's -- and over
    that time both clocks may drift at the bound, so the bound grows by twice
    ``max_drift`` times it.  Against the hub node (its leg is exactly 0)
    nothing grows: the node's LAN leg *is* its clock against the hub's, at
    the node's ``measured_at``, the time the result is stated at.  When either
    has no LAN leg (no hub, or a node measured before it had one), both are
    compared against UTC instead, with their whole (WAN-sized) bounds: never a
    hub-based offset against a UTC-based one.
    """
    node = str(node_latest.get("node"))
    reference = str(reference_latest.get("node"))
    if node == reference:
        return Relative(node, reference, 0.0, 0.0, float(node_latest["measured_at"]))
    hub_node = hub_node or hub_node_of(node_latest) or hub_node_of(reference_latest)
    try:
        o_n, u_n, t_n = lan_leg(node_latest, hub_node=hub_node)
        o_r, u_r, t_r = lan_leg(reference_latest, hub_node=hub_node)
    except ValueError:
        (o_n, u_n, t_n), (o_r, u_r, t_r) = utc_leg(node_latest), utc_leg(reference_latest)
    phi = max_drift_ppm * PPM
    # The gap as read is short by at most the two legs' errors, and by the hub clock's own rate over it.
    apart_s = 0.0 if reference == hub_node else (abs(t_n - t_r) + u_n + u_r) * (1 + 2 * phi)
    drift_s = 2 * phi * apart_s
    return Relative(node, reference, o_n - o_r, u_n + u_r + drift_s, float(node_latest["measured_at"]))


def relative_series(node_latests: list[Mapping[str, Any]], reference_latests: list[Mapping[str, Any]], *,
                    hub_node: str | None, max_drift_ppm: float) -> list[Relative]:
    """A node's clock against the reference's over time: each of the node's published measurements (oldest
    first) against the reference's nearest one in time (on the hub's clock, :func:`lan_leg`), by
    :func:`relative` -- so each point's bound is its two legs plus their drift over the time between them.
    Against the hub node every point is the node's LAN leg alone."""
    if not node_latests or not reference_latests:
        return []
    hub_node = hub_node or hub_node_of(node_latests[-1]) or hub_node_of(reference_latests[-1])

    def when(latest: Mapping[str, Any]) -> float:
        try:
            return lan_leg(latest, hub_node=hub_node)[2]
        except ValueError:
            return utc_leg(latest)[2]

    references = sorted(reference_latests, key=when)
    times = [when(r) for r in references]
    out = []
    for latest in node_latests:
        t = when(latest)
        i = min(range(len(times)), key=lambda k: abs(times[k] - t))
        out.append(relative(latest, references[i], hub_node=hub_node, max_drift_ppm=max_drift_ppm))
    return out
