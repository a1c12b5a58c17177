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
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit, quote

import yaml

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

DEFAULT_NTP_PORT = 123


class ConfigError(ValueError):
    """A configuration that must not be used, with where and why."""

    def __init__(self, source: str, key: str, problem: str):
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ServerAddress:
    """One configured NTP server: ``host`` or ``host:port`` (``[v6]:port``)."""

    host: str
    port: int = DEFAULT_NTP_PORT

    @property
    def name(self) -> str:
        """The spelling used in records and logs: the config's, with the port if not 123."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_NTP_PORT else f"{host}:{self.port}"


@dataclass(frozen=True)
class NtpSettings:
    """``clock_measurement.ntp``: what to query and how good a sample must be.

    Times are seconds.  ``max_retries`` is the total number of attempts per
    server (0 and 1 both mean a single attempt), as it was in ChronoTick;
    ``retry_delay`` is the first wait, doubled after each further failure.
    """

    servers: tuple[ServerAddress, ...]
    timeout_seconds: float = 2.0
    max_acceptable_uncertainty: float = 0.010
    min_stratum: int = 1
    max_stratum: int = 15
    max_delay: float = 0.100
    measurement_mode: str = "simple"
    advanced_samples: int = 3
    outlier_window_size: int = 20
    outlier_sigma_threshold: float = 5.0
    parallel_queries: bool = True
    max_workers: int | None = None
    enable_fallback: bool = True
    max_retries: int = 3
    retry_delay: float = 5.0
    selection: str = "best"
    server_groups: tuple[tuple[str, ...], ...] = ()
    max_root_delay: float = 1.0
    max_root_dispersion: float = 1.0

    @property
    def config_id(self) -> str:
        """A short fingerprint of these settings: a change lifts DENY/RSTR demobilisation."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]

    @property
    def attempts(self) -> int:
        return max(1, self.max_retries)

    @property
    def retry_waits_s(self) -> tuple[float, ...]:
        """Waits between attempts: retry_delay, 2*retry_delay, ... (0, 5, 15 s starts)."""
        return tuple(self.retry_delay * 2 ** i for i in range(self.attempts - 1))


@dataclass(frozen=True)
class TimingSettings:
    """``clock_measurement.timing``: how often rounds run (seconds)."""

    warm_up_duration_s: float = 60.0
    warm_up_interval_s: float = 1.0
    normal_interval_s: float = 120.0

    def interval_at(self, elapsed_s: float) -> float:
        """The interval in force ``elapsed_s`` after the schedule started."""
        return self.warm_up_interval_s if elapsed_s < self.warm_up_duration_s else self.normal_interval_s


@dataclass(frozen=True)
class ServiceSettings:
    """``ntp_service``: the distributed side.

    ``redis_url`` here is the resolved URL (environment applied) and may hold
    a password: never log it; use :attr:`redis_url_redacted`.
    """

    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = "chronotick"
    nodes: tuple[str, ...] = ()
    history_length: int = 10_000
    worker_concurrency: int | None = None
    beat_lease_seconds: float = 10.0

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)


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


#: RFC 4330 asks clients not to poll a server more often than this (s).
MIN_PUBLIC_POLL_S = 16.0


def warnings_for(config: "Config") -> list[str]:
    """Things that are allowed but unkind: polling public servers faster than RFC 4330 asks."""
    public = [s.name for s in config.ntp.servers if is_public(s.host)]
    found = []
    for what, interval in (("timing.warm_up.measurement_interval", config.timing.warm_up_interval_s),
                           ("timing.normal_operation.measurement_interval", config.timing.normal_interval_s)):
        if public and interval < MIN_PUBLIC_POLL_S:
            if what.startswith("timing.warm_up") and config.timing.warm_up_duration_s == 0:
                continue
            found.append(f"{config.source}: clock_measurement.{what}: {interval:g} s polls {len(public)} public "
                         f"server(s) faster than once per {MIN_PUBLIC_POLL_S:g} s (RFC 4330); they may send "
                         "Kiss-o'-Death RATE or block this host")
    return found


def is_public(host: str) -> bool:
    """Whether ``host`` is someone else's server: a global address, or a name not obviously local."""
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return not (host == "localhost" or host.endswith((".local", ".lan", ".internal", ".localhost")))


# -- schema -----------------------------------------------------------------

_NUMBER = (int, float)

