"""Query outcomes reported to their round, many per Redis round trip, off the task's path.

Celery stores no result for a query task (``ignore_result``): its return value
reaches the chord's callback through the chord's join.  If the callback never
comes -- the worker killed mid-round, a message lost, a task expired -- the
round is closed at its deadline from what the tasks *reported*: each task
hands its outcome to this process's :class:`Reporter`, whose one thread
writes whatever has accumulated in a single pipeline (``HSET`` per outcome,
``EXPIREAT`` per round) and goes back to waiting.

Why a thread: one pipeline per task cost about as much worker time as the
NTP exchange itself (issue #12).  Forty replies that land together are
written in a handful of round trips instead of forty, and no task waits for
Redis before its result joins the chord.

The round's hash is deleted in the transaction that publishes the round; the
callback calls :meth:`Reporter.drain` first, so a report still queued in this
process does not land after the deletion.  One that does anyway (a second
worker process on the same queue, a slow Redis) expires ``keep_s`` after the
round's deadline.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from .contracts import OutcomeDict

log = logging.getLogger(__name__)

#: How long after its round's deadline a report is kept if nobody publishes the round (s).  A
#: closer runs 2 s after the deadline; this leaves a beat that was away a minute to adopt it.
DEFAULT_KEEP_AFTER_DEADLINE_S = 60.0

#: How long :meth:`Reporter.drain` waits at most (s): a callback must not hang on a stuck Redis.
DEFAULT_DRAIN_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Report:
    """One outcome for one round: the hash, the field (the server) and the outcome's JSON."""

    key: str
    server: str
    outcome_json: str
    expire_at: int


class Reporter:
    """Writes reports in batches from one daemon thread (started on the first report).

    Parameters
    ----------
    client:
        Called in the thread for the ``redis.Redis`` to write to (the
        result backend's client in a worker: the same Redis as the rounds).
    keep_after_deadline_s:
        How long an unpublished round's reports live after its deadline.
    """

    def __init__(self, client: Callable[[], redis.Redis], *,
                 keep_after_deadline_s: float = DEFAULT_KEEP_AFTER_DEADLINE_S):
        self._client = client
        self.keep_after_deadline_s = keep_after_deadline_s
        self._queue: queue.SimpleQueue[Report] = queue.SimpleQueue()
        self._idle = threading.Condition()  # guards _thread and _pending; notified when nothing is pending
        self._thread: threading.Thread | None = None
        self._pending = 0  # reports queued or being written
        #: Reports written, and round trips that wrote them (for tests and benchmarks).
        self.written = 0
        self.batches = 0

    def report(self, job: dict, outcome: OutcomeDict) -> None:
        """Queue ``outcome`` for ``job["report_to"]`` (nothing to do without one); never blocks on Redis."""
        key = job.get("report_to")
        if not key:
            return
        item = Report(key, job["server"], json.dumps(outcome, separators=(",", ":")),
                      int(job["deadline_at"] + self.keep_after_deadline_s))
        with self._idle:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chronotick-reporter", daemon=True)
                self._thread.start()
        self._queue.put(item)

    def drain(self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
        """Wait until every report queued so far is written (or failed); ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception as exc:  # Redis away: the chord cannot join either; the closer gets less
                log.warning("cannot report %d outcome(s) (%s: %s)", len(batch), type(exc).__name__, exc)
            finally:
                with self._idle:
                    self._pending -= len(batch)
                    if not self._pending:
                        self._idle.notify_all()

    def _write(self, batch: list[Report]) -> None:
        expiries = {}
        with self._client().pipeline(transaction=False) as pipe:
            for item in batch:
                pipe.hset(item.key, item.server, item.outcome_json)
                expiries[item.key] = item.expire_at
            for key, expire_at in expiries.items():
                pipe.expireat(key, expire_at)
            pipe.execute()
        self.written += len(batch)
        self.batches += 1
