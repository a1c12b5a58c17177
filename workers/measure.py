"""One measurement attempt against one server, as a query task performs it.

A *job* is the plain-JSON description of what to measure (it is the query
task's argument, so Flower shows it).  :func:`attempt` runs one attempt of a
job: resolve the name within a bounded time, take one sample (``simple``) or a
short burst keeping the minimum-delay sample (``advanced``: RFC 5905's
clock-filter idea, since the lowest-delay exchange is the one least disturbed
by queueing), and check the result against the loosest gate that could still
publish it.  Whether and when an attempt is retried is :mod:`workers.retry`'s
to say, and the task's to do.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout

from . import inflight
from .contracts import Reason, SampleDict
from .ntp import client, packet, sanity
from .ntp.client import QueryFailed
from .ntp.sanity import Rejection
from .retry import ADVANCED_SAMPLE_SPACING_S, RetryPolicy


class BurstFailed(QueryFailed):
    """An attempt failed; ``earlier`` are the refusals of its burst before the last one (advanced mode)."""

    def __init__(self, rejection: Rejection, earlier: list[Rejection]):
        super().__init__(rejection)
        self.earlier = list(earlier)


# getaddrinfo cannot be interrupted; it runs here so a hung resolver costs
# a thread, not the task's time budget.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ntp-dns")

#: Threads for the exchanges of advanced-mode bursts: every server's whole burst of a round at once.
BURST_THREADS = 128

#: A burst stops waiting for a request this many times its best delay so far (plus the hold allowance)
#: after it was sent: a slower reply could not be its sample (chrony's ``maxdelayratio`` idea).
BURST_DELAY_RATIO = 4.0

_burst_pool = ThreadPoolExecutor(max_workers=BURST_THREADS, thread_name_prefix="ntp-burst")


def make_job(*, server, node: str, round_id: str, ntp, deadline_at: float, rate_backoff_s: float,
             report_to: str | None = None, key_prefix: str = "", retry: bool = True) -> dict:
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
        How long a server that sent a RATE kiss is left alone (:func:`workers.retry.rate_backoff_for`).
    report_to:
        The Redis hash the task writes its outcome to, for whoever closes the
        round if its callback never comes (the orchestrator names it; none:
        not reported).
    key_prefix:
        The service's key prefix: with node and round id, the round's name in the worker
        (:mod:`workers.inflight`).
    retry:
        ``False`` for a server unreachable for eight rounds (its reach register is 0): probed
        as :meth:`workers.retry.RetryPolicy.probe` says, one request a round, not retried.
    """
    policy = RetryPolicy.from_settings(ntp, rate_backoff_s=rate_backoff_s)
    return {
        "server": server.name,
        "host": server.host,
        "port": server.port,
        "node": node,
        "round_id": round_id,
        **(policy if retry else policy.probe()).as_job(),  # timeout_s, samples, retry_waits_s, rate_backoff_s
        "deadline_at": deadline_at,
        "max_root_delay_s": ntp.max_root_delay,
        "max_root_dispersion_s": ntp.max_root_dispersion,
        "config_id": ntp.config_id,
        "nts": server.nts,
        "nts_ca_file": ntp.nts_ca_file if server.nts else None,
        "report_to": report_to,
        "key_prefix": key_prefix,
    }


