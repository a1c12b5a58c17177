"""What crosses Celery from a query task: its outcome, its sample, its attempts.

Everything here travels as JSON, so the types are ``TypedDict`` (the dicts
themselves, named) and ``StrEnum`` (rq's ``JobStatus`` style: a member *is*
its string, so ``json.dumps`` writes ``"ok"`` and a decoded ``"ok"`` compares
equal to :attr:`OutcomeStatus.OK`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import NotRequired, TypedDict


class OutcomeStatus(StrEnum):
    """A query task's result: a sample, or a structured failure after every attempt."""

    OK = "ok"
    FAILED = "failed"


class AuthSelect(StrEnum):
    """``clock_measurement.ntp.auth_select``: how NTS authentication counts (chrony's ``authselectmode``)."""

    REQUIRE = "require"  # only authenticated samples vote and may be published
    PREFER = "prefer"    # plain samples only when no authenticated one passes
    MIX = "mix"          # both vote and are chosen alike
    IGNORE = "ignore"    # authentication does not count


class SampleDict(TypedDict):
    """One accepted exchange (:meth:`workers.ntp.client.Sample.as_dict`), seconds and Unix seconds."""

    server: str
    address: str
    port: int
    offset_s: float
    delay_s: float
    uncertainty_s: float
    stratum: int
    leap: int
    root_delay_s: float
    root_dispersion_s: float
    precision_s: float
    ref_id: str
    t1_ns: int
    t4_ns: int
    kernel_rx_timestamp: bool
    nts: bool
    measured_at: float
    # Advanced mode (a burst per attempt):
    samples_taken: NotRequired[int]
    burst_delays_s: NotRequired[list[float]]
    jitter_s: NotRequired[float]
    spread_s: NotRequired[float]


class RefusalDict(TypedDict):
    """A refused sample inside an advanced-mode burst."""

    reason: str
    detail: str


class AttemptDict(TypedDict):
    """One attempt of a query task; ``reason`` is ``None`` for the attempt that produced the sample."""

    attempt: int
    started_at: float
    reason: str | None
    detail: NotRequired[str]
    kiss_code: NotRequired[str | None]
    refusals: NotRequired[list[RefusalDict]]


class OutcomeDict(TypedDict):
    """What :func:`workers.tasks.query_server` returns to the chord."""

    summary: str
    status: OutcomeStatus
    server: str
    attempts: int
    history: list[AttemptDict]
    worker: str | None
    sample: NotRequired[SampleDict]
    reason: NotRequired[str]
    detail: NotRequired[str]
    kiss_code: NotRequired[str | None]
