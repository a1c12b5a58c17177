"""When a server is asked again: the one retry policy of the query task, the round, the tracker and the early decider.

A :class:`RetryPolicy` is built once from ``clock_measurement.ntp``
(:meth:`RetryPolicy.from_settings`), travels in each job (:meth:`RetryPolicy.as_job`,
:meth:`RetryPolicy.from_job`) and answers every question about asking a server again:

* **how many attempts**: ``max_retries`` in total, as in ChronoTick (0 and 1 both mean one);
* **when attempt k starts**: the waits ``retry_delay``, ``2 * retry_delay``, ... separate the attempts'
  *starts*, counted from the first attempt's start -- 0, 5 and 15 s with ChronoTick's 5 s, whatever the
  timeout (:attr:`RetryPolicy.offsets_s`).  An attempt that fails past its successor's place is followed at
  once.  The task computes the countdown itself rather than leave it to Celery's ``retry_backoff``, which
  truncates fractional factors, adds random jitter and counts from the failure;
* **whether a failure is retried**, and if not, by which named rule (:class:`NotRetried`): a reason
  (:meth:`RetryPolicy.rule_for_reason`: a Kiss-o'-Death, a spent politeness budget, ...), the schedule
  being spent, the next attempt not ending by the round's deadline, or the round being published
  (:meth:`RetryPolicy.next_attempt`, :meth:`RetryPolicy.start_refused`);
* **how long a Kiss-o'-Death keeps a server unasked** (RFC 5905 section 7.4, as chrony acts on it):
  :meth:`RetryPolicy.kiss_backoff_s`.

The early decider reads the same answers: a server whose attempt out may be followed by a retry (the policy
said so when it started) or whose retry is to come could still say anything (:mod:`workers.inflight`,
:class:`orchestrator.early.Outstanding`).  Pure: no clock, no I/O; every time is passed in (Redis' clock:
:mod:`workers.redisclock`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

from .contracts import MeasurementMode, Reason, kiss_reason

#: Pause between the requests of an advanced-mode burst (ChronoTick used 0.1 s): part of how long an
#: attempt can take (:attr:`RetryPolicy.attempt_s`); :mod:`workers.measure` sends them this far apart.
ADVANCED_SAMPLE_SPACING_S = 0.1

#: Kiss codes acted on (RFC 5905 section 7.4): RATE -- poll less often; DENY and RSTR -- stop.
#: Others (INIT, STEP, ...) are a rejected reply like any other, and retried.
RATE = "RATE"
DEMOBILISING = frozenset({"DENY", "RSTR"})
ACTED_ON = DEMOBILISING | {RATE}

#: A RATE kiss keeps a server unasked this many normal intervals (chrony adds four poll intervals) ...
RATE_BACKOFF_INTERVALS = 4
#: ... doubled for each further RATE, at most this long (s).
MAX_RATE_BACKOFF_S = 86_400.0


class NotRetried(StrEnum):
    """Why a server is not asked again in its round: one named rule each."""

    #: Every attempt of the schedule was made (``max_retries`` in total).
    LAST_ATTEMPT = "last_attempt"
    #: The next attempt would start after the round's deadline, or could not end by it.
    PAST_DEADLINE = "past_deadline"
    #: The round is published: no reply can change it (a retry already waiting ends without a packet).
    ROUND_DECIDED = "round_decided"
    #: The server sent RATE, DENY or RSTR, or is still kept away after one (RFC 5905 section 7.4).
    KISS_OF_DEATH = "kiss_of_death"
    #: The cluster's budget for this public server is spent (:mod:`workers.politeness`).
    POLITENESS = "politeness"
    #: This worker measures another node: measuring would describe the wrong machine's clock.
    WRONG_NODE = "wrong_node"
    #: No attempt failed: the selection's verdict on a reply that came, or the closer's word for a task that
    #: never reported.
    NOT_A_QUERY_FAILURE = "not_a_query_failure"


#: The reasons a failure is never retried for, whatever the schedule; any other reason (a timeout, a socket
#: or DNS error, a reply refused by RFC 5905's tests, NTS, another kiss code) is retried while it allows.
_RULE_OF_REASON: dict[str, NotRetried] = {
    **{kiss_reason(code): NotRetried.KISS_OF_DEATH for code in ACTED_ON},
    Reason.KOD_BACKOFF: NotRetried.KISS_OF_DEATH,
    Reason.KOD_DEMOBILISED: NotRetried.KISS_OF_DEATH,
    Reason.POLITENESS_LIMIT: NotRetried.POLITENESS,
    Reason.WRONG_NODE: NotRetried.WRONG_NODE,
    Reason.ROUND_DEADLINE: NotRetried.PAST_DEADLINE,
    Reason.NO_RESULT: NotRetried.NOT_A_QUERY_FAILURE,
    Reason.FALSETICKER: NotRetried.NOT_A_QUERY_FAILURE,
    Reason.NOT_AUTHENTICATED: NotRetried.NOT_A_QUERY_FAILURE,
    Reason.OVER_STRICT_THRESHOLDS: NotRetried.NOT_A_QUERY_FAILURE,
    Reason.OVER_RELAXED_THRESHOLDS: NotRetried.NOT_A_QUERY_FAILURE,
    Reason.OTHER_TIMESCALE: NotRetried.NOT_A_QUERY_FAILURE,
}


class RetrySettings(Protocol):
    """What the policy reads of ``clock_measurement.ntp`` (:class:`workers.config.NtpSettings`)."""

    @property
    def max_retries(self) -> int: ...
    @property
    def retry_delay(self) -> float: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def measurement_mode(self) -> str: ...
    @property
    def advanced_samples(self) -> int: ...


def rate_backoff_for(normal_interval_s: float) -> float:
    """A first RATE kiss's back-off (s): :data:`RATE_BACKOFF_INTERVALS` normal measurement intervals."""
    return RATE_BACKOFF_INTERVALS * normal_interval_s


