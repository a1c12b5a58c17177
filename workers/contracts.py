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


class Reason(StrEnum):
    """Every named reason a query fails or a reply is refused: a round record's ``reason``, ``stats``'
    ``failed:<reason>`` and ``rejected:<reason>``.  Named once here, and only here: every module says
    ``Reason.TIMEOUT`` (no alias: ``tests/unit/test_contracts.py``).  A Kiss-o'-Death other than these is
    ``kod_`` plus its lower-case code (:func:`kiss_reason`).
    """

    # No usable reply (workers.ntp.client, workers.measure).
    TIMEOUT = "timeout"
    SOCKET_ERROR = "socket_error"
    PORT_UNREACHABLE = "port_unreachable"  # ICMP: nothing listens at the server's address and port
    DNS_ERROR = "dns_error"
    QUERY_ERROR = "query_error"
    # A reply refused by RFC 5905's packet tests (workers.ntp.sanity).
    WRONG_SOURCE = "wrong_source"
    TRUNCATED = "truncated"
    BAD_MODE = "bad_mode"
    BOGUS_ORIGIN = "bogus_origin"
    BAD_VERSION = "bad_version"
    ZERO_TRANSMIT = "zero_transmit"
    ZERO_RECEIVE = "zero_receive"
    RECEIVE_AFTER_TRANSMIT = "receive_after_transmit"
    SERVER_PROCESSING_TOO_LONG = "server_processing_too_long"
    UNSYNCHRONISED_LEAP = "unsynchronised_leap"
    UNSYNCHRONISED_STRATUM = "unsynchronised_stratum"
    ROOT_DELAY_OUT_OF_RANGE = "root_delay_out_of_range"
    ROOT_DISPERSION_OUT_OF_RANGE = "root_dispersion_out_of_range"
    REFERENCE_AFTER_TRANSMIT = "reference_after_transmit"
    STALE_REFERENCE = "stale_reference"
    NEGATIVE_DELAY = "negative_delay"
    # Kiss-o'-Death (workers.kod).
    KOD_RATE = "kod_rate"
    KOD_DENY = "kod_deny"
    KOD_RSTR = "kod_rstr"
    KOD_BACKOFF = "kod_backoff"
    KOD_DEMOBILISED = "kod_demobilised"
    # NTS, RFC 8915 (workers.ntp.nts).
    NTS_KE_FAILED = "nts_ke_failed"
    NTS_AUTH_FAILED = "nts_auth_failed"
    NTS_BAD_UNIQUE_ID = "nts_bad_unique_id"
    NTS_NO_AUTHENTICATOR = "nts_no_authenticator"
    NTS_NAK = "nts_nak"
    # The round (workers.tasks, orchestrator).
    ROUND_DEADLINE = "round_deadline"
    WRONG_NODE = "wrong_node"
    NO_RESULT = "no_result"
    POLITENESS_LIMIT = "politeness_limit"  # the cluster's budget for a public server is spent: nothing sent
    # The selection's verdicts on a reply that arrived (orchestrator.selection).
    FALSETICKER = "falseticker"
    NOT_AUTHENTICATED = "not_authenticated"
    OVER_STRICT_THRESHOLDS = "over_strict_thresholds"
    OVER_RELAXED_THRESHOLDS = "over_relaxed_thresholds"
    OTHER_TIMESCALE = "other_timescale"  # near a leap second: a smearing server among stepping ones, or back


#: A Kiss-o'-Death's reason: this prefix and the lower-case kiss code.
KOD_PREFIX = "kod_"


def kiss_reason(code: str) -> str:
    """The reason for a kiss code: a :class:`Reason` member where one is named, else ``kod_<code>``."""
    text = KOD_PREFIX + code.strip().lower()
    try:
        return Reason(text)
    except ValueError:
        return text


class Selection(StrEnum):
    """``clock_measurement.ntp.selection``: what a round publishes."""

    COMBINE = "combine"  # the truechimers' weighted combination (ChronoTick's way; the default)
    BEST = "best"        # the one truechimer with the smallest bound


class MeasurementMode(StrEnum):
    """``clock_measurement.ntp.measurement_mode``."""

    SIMPLE = "simple"      # one exchange an attempt
    ADVANCED = "advanced"  # a burst, the minimum-delay sample kept (RFC 5905's clock filter)


class SampleDict(TypedDict):
    """One accepted exchange (:meth:`workers.ntp.client.Sample.as_dict`), seconds and Unix seconds.

    The names the round record is built from: :mod:`orchestrator.records` reads a sample by these
    (``FROM_CHOSEN``: ``offset_s`` is published as ``offset``; ``SAMPLE_FIELDS``: what a compact record
    keeps), and ``tests/unit/test_records.py`` holds both those names and the client's sample to this.
    """

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
    #: The burst's samples refused before one was kept: taken out by the query task into the attempt's
    #: :class:`AttemptDict` before the outcome leaves the worker (never part of a published sample).
    refusals: NotRequired[list[RefusalDict]]


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
