"""ChronoTick's import path, kept as a contract: the reader lives in :mod:`orchestrator.reader`.

ChronoTick swaps its in-process NTP client with one line, which keeps working unchanged::

    from orchestrator.consumer import ClockMeasurementSource as ClockMeasurementCollector

Programs written against the first releases keep working too: every public name this module had
(``from orchestrator.consumer import NtpReader``, its constants) is the reader's, re-exported here and
nowhere else.  New code imports :mod:`orchestrator.reader`.
"""

from orchestrator.reader import (
    CHRONOTICK_FIELDS,
    DRIFT_BOUND,
    EMPTY_STREAM_ID,
    FOLLOW_BLOCK_MS,
    FOLLOW_RETRY_S,
    FOLLOW_TIMEOUT_S,
    HELD_ENTRY,
    KEEP_MEASUREMENTS,
    SEEN_REMEMBERED,
    SOCKET_TIMEOUT_S,
    STATISTICS_RECENT,
    ClockMeasurementSource,
    Measurement,
    NtpReader,
    ServiceUnavailable,
    SourceStatistics,
)
from workers.config import DEFAULT_STALE_AFTER_S
from workers.redisclock import STALE_INTERVALS

__all__ = ["CHRONOTICK_FIELDS", "DEFAULT_STALE_AFTER_S", "DRIFT_BOUND", "EMPTY_STREAM_ID", "FOLLOW_BLOCK_MS",
           "FOLLOW_RETRY_S", "FOLLOW_TIMEOUT_S", "HELD_ENTRY", "KEEP_MEASUREMENTS", "SEEN_REMEMBERED",
           "SOCKET_TIMEOUT_S", "STALE_INTERVALS", "STATISTICS_RECENT", "ClockMeasurementSource", "Measurement",
           "NtpReader", "ServiceUnavailable", "SourceStatistics"]
