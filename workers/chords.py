"""Sending a chord the way Celery's own chord does, minus the sender's waiters, and in one message if asked.

``chord(header, body).apply_async()`` makes the *sender* a waiter: a group
barrier over every header result, each one a result-channel subscription in
Redis.  A dispatcher that never waits (the beat learns that a round finished
from the round's claim key) must then undo all of it.  The worker side of a
chord needs none of it -- only what each header message carries (its group
id, its index, the callback) and the chord size in the result backend.  The
Redis backend then joins the header results and sends the callback exactly as
for ``chord.apply_async`` (``on_chord_part_return``).  Only public calls are
used: ``Signature.freeze``, ``Backend.set_chord_size`` and one producer, in
one publish batch, for every message.

Two ways to send one:

:func:`send`
    Every header message from this process.
:func:`send_via_queue`
    One message, :data:`FAN_OUT_TASK`, to the queue the header goes to; the
    worker that takes it sends the header messages (:func:`fan_out`).  A
    dispatcher sending rounds for thousands of nodes then pays Celery's
    per-message cost once per round instead of once per server: each node
    fans its own round out.

Either way the group's and the callback's ids are fixed by the sender before
anything is sent, so the sender knows what to wait for.  (The header tasks'
ids are given as they are sent: nobody waits for them, since their results
travel in the chord's join.)
"""

from __future__ import annotations

from dataclasses import dataclass

from celery.canvas import Signature, signature
from celery.utils import uuid

from .app import app

#: The registered name of the node-side fan-out task.
FAN_OUT_TASK = "chronotick.fan_out"

#: Messages per Redis round trip when this process sends a chord that another process consumes
#: (:func:`send`).  Small batches let the worker start the first tasks while the rest are sent.
#: bench/round_latency.py's same50 set took 1.25x the thread pool with 2, against 1.29x one at a
#: time and 1.31-1.38x all at once.
SEND_BATCH_MESSAGES = 2


@dataclass(frozen=True)
class SentChord:
    """Ids of a chord that was sent: its group and its callback."""

    group_id: str
    callback_id: str


def freeze(body: Signature) -> SentChord:
    """Give the chord its group id and its callback an id, in place; send nothing."""
    group_id = uuid()
    return SentChord(group_id, body.freeze(group_id=group_id).id)


def send(header: list[Signature], body: Signature, *, frozen: SentChord | None = None) -> SentChord:
    """Send the chord from this process; return its ids (``frozen``: from :func:`freeze`, already called).

    No waiter is registered.  Celery's Redis backend subscribes this process
    to the result channel of each task it sends whose result is not ignored
    (``on_task_call``), which whoever waits ends by id afterwards.  The
    messages go :data:`SEND_BATCH_MESSAGES` to a Redis round trip: the worker
    starts the first ones while the rest are still being sent.
    """
    ids = frozen or freeze(body)
    _send_frozen(ids.group_id, header, body, batch=SEND_BATCH_MESSAGES)
    return ids


def send_via_queue(header: list[Signature], body: Signature, *, queue: str, expires=None,
                   frozen: SentChord | None = None) -> SentChord:
    """Send one :data:`FAN_OUT_TASK` message to ``queue``; its worker sends the chord.

    Nothing is subscribed in this process (the message's own result is
    ignored).  ``expires``: past it, the worker drops the message unread
    (and so the whole chord).
    """
    ids = frozen or freeze(body)
    app.send_task(FAN_OUT_TASK, kwargs={"group_id": ids.group_id, "header": [dict(s) for s in header],
                                        "body": dict(body)},
                  queue=queue, expires=expires, ignore_result=True, declare=[],
                  argsrepr="()", kwargsrepr=f"{{<{len(header)} tasks>, callback={ids.callback_id}}}")
    return ids


@app.task(name=FAN_OUT_TASK, ignore_result=True)
def fan_out(group_id: str, header: list[dict], body: dict) -> None:
    """Send a chord frozen by :func:`send_via_queue` (runs on the worker of the header's queue).

    Every message in one Redis round trip: this process is also the one that
    will consume them, so sending sooner would only take its time from
    consuming.
    """
    _send_frozen(group_id, [signature(d, app=app) for d in header], signature(body, app=app),
                 batch=max(1, len(header)))


def _send_frozen(group_id: str, header: list[Signature], body: Signature, *, batch: int) -> None:
    """Send the header's messages, ``batch`` of them to a Redis pipeline (kombu's ``Producer.batch``).

    Without a batch kombu's Redis transport builds a client and makes a round
    trip per message: about half of what sending one costs.
    """
    app.backend.set_chord_size(group_id, len(header))
    with app.producer_or_acquire() as producer, producer.batch(max_size=batch):
        for index, task in enumerate(header):
            task.freeze(group_id=group_id, chord=body, group_index=index)
            # declare=[]: the worker declared its queue when it began consuming it, and a
            # publish to the default exchange needs no binding: no SADD per message.
            task.apply_async(producer=producer, add_to_parent=False, declare=[])
