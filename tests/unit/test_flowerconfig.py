"""Flower's tasks page shows each result's one-line summary (orchestrator/flowerconfig.py)."""

from orchestrator.flowerconfig import format_task


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
