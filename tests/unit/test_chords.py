"""workers.chords: a chord's ids fixed before it is sent; sent from here in small batches, or as one message
that the node's worker fans out into the very same chord; and what fanning out sends -- with Celery's
sending replaced by recorders (no broker, no worker).

A chord sent through a real Redis to a real worker: tests/integration/test_pipeline.py.
"""

from __future__ import annotations

import contextlib
import random
from datetime import UTC, datetime

from celery.canvas import Signature

from orchestrator.callback import finish_round
from workers import chords
from workers.tasks import query_server

SEED = 20270310


def _chord(rng: random.Random, n: int) -> tuple[list[Signature], Signature]:
    jobs = [{"server": f"10.0.0.{i}", "node": "n1", "round_id": "r", "timeout_s": rng.choice([0.5, 1.0]),
             "samples": rng.randint(1, 4)} for i in range(n)]
    header = [query_server.signature(kwargs={"job": job}, queue="ntp.n1", argsrepr="()",
                                     kwargsrepr=f"{{server={job['server']}}}") for job in jobs]
    body = finish_round.signature(args=({"round_id": "r", "node": "n1", "key_prefix": "t"},), queue="ntp.n1",
                                  ignore_result=True)
    return header, body


def test_freezing_fixes_the_group_and_callback_ids_and_sends_nothing():
    _, body = _chord(random.Random(SEED), 0)
    ids = chords.freeze(body)
    assert ids.callback_id == body.id == body.options["task_id"]
    assert ids.group_id and ids.group_id != ids.callback_id
    again = chords.freeze(_chord(random.Random(SEED), 0)[1])
    assert again.group_id != ids.group_id, "a new chord, new ids"


def test_sending_from_here_keeps_the_frozen_ids_and_sends_in_small_batches(monkeypatch):
    sent = []
    monkeypatch.setattr(chords, "_send_frozen", lambda group_id, header, body, *, batch: sent.append(
        (group_id, header, body, batch)))
    header, body = _chord(random.Random(SEED), 3)
    frozen = chords.freeze(body)
    assert chords.send(header, body, frozen=frozen) is frozen
    ((group_id, given_header, given_body, batch),) = sent
    assert (group_id, given_header, given_body, batch) == (frozen.group_id, header, body, chords.SEND_BATCH_MESSAGES)
    unfrozen = chords.send(*_chord(random.Random(SEED), 2))
    assert sent[-1][0] == unfrozen.group_id


def test_random_chords_sent_via_the_queue_are_fanned_out_into_the_same_chord(monkeypatch):
    """The oracle: the one message carries the frozen ids and every signature; the worker that takes it
    sends the header rebuilt signature for signature, in order, in one batch."""
    rng = random.Random(SEED + 1)
    messages, fanned = [], []
    monkeypatch.setattr(chords.app, "send_task", lambda name, **options: messages.append((name, options)))
    monkeypatch.setattr(chords, "_send_frozen", lambda group_id, header, body, *, batch: fanned.append(
        (group_id, header, body, batch)))
    for case in range(30):
        n = rng.randint(0, 20)
        header, body = _chord(rng, n)
        expires = datetime.fromtimestamp(rng.uniform(1.7e9, 1.8e9), tz=UTC)
        frozen = chords.freeze(body) if rng.random() < 0.5 else None
        ids = chords.send_via_queue(header, body, queue="ntp.n1", expires=expires, frozen=frozen)
        assert frozen is None or ids is frozen
        name, options = messages[-1]
        assert name == chords.FAN_OUT_TASK
        assert (options["queue"], options["expires"], options["ignore_result"], options["declare"]) == (
            "ntp.n1", expires, True, [])
        assert options["argsrepr"] == "()"
        assert options["kwargsrepr"] == f"{{<{n} tasks>, callback={ids.callback_id}}}", "Flower: the size, not the jobs"
        kwargs = options["kwargs"]
        assert kwargs["group_id"] == ids.group_id and kwargs["body"]["options"]["task_id"] == ids.callback_id
        chords.fan_out(**kwargs)  # what the node's worker runs
        group_id, rebuilt, rebuilt_body, batch = fanned[-1]
        assert group_id == ids.group_id, case
        assert [dict(s) for s in rebuilt] == [dict(s) for s in header], case
        assert all(isinstance(s, Signature) for s in rebuilt)
        assert dict(rebuilt_body) == dict(body) and batch == max(1, n), case


class Recorder:
    """Celery's app as :func:`chords._send_frozen` uses it: the chord size, a producer, its batch."""

    def __init__(self):
        self.calls: list[tuple] = []
        recorder = self

        class Backend:
            def set_chord_size(self, group_id, size):
                recorder.calls.append(("chord size", group_id, size))

        class Producer:
            @contextlib.contextmanager
            def batch(self, max_size):
                recorder.calls.append(("batch", max_size))
                yield
                recorder.calls.append(("batch sent",))

        self.backend = Backend()
        self.producer = Producer()

    @contextlib.contextmanager
    def producer_or_acquire(self):
        yield self.producer


class Task:
    def __init__(self, recorder: Recorder, name: str):
        self.recorder, self.name = recorder, name

    def freeze(self, **options):
        self.recorder.calls.append(("freeze", self.name, options))

    def apply_async(self, **options):
        self.recorder.calls.append(("send", self.name, options))


def test_fanning_out_sets_the_chord_size_first_then_sends_each_task_frozen_into_the_chord(monkeypatch):
    rng = random.Random(SEED + 2)
    for case in range(20):
        recorder = Recorder()
        monkeypatch.setattr(chords, "app", recorder)
        n, batch = rng.randint(0, 10), rng.randint(1, 5)
        header = [Task(recorder, f"t{i}") for i in range(n)]
        body = object()
        chords._send_frozen("g1", header, body, batch=batch)
        expected = [("chord size", "g1", n), ("batch", batch)]
        for i in range(n):
            expected += [("freeze", f"t{i}", {"group_id": "g1", "chord": body, "group_index": i}),
                         ("send", f"t{i}", {"producer": recorder.producer, "add_to_parent": False, "declare": []})]
        assert recorder.calls == expected + [("batch sent",)], case
