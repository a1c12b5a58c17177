"""Flower's configuration for ``chronotick-ntp flower`` (passed as ``--conf``; Flower executes it).

Every query task succeeds as far as Celery knows -- a dead server is a
structured failure the chord needs, not an exception -- so Flower's state
column is green for all of them.  Each outcome starts with a one-line
``summary`` (``ok +1.234 ms ±5.100 ms``, ``failed: timeout x3``); the tasks
page shows the ``result`` column, and :func:`format_task` cuts the cell to
that summary so a failed server is visible at a glance.  Flower's JSON API is
left untouched: the result as Celery's task-succeeded event carries it, its
repr cut at ``workers.tasks.RESULT_REPR_MAX_CHARS`` (the summary first; the
whole outcome is in the round's record).
"""

import re

#: The columns of Flower's tasks page, in order.
tasks_columns = "name,state,result,kwargs,received,runtime,worker,retries,args"

_SUMMARY = re.compile(r"""^\{['"]summary['"]: (['"])(?P<summary>.*?)\1""")


def format_task(task):
    """Show a chronotick task's result as its summary (Flower passes a copy)."""
    match = _SUMMARY.match(task.result or "") if isinstance(task.result, str) else None
    if match:
        task.result = match.group("summary")
    return task
