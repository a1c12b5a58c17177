"""One measurement attempt against one server, as a query task performs it.

A *job* is the plain-JSON description of what to measure (it is the query
task's argument, so Flower shows it).  :func:`attempt` runs one attempt of a
job: resolve the name within a bounded time, take one sample (``simple``) or a
short burst keeping the minimum-delay sample (``advanced``: RFC 5905's
clock-filter idea, since the lowest-delay exchange is the one least disturbed
by queueing), and check the result against the loosest gate that could still
publish it.  Retrying is the task's business, not this module's.
"""

from __future__ import annotations

import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from .contracts import Reason
from .ntp import client, packet, sanity
from .ntp.client import QueryFailed
from .ntp.sanity import Rejection

#: Pause between the samples of an advanced-mode burst (ChronoTick used 0.1 s).
ADVANCED_SAMPLE_SPACING_S = 0.1

#: The reason when an attempt failed in a way no other reason names (a bug, or input no check
#: foresaw): the task still ends with an outcome, so the round's chord still calls back.
REASON_QUERY_ERROR = Reason.QUERY_ERROR

#: The reason when the round's deadline leaves no time for another attempt.
REASON_ROUND_DEADLINE = Reason.ROUND_DEADLINE

class BurstFailed(QueryFailed):
    """An attempt failed; ``earlier`` are the refusals of its burst before the last one (advanced mode)."""

    def __init__(self, rejection: Rejection, earlier: list[Rejection]):
        super().__init__(rejection)
        self.earlier = list(earlier)


# getaddrinfo cannot be interrupted; it runs here so a hung resolver costs
# a thread, not the task's time budget.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ntp-dns")


def make_job(*, server, node: str, round_id: str, ntp, deadline_at: float, rate_backoff_s: float,
             report_to: str | None = None) -> dict:
    """Describe one server's part of a round as plain JSON.

    Parameters
    ----------
    server:
        A :class:`workers.config.ServerAddress`.
    node:
        The node being measured (the queue the task goes to).
    round_id:
        The round this job belongs to.
    ntp:
        The :class:`workers.config.NtpSettings` in force.
    deadline_at:
        Unix time after which no attempt may start.
    rate_backoff_s:
        How long a server that sent a RATE kiss is left alone (see :mod:`workers.kod`).
    report_to:
        The Redis hash the task writes its outcome to, for whoever closes the
        round if its callback never comes (the orchestrator names it; none:
        not reported).
    """
    return {
        "server": server.name,
        "host": server.host,
        "port": server.port,
        "node": node,
        "round_id": round_id,
        "timeout_s": ntp.timeout_seconds,
        "samples": samples_per_attempt(ntp),
        "retry_waits_s": list(ntp.retry_waits_s),
        "deadline_at": deadline_at,
        "max_root_delay_s": ntp.max_root_delay,
        "max_root_dispersion_s": ntp.max_root_dispersion,
        "config_id": ntp.config_id,
        "nts": server.nts,
        "nts_ca_file": ntp.nts_ca_file if server.nts else None,
        "rate_backoff_s": rate_backoff_s,
        "report_to": report_to,
    }


def samples_per_attempt(ntp) -> int:
    """Exchanges per attempt: ``advanced_samples`` in advanced mode, else one."""
    return ntp.advanced_samples if ntp.measurement_mode == "advanced" else 1


def attempt_budget_s(*, timeout_s: float, samples: int) -> float:
    """The longest one attempt can take: a DNS look-up and ``samples`` exchanges, each up to ``timeout_s``."""
    return timeout_s * (samples + 1) + ADVANCED_SAMPLE_SPACING_S * (samples - 1)


