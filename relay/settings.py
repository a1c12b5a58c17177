"""The relay's configuration: ChronoTick's ``ntp_proxy_config.yaml``, unchanged, plus optional keys.

ChronoTick's file::

    proxy_mappings:
      - listen_port: 8123
        ntp_server: time.google.com
        ntp_port: 123

Each mapping may also carry (this project's, optional):

``min_interval_s``, ``upstream_burst``
    What the relay sends that upstream, all clients together: a token bucket
    of ``upstream_burst`` requests, refilled by one every ``min_interval_s``.
    The head node is *one* client to a public server, however many nodes
    stand behind it.  Absent: the defaults below, within the public servers'
    published rules -- a start-up burst of 4 (chrony's ``iburst``), then one
    request every 4 s at most (NIST: never more often than once every 4 s).
    A request over the budget is not forwarded: the relay answers it with a
    RATE kiss of its own (RFC 5905 section 7.4), counted ``policy_refused``,
    and the node's worker backs that server off (``workers/kod.py``).
    docs/operations.md ("Politeness: the arithmetic") has the numbers for
    10, 100 and 1,000 nodes; warm-ups belong on the hub, not here.
``rate_backoff_s``
    How long the relay leaves the upstream alone after it sent a RATE kiss
    (default :data:`DEFAULT_RATE_BACKOFF_S`).

Every problem is one :class:`RelayConfigError` naming the file, the key and
what is wrong, found before any socket is opened.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workers.ntp import packet

#: After a RATE kiss, forward nothing to that upstream for this long (s): chrony's
#: default minimum poll interval, 2^6 s.
DEFAULT_RATE_BACKOFF_S = 64.0
#: Per client and port, a sustained request rate above one per this many seconds is refused (s):
#: 4 a second, over the 3 a second of a ChronoTick node's advanced warm-up (3 samples every 1 s).
DEFAULT_CLIENT_INTERVAL_S = 0.25
#: ... after a burst of this many requests: a round's 3 samples and a retry's 3, with room.
DEFAULT_CLIENT_BURST = 8
#: All clients together, one request per this many seconds to an upstream in the long run (s):
#: NIST's rule for its servers, "never query more frequently than once every 4 seconds".  Ten ARES
#: nodes in normal operation (3 samples every 120 s each) fit exactly; more are policy-refused.
DEFAULT_MIN_INTERVAL_S = 4.0
#: ... after a start-up burst of this many: chrony's ``iburst`` (4 requests), room for one
#: advanced-mode round (3 samples).  A warm-up (3 a second) is policy-refused after it.
DEFAULT_UPSTREAM_BURST = 4
#: The published rules the defaults keep, for the start-up warning about a mapping set past them:
#: NIST's 4 s, and a start-up burst no larger than chrony's ``iburst``.
POLITE_MIN_INTERVAL_S = 4.0
POLITE_BURST = 4
#: A request whose reply has not come by then is given up (its reply, if it comes, is dropped) (s).
DEFAULT_TIMEOUT_S = 4.0
#: The longest ``--timeout`` and ``--client-interval`` accepted (s): beyond, requests would be
#: remembered for ever.
MAX_TIMEOUT_S = 60.0
MAX_CLIENT_INTERVAL_S = 3_600.0
#: Upstream names are resolved again this often (s): the Pool rotates its addresses.
DEFAULT_RESOLVE_EVERY_S = 300.0
#: After a failed look-up the name is asked again this soon (s), the wait doubling after each failure up to
#: ``resolve_every_s``: a relay started before DNS works serves seconds after it does, not minutes.
DEFAULT_RESOLVE_RETRY_S = 1.0
#: The longest a setting in seconds may be: :data:`MAX_TIMEOUT_S`, :data:`MAX_CLIENT_INTERVAL_S`, a day for the
#: look-ups' intervals.
_MOST_S = {"timeout_s": MAX_TIMEOUT_S, "client_interval_s": MAX_CLIENT_INTERVAL_S, "resolve_every_s": 86_400.0,
           "resolve_retry_s": 86_400.0}
#: What the relay binds, unless told: loopback only.
DEFAULT_BIND = "127.0.0.1"
#: Who it answers, unless told: loopback only.
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")

_MAPPING_KEYS = ("listen_port", "ntp_server", "ntp_port", "min_interval_s", "upstream_burst", "rate_backoff_s")


#: :attr:`RelayConfigError.source` of a problem of the command line: its key is the flag (``--bind``).
COMMAND_LINE = ""


class RelayConfigError(ValueError):
    """A relay configuration that must not be used, with where and why.

    ``source``: the proxy file, and ``key`` the place in it (``proxy_mappings[0].listen_port``); or
    :data:`COMMAND_LINE`, and ``key`` the flag (``--bind``).
    """

    def __init__(self, source: str, key: str, problem: str):
        super().__init__(f"{source}: {key}: {problem}" if source else f"{key}: {problem}")
        self.source, self.key, self.problem = source, key, problem


@dataclass(frozen=True)
class Mapping:
    """One listening port and the upstream server it relays to."""

    listen_port: int
    ntp_server: str
    ntp_port: int = packet.NTP_PORT
    min_interval_s: float = DEFAULT_MIN_INTERVAL_S
    upstream_burst: int = DEFAULT_UPSTREAM_BURST
    rate_backoff_s: float = DEFAULT_RATE_BACKOFF_S

    @property
    def upstream(self) -> str:
        return f"{self.ntp_server}:{self.ntp_port}"


@dataclass(frozen=True)
class RelaySettings:
    """What ``chronotick-ntp relay`` runs with."""

    mappings: tuple[Mapping, ...]
    bind: str = DEFAULT_BIND
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_ALLOW)
    client_interval_s: float = DEFAULT_CLIENT_INTERVAL_S
    client_burst: int = DEFAULT_CLIENT_BURST
    timeout_s: float = DEFAULT_TIMEOUT_S
    resolve_every_s: float = DEFAULT_RESOLVE_EVERY_S
    resolve_retry_s: float = DEFAULT_RESOLVE_RETRY_S

    def __post_init__(self) -> None:
        for name, most in _MOST_S.items():
            problem = _seconds_problem(getattr(self, name), most)
            if problem:
                raise ValueError(f"{name} {problem}")
        problem = _burst_problem(self.client_burst)
        if problem:
            raise ValueError(f"client_burst {problem}")

    def allows(self, address: str) -> bool:
        """Whether a client at ``address`` may use the relay."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.allow)


