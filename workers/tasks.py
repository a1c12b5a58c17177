"""The query task: one NTP server, one measurement, retried by Celery.

Whether and when a failed attempt is retried is the job's retry policy's to say
(:class:`workers.retry.RetryPolicy`, carried in the job): this task asks it and
does what it says, with Celery's own machinery (``self.retry``), the countdown
being the next attempt's start on Redis' clock minus now -- 0, 5 and 15 s after
the first attempt's start with ChronoTick's defaults, whatever the timeout.

A server that sent a RATE, DENY or RSTR Kiss-o'-Death is not retried and, while
:mod:`workers.kod` says so, not even queried.  Nor is a failed attempt retried
once its round is published (:mod:`workers.inflight`): a round decided early
costs no retries, and a retry already waiting ends without a packet.

After the last attempt the task *returns* a structured failure instead of
raising: in a chord, one raising header task fails the whole round, and one
dead server must never cost the others' measurements.

Where the outcome goes.  Celery does not store it (``ignore_result``): the
chord's join carries every header task's return value to the callback
whether or not it is stored, and storing it -- a GET, a SETEX and a PUBLISH
per task, on a key nobody reads -- was a fifth of the worker's time per task
(issue #12).  Instead the task reports its outcome to the round's ``report_to`` hash (named
by the orchestrator, deleted when the round is published), which is what a
closer reads if the callback never comes; :mod:`workers.outcome_reports` writes those
reports in batches.
"""

from __future__ import annotations

import os
import secrets
import threading

import redis
from celery import signals
from celery.utils.log import get_task_logger

from . import inflight, kod, measure, politeness, redisurl
from .app import app, redis_url_of
from .config import ENV_NODE
from .contracts import AttemptDict, OutcomeDict, OutcomeStatus, Reason, SampleDict
from .ntp.client import QueryFailed
from .ntp.sanity import Rejection
from .outcome_reports import Reporter
from .redisclock import RedisClock
from .retry import NotRetried, RetryPolicy

log = get_task_logger(__name__)

#: The registered name (what Flower shows).
QUERY_TASK = "chronotick.query_server"

#: How much of an outcome's repr Celery keeps for the task-succeeded event (Flower's result column)
#: (characters): the summary, the status and the server.  The whole outcome is in the round's record.
#: Celery builds this repr for every task at any log level, in pure Python: at 80 characters it costs a
#: fifth of what Celery's default 1,024 does.
RESULT_REPR_MAX_CHARS = 80

#: Writes the outcomes this process's tasks report, in batches (:mod:`workers.outcome_reports`).
reporter = Reporter(lambda: app.backend.client)


_clock: RedisClock | None = None
_clock_lock = threading.Lock()


def service_now() -> float:
    """Redis' clock, as this worker estimates it: what a round's deadline is set on (:mod:`workers.redisclock`).

    One estimate for the whole process: Celery's backend (and its client) is per thread, and
    threads with estimates of their own would disagree by their estimates' errors.
    """
    global _clock
    with _clock_lock:
        if _clock is None:
            _clock = RedisClock(redisurl.connect(redis_url_of(app), app.conf.chronotick_redis_master_name))
    return _clock.now()


@signals.worker_shutdown.connect
def _write_the_last_reports(**_) -> None:
    """A warm shutdown lets running tasks finish: what they reported reaches Redis before the process exits."""
    reporter.drain()


