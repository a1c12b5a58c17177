"""Flower's tasks page shows each result's one-line summary (orchestrator/flowerconfig.py)."""

import pytest
from celery.utils.saferepr import saferepr

from orchestrator.flowerconfig import format_task
from workers import tasks
from workers.contracts import Reason

#: Every reason a query can fail with.
REASONS = sorted(Reason)


class _Task:
    def __init__(self, result):
        self.result = result


def test_flower_cell_shows_the_summary_only():
    assert format_task(_Task("{'summary': 'failed: timeout x3', 'status': 'failed', ...}")).result \
        == "failed: timeout x3"
    assert format_task(_Task("{'summary': 'ok +1.234 ms ±5.100 ms', 'status': 'ok'}")).result \
        == "ok +1.234 ms ±5.100 ms"
    assert format_task(_Task("42")).result == "42"
    assert format_task(_Task(None)).result is None


@pytest.mark.parametrize("reason", REASONS)
def test_the_summary_survives_celerys_cut_of_the_result_repr(reason):
    """Celery keeps RESULT_REPR_MAX_CHARS of a query's repr for Flower: the summary must fit, whatever the reason."""
    outcome = tasks._failed({"server": "ntp-a-very-long-name.example.org:123"}, [{}] * 3, reason,
                            "detail " * 50)
    cut = saferepr(outcome, tasks.RESULT_REPR_MAX_CHARS)
    assert format_task(_Task(cut)).result == tasks.summarise_failure(reason, 3)


def test_an_ok_summary_survives_the_cut():
    sample = {"offset_s": -1.234567, "uncertainty_s": 0.105432}
    outcome = {"summary": tasks.summarise_ok(sample, 3), "status": "ok", "server": "x" * 60, "sample": sample}
    assert format_task(_Task(saferepr(outcome, tasks.RESULT_REPR_MAX_CHARS))).result == outcome["summary"]