def attempt(job: dict) -> dict:
    """Run one attempt; return the accepted sample as a dict.

    Raises
    ------
    QueryFailed
        With the named reason (DNS, timeout, a rejected reply).  A reply
        over the quality gates is returned like any other: the gates judge
        after the vote.
    """
    association = None
    if job.get("nts"):
        from .ntp import nts  # cryptography and pyOpenSSL only where NTS is used

        association = nts.association(job["host"], job["port"], ca_file=job.get("nts_ca_file"))
    else:
        family, sockaddr = _resolve(job["host"], job["port"], timeout_s=job["timeout_s"])
    samples: list[client.Sample] = []
    refusals: list[Rejection] = []
    for i in range(job["samples"]):
        if i:
            time.sleep(ADVANCED_SAMPLE_SPACING_S)
        try:
            protected = None
            if association is not None:
                protected, ntp_address = _nts_request(association, job["timeout_s"])
                family, sockaddr = _resolve(*ntp_address, timeout_s=job["timeout_s"])
            samples.append(client.exchange(
                job["server"], family, sockaddr, timeout_s=job["timeout_s"],
                max_root_delay_s=job.get("max_root_delay_s", sanity.DEFAULT_MAX_ROOT_S),
                max_root_dispersion_s=job.get("max_root_dispersion_s", sanity.DEFAULT_MAX_ROOT_S),
                nts=protected))
        except QueryFailed as exc:
            if exc.rejection.kiss_code:
                raise BurstFailed(exc.rejection, refusals) from None  # a kiss: no more packets this attempt
            refusals.append(exc.rejection)
    if not samples:
        raise BurstFailed(refusals[-1], refusals[:-1])
    result = _best_of(samples)
    if refusals:
        # Refused samples of a burst that still produced one: on the record, and counted.
        result["refusals"] = [{"reason": r.reason, "detail": r.detail} for r in refusals]
    # No quality gate here: every reply that passed RFC 5905's tests votes in the falseticker
    # rejection, and only then do the gates judge (orchestrator.selection).  A slow honest reply
    # dropped here would leave a quick liar the majority.
    return result


def _nts_request(association, timeout_s: float) -> tuple[client.NtsRequest, tuple[str, int]]:
    """A protected request and where NTS-KE said to send it; ``nts_ke_failed`` as a refusal."""
    from .ntp import nts

    header, transmit = packet.make_request()
    try:
        request, unique_id, s2c, ntp_address = association.prepare(header, timeout_s=timeout_s)
    except nts.NtsError as exc:
        raise QueryFailed(Rejection(exc.reason, exc.detail)) from None
    return client.NtsRequest(request, transmit, unique_id, s2c, association), ntp_address


def _best_of(samples: list[client.Sample]) -> dict:
    """The minimum-delay sample, its uncertainty widened by the burst's jitter.

    Jitter is RFC 5905's: the RMS of the other samples' offsets from the
    chosen one.  ``spread_s`` (max - min offset) is reported as ChronoTick did.
    """
    best = min(samples, key=lambda s: s.delay_s)
    result = best.as_dict()
    others = [s.offset_s - best.offset_s for s in samples if s is not best]
    jitter_s = math.sqrt(sum(d * d for d in others) / len(others)) if others else 0.0
    offsets = [s.offset_s for s in samples]
    result.update(
        samples_taken=len(samples),
        burst_delays_s=[s.delay_s for s in samples],
        jitter_s=jitter_s,
        spread_s=max(offsets) - min(offsets),
        uncertainty_s=best.uncertainty_s + jitter_s,
    )
    return result


def _resolve(host: str, port: int, *, timeout_s: float) -> tuple[int, tuple]:
    try:  # an address literal needs no resolver and no thread
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, socket.IPPROTO_UDP,
                                   socket.AI_NUMERICHOST)
        return infos[0][0], infos[0][4]
    except socket.gaierror:
        pass
    except UnicodeError as exc:  # an empty or over-long label: no resolver can answer it
        raise QueryFailed(Rejection(sanity.REASON_DNS_ERROR, f"cannot resolve {host!r}: {exc}")) from None
    future = _resolver.submit(client.resolve, host, port)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        raise QueryFailed(Rejection(sanity.REASON_DNS_ERROR,
                                    f"resolving {host!r} took longer than {timeout_s} s")) from None