# key -> (types, check, problem) ; check(value) True means fine.
_NTP_KEYS: dict[str, tuple[tuple, Any, str]] = {
    "servers": ((list,), None, ""),
    "timeout_seconds": (_NUMBER, lambda v: v > 0, "must be greater than 0"),
    "max_acceptable_uncertainty": (_NUMBER, lambda v: v > 0, "must be greater than 0"),
    "min_stratum": ((int,), lambda v: 1 <= v <= 16, "must be between 1 and 16"),
    "max_stratum": ((int,), lambda v: 1 <= v <= 16, "must be between 1 and 16"),
    "max_delay": (_NUMBER, lambda v: v > 0, "must be greater than 0"),
    "measurement_mode": ((str,), lambda v: v in ("simple", "advanced"), "must be 'simple' or 'advanced'"),
    "advanced_samples": ((int,), lambda v: 1 <= v <= 8, "must be between 1 and 8"),
    "outlier_window_size": ((int,), lambda v: v >= 1, "must be at least 1"),
    "outlier_sigma_threshold": (_NUMBER, lambda v: v > 0, "must be greater than 0"),
    "parallel_queries": ((bool,), None, ""),
    "max_workers": ((int, type(None)), lambda v: v is None or v >= 1, "must be at least 1 (or null)"),
    "enable_fallback": ((bool,), None, ""),
    "max_retries": ((int,), lambda v: 0 <= v <= 10, "must be between 0 and 10"),
    "retry_delay": (_NUMBER, lambda v: v > 0, "must be greater than 0"),
    "selection": ((str,), lambda v: v in ("best", "combine"), "must be 'best' or 'combine'"),
    "server_groups": ((dict,), None, ""),
    "max_root_delay": (_NUMBER, lambda v: v > 0, "must be greater than 0"),
    "max_root_dispersion": (_NUMBER, lambda v: v > 0, "must be greater than 0"),
}
_TIMING_KEYS = {
    "warm_up": {"duration_seconds": lambda v: v >= 0, "measurement_interval": lambda v: v > 0},
    "normal_operation": {"measurement_interval": lambda v: v > 0},
}
_SERVICE_KEYS: dict[str, tuple[tuple, Any, str]] = {
    "redis_url": ((str,), None, ""),
    "key_prefix": ((str,), lambda v: bool(v) and not any(c.isspace() for c in v),
                   "must be a non-empty word without spaces"),
    "nodes": ((list,), None, ""),
    "history_length": ((int,), lambda v: v >= 1, "must be at least 1"),
    "worker_concurrency": ((int, type(None)), lambda v: v is None or v >= 1, "must be at least 1 (or null)"),
    "beat_lease_seconds": (_NUMBER, lambda v: v >= 1, "must be at least 1"),
}


def load(path: str | os.PathLike, *, environ: dict[str, str] | None = None) -> Config:
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


def from_mapping(document: Any, *, source: str = "<config>",
                 environ: dict[str, str] | None = None) -> Config:
    """Validate an already-parsed document (see :func:`load`)."""
    environ = os.environ if environ is None else environ
    if not isinstance(document, dict):
        raise ConfigError(source, "(top level)", "must be a mapping")
    clock = _section(document, "clock_measurement", source, required=True)
    ntp_raw = _section(clock, "ntp", source, prefix="clock_measurement.", required=True)
    ntp = _parse_ntp(ntp_raw, source)
    timing = _parse_timing(_section(clock, "timing", source, prefix="clock_measurement."), source)
    service = _parse_service(_section(document, "ntp_service", source), source, environ)
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


def _check_keys(raw: dict, schema: dict, source: str, prefix: str) -> dict:
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(source, prefix + str(unknown[0]),
                          f"unknown key (known: {', '.join(sorted(schema))})")
    values = {}
    for key, value in raw.items():
        types, check, problem = schema[key]
        if isinstance(value, bool) and bool not in types:
            # YAML's true/false are ints to Python; never accept them as numbers.
            raise ConfigError(source, prefix + key, f"must be {_types_text(types)}, not a boolean")
        if not isinstance(value, types):
            raise ConfigError(source, prefix + key, f"must be {_types_text(types)}, not {_type_name(value)}")
        if check is not None and not check(value):
            raise ConfigError(source, prefix + key, f"{problem} (got {value!r})")
        values[key] = float(value) if types == _NUMBER else value
    return values


