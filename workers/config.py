"""Loading and validating the YAML configuration.

ChronoTick's own files load unchanged: the ``clock_measurement.ntp`` and
``clock_measurement.timing`` sections keep every key and meaning they had (and
``max_delay`` / ``max_stratum``, which the old client silently ignored, are
honoured).  The distributed side has its own top-level section,
``ntp_service``.  Any other top-level section (ChronoTick's models, scheduling
...) belongs to ChronoTick and is left alone.

Every problem is found before anything runs and reported as one
:class:`ConfigError` naming the file, the key and what is wrong.  Secrets never
come from YAML: the Redis URL and password come from the environment.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from . import redisclock, redisurl
from .contracts import AuthSelect, MeasurementMode, Selection
from .ntp import packet
from .retry import RetryPolicy

#: Overrides ``ntp_service.redis_url``.
ENV_REDIS_URL = "CHRONOTICK_REDIS_URL"
#: Injected into the Redis URL when it has no password of its own.
ENV_REDIS_PASSWORD = "CHRONOTICK_REDIS_PASSWORD"
#: The node a worker serves (else the host name).
ENV_NODE = "CHRONOTICK_NODE"
#: The config file a plain ``celery -A workers.app`` process reads.
ENV_CONFIG = "CHRONOTICK_CONFIG"

#: Where Redis is when nothing says otherwise: loopback, never 0.0.0.0.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

DEFAULT_NTP_PORT = packet.NTP_PORT
#: NTS-KE's port (RFC 8915), for ``nts://host`` servers.
DEFAULT_NTS_KE_PORT = packet.NTS_KE_PORT
NTS_SCHEME = "nts://"


class ConfigError(ValueError):
    """A configuration that must not be used, with where and why."""

    def __init__(self, source: str, key: str, problem: str):
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ServerAddress:
    """One configured NTP server: ``host`` or ``host:port`` (``[v6]:port``), or ``nts://host[:ke_port]``.

    For an NTS server ``port`` is the NTS-KE port; NTS-KE names the NTP one.
    """

    host: str
    port: int = DEFAULT_NTP_PORT
    nts: bool = False

    @property
    def identity(self) -> tuple[str, int, bool]:
        """What the server is, whatever the spelling: names without case or a final dot, addresses canonical."""
        try:
            host = str(ipaddress.ip_address(self.host))
        except ValueError:
            host = self.host.rstrip(".").lower()
        return host, self.port, self.nts

    @property
    def name(self) -> str:
        """The spelling used in records and logs: the config's, with the port if not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.nts:
            return f"{NTS_SCHEME}{host}" + ("" if self.port == DEFAULT_NTS_KE_PORT else f":{self.port}")
        return host if self.port == DEFAULT_NTP_PORT else f"{host}:{self.port}"


_NUMBER = (int, float)

_A_WORD = "must be a non-empty word without spaces"


def _is_word(value: str) -> bool:
    return bool(value) and not any(c.isspace() for c in value)


#: ``auth_select`` values (:class:`workers.contracts.AuthSelect`).
AUTH_SELECT_MODES = tuple(mode.value for mode in AuthSelect)


@dataclass(frozen=True)
class Option:
    """How one YAML key is read: its type(s), its check and what it must be, and a line of doc.

    Each settings field declares its option once, with :func:`option`; the
    parsers, the key tables, the configuration tables of docs/contract.md (a test holds
    them to it) and the round metadata all come from these declarations.
    """

    #: Path of the key inside its section (``warm_up.duration_seconds``); default: the field's name.
    key: str | None
    types: tuple
    check: Callable[[Any], bool] | None
    problem: str
    doc: str