@app.task(bind=True, name=QUERY_TASK, ignore_result=True, resultrepr_maxsize=RESULT_REPR_MAX_CHARS)
def query_server(self, *carried, job: dict, history: list | None = None):
    """Measure ``job['server']`` for ``job['node']``; return an outcome dict.

    Parameters
    ----------
    carried:
        In sequential mode (``parallel_queries: false``) the tasks form a
        chain and each receives the outcomes before it; it returns them with
        its own appended.  Empty in the normal, parallel chord.
    job:
        From :func:`workers.measure.make_job`.
    history:
        The earlier attempts of this job (carried across retries).

    Returns
    -------
    ``{"summary", "status": "ok", "server", "sample", "attempts", "history", "worker"}`` or
    ``{"summary", "status": "failed", "server", "reason", "detail", "kiss_code", "attempts", "history",
    "worker"}`` (``worker`` is the Celery hostname, ``<node>@<host>``, that ran it; ``summary`` is one
    line, ``ok +1.234 ms ±5.100 ms`` or ``failed: timeout x3``, first so that Flower's result column
    shows it).
    """
    history = list(history or [])
    started_at = service_now()  # deadlines are Redis' clock: a node whose own clock is off is still measured
    attempt_no = len(history) + 1
    policy = RetryPolicy.from_job(job)
    own_node = os.environ.get(ENV_NODE)
    if own_node and own_node != job["node"]:
        # Routing sends a node's jobs only to its queue; if one strays here
        # anyway, measuring it would describe the wrong machine's clock.
        return _done(job, carried, _failed(job, history, Reason.WRONG_NODE,
                                       f"worker {self.request.hostname} measures node {own_node!r}",
                                       worker=self.request.hostname))
    refused = policy.start_refused(attempt_no, now=started_at, deadline_at=job["deadline_at"],
                                   round_decided=bool(history) and inflight.tracker.decided(job))
    if refused == NotRetried.PAST_DEADLINE:
        log.warning("[LATE] %s for %s: round %s is past its deadline; no packet sent", job["server"], job["node"],
                    job["round_id"])
        outcome = _failed(job, history, Reason.ROUND_DEADLINE,
                          f"attempt {attempt_no} would start after the round's deadline",
                          worker=self.request.hostname)
        return _done(job, carried, outcome)
    if refused == NotRetried.ROUND_DECIDED:
        # The round was published while this retry waited: nothing it could measure would change it.
        last = history[-1]
        return _done(job, carried, _failed(job, history, last["reason"],
                                       f"not retried: the round was published before attempt {attempt_no}",
                                       kiss_code=last.get("kiss_code"), worker=self.request.hostname))
    refusal = kod.memory.refusal(job["server"], config_id=job.get("config_id", ""))
    if refusal:
        # Not a packet to a server that told us to stay away; not an attempt either.
        return _done(job, carried, _failed(job, history, *refusal, worker=self.request.hostname))
    refusal = _over_budget(job, attempt_no)
    if refusal:
        # The cluster's budget for this public server is spent (or cannot be checked): no packet, no attempt.
        log.warning("[POLITE] %s for %s: %s", job["server"], job["node"], refusal[1])
        return _done(job, carried, _failed(job, history, *refusal, worker=self.request.hostname))
    try:
        try:
            first_started_at = history[0]["started_at"] if history else started_at
            # Final: no retry can follow it, whatever it fails with (the early decider's bound: workers.inflight).
            final = not policy.next_attempt(attempt_no, first_started_at=first_started_at, now=service_now(),
                                            deadline_at=job["deadline_at"]).retried
            sample = measure.attempt(job, on_exchange=lambda i: inflight.tracker.exchange_started(job, i, final=final),
                                     on_done=lambda i, delay_s: inflight.tracker.exchange_done(job, i, delay_s))
        except QueryFailed:
            raise
        except Exception as exc:  # never a crashed task: the chord would wait for its deadline
            log.exception("[QUERY] %s for %s: attempt %d failed unexpectedly", job["server"], job["node"], attempt_no)
            raise QueryFailed(Rejection(Reason.QUERY_ERROR, f"{type(exc).__name__}: {exc}")) from exc
    except QueryFailed as exc:
        rejection = exc.rejection
        entry = {"attempt": attempt_no, "started_at": started_at, "reason": rejection.reason,
                 "detail": rejection.detail, "kiss_code": rejection.kiss_code}
        if isinstance(exc, measure.BurstFailed) and exc.earlier:
            entry["refusals"] = [{"reason": r.reason, "detail": r.detail} for r in exc.earlier]
        history.append(entry)
        if rejection.kiss_code:
            kod.memory.record(job["server"], rejection.kiss_code, config_id=job.get("config_id", ""), policy=policy)
        now = service_now()
        retry = policy.next_attempt(attempt_no, first_started_at=history[0]["started_at"], now=now,
                                    deadline_at=job["deadline_at"], reason=rejection.reason)
        # Told first: the round may be decided without this server's next attempt (it has none out).
        # Retried only while the round is undecided: once it is published, no reply can change it.
        inflight.tracker.attempt_ended(job, retrying=retry.retried)
        retry = retry.given(round_decided=inflight.tracker.decided(job))
        if retry.retried:
            wait_s = retry.countdown_s(now)
            log.info("[RETRY] %s for %s: attempt %d/%d failed (%s), next in %.3g s",
                     job["server"], job["node"], attempt_no, policy.attempts, rejection.reason, wait_s)
            raise self.retry(kwargs={"job": job, "history": history}, countdown=wait_s,
                             max_retries=policy.attempts - 1, argsrepr="()",
                             kwargsrepr=describe(job, attempt=attempt_no + 1)) from None
        log.warning("[FAILED] %s for %s after %d attempt(s): %s", job["server"], job["node"],
                    attempt_no, rejection.reason)
        return _done(job, carried, _failed(job, history, rejection.reason, rejection.detail,
                                       kiss_code=rejection.kiss_code, worker=self.request.hostname))
    entry = {"attempt": attempt_no, "started_at": started_at, "reason": None}
    refusals = sample.pop("refusals", None)
    if refusals:  # advanced mode: samples of this burst refused before one was kept
        entry["refusals"] = refusals
    history.append(entry)
    return _done(job, carried, OutcomeDict(summary=summarise_ok(sample, attempt_no), status=OutcomeStatus.OK,
                                           server=job["server"], sample=sample, attempts=attempt_no,
                                           history=history, worker=self.request.hostname))


