"""ChronoTick's import path, kept as a contract: the reader lives in :mod:`orchestrator.reader`.

ChronoTick swaps its in-process NTP client with one line, which keeps working unchanged::

    from orchestrator.consumer import ClockMeasurementSource as ClockMeasurementCollector

Programs written against the first releases (``from orchestrator.consumer import NtpReader``) keep
working too.  New code imports :mod:`orchestrator.reader`.
"""

from orchestrator.reader import ClockMeasurementSource, Measurement, NtpReader, ServiceUnavailable

__all__ = ["ClockMeasurementSource", "Measurement", "NtpReader", "ServiceUnavailable"]