@dataclass(frozen=True)
class Retry:
    """The policy's answer for what follows an attempt: when the next one starts, or the rule that makes none.

    ``starts_at``: the next attempt's start (Unix s on Redis' clock); ``None`` when ``rule`` says why
    there is none.
    """

    starts_at: float | None
    rule: NotRetried | None = None

    @property
    def retried(self) -> bool:
        return self.rule is None

    def countdown_s(self, now: float) -> float:
        """Seconds from ``now`` until the next attempt starts (0: at once, or none)."""
        return 0.0 if self.starts_at is None else max(0.0, self.starts_at - now)

    def given(self, *, round_decided: bool) -> Retry:
        """This answer once the round's state is known: a published round's server is not retried."""
        return Retry(None, NotRetried.ROUND_DECIDED) if self.retried and round_decided else self


@dataclass(frozen=True)
class RetryPolicy:
    """When one server is asked within a round, and again after a Kiss-o'-Death (module doc).

    ``timeout_s``: one exchange's (and one DNS look-up's) limit; ``waits_s``: between the attempts'
    starts, so ``len(waits_s) + 1`` attempts; ``samples``: requests per attempt (an advanced-mode burst:
    several, :data:`ADVANCED_SAMPLE_SPACING_S` apart); ``rate_backoff_s``: how long a first RATE kiss
    keeps the server unasked.
    """

    timeout_s: float
    waits_s: tuple[float, ...] = ()
    samples: int = 1
    rate_backoff_s: float = 0.0

    @classmethod
    def from_settings(cls, ntp: RetrySettings, *, rate_backoff_s: float = 0.0) -> RetryPolicy:
        """The policy of ``clock_measurement.ntp``: ``max(1, max_retries)`` attempts, the waits
        ``retry_delay`` doubled after each, ``advanced_samples`` requests an attempt in advanced mode.
        ``rate_backoff_s``: see :func:`rate_backoff_for` (0: a RATE kiss keeps the server away for no time)."""
        attempts = max(1, ntp.max_retries)
        samples = ntp.advanced_samples if ntp.measurement_mode == MeasurementMode.ADVANCED else 1
        return cls(timeout_s=ntp.timeout_seconds, waits_s=tuple(ntp.retry_delay * 2 ** i for i in range(attempts - 1)),
                   samples=samples, rate_backoff_s=rate_backoff_s)

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> RetryPolicy:
        """The policy a job carries (:meth:`as_job`)."""
        return cls(timeout_s=job["timeout_s"], waits_s=tuple(job["retry_waits_s"]), samples=job["samples"],
                   rate_backoff_s=job.get("rate_backoff_s", 0.0))

    def as_job(self) -> dict[str, Any]:
        """The policy as a job's plain-JSON fields (:func:`workers.measure.make_job`)."""
        return {"timeout_s": self.timeout_s, "samples": self.samples, "retry_waits_s": list(self.waits_s),
                "rate_backoff_s": self.rate_backoff_s}

    def probe(self) -> RetryPolicy:
        """The policy for a server unreachable for eight rounds (its reach register is 0): one request a
        round (no burst), not retried, until it answers again."""
        return replace(self, waits_s=(), samples=1)

    # -- the schedule -----------------------------------------------------------------------------

    @property
    def attempts(self) -> int:
        """Attempts per server and round."""
        return len(self.waits_s) + 1

    @property
    def offsets_s(self) -> list[float]:
        """When each attempt starts, in seconds after the first attempt's start: 0, then the waits' running sums."""
        offsets = [0.0]
        for wait_s in self.waits_s:
            offsets.append(offsets[-1] + wait_s)
        return offsets

    @property
    def attempt_s(self) -> float:
        """The longest one attempt can take: a DNS look-up and ``samples`` exchanges, each up to ``timeout_s``."""
        return self.timeout_s * (self.samples + 1) + ADVANCED_SAMPLE_SPACING_S * (self.samples - 1)

    @property
    def latest_starts_s(self) -> list[float]:
        """The latest each attempt can start after the first one's start, when every attempt before it takes
        its whole :attr:`attempt_s`: what a round's budget must allow for."""
        starts: list[float] = []
        for offset in self.offsets_s:
            starts.append(offset if not starts else max(offset, starts[-1] + self.attempt_s))
        return starts

    @property
    def server_budget_s(self) -> float:
        """How long one server's part of a round may take: every wait and every attempt's worst case."""
        return sum(self.waits_s) + self.attempts * self.attempt_s

    # -- the decisions --------------------------------------------------------------------------------

    @staticmethod
    def rule_for_reason(reason: str) -> NotRetried | None:
        """The rule that keeps a failure with ``reason`` from being retried (``None``: the schedule decides)."""
        return _RULE_OF_REASON.get(reason)

    def start_refused(self, attempt_no: int, *, now: float, deadline_at: float,
                      round_decided: bool = False) -> NotRetried | None:
        """Why attempt ``attempt_no`` (from 1) may not start ``now`` (``None``: it may).

        No attempt starts after the round's deadline; no retry once the round is published (``round_decided``).
        """
        if now > deadline_at:
            return NotRetried.PAST_DEADLINE
        if attempt_no > 1 and round_decided:
            return NotRetried.ROUND_DECIDED
        return None

    def next_attempt(self, attempt_no: int, *, first_started_at: float, now: float, deadline_at: float,
                     reason: str | None = None) -> Retry:
        """What follows attempt ``attempt_no`` (from 1) if it fails ``now`` with ``reason``.

        ``reason=None``: asked before the attempt, whether any retry can follow it -- if not it is *final*,
        and its requests bound what its server can still say (:mod:`workers.inflight`).  The next attempt
        starts at its place, ``first_started_at`` plus its offset, or ``now`` if that is past; it is made only
        if it ends (its start plus :attr:`attempt_s`) by ``deadline_at``.  Whether the round is published
        is asked last (:meth:`Retry.given`), since the task tells the tracker first.
        """
        rule = None if reason is None else self.rule_for_reason(reason)
        if rule is not None:
            return Retry(None, rule)
        offsets = self.offsets_s
        if attempt_no >= len(offsets):
            return Retry(None, NotRetried.LAST_ATTEMPT)
        starts_at = max(now, first_started_at + offsets[attempt_no])
        if starts_at + self.attempt_s > deadline_at:
            return Retry(None, NotRetried.PAST_DEADLINE)
        return Retry(starts_at)

    def kiss_backoff_s(self, code: str, count: int) -> float:
        """How long a kiss keeps its server unasked (s): RATE, :attr:`rate_backoff_s` doubled for each RATE
        in a row (``count``, from 1) up to :data:`MAX_RATE_BACKOFF_S`; DENY and RSTR, for good (until the
        worker restarts or the configuration changes: :mod:`workers.kod`); any other code, not at all."""
        if code == RATE:
            return min(self.rate_backoff_s * 2.0 ** (count - 1), MAX_RATE_BACKOFF_S)
        return float("inf") if code in DEMOBILISING else 0.0