def _over_budget(job: dict, attempt_no: int) -> tuple[str, str] | None:
    """``(reason, detail)`` if this attempt's requests find no room in the server's politeness window.

    Only a hub node's jobs carry a budget (``polite``: :mod:`workers.politeness`); the whole attempt
    (every sample of a burst) takes its places at once, or sends nothing.  A budget that cannot be
    checked (Redis away) is not spent on a guess: nothing is sent.
    """
    budget = politeness.Budget.from_job(job.get("polite"))
    if budget is None:
        return None
    try:
        answer = politeness.take(app.backend.client, job["key_prefix"], job["server"], job["samples"], budget,
                                 holder=f"{job['node']}:{job['round_id']}:{attempt_no}:{secrets.token_hex(4)}")
    except redis.RedisError as exc:
        return Reason.POLITENESS_LIMIT, (f"the cluster's budget could not be checked ({type(exc).__name__}); "
                                         "no request sent")
    if answer.granted:
        return None
    return Reason.POLITENESS_LIMIT, answer.refusal(job["server"], budget, job["samples"])


def summarise_ok(sample: SampleDict, attempts: int) -> str:
    """The outcome at a glance (first in the result, so Flower's result column starts with it)."""
    text = f"ok {sample['offset_s'] * 1e3:+.3f} ms ±{sample['uncertainty_s'] * 1e3:.3f} ms"
    return text + (f" (attempt {attempts})" if attempts > 1 else "")


def summarise_failure(reason: str, attempts: int) -> str:
    return f"failed: {reason}" + (f" x{attempts}" if attempts > 1 else "")


def describe(job: dict, *, attempt: int = 1) -> str:
    """The task's arguments as Flower shows them: server, node, round (and attempt when retried).

    Given to Celery as ``kwargsrepr`` so that nobody has to read the whole job,
    and Celery does not have to ``saferepr`` it for every message.
    """
    text = f"{{server={job['server']}, node={job['node']}, round={job['round_id']}"
    return text + (f", attempt={attempt}}}" if attempt > 1 else "}")


def _failed(job: dict, history: list[AttemptDict], reason: str, detail: str, *, kiss_code: str | None = None,
            worker: str | None = None) -> OutcomeDict:
    return OutcomeDict(summary=summarise_failure(reason, len(history)), status=OutcomeStatus.FAILED,
                       server=job["server"], reason=reason, detail=detail, kiss_code=kiss_code,
                       attempts=len(history), history=history, worker=worker)


def _done(job: dict, carried: tuple, outcome: OutcomeDict):
    """Report ``outcome`` to the round (for a closer, by :data:`reporter`) and to this process's
    tracker (which may find the round decided: :mod:`workers.inflight`), then return it."""
    reporter.report(job, outcome)
    inflight.tracker.outcome(job, outcome)
    return _carry(carried, outcome)


def _carry(carried: tuple, outcome: OutcomeDict):
    if not carried:
        return outcome
    before = carried[0]
    return [*(before if isinstance(before, list) else [before]), outcome]