def impolite(mapping: Mapping) -> list[str]:
    """What a mapping sets past the public servers' published rules (empty: nothing); the relay warns once."""
    problems = []
    if mapping.min_interval_s < POLITE_MIN_INTERVAL_S:
        problems.append(f"min_interval_s {mapping.min_interval_s:g} s: NIST asks for at most one request every "
                        f"{POLITE_MIN_INTERVAL_S:g} s")
    if mapping.upstream_burst > POLITE_BURST:
        problems.append(f"upstream_burst {mapping.upstream_burst}: a start-up burst above chrony's iburst "
                        f"({POLITE_BURST})")
    return problems


def describe(mapping: Mapping) -> str:
    """A mapping's limit in words, for the relay's start-up lines."""
    return (f"upstream at most {mapping.upstream_burst} requests at once, then one per {mapping.min_interval_s:g} s; "
            f"over that, a RATE kiss from the relay (policy_refused); {mapping.rate_backoff_s:g} s of silence after "
            "the upstream's own RATE")


def load_mappings(path: str | Path) -> tuple[Mapping, ...]:
    """Read the ``proxy_mappings`` of a ChronoTick proxy file."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise RelayConfigError(source, "(file)", f"cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RelayConfigError(source, "(file)", f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or "proxy_mappings" not in raw:
        raise RelayConfigError(source, "proxy_mappings", "missing: the file must have a proxy_mappings list")
    items = raw["proxy_mappings"]
    if not isinstance(items, list) or not items:
        raise RelayConfigError(source, "proxy_mappings", "must be a non-empty list")
    mappings: list[Mapping] = []
    for i, item in enumerate(items):
        where = f"proxy_mappings[{i}]"
        if not isinstance(item, dict):
            raise RelayConfigError(source, where, "must be a mapping with listen_port, ntp_server, ntp_port")
        unknown = sorted(set(item) - set(_MAPPING_KEYS))
        if unknown:
            raise RelayConfigError(source, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(_MAPPING_KEYS)})")
        mappings.append(Mapping(
            listen_port=_port(item, "listen_port", source, where, required=True),
            ntp_server=_server(item, source, where),
            ntp_port=_port(item, "ntp_port", source, where, required=False),
            min_interval_s=_seconds(item, "min_interval_s", source, where, DEFAULT_MIN_INTERVAL_S),
            upstream_burst=_count(item, "upstream_burst", source, where, DEFAULT_UPSTREAM_BURST),
            rate_backoff_s=_seconds(item, "rate_backoff_s", source, where, DEFAULT_RATE_BACKOFF_S),
        ))
    ports = [m.listen_port for m in mappings]
    for i, port in enumerate(ports):
        if port in ports[:i]:
            raise RelayConfigError(source, f"proxy_mappings[{i}].listen_port", f"port {port} is listed twice")
    return tuple(mappings)


def parse_allow(values: list[str] | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``--allow`` CIDRs (default: loopback only); a bad one raises :class:`RelayConfigError` naming it."""
    if not values:
        return tuple(ipaddress.ip_network(n) for n in DEFAULT_ALLOW)
    nets = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise RelayConfigError(COMMAND_LINE, "--allow",
                                   f"{value!r} is not an address or CIDR (e.g. 172.20.0.0/16)") from None
    return tuple(nets)