def option(default: Any, *, types: tuple, doc: str, check: Callable[[Any], bool] | None = None,
           problem: str = "", key: str | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is a configuration option (see :class:`Option`)."""
    meta = {"option": Option(key, types, check, problem, doc)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def options_of(settings_class) -> dict[str, tuple[str, Option]]:
    """``{yaml key: (field name, Option)}`` of a settings dataclass, in declaration order."""
    return {(f.metadata["option"].key or f.name): (f.name, f.metadata["option"])
            for f in fields(settings_class) if "option" in f.metadata}


def _positive(v) -> bool:
    return v > 0


_GREATER_THAN_0 = "must be greater than 0"

#: Upper bounds that keep every derived time finite and meaningful: one exchange (s) ...
MAX_TIMEOUT_S = 60.0
#: ... the first retry wait: retries belong to one round, far inside the broker's
#: one-hour visibility timeout (s) ...
MAX_RETRY_DELAY_S = 600.0
#: ... how long records are kept (h: ten years) ...
MAX_HISTORY_HOURS = 87_600.0
#: ... a beat's lease (s) ...
MAX_LEASE_S = 3_600.0
#: ... and an interval or a warm-up (s: a day).
MAX_INTERVAL_S = 86_400.0
_INTERVAL_PROBLEM = f"must be more than 0 and at most {MAX_INTERVAL_S:g} s"


@dataclass(frozen=True)
class NtpSettings:
    """``clock_measurement.ntp``: what to query and how good a sample must be.

    Times are seconds.  ``max_retries`` is the total number of attempts per
    server (0 and 1 both mean a single attempt), as it was in ChronoTick;
    ``retry_delay`` is the first wait, doubled after each further failure; the
    waits separate the attempts' *starts*, counted from the first attempt's
    start (0, 5, 15 s with ChronoTick's 5 s), whatever the timeout.  The
    schedule they make is :meth:`workers.retry.RetryPolicy.from_settings`'s.
    """

    servers: tuple[ServerAddress, ...] = option(
        (), types=(list,), doc="`host`, `host:port`, `[v6]:port`; `nts://host[:ke_port]` for NTS (RFC 8915)")
    timeout_seconds: float = option(
        2.0, types=_NUMBER, check=lambda v: 0 < v <= MAX_TIMEOUT_S, problem=f"must be more than 0 and at most "
        f"{MAX_TIMEOUT_S:g} s", doc="per exchange, and per DNS look-up (s)")
    max_acceptable_uncertainty: float = option(
        0.010, types=_NUMBER, check=_positive, problem=_GREATER_THAN_0, doc="strict gate (s)")
    min_stratum: int = option(
        1, types=(int,), check=lambda v: 1 <= v <= 16, problem="must be between 1 and 16", doc="strict gate")
    max_stratum: int = option(
        15, types=(int,), check=lambda v: 1 <= v <= 16, problem="must be between 1 and 16",
        doc="strict gate, never relaxed (the old client ignored it; stratum 16 is always unsynchronised)")
    max_delay: float = option(
        0.100, types=_NUMBER, check=_positive, problem=_GREATER_THAN_0,
        doc="strict gate (s; the old client ignored it)")
    measurement_mode: str = option(
        MeasurementMode.SIMPLE.value, types=(str,), check=lambda v: v in tuple(MeasurementMode),
        problem="must be 'simple' or 'advanced'", doc="`advanced`: a burst of `advanced_samples`, minimum delay kept")
    advanced_samples: int = option(
        3, types=(int,), check=lambda v: 1 <= v <= 8, problem="must be between 1 and 8",
        doc="samples per attempt in advanced mode (new key)")
    outlier_window_size: int = option(
        20, types=(int,), check=lambda v: v >= 1, problem="must be at least 1",
        doc="the temporal filter's window (results)")
    outlier_sigma_threshold: float = option(
        5.0, types=_NUMBER, check=_positive, problem=_GREATER_THAN_0,
        doc="the temporal filter's threshold (ChronoTick's homelab 10000 effectively disables it)")
    parallel_queries: bool = option(True, types=(bool,), doc="false: one server after another")
    publish_early: bool = option(True, types=(bool,),
                                 doc="publish a round once the replies in hand decide it (new key)")
    max_workers: int | None = option(
        None, types=(int, type(None)), check=lambda v: v is None or v >= 1, problem="must be at least 1 (or null)",
        doc="the worker's thread count (+2); default: one per server")
    enable_fallback: bool = option(True, types=(bool,), doc="the relaxed gate at 2x")
    max_retries: int = option(
        3, types=(int,), check=lambda v: 0 <= v <= 10, problem="must be between 0 and 10",
        doc="attempts in total per server")
    retry_delay: float = option(
        5.0, types=_NUMBER, check=lambda v: 0 < v <= MAX_RETRY_DELAY_S,
        problem=f"must be more than 0 and at most {MAX_RETRY_DELAY_S:g} s", doc="first wait; then doubled (s)")
    selection: str = option(
        Selection.COMBINE.value, types=(str,), check=lambda v: v in tuple(Selection),
        problem="must be 'best' or 'combine'",
        doc="`combine` (default: ChronoTick averages servers, so best-server switching cannot flicker the "
            "offset) or `best` (new key)")
    server_groups: tuple[tuple[str, ...], ...] = option(
        (), types=(dict,), doc="`{name: [server, ...]}`: correlated servers, one vote (new key)")
    max_root_delay: float = option(
        1.0, types=_NUMBER, check=_positive, problem=_GREATER_THAN_0,
        doc="sanity limit on the server's root delay (s, new key)")
    max_root_dispersion: float = option(
        1.0, types=_NUMBER, check=_positive, problem=_GREATER_THAN_0,
        doc="sanity limit on the server's root dispersion (s, new key)")
    nts_ca_file: str | None = option(
        None, types=(str, type(None)), check=lambda v: v is None or os.path.isfile(v),
        problem="must name a readable PEM file (or be null)",
        doc="extra trust anchors (PEM) for NTS servers' certificates; default: the system store (new key)")
    auth_select: str = option(
        AuthSelect.MIX.value, types=(str,), check=lambda v: v in AUTH_SELECT_MODES,
        problem="must be one of " + ", ".join(AUTH_SELECT_MODES),
        doc="as chrony's `authselectmode`: `require` only NTS may be published; `prefer` plain only when no NTS "
            "sample passes; `mix` both alike; `ignore` authentication does not count (new key)")
    smearing_servers: tuple[str, ...] = option(
        (), types=(list,),
        doc="servers that smear leap seconds, beyond Google's (`time*.google.com`, known by name); near a leap "
            "they never vote or combine with stepping ones (new key)")
    leap_timescale: str = option(
        "step", types=(str,), check=lambda v: v in ("step", "smear"), problem="must be 'step' or 'smear'",
        doc="from 12 h before to 12 h after a leap second, only servers of this timescale vote (new key)")
    leap_seconds_file: str = option(
        "/usr/share/zoneinfo/leap-seconds.list", types=(str,),
        doc="the IERS/IETF leap-seconds.list read for the leap window; an expired or missing file: no window "
            "known, said once in the log (new key)")

    def as_mapping(self) -> dict:
        """These settings as the YAML section they come from (plain JSON: what a round carries)."""
        values = {key: getattr(self, name) for key, (name, _) in options_of(NtpSettings).items()}
        values["servers"] = [s.name for s in self.servers]
        values["server_groups"] = {f"group{i}": list(g) for i, g in enumerate(self.server_groups)}
        values["smearing_servers"] = list(self.smearing_servers)
        return values

    @cached_property
    def config_id(self) -> str:
        """A short fingerprint of these settings: a change lifts DENY/RSTR demobilisation."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TimingSettings:
    """``clock_measurement.timing``: how often rounds run (seconds)."""

    warm_up_duration_s: float = option(
        60.0, key="warm_up.duration_seconds", types=_NUMBER, check=lambda v: 0 <= v <= MAX_INTERVAL_S,
        problem=f"must be from 0 to {MAX_INTERVAL_S:g} s",
        doc="how long rounds run at the warm-up interval (s)")
    warm_up_interval_s: float = option(
        1.0, key="warm_up.measurement_interval", types=_NUMBER, check=lambda v: 0 < v <= MAX_INTERVAL_S,
        problem=_INTERVAL_PROBLEM,
        doc="interval between rounds during the warm-up (s)")
    normal_interval_s: float = option(
        120.0, key="normal_operation.measurement_interval", types=_NUMBER,
        check=lambda v: 0 < v <= MAX_INTERVAL_S, problem=_INTERVAL_PROBLEM,
        doc="interval between rounds afterwards (s)")


#: A node's staleness limit under the default timing (s): :func:`workers.redisclock.stale_after_s` of the
#: default normal interval; what a reader or an exporter given no config judges by.
DEFAULT_STALE_AFTER_S = redisclock.stale_after_s(TimingSettings.normal_interval_s)


@dataclass(frozen=True)
class HubSettings:
    """``ntp_service.hub``: the head node as the cluster's time hub (issue #26).

    The hub node's rounds measure ``clock_measurement.ntp.servers`` (the
    public ones) for the whole cluster, politely; every other node measures
    ``address``, a LAN NTP server on the head (``chronotick-ntp hub`` runs
    chronyd there), and publishes that LAN offset composed with the hub's
    latest offset to UTC.
    """

    address: str = option(
        "", types=(str,), doc="`HOST[:PORT]`: the LAN time server (the head's chronyd) every other node measures")
    node: str = option("", types=(str,), doc="the head's node name, whose rounds measure the public servers")
    measurement_interval: float = option(
        64.0, types=_NUMBER, check=lambda v: 16 <= v <= MAX_INTERVAL_S,
        problem=f"must be from 16 to {MAX_INTERVAL_S:g} s (RFC 4330's least poll)",
        doc="the hub node's rounds at least this far apart, warm-up or not (s; chrony's minpoll 6)")
    max_requests_per_minute: int = option(
        12, types=(int,), check=lambda v: 1 <= v <= 60, problem="must be from 1 to 60",
        doc="requests one public server gets from the whole cluster in any 60 s, bursts and retries included")
    max_requests_per_10_minutes: int = option(
        40, types=(int,), check=lambda v: 1 <= v <= 600, problem="must be from 1 to 600",
        doc="requests one public server gets from the whole cluster in any 10 minutes")
    max_drift_ppm: float = option(
        15.0, types=_NUMBER, check=lambda v: 0 < v <= 500, problem="must be more than 0 and at most 500 ppm",
        doc="how fast a clock may drift between two measurements: the head's since its last round, a node's "
            "between two nodes' rounds (ppm; RFC 5905's PHI)")

    @property
    def server(self) -> ServerAddress:
        return parse_server(self.address, key="ntp_service.hub.address")


@dataclass(frozen=True)
class ServiceSettings:
    """``ntp_service``: the distributed side.

    ``redis_url`` here is the resolved URL (environment applied) and may hold
    a password: never log it; use :attr:`redis_url_redacted`.
    """

    redis_url: str = option(
        DEFAULT_REDIS_URL, types=(str,),
        doc="`redis://host:port/db`, or Sentinels: `sentinel://h1:26379;sentinel://h2:26379`; no password allowed "
            "here; `CHRONOTICK_REDIS_URL` overrides, `CHRONOTICK_REDIS_PASSWORD` is added")
    redis_master_name: str = option(
        redisurl.DEFAULT_MASTER_NAME, types=(str,), check=_is_word, problem=_A_WORD,
        doc="with `sentinel://` URLs: the name the Sentinels monitor the master under")
    key_prefix: str = option(
        "chronotick", types=(str,), check=_is_word, problem=_A_WORD, doc="first part of every key")
    nodes: tuple[str, ...] = option((), types=(list,), doc="the nodes `beat` runs rounds for")
    history_length: int = option(
        10_000, types=(int,), check=lambda v: v >= 1, problem="must be at least 1",
        doc="round records kept per node, at most")
    history_hours: float = option(
        24.0, types=_NUMBER, check=lambda v: 0 < v <= MAX_HISTORY_HOURS,
        problem=f"must be more than 0 and at most {MAX_HISTORY_HOURS:g} h",
        doc="round records older than this are trimmed (the stream's MINID), so memory stays flat (h)")
    record_detail: str = option(
        "compact", types=(str,), check=lambda v: v in ("compact", "verbose"), problem="must be 'compact' or 'verbose'",
        doc="`compact`: at most 2,000 bytes per 10-server round; `verbose`: every attempt's detail and the whole "
            "sample")
    worker_concurrency: int | None = option(
        None, types=(int, type(None)), check=lambda v: v is None or v >= 1, problem="must be at least 1 (or null)",
        doc="a worker's threads; default: one per server, plus two")
    beat_lease_seconds: float = option(
        10.0, types=_NUMBER, check=lambda v: 1 <= v <= MAX_LEASE_S, problem=f"must be from 1 to {MAX_LEASE_S:g} s",
        doc="how long a beat's lease lasts; a standby takes over after it (s)")
    warm_up_cooldown_seconds: float = option(
        600.0, types=_NUMBER, check=lambda v: 0 <= v <= MAX_INTERVAL_S,
        problem=f"must be from 0 to {MAX_INTERVAL_S:g} s",
        doc="after a node's warm-up, none again for this long (s); the length of one is the service's "
            "`warm_up.duration_seconds`, never a consumer's")
    hub: HubSettings | None = option(
        None, types=(dict, type(None)), doc="the head as the cluster's time hub: `address`, `node` and the keys below")

    @property
    def redis_url_redacted(self) -> str:
        return redisurl.redact(self.redis_url)


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    source: str
    ntp: NtpSettings
    timing: TimingSettings = field(default_factory=TimingSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    #: Sections of the file this package does not own, kept for tools that
    #: want them (the simulator reads ``simulator``).
    extra: dict = field(default_factory=dict)

    def hub_leg_of(self, node: str) -> HubSettings | None:
        """The hub ``node``'s rounds go through, or ``None``: no hub, or ``node`` is the hub node itself."""
        hub = self.service.hub
        return hub if hub is not None and node != hub.node else None

    def normal_interval_of(self, node: str) -> float:
        """``node``'s normal interval (s): the hub node's rounds at least ``hub.measurement_interval`` apart."""
        hub = self.service.hub
        if hub is not None and node == hub.node:
            return max(self.timing.normal_interval_s, hub.measurement_interval)
        return self.timing.normal_interval_s

    def stale_after_s(self, node: str | None = None) -> float:
        """How old ``node``'s ``latest`` may get before it is stale (s): :func:`workers.redisclock.stale_after_s`
        of its normal interval (:meth:`normal_interval_of`: the hub node's is longer).  Without a node, any
        node's but the hub node's.  ``status``, the exporter, the beat's and a worker's warm-up checks, the
        hub's leg and the reader all judge by it.
        """
        return redisclock.stale_after_s(self.timing.normal_interval_s if node is None
                                        else self.normal_interval_of(node))

    def for_node(self, node: str) -> Config:
        """This configuration as ``node``'s rounds use it (issue #26).

        With a hub, every node but the hub node measures one server, the hub's
        LAN address (``ntp_service.hub.address``), with the same gates, mode
        and retries; the hub node measures ``clock_measurement.ntp.servers``.
        Without a hub, every node measures those.
        """
        hub = self.hub_leg_of(node)
        if hub is None:
            return self
        # The hub's LAN server keeps the timescale the hub node selects (``leap_timescale``): near a leap it
        # must never be set apart as the other one, or every node would publish nothing for a day.
        smearing = (hub.server.name,) if self.ntp.leap_timescale == "smear" else ()
        ntp = replace(self.ntp, servers=(hub.server,), server_groups=(), smearing_servers=smearing)
        return replace(self, ntp=ntp)


#: RFC 4330 asks clients not to poll a server more often than this (s).
MIN_PUBLIC_POLL_S = 16.0


def warnings_for(config: Config) -> list[str]:
    """Things that are allowed but unkind: polling public servers faster than RFC 4330 asks."""
    public = [s.name for s in config.ntp.servers if is_public(s.host)]
    found = []
    hub = config.service.hub
    polls: tuple[tuple[str, float], ...] = (
        ("timing.warm_up.measurement_interval", config.timing.warm_up_interval_s),
        ("timing.normal_operation.measurement_interval", config.timing.normal_interval_s))
    if hub is not None:  # only the hub node asks them, never warming up, at least its own interval apart
        polls = (("ntp_service.hub.measurement_interval", config.normal_interval_of(hub.node)),)
    for what, interval in polls:
        if public and interval < MIN_PUBLIC_POLL_S:
            if what.startswith("timing.warm_up") and config.timing.warm_up_duration_s == 0:
                continue
            key = what if what.startswith("ntp_service.") else f"clock_measurement.{what}"
            found.append(f"{config.source}: {key}: {interval:g} s polls {len(public)} public "
                         f"server(s) faster than once per {MIN_PUBLIC_POLL_S:g} s (RFC 4330); they may send "
                         "Kiss-o'-Death RATE or block this host")
    return found


def is_public(host: str) -> bool:
    """Whether ``host`` is someone else's server: a global address, or a name not obviously local."""
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return not (host == "localhost" or host.endswith((".local", ".lan", ".internal", ".localhost")))


def load(path: str | os.PathLike, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve a configuration file.

    Parameters
    ----------
    path:
        The YAML file.
    environ:
        The environment to take ``CHRONOTICK_REDIS_URL`` and
        ``CHRONOTICK_REDIS_PASSWORD`` from (default ``os.environ``).

    Raises
    ------
    ConfigError
        For an unreadable file or any invalid key; nothing has been changed.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "(file)", f"not valid YAML: {exc}") from None
    return from_mapping(document, source=source, environ=environ)


#: The sections of ``clock_measurement`` (ChronoTick's files have exactly these).
CLOCK_SECTIONS = ("ntp", "timing")


def from_mapping(document: Any, *, source: str = "<config>",
                 environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed document (see :func:`load`)."""
    environ = os.environ if environ is None else environ
    if not isinstance(document, dict):
        raise ConfigError(source, "(top level)", "must be a mapping")
    clock = _section(document, "clock_measurement", source, required=True)
    unknown = sorted(str(k) for k in set(clock) - set(CLOCK_SECTIONS))
    if unknown:  # a misspelt section would silently run on defaults
        raise ConfigError(source, f"clock_measurement.{unknown[0]}",
                          f"unknown section (known: {', '.join(CLOCK_SECTIONS)})")
    ntp_raw = _section(clock, "ntp", source, prefix="clock_measurement.", required=True)
    ntp = _parse_ntp(ntp_raw, source)
    timing = _parse_timing(_section(clock, "timing", source, prefix="clock_measurement."), source)
    service = _parse_service(_section(document, "ntp_service", source), source, environ)
    if service.hub is not None:
        burst = RetryPolicy.from_settings(ntp).samples
        for key, budget in (("max_requests_per_minute", service.hub.max_requests_per_minute),
                            ("max_requests_per_10_minutes", service.hub.max_requests_per_10_minutes)):
            if budget < burst:  # an attempt takes its whole burst's places or none: it could never be sent
                raise ConfigError(source, f"ntp_service.hub.{key}",
                                  f"{budget} is less than one attempt's {burst} requests "
                                  "(clock_measurement.ntp.advanced_samples): the hub node could never ask")
        if service.hub.max_requests_per_10_minutes < service.hub.max_requests_per_minute:
            raise ConfigError(source, "ntp_service.hub.max_requests_per_10_minutes",
                              f"{service.hub.max_requests_per_10_minutes} is less than max_requests_per_minute "
                              f"{service.hub.max_requests_per_minute}")
    extra = {k: v for k, v in document.items() if k not in ("clock_measurement", "ntp_service")}
    return Config(source=source, ntp=ntp, timing=timing, service=service, extra=extra)


def _section(parent: dict, name: str, source: str, *, prefix: str = "", required: bool = False) -> dict:
    value = parent.get(name)
    if value is None:
        if required:
            raise ConfigError(source, prefix + name, "missing section")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(source, prefix + name, f"must be a mapping, not {_type_name(value)}")
    return value


def _check_keys(raw: dict, settings_class, source: str, prefix: str) -> dict:
    """``{field name: value}`` for the keys of a flat section, each checked against its option."""
    schema = options_of(settings_class)
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(source, prefix + str(unknown[0]),
                          f"unknown key (known: {', '.join(sorted(schema))})")
    return {schema[key][0]: _checked(value, schema[key][1], source, prefix + key) for key, value in raw.items()}


def _checked(value: Any, opt: Option, source: str, key: str) -> Any:
    if isinstance(value, bool) and bool not in opt.types:
        # YAML's true/false are ints to Python; never accept them as numbers.
        raise ConfigError(source, key, f"must be {_types_text(opt.types)}, not a boolean")
    if not isinstance(value, opt.types):
        raise ConfigError(source, key, f"must be {_types_text(opt.types)}, not {_type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, key, f"must be a finite number, not {value!r}")
    if opt.check is not None and not opt.check(value):
        raise ConfigError(source, key, f"{opt.problem} (got {value!r})")
    return float(value) if opt.types == _NUMBER else value


def ntp_from_mapping(raw: dict, *, source: str = "<settings>") -> NtpSettings:
    """Validate a ``clock_measurement.ntp`` mapping (the inverse of :meth:`NtpSettings.as_mapping`)."""
    return _parse_ntp(raw, source)


def options_table(settings_class, *, prefix: str = "") -> str:
    """docs/contract.md's table of a section's options, from their declarations."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, (name, opt) in options_of(settings_class).items():
        default = next(f for f in fields(settings_class) if f.name == name).default
        shown = "—" if default in ((), None, "") or name == "servers" else (
            "null" if default is None else str(default).lower() if isinstance(default, bool) else f"{default}")
        rows.append(f"| `{prefix}{key}` | {shown} | {opt.doc} |")
    return "\n".join(rows)


def _parse_ntp(raw: dict, source: str) -> NtpSettings:
    prefix = "clock_measurement.ntp."
    values = _check_keys(raw, NtpSettings, source, prefix)
    if "servers" not in values:
        raise ConfigError(source, prefix + "servers", "missing (a list of host or host:port)")
    servers = tuple(parse_server(s, source=source, key=f"{prefix}servers[{i}]")
                    for i, s in enumerate(values.pop("servers")))
    if not servers:
        raise ConfigError(source, prefix + "servers", "empty: at least one server is needed")
    seen: dict[tuple, str] = {}
    for server in servers:  # by what it reaches, not how it is spelt: one server, one vote
        if server.identity in seen:
            again = "" if seen[server.identity] == server.name else f" (as {seen[server.identity]})"
            raise ConfigError(source, prefix + "servers", f"{server.name} is listed twice{again}")
        seen[server.identity] = server.name
    groups = _parse_groups(values.pop("server_groups", {}), servers, source, prefix + "server_groups")
    smearing = []
    for i, value in enumerate(values.pop("smearing_servers", [])):
        where = f"{prefix}smearing_servers[{i}]"
        server = parse_server(value, source=source, key=where)
        match = next((s for s in servers if s.identity == server.identity), None)
        if match is None:
            raise ConfigError(source, where, f"{value!r} is not one of clock_measurement.ntp.servers")
        smearing.append(match.name)
    settings = NtpSettings(servers=servers, server_groups=groups, smearing_servers=tuple(smearing), **values)
    if settings.max_stratum < settings.min_stratum:
        raise ConfigError(source, prefix + "max_stratum",
                          f"{settings.max_stratum} is below min_stratum {settings.min_stratum}")
    return settings


def _parse_groups(raw: dict, servers: tuple[ServerAddress, ...], source: str, key: str):
    """``{name: [server, ...]}``: servers that fail together and so vote once."""
    known = {s.name: s for s in servers}
    seen: dict[str, str] = {}
    groups = []
    for name, members in raw.items():
        where = f"{key}.{name}"
        if not isinstance(members, list) or len(members) < 2:
            raise ConfigError(source, where, "must be a list of at least two of the configured servers")
        names = []
        for i, member in enumerate(members):
            server = parse_server(member, source=source, key=f"{where}[{i}]")
            if server.name not in known:
                raise ConfigError(source, f"{where}[{i}]", f"{member!r} is not in clock_measurement.ntp.servers")
            if server.name in seen:
                raise ConfigError(source, f"{where}[{i}]", f"{member!r} is already in group {seen[server.name]!r}")
            seen[server.name] = str(name)
            names.append(server.name)
        groups.append(tuple(names))
    return tuple(groups)


def parse_server(value: Any, *, source: str = "<config>", key: str = "server") -> ServerAddress:
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``, each optionally after ``nts://``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, f"must be 'host' or 'host:port', not {value!r}")
    text = value.strip()
    nts = text.lower().startswith(NTS_SCHEME)
    if nts:
        text = text[len(NTS_SCHEME):]
    elif "://" in text:
        raise ConfigError(source, key, f"bad server {value!r}: the only scheme is {NTS_SCHEME}")
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (len(text) > end + 1 and text[end + 1] != ":"):
            raise ConfigError(source, key, f"bad address {value!r}: expected [ipv6] or [ipv6]:port")
        host, port_text = text[1:end], (text[end + 2:] if len(text) > end + 1 else None)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        try:
            host = str(ipaddress.IPv6Address(text))  # a bare IPv6 address, default port
        except ValueError:
            raise ConfigError(source, key, f"bad address {value!r}: an IPv6 address with a port is "
                                           "written [address]:port") from None
    if not host or any(c.isspace() for c in host):
        raise ConfigError(source, key, f"bad host in {value!r}")
    problem = host_name_problem(host)
    if problem:
        raise ConfigError(source, key, f"bad host name in {value!r}: {problem}")
    port = DEFAULT_NTS_KE_PORT if nts else DEFAULT_NTP_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(source, key, f"bad port in {value!r}: must be 1-65535")
        port = int(port_text)
    return ServerAddress(host=host, port=port, nts=nts)


#: A DNS name's limits (RFC 1035, section 2.3.4): a label, the whole name.
MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253


def host_name_problem(host: str) -> str | None:
    """Why ``host`` cannot be resolved as written (``None``: it is an address, or a well-formed name)."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    try:
        encoded = name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        return f"not a valid DNS name ({exc})"
    if len(encoded) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters"
    for label in encoded.split("."):
        if not label:
            return "an empty label (two dots in a row, or a leading dot)"
        if len(label) > MAX_LABEL_LENGTH:
            return f"the label {label[:20]!r}... is longer than {MAX_LABEL_LENGTH} characters"
        if not all(c.isalnum() or c in "-_" for c in label) or label.startswith("-") or label.endswith("-"):
            return f"the label {label!r} has characters a host name cannot have"
    return None


def _parse_timing(raw: dict, source: str) -> TimingSettings:
    """``warm_up.*`` and ``normal_operation.*``: two levels, each key checked against its option."""
    prefix = "clock_measurement.timing."
    schema = options_of(TimingSettings)
    groups: dict[str, list[str]] = {}
    for key in schema:
        group, leaf = key.split(".")
        groups.setdefault(group, []).append(leaf)
    unknown = sorted(set(raw) - set(groups))
    if unknown:
        raise ConfigError(source, prefix + str(unknown[0]), f"unknown key (known: {', '.join(groups)})")
    values = {}
    for group, leaves in groups.items():
        sub = _section(raw, group, source, prefix=prefix)
        extra = sorted(set(sub) - set(leaves))
        if extra:
            raise ConfigError(source, f"{prefix}{group}.{extra[0]}", f"unknown key (known: {', '.join(leaves)})")
        for leaf in leaves:
            if leaf in sub:
                name, opt = schema[f"{group}.{leaf}"]
                values[name] = _checked(sub[leaf], opt, source, f"{prefix}{group}.{leaf}")
    return TimingSettings(**values)


def _parse_service(raw: dict, source: str, environ) -> ServiceSettings:
    prefix = "ntp_service."
    values = _check_keys(raw, ServiceSettings, source, prefix)
    file_url = values.pop("redis_url", None)
    if file_url is not None:
        _check_redis_url(file_url, source, prefix + "redis_url")
        if redisurl.has_password(file_url):
            raise ConfigError(source, prefix + "redis_url",
                              f"holds a password: secrets stay out of YAML, set {ENV_REDIS_PASSWORD}")
    url = environ.get(ENV_REDIS_URL) or file_url or DEFAULT_REDIS_URL
    _check_redis_url(url, f"${ENV_REDIS_URL}" if environ.get(ENV_REDIS_URL) else source, prefix + "redis_url")
    password = environ.get(ENV_REDIS_PASSWORD)
    if password and not redisurl.has_password(url):
        url = redisurl.with_password(url, password)
    nodes = values.pop("nodes", [])
    for i, node in enumerate(nodes):
        if not isinstance(node, str) or not is_valid_node_name(node):
            raise ConfigError(source, f"{prefix}nodes[{i}]",
                              f"bad node name {node!r}: letters, digits, '-', '_' and '.' only")
    if len(set(nodes)) != len(nodes):
        raise ConfigError(source, prefix + "nodes", "a node is listed twice")
    hub_raw = values.pop("hub", None)
    hub = _parse_hub(hub_raw, source, nodes) if hub_raw is not None else None
    return ServiceSettings(redis_url=url, nodes=tuple(nodes), hub=hub, **values)


def _parse_hub(raw: dict, source: str, nodes: list[str]) -> HubSettings:
    prefix = "ntp_service.hub."
    values = _check_keys(raw, HubSettings, source, prefix)
    for key in ("address", "node"):
        if not values.get(key):
            raise ConfigError(source, prefix + key, "missing: a hub needs its `address` and its `node`")
    parse_server(values["address"], source=source, key=prefix + "address")
    if parse_server(values["address"]).nts:
        raise ConfigError(source, prefix + "address", "the hub is a LAN NTP server: plain `HOST[:PORT]`")
    if not is_valid_node_name(values["node"]):
        raise ConfigError(source, prefix + "node", f"bad node name {values['node']!r}")
    if nodes and values["node"] not in nodes:
        raise ConfigError(source, prefix + "node", f"{values['node']!r} is not in ntp_service.nodes")
    return HubSettings(**values)


def _check_redis_url(url: str, source: str, key: str) -> None:
    problem = redisurl.check(url)
    if problem:
        raise ConfigError(source, key, problem)


def service_from_environment(environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """The ``ntp_service`` settings of a process given no config file: Redis from the environment."""
    environ = os.environ if environ is None else environ
    return _parse_service({}, "$" + ENV_REDIS_URL, environ)


def is_valid_node_name(name: str) -> bool:
    """Node names become queue and key names: keep them to a safe alphabet."""
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


def resolve_node(cli_value: str | None = None, *, environ: Mapping[str, str] | None = None) -> str:
    """The node this process measures: ``--node``, else ``$CHRONOTICK_NODE``, else the host name.

    Raises ``ValueError`` for a name that cannot be a queue or key name.
    """
    environ = os.environ if environ is None else environ
    node = cli_value or environ.get(ENV_NODE) or socket.gethostname().split(".")[0]
    if not is_valid_node_name(node):
        raise ValueError(f"bad node name {node!r}: letters, digits, '-', '_' and '.' only")
    return node


def _types_text(types: tuple) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             list: "a list", type(None): "null"}
    if types == _NUMBER:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
