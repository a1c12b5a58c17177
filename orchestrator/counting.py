"""Counting: what one round adds to its node's counters and round-time histogram.  Pure.

The ``stats`` hash (and its ``rejected:<reason>`` / ``failed:<reason>`` fields),
the ``round_duration`` histogram, ``chronotick-ntp status`` (:mod:`orchestrator.targets`)
and the exporter all count with these, so every view of a node agrees.
"""

from __future__ import annotations

from workers.contracts import Reason

from .outcomes import ClosedBy, ServerStatus

#: Counters every node's stats hash has (zero until first counted).  ``queries`` counts attempts and
#: ``requests`` the request packets they sent (an advanced-mode attempt is a burst): see docs/contract.md.
#: ``starvation`` is NTP starvation only; ``outage`` counts rounds no server could be asked or reached in
#: (:func:`orchestrator.outcomes.outage_of`), apart.
COUNTERS = ("rounds", "strict", "relaxed", "starvation", "outlier", "outage", "queries", "requests", "retries",
            "replies", "rejected", "falsetickers", "early", "late")

#: Upper bounds of the round-time histogram (s): around ChronoTick's targets,
#: 500 ms on average and 2 s at p99, and up to a whole retry schedule.
ROUND_DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

#: Attempt failures before any request left: no name, no NTS keys, the worker's own error (taken as
#: before the send), a job for another node, or a server the worker kept away from.  A ``socket_error``
#: counts as sent: the kernel refused the packet or reported its answer (ICMP), and a record cannot tell which.
NO_REQUEST_REASONS = frozenset({Reason.DNS_ERROR, Reason.NTS_KE_FAILED, Reason.QUERY_ERROR, Reason.ROUND_DEADLINE,
                                Reason.NO_RESULT, Reason.WRONG_NODE, Reason.KOD_BACKOFF, Reason.KOD_DEMOBILISED,
                                Reason.POLITENESS_LIMIT})

#: Attempt failures that are not a reply we refused: nothing came back, whether or not a request left.
NO_REPLY_REASONS = NO_REQUEST_REASONS | {Reason.TIMEOUT, Reason.SOCKET_ERROR, Reason.PORT_UNREACHABLE}


def duration_fields(duration_s: float) -> list[str]:
    """The round-time histogram fields one round of ``duration_s`` increments (cumulative)."""
    return [f"le:{bound:g}" for bound in ROUND_DURATION_BUCKETS_S if duration_s <= bound] + ["count"]


def round_counters(record: dict) -> dict[str, int]:
    """What one round adds to its node's stats hash.

    ``queries`` counts attempts (each try of a server: one request in simple
    mode, a burst of ``advanced_samples`` in advanced mode), ``retries`` the
    attempts after a server's first, ``requests`` the request packets sent,
    ``replies`` the reply packets received (refused ones included), ``rejected``
    the replies refused -- by a sanity check, or by the gate in force in
    selection.  ``status`` and the exporter's rates use exactly these:
    retries / queries, rejected / replies.
    """
    counts = {"rounds": 1, record["quality"]: 1, "queries": 0, "requests": 0, "retries": 0, "replies": 0,
              "rejected": 0}
    if record.get("closed_by") == ClosedBy.EARLY:
        counts["early"] = 1  # published before every server had answered
    for server in record["servers"]:
        _count_server(server, counts)
    return counts


def late_counters(entries: list[dict]) -> dict[str, int]:
    """What a round published early adds when its late servers' outcomes come (``late``: how many).

    With :func:`round_counters` of the published record, every request the
    round sent is counted once: the late servers had none in it.
    """
    counts = {"late": len(entries), "queries": 0, "requests": 0, "retries": 0, "replies": 0}
    for entry in entries:
        _count_server(entry, counts)
        if entry.get("reason"):  # a late server that failed: counted as a failure, by reason
            key = f"failed:{entry['reason']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _count_server(server: dict, counts: dict[str, int]) -> None:
    attempts = server["attempts"]
    counts["queries"] += attempts
    counts["retries"] += max(0, attempts - 1)
    for attempt in server.get("history", []):
        # An attempt's own outcome, then (advanced mode) the samples of its burst refused before it.
        for reason in [attempt.get("reason"), *(r["reason"] for r in attempt.get("refusals", ()))]:
            # The attempt that produced the sample received samples_taken replies (advanced mode: a burst),
            # to as many requests; every other exchange of the attempt is one request, if one left.
            exchanges = (server.get("sample") or {}).get("samples_taken", 1) if reason is None else 1
            if reason not in NO_REQUEST_REASONS:
                counts["requests"] += exchanges
            if reason in NO_REPLY_REASONS:
                continue
            counts["replies"] += exchanges
            if reason:
                counts["rejected"] = counts.get("rejected", 0) + 1
                counts[f"rejected:{reason}"] = counts.get(f"rejected:{reason}", 0) + 1
    if server["status"] == ServerStatus.FALSETICKER:
        counts["falsetickers"] = counts.get("falsetickers", 0) + 1
    if server["status"] == ServerStatus.REJECTED:
        counts["rejected"] = counts.get("rejected", 0) + 1
        key = f"rejected:{server['reason']}"
        counts[key] = counts.get(key, 0) + 1
    if server["status"] == ServerStatus.FAILED:
        key = f"failed:{server['reason']}"
        counts[key] = counts.get(key, 0) + 1