def from_arguments(config: str | Path, *, bind: str | None = None, allow: list[str] | None = None,
                   timeout_s: float | None = None, client_interval_s: float | None = None,
                   client_burst: int | None = None) -> RelaySettings:
    """What ``chronotick-ntp relay`` runs with: the proxy file ``config`` and the flags (``None``: not given,
    the default).

    Every problem, found before any socket is opened, is one :class:`RelayConfigError`: a key of the file, or
    the flag (``--bind``, ``--allow``, ``--timeout``, ``--client-interval``, ``--client-burst``).  A ``bind``
    other than loopback needs ``allow``: the default answers only loopback clients, which could not reach it.
    """
    mappings = load_mappings(config)
    nets = parse_allow(allow)
    bind = bind or DEFAULT_BIND
    try:
        address = ipaddress.ip_address(bind)
    except ValueError:
        raise RelayConfigError(COMMAND_LINE, "--bind",
                               f"{bind!r} is not an IP address (the relay binds one address)") from None
    if not address.is_loopback and not allow:
        raise RelayConfigError(COMMAND_LINE, "--bind", f"{bind} without --allow would answer only loopback "
                               "clients, which cannot reach it: give the nodes' network, e.g. --allow 172.20.0.0/16")
    given: dict[str, Any] = {}
    for flag, name, value in (("--timeout", "timeout_s", timeout_s),
                              ("--client-interval", "client_interval_s", client_interval_s),
                              ("--client-burst", "client_burst", client_burst)):
        if value is None:
            continue
        problem = _burst_problem(value) if name == "client_burst" else _seconds_problem(value, _MOST_S[name])
        if problem:
            raise RelayConfigError(COMMAND_LINE, flag, problem)
        given[name] = value
    return RelaySettings(mappings=mappings, bind=bind, allow=nets, **given)


def _seconds_problem(value: Any, most: float) -> str | None:
    """What is wrong with ``value`` as a setting in seconds of at most ``most`` (``None``: nothing)."""
    if isinstance(value, int | float) and math.isfinite(value) and 0 < value <= most:
        return None
    return f"must be a finite number of seconds > 0 and <= {most:g}, not {value!r}"


def _burst_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as a client burst (``None``: nothing)."""
    return None if isinstance(value, int) and value >= 1 else f"must be at least 1, not {value!r}"


def _port(item: dict, key: str, source: str, where: str, *, required: bool) -> int:
    if key not in item:
        if required:
            raise RelayConfigError(source, f"{where}.{key}", "missing")
        return packet.NTP_PORT
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise RelayConfigError(source, f"{where}.{key}", f"must be a port number 1-65535, not {value!r}")
    return value


def _server(item: dict, source: str, where: str) -> str:
    value = item.get("ntp_server")
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise RelayConfigError(source, f"{where}.ntp_server", f"must be a host name or address, not {value!r}")
    return value.strip()


def _seconds(item: dict, key: str, source: str, where: str, default: Any) -> Any:
    if key not in item or item[key] is None:
        return default
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise RelayConfigError(source, f"{where}.{key}", f"must be a number of seconds > 0, not {value!r}")
    return float(value)


def _count(item: dict, key: str, source: str, where: str, default: int) -> int:
    if key not in item or item[key] is None:
        return default
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RelayConfigError(source, f"{where}.{key}", f"must be a whole number of requests >= 1, not {value!r}")
    return value