def _parse_ntp(raw: dict, source: str) -> NtpSettings:
    prefix = "clock_measurement.ntp."
    values = _check_keys(raw, _NTP_KEYS, source, prefix)
    if "servers" not in values:
        raise ConfigError(source, prefix + "servers", "missing (a list of host or host:port)")
    servers = tuple(parse_server(s, source=source, key=f"{prefix}servers[{i}]")
                    for i, s in enumerate(values.pop("servers")))
    if not servers:
        raise ConfigError(source, prefix + "servers", "empty: at least one server is needed")
    names = [s.name for s in servers]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(source, prefix + "servers", f"{duplicate} is listed twice")
    groups = _parse_groups(values.pop("server_groups", {}), servers, source, prefix + "server_groups")
    settings = NtpSettings(servers=servers, server_groups=groups, **values)
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
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, f"must be 'host' or 'host:port', not {value!r}")
    text = value.strip()
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
    port = DEFAULT_NTP_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(source, key, f"bad port in {value!r}: must be 1-65535")
        port = int(port_text)
    return ServerAddress(host=host, port=port)


def _parse_timing(raw: dict, source: str) -> TimingSettings:
    prefix = "clock_measurement.timing."
    unknown = sorted(set(raw) - set(_TIMING_KEYS))
    if unknown:
        raise ConfigError(source, prefix + str(unknown[0]), f"unknown key (known: {', '.join(_TIMING_KEYS)})")
    found: dict[str, float] = {}
    for group, keys in _TIMING_KEYS.items():
        sub = _section(raw, group, source, prefix=prefix)
        extra = sorted(set(sub) - set(keys))
        if extra:
            raise ConfigError(source, f"{prefix}{group}.{extra[0]}", f"unknown key (known: {', '.join(keys)})")
        for key, check in keys.items():
            if key not in sub:
                continue
            value = sub[key]
            where = f"{prefix}{group}.{key}"
            if isinstance(value, bool) or not isinstance(value, _NUMBER):
                raise ConfigError(source, where, f"must be a number of seconds, not {_type_name(value)}")
            if not check(value):
                raise ConfigError(source, where, f"must be greater than 0 (got {value!r})")
            found[f"{group}.{key}"] = float(value)
    defaults = TimingSettings()
    return TimingSettings(
        warm_up_duration_s=found.get("warm_up.duration_seconds", defaults.warm_up_duration_s),
        warm_up_interval_s=found.get("warm_up.measurement_interval", defaults.warm_up_interval_s),
        normal_interval_s=found.get("normal_operation.measurement_interval", defaults.normal_interval_s),
    )


def _parse_service(raw: dict, source: str, environ) -> ServiceSettings:
    prefix = "ntp_service."
    values = _check_keys(raw, _SERVICE_KEYS, source, prefix)
    file_url = values.pop("redis_url", None)
    if file_url is not None:
        _check_redis_url(file_url, source, prefix + "redis_url")
        if urlsplit(file_url).password:
            raise ConfigError(source, prefix + "redis_url",
                              f"holds a password: secrets stay out of YAML, set {ENV_REDIS_PASSWORD}")
    url = environ.get(ENV_REDIS_URL) or file_url or DEFAULT_REDIS_URL
    _check_redis_url(url, f"${ENV_REDIS_URL}" if environ.get(ENV_REDIS_URL) else source, prefix + "redis_url")
    password = environ.get(ENV_REDIS_PASSWORD)
    if password and not urlsplit(url).password:
        url = _with_password(url, password)
    nodes = values.pop("nodes", [])
    for i, node in enumerate(nodes):
        if not isinstance(node, str) or not is_valid_node_name(node):
            raise ConfigError(source, f"{prefix}nodes[{i}]",
                              f"bad node name {node!r}: letters, digits, '-', '_' and '.' only")
    if len(set(nodes)) != len(nodes):
        raise ConfigError(source, prefix + "nodes", "a node is listed twice")
    return ServiceSettings(redis_url=url, nodes=tuple(nodes), **values)


def _check_redis_url(url: str, source: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(source, key, f"must be a redis://, rediss:// or unix:// URL, not {redact_url(url)!r}")


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = quote(parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe to print)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def service_from_environment(environ: dict[str, str] | None = None) -> ServiceSettings:
    """The ``ntp_service`` settings of a process given no config file: Redis from the environment."""
    environ = os.environ if environ is None else environ
    return _parse_service({}, "$" + ENV_REDIS_URL, environ)


def is_valid_node_name(name: str) -> bool:
    """Node names become queue and key names: keep them to a safe alphabet."""
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


def resolve_node(cli_value: str | None = None, *, environ: dict[str, str] | None = None) -> str:
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