def attempt(job: dict, *, on_exchange: Callable[[int], None] | None = None,
            on_done: Callable[[int, float | None], None] | None = None) -> SampleDict:
    """Run one attempt; return the accepted sample as a dict.

    ``on_exchange(i)`` is called just before the ``i``-th request is sent and
    ``on_done(i, delay_s)`` when it is over (``None``: no usable reply): how
    the worker knows which requests are out, and since when (:mod:`workers.inflight`).

    An advanced-mode burst sends its requests :data:`ADVANCED_SAMPLE_SPACING_S`
    apart whether or not the earlier ones were answered (as chrony's burst
    does), so a lost one costs the burst nothing; and since it keeps its
    minimum-delay sample, a request out :data:`BURST_DELAY_RATIO` times the
    best delay so far is given up (``timeout``, or what it set aside).

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
        address = None
    else:
        address = _resolve(job["host"], job["port"], timeout_s=job["timeout_s"])

    burst = _Burst()

    def one(i: int, protected, where) -> client.Sample:
        if on_exchange is not None:
            on_exchange(i)
        sent_at = time.monotonic()
        delay_s = None
        try:
            sample = client.exchange(
                job["server"], *where, timeout_s=job["timeout_s"],
                max_root_delay_s=job.get("max_root_delay_s", sanity.DEFAULT_MAX_ROOT_S),
                max_root_dispersion_s=job.get("max_root_dispersion_s", sanity.DEFAULT_MAX_ROOT_S),
                nts=protected, give_up_at=(lambda: burst.give_up_at(sent_at)) if job["samples"] > 1 else None)
            delay_s = sample.delay_s
            burst.taken(delay_s)
            return sample
        finally:
            if on_done is not None:
                on_done(i, delay_s)

    def request(i: int):
        """What the ``i``-th exchange sends, and where (an NTS request is prepared here, in order)."""
        if association is None:
            return None, address
        protected, ntp_address = _nts_request(association, job["timeout_s"])
        return protected, _resolve(*ntp_address, timeout_s=job["timeout_s"])

    if job["samples"] == 1:
        try:
            return _best_of([one(0, *request(0))])
        except QueryFailed as exc:
            raise BurstFailed(exc.rejection, []) from None
    return _run_burst(job, request, one)


class _Burst:
    """A burst's best delay so far, shared by its exchanges' threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.best_delay_s: float | None = None

    def taken(self, delay_s: float) -> None:
        with self._lock:
            self.best_delay_s = delay_s if self.best_delay_s is None else min(self.best_delay_s, delay_s)

    def give_up_at(self, sent_at: float) -> float | None:
        """When a request sent at ``sent_at`` is no longer worth waiting for (``None``: no sample yet).

        The burst keeps its minimum-delay sample: a reply slower than :data:`BURST_DELAY_RATIO` times
        the best could not be kept and would add only its offset to the burst's jitter.
        """
        best = self.best_delay_s
        return None if best is None else sent_at + BURST_DELAY_RATIO * best + inflight.HOLD_ALLOWANCE_S


def _run_burst(job: dict, request, one) -> SampleDict:
    """An advanced-mode attempt: ``samples`` exchanges, one spacing apart, in :data:`_burst_pool`."""
    samples: list[client.Sample] = []
    refusals: list[Rejection] = []
    pending: set[Future] = set()

    def collect(done) -> None:
        for future in done:
            pending.discard(future)
            try:
                samples.append(future.result())
            except QueryFailed as exc:
                if exc.rejection.kiss_code:
                    raise BurstFailed(exc.rejection, refusals) from None  # a kiss: no more packets this attempt
                refusals.append(exc.rejection)

    next_at = time.monotonic()
    for i in range(job["samples"]):
        while (remaining := next_at - time.monotonic()) > 0:  # answers that come while the burst is sent
            if not pending:
                time.sleep(remaining)
                break
            done, _ = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
            collect(done)
        try:
            protected, where = request(i)
        except QueryFailed as exc:
            refusals.append(exc.rejection)
            next_at = time.monotonic() + ADVANCED_SAMPLE_SPACING_S
            continue
        pending.add(_burst_pool.submit(one, i, protected, where))
        next_at = time.monotonic() + ADVANCED_SAMPLE_SPACING_S
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        collect(done)
    # Sent in order, answered in any: the record keeps them in the order they were sent.
    samples.sort(key=lambda s: s.t1_ns)
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


def _best_of(samples: list[client.Sample]) -> SampleDict:
    """The minimum-delay sample, its uncertainty widened by the burst's jitter.

    Jitter is RFC 5905's: the RMS of the other samples' offsets from the
    chosen one.  ``spread_s`` (max - min offset) is reported as ChronoTick did.
    """
    best = min(samples, key=lambda s: s.delay_s)
    result = best.as_dict()
    others = [s.offset_s - best.offset_s for s in samples if s is not best]
    jitter_s = math.sqrt(sum(d * d for d in others) / len(others)) if others else 0.0
    offsets = [s.offset_s for s in samples]
    result["samples_taken"] = len(samples)
    result["burst_delays_s"] = [s.delay_s for s in samples]
    result["jitter_s"] = jitter_s
    result["spread_s"] = max(offsets) - min(offsets)
    result["uncertainty_s"] = best.uncertainty_s + jitter_s
    return result


def _resolve(host: str, port: int, *, timeout_s: float) -> tuple[int, tuple]:
    try:  # an address literal needs no resolver and no thread
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, socket.IPPROTO_UDP,
                                   socket.AI_NUMERICHOST)
        return infos[0][0], infos[0][4]
    except socket.gaierror:
        pass
    except UnicodeError as exc:  # an empty or over-long label: no resolver can answer it
        raise QueryFailed(Rejection(Reason.DNS_ERROR, f"cannot resolve {host!r}: {exc}")) from None
    future = _resolver.submit(client.resolve, host, port)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        raise QueryFailed(Rejection(Reason.DNS_ERROR,
                                    f"resolving {host!r} took longer than {timeout_s} s")) from None
