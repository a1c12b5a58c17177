"""``chronotick-ntp``: the command line, one sub-command per job.

Exit codes: 0 success; 1 starvation or an unfinished round (``up``: a service
exited by itself); 2 bad config or usage; 3 no worker serves the node's queue;
4 Redis (the broker) unreachable; 5 (``up``) a port or the data directory in use;
141 the reader of stdout went away (``| head -1``), quietly, as a program SIGPIPE ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import signal
import sys
import time

import redis

from workers import config as config_mod
from workers import redisurl
from workers.redisclock import RedisClock, clock_for, redis_now
from workers.retry import RetryPolicy

from . import commands, defaults, display
from .commands import (  # every command's exit codes and one-line failure, the plug-ins' too
    EXIT_CLOSED_PIPE,
    EXIT_IN_USE,
    EXIT_NO_BROKER,
    EXIT_NO_WORKER,
    EXIT_OK,
    EXIT_SERVICE_FAILED,
    EXIT_STARVATION,
    EXIT_USAGE,
    CliError,
)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    ours: set[str] = set()
    parser = _parser(plugins=False, names=ours)
    if not words or words[0] not in ours:  # other packages' commands (entry points) only when asked for
        parser = _parser()
    args = parser.parse_args(words)
    logging.basicConfig(level=getattr(args, "loglevel", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # some other pipe or socket: not for this handler to hide
        _discard_stdout()
        return EXIT_CLOSED_PIPE
    except config_mod.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except redis.RedisError as exc:  # Redis went away after the first check
        print(f"error: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_NO_BROKER
    except KeyboardInterrupt:
        return 130


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader is gone: poll says POLLERR or POLLHUP."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced (a test's capture) or closed
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit finds no closed pipe either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _parser(*, plugins: bool = True, names: set[str] | None = None) -> argparse.ArgumentParser:
    """Every command's parser; ``plugins``: with other packages' commands; ``names`` collects the commands'."""
    # Every default a help names comes from where it is declared (or is argparse's own, %(default)s):
    # tests/unit/test_cli_help.py holds each help to its option's default.
    from relay import settings as relay_settings

    parser = argparse.ArgumentParser(prog="chronotick-ntp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_text, *, config=True, node=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", required=True, help="YAML configuration file")
        if node:
            p.add_argument("--node", help=f"node to measure (default ${config_mod.ENV_NODE}, else the host name)")
        p.add_argument("--loglevel", default="WARNING", help="logging level (default %(default)s)")
        p.set_defaults(func=func)
        return p

    p = command("measure", cmd_measure, "run one round through the workers now and print the result")
    p.add_argument("--json", action="store_true", help="print the round record as JSON")
    p.add_argument("--complete", action="store_true",
                   help="wait for the servers still out when the round was published, and show what they said")
    p = command("latest", cmd_latest, "print the node's latest published measurement")
    p.add_argument("--json", action="store_true", help="print the raw JSON value")
    p.add_argument("--follow", "-f", action="store_true",
                   help="then print each new measurement as it is published (until interrupted)")
    p = command("status", cmd_status, "each node's figures over the last hours against ChronoTick's targets")
    p.add_argument("--hours", type=_positive_float, default=24.0, help="window (default %(default)g)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = command("servers", cmd_servers, "each server of a node: state, reach, last sample, failures "
                "(like chronyc sources)")
    p.add_argument("--hours", type=_positive_float, default=1.0,
                   help="window of rounds the failures and last samples are read from (default %(default)g)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = command("exporter", cmd_exporter, "serve Prometheus metrics for every node from Redis", node=False)
    p.add_argument("--address", default=None,
                   help=f"HOST or HOST:PORT to bind (default ${defaults.ENV_EXPORTER_ADDRESS}, "
                        f"else {defaults.EXPORTER_ADDRESS})")
    p.add_argument("--port", type=_port, default=None,
                   help=f"port (default: the address's, else {defaults.EXPORTER_PORT})")
    p = command("plot", cmd_plot, "draw a node's offsets, servers and round times to a PNG")
    p.add_argument("--hours", type=_positive_float, default=24.0, help="window (default %(default)g)")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p = sub.add_parser("check-config", help="validate a configuration file and summarise it")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config, loglevel="WARNING")
    p = command("worker", cmd_worker, "start a Celery worker serving one node's queue")
    p.add_argument("--concurrency", type=int, help="threads (default: one per server, plus two)")
    p.add_argument("--events", action="store_true", help="send task events (for Flower)")
    p = command("beat", cmd_beat, "run rounds for every configured node on the configured timing")
    p = command("flower", cmd_flower, "start Flower on this config's Redis, behind basic auth", node=False)
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=_port, default=5555, help="port (default %(default)s)")
    p.add_argument("--allow-control", action="store_true",
                   help="let Flower users revoke, terminate and apply tasks (default: read-only)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="start without authentication (anyone who reaches the port sees and, with "
                        "--allow-control, controls every task)")
    p = command("relay", cmd_relay, "relay NTP for nodes without Internet (ChronoTick's ntp_proxy_config.yaml)",
                config=False, node=False)
    p.add_argument("--config", required=True, help="ChronoTick's proxy file (proxy_mappings)")
    p.add_argument("--bind", default=None,
                   help=f"the one address to listen on (default {relay_settings.DEFAULT_BIND})")
    p.add_argument("--allow", nargs="+", metavar="CIDR", help="clients answered (default: loopback only)")
    p.add_argument("--timeout", type=_positive_float, default=None,
                   help=f"seconds a request waits for its reply (default {relay_settings.DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--client-interval", type=_positive_float, default=None,
                   help="per client and port, at most one request per this many seconds, sustained "
                        f"(default {relay_settings.DEFAULT_CLIENT_INTERVAL_S:g})")
    p.add_argument("--client-burst", type=int, default=None,
                   help=f"... after a burst of this many (default {relay_settings.DEFAULT_CLIENT_BURST})")
    p.add_argument("--key-prefix", default=config_mod.ServiceSettings.key_prefix,
                   help=f"first part of the Redis keys the counts go to (with ${config_mod.ENV_REDIS_URL}; "
                        "default %(default)s)")
    p = command("hub", cmd_hub, "the head node as the cluster's time hub: chronyd for the LAN and the hub "
                "node's rounds against the public servers (ntp_service.hub)", node=False)
    p.add_argument("--bind", required=True, help="the head's LAN address chronyd listens on")
    p.add_argument("--allow", nargs="+", required=True, metavar="CIDR", help="the LAN networks chronyd answers")
    p.add_argument("--chronyd", default=None,
                   help=f"chronyd's path (default: chronyd on PATH, or {defaults.CHRONYD})")
    p.add_argument("--chronyd-user", default=None,
                   help="the user chronyd drops to when started as root (default: the first of "
                        f"{', '.join(defaults.CHRONYD_USERS)} that exists)")
    p.add_argument("--run-dir", default=None,
                   help=f"where chronyd's configuration, pid and drift files go (default ./{defaults.HUB_RUN_DIR})")
    p.add_argument("--worker-user", default=None,
                   help="started as root (chronyd needs it), the hub node's worker runs as this user "
                        f"(default {defaults.HUB_WORKER_USER}; root only if named)")
    p = command("cluster", cmd_cluster, "each node's clock against a reference node, bounded by the LAN "
                "(through ntp_service.hub)", node=False)
    p.add_argument("--reference", default=None, help="the reference node (default: the hub node, else the first)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw every node's offset to the reference over time")
    p.add_argument("--hours", type=_positive_float, default=1.0, help="the plot's window (default %(default)g)")
    p = command("up", cmd_up, "one box: a private Redis (unless one is configured), this node's worker, the beat "
                "and the exporter; Ctrl-C stops all")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (f"exit codes:\n  {EXIT_OK}  stopped by Ctrl-C, SIGTERM or SIGHUP: the services first, then Redis\n"
                f"  {EXIT_SERVICE_FAILED}  a service or Redis exited by itself; up stopped the rest and named it\n"
                f"  {EXIT_USAGE}  bad config or usage: the file, --data-dir (a file, not writable), no redis-server\n"
                f"  {EXIT_IN_USE}  in use: the private Redis' or the exporter's port, or the data directory (another "
                "up)\nnothing is started before the checks behind 2 and 5 pass.")
    p.add_argument("--data-dir", default=None,
                   help="where the private Redis keeps its data, locked while up runs "
                        f"(default ./{defaults.DATA_DIR})")
    p.add_argument("--exporter-port", type=_port, default=None,
                   help=f"the exporter's port (default: ${defaults.ENV_EXPORTER_ADDRESS}'s, "
                        f"else {defaults.EXPORTER_PORT})")
    p.add_argument("--redis-port", type=lambda text: 0 if text.strip() == "0" else _port(text), default=None,
                   help=f"the private Redis' loopback port (default {defaults.REDIS_PORT}; 0: any free port)")
    for plugin in commands.discovered() if plugins else ():  # other packages' (the simulator's demo, simulate)
        plugin.arguments(command(plugin.name, plugin.run, plugin.help, config=plugin.config, node=plugin.node))
    if names is not None:
        names.update(sub.choices)
    return parser



# -- helpers ------------------------------------------------------------------

def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, not {text}")
    return value


def _load(args) -> config_mod.Config:
    config = config_mod.load(args.config)
    from workers.app import app, configure

    configure(app, config.service)
    return config


def _node(args) -> str:
    try:
        return config_mod.resolve_node(getattr(args, "node", None))
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _check_broker(config: config_mod.Config) -> None:
    client = redisurl.connect(config.service.redis_url, config.service.redis_master_name, timeout_s=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CliError(f"cannot reach Redis at {config.service.redis_url_redacted}: {exc}. "
                       f"Start it, or set ${config_mod.ENV_REDIS_URL}.", EXIT_NO_BROKER) from None
    finally:
        client.close()


# -- commands -----------------------------------------------------------------

def _warn(config: config_mod.Config) -> None:
    for warning in config_mod.warnings_for(config):
        print(f"warning: {warning}", file=sys.stderr)


def cmd_check_config(args) -> int:
    config = config_mod.load(args.file)
    _warn(config)
    ntp, timing, service = config.ntp, config.timing, config.service
    print(f"{args.file}: OK")
    print(f"  servers ({len(ntp.servers)}): {', '.join(s.name for s in ntp.servers)}")
    secured = [s.name for s in ntp.servers if s.nts]
    print(f"  NTS (RFC 8915): {len(secured)} of {len(ntp.servers)} servers"
          + (f" ({', '.join(secured)})" if secured else "")
          + f"; auth_select: {ntp.auth_select}"
          + (f"; extra CA file {ntp.nts_ca_file}" if ntp.nts_ca_file else ""))
    print(f"  strict gate: delay <= {ntp.max_delay * 1e3:g} ms, uncertainty <= "
          f"{ntp.max_acceptable_uncertainty * 1e3:g} ms, stratum {ntp.min_stratum}-{ntp.max_stratum}")
    print(f"  fallback: {'on (2x delay, 2x uncertainty)' if ntp.enable_fallback else 'off'}")
    print(f"  selection: {ntp.selection}; falsetickers rejected by majority of "
          f"{len(ntp.servers) - sum(len(g) - 1 for g in ntp.server_groups)} votes"
          + "".join(f"; group of {len(g)} votes once ({', '.join(g)})" for g in ntp.server_groups))
    print(f"  temporal filter: {ntp.outlier_window_size} results, {ntp.outlier_sigma_threshold:g} sigma")
    print(f"  mode: {ntp.measurement_mode}, {'parallel' if ntp.parallel_queries else 'sequential'}, "
          f"timeout {ntp.timeout_seconds:g} s")
    retry = RetryPolicy.from_settings(ntp)
    starts, attempt_s, latest = retry.offsets_s, retry.attempt_s, retry.latest_starts_s
    print(f"  attempts per server: {retry.attempts}, starting at {', '.join(f'{s:g}' for s in starts)} s "
          "after the first attempt's start"
          + ("" if latest == starts else
             f" (at the latest {', '.join(f'{s:g}' for s in latest)} s: an attempt takes up to {attempt_s:g} s, "
             "and a retry due before its attempt failed starts at once)"))
    print(f"  timing: warm-up {timing.warm_up_duration_s:g} s every {timing.warm_up_interval_s:g} s, "
          f"then every {timing.normal_interval_s:g} s")
    print(f"  redis: {service.redis_url_redacted}, key prefix {service.key_prefix!r}")
    print(f"  nodes: {', '.join(service.nodes) or '(this host only)'}")
    if service.hub is not None:
        hub = service.hub
        print(f"  hub: every node but {hub.node} measures {hub.address} on the LAN; {hub.node} measures the "
              f"{len(ntp.servers)} server(s) above every {config.normal_interval_of(hub.node):g} s, never warming "
              f"up, each within {hub.max_requests_per_minute} requests a minute and "
              f"{hub.max_requests_per_10_minutes} in 10 minutes (enforced in Redis); its leg's drift bound "
              f"{hub.max_drift_ppm:g} ppm")
    return EXIT_OK


def cmd_measure(args) -> int:
    config = _load(args)
    node = _node(args)
    from workers.app import queue_for, workers_for_queue

    from . import rounds

    _check_broker(config)
    queue = queue_for(node)
    if not workers_for_queue(queue):
        raise CliError(f"no worker serves queue {queue!r} for node {node!r}. Start one on that node: "
                       f"chronotick-ntp worker --config {args.config} --node {node}", EXIT_NO_WORKER)
    handle = rounds.dispatch(config, node)
    record = handle.wait(complete=args.complete)
    if record is None:
        # The chord will not fire (a worker died, a message was lost): close the
        # round with what its tasks reported, as the scheduler would.
        print(f"round {handle.round_id}: no callback by its deadline; closing it with what it has",
              file=sys.stderr)
        record = rounds.close(handle) or handle.stored_record()  # or the callback won by a hair
    if record is None:
        raise CliError(f"round {handle.round_id} did not finish by its deadline", EXIT_STARVATION)
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True))
    else:
        print(display.format_round(record))
    return EXIT_OK if record["latest"] is not None else EXIT_STARVATION


def cmd_latest(args) -> int:
    config = _load(args)
    node = _node(args)
    _check_broker(config)

    from .store import Store

    store = Store(redisurl.connect(config.service.redis_url, config.service.redis_master_name),
                  prefix=config.service.key_prefix)
    latest = store.latest(node)
    if latest is None and not args.follow:
        print(f"no measurement published for node {node!r} yet", file=sys.stderr)
        return EXIT_STARVATION
    if latest is not None:
        if args.json:
            print(json.dumps(latest, sort_keys=True), flush=True)
        else:
            print(display.format_latest(latest, now=redis_now(store.client)))
            stats = store.stats(node)
            shown = ("rounds", "strict", "relaxed", "starvation", "outage", "queries", "retries", "rejected")
            print("stats: " + ", ".join(f"{k} {stats[k]}" for k in shown), flush=True)
    if args.follow:
        return _follow(config, node, as_json=args.json, service_clock=clock_for(store.client))
    return EXIT_OK


def _follow(config: config_mod.Config, node: str, *, as_json: bool, service_clock: RedisClock) -> int:
    """Print each measurement published for ``node`` until interrupted (or SIGTERM); ages on Redis' clock."""
    from .reader import NtpReader, ServiceUnavailable

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"following {node!r}: each new measurement as it is published (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    with NtpReader(config.service.redis_url, prefix=config.service.key_prefix,
                   master_name=config.service.redis_master_name) as reader:
        try:
            for m in reader.updates(node):
                print(json.dumps(m.raw, sort_keys=True) if as_json
                      else display.format_latest(m.raw, now=service_clock.now()), flush=True)
        except ServiceUnavailable as exc:
            raise CliError(str(exc), EXIT_NO_BROKER) from None
    return EXIT_OK


def _nodes_to_report(args, config: config_mod.Config, store) -> list[str]:
    if args.node:
        return [_node(args)]
    nodes = sorted({*config.service.nodes, *store.nodes()})
    return nodes or [_node(args)]


def cmd_status(args) -> int:
    config = _load(args)
    _check_broker(config)
    from . import targets
    from .store import store_for

    store = store_for(config.service)
    now = time.time()
    since = now - args.hours * 3600  # history_since reads it on Redis' clock
    read = {node: (store.history_since(node, since), store.latest(node))
            for node in _nodes_to_report(args, config, store)}
    # Ages are Redis' clock now (read after every ``latest``) minus ``published_at``: never this host's
    # clock, nor the node's own (``measured_at``), which may be hours off.
    service_now = redis_now(store.client)
    # The hub node's rounds are further apart (ntp_service.hub.measurement_interval): it is stale later.
    nodes = {node: targets.node_report(records, latest, now=service_now,
                                       stale_after_s=config.stale_after_s(node))
             for node, (records, latest) in read.items()}
    ok = all(n["ok"] for n in nodes.values())
    if args.json:
        print(json.dumps({"ok": ok, "hours": args.hours, "generated_at": now, "nodes": nodes}, indent=2,
                         sort_keys=True))
    else:
        print(display.format_status(nodes, hours=args.hours, color=sys.stdout.isatty()))
    return EXIT_OK if ok else EXIT_STARVATION


def cmd_servers(args) -> int:
    config = _load(args)
    node = _node(args)
    _check_broker(config)
    from . import sources
    from .store import store_for

    store = store_for(config.service)
    now = time.time()
    records = store.history_since(node, now - args.hours * 3600)
    report = sources.report(node, [s.name for s in config.for_node(node).ntp.servers], records, store.reach(node),
                            now=now)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(display.format_servers(report))
    return EXIT_OK


def cmd_exporter(args) -> int:
    config = _load(args)
    from prometheus_client import start_http_server

    from .exporter import collector_for, listen_address, registry_for
    from .store import service_client

    try:  # the flags, else $CHRONOTICK_EXPORTER_ADDRESS (the systemd unit's env file), else 127.0.0.1:9124
        address, port = listen_address(args.address, args.port, os.environ)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    collector = collector_for(config, service_client(config.service))
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        server, thread = start_http_server(port, addr=address, registry=registry_for(collector))
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {where}: {exc.strerror or exc}", EXIT_USAGE) from None
    print(f"exporter: http://{where}/metrics for {config.service.redis_url_redacted} "
          f"(prefix {config.service.key_prefix!r}); each scrape reads Redis", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop and thread.is_alive():
            thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return EXIT_OK


def cmd_plot(args) -> int:
    config = _load(args)
    node = _node(args)
    _check_broker(config)
    try:
        from .plot import plot_node
    except ImportError as exc:
        raise CliError(f"plot needs matplotlib ({exc}); pip install 'chronotick-ntp[plot]'", EXIT_USAGE) from None
    from .store import store_for

    store = store_for(config.service)
    now = time.time()
    records = store.history_since(node, now - args.hours * 3600)
    if not records:
        raise CliError(f"no rounds for node {node!r} in the last {args.hours:g} h: nothing to plot", EXIT_STARVATION)
    try:
        plot_node(records, node=node, output=args.output, hours=args.hours)
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror or exc}", EXIT_USAGE) from None
    print(f"{args.output}: {len(records)} rounds of {node} over {args.hours:g} h")
    return EXIT_OK


def cmd_worker(args) -> int:
    config = _load(args)
    node = _node(args)
    _warn(config)
    try:
        _check_broker(config)
    except CliError:
        # A worker waits for Redis (it may be starting too); say so once, plainly.
        print(f"waiting for Redis at {config.service.redis_url_redacted}; the worker keeps trying",
              file=sys.stderr, flush=True)
    os.environ[config_mod.ENV_CONFIG] = os.path.abspath(args.config)
    os.environ[config_mod.ENV_NODE] = node
    from workers.app import app, worker_argv

    loglevel = args.loglevel if args.loglevel.upper() != "WARNING" else "INFO"
    app.worker_main(worker_argv(config, node, concurrency=args.concurrency, events=args.events,
                                loglevel=loglevel))
    return EXIT_OK


def cmd_hub(args) -> int:
    config = _load(args)
    from pathlib import Path

    from .timehub import HubError, TimeHub, find_chronyd, parse_allow

    try:
        hub = TimeHub(os.path.abspath(args.config), config, bind=args.bind, allow=parse_allow(args.allow),
                      chronyd=find_chronyd(args.chronyd), run_dir=Path(args.run_dir or defaults.HUB_RUN_DIR).resolve(),
                      chronyd_user=args.chronyd_user, worker_user=args.worker_user)
    except (HubError, KeyError) as exc:
        raise CliError(f"hub: {exc}", EXIT_USAGE) from None
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    settings = config.service.hub
    assert settings is not None  # TimeHub refused a config without one
    print(f"hub: chronyd serving {args.bind}:{settings.server.port} to {', '.join(args.allow)}; "
          f"node {settings.node} measures {len(config.ntp.servers)} public server(s) at most every "
          f"{config.normal_interval_of(settings.node):g} s, each within {settings.max_requests_per_minute} "
          f"requests a minute and {settings.max_requests_per_10_minutes} in 10 minutes", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, hub.stop)
    hub.run()
    return EXIT_OK


def cmd_cluster(args) -> int:
    config = _load(args)
    from . import hub as hub_mod
    from .store import store_for

    settings = config.service.hub
    nodes = list(config.service.nodes)
    if not nodes:
        raise CliError(f"{config.source}: ntp_service.nodes: empty, so there is no cluster to compare", EXIT_USAGE)
    reference = args.reference or (settings.node if settings is not None else nodes[0])
    if reference not in nodes:
        raise CliError(f"--reference {reference!r}: not in ntp_service.nodes ({', '.join(nodes)})", EXIT_USAGE)
    drift = settings.max_drift_ppm if settings is not None else hub_mod.DEFAULT_MAX_DRIFT_PPM
    _check_broker(config)
    store = store_for(config.service)
    latest = {node: _latest_or_none(store, node) for node in nodes}
    reference_latest = latest[reference]
    if reference_latest is None:
        raise CliError(f"the reference node {reference} has published no measurement", EXIT_USAGE)
    rows = [hub_mod.relative(value, reference_latest, hub_node=settings.node if settings else None,
                             max_drift_ppm=drift).as_dict()
            for node, value in latest.items() if value is not None]
    missing = [node for node, value in latest.items() if value is None]
    if args.plot:
        _plot_cluster(store, nodes, reference, args, hub_node=settings.node if settings else None, drift_ppm=drift)
    if args.json:
        print(json.dumps({"reference": reference, "nodes": rows, "missing": missing}, indent=2))
        return EXIT_OK
    print(f"each node's clock against {reference}'s (offset_to_reference = {reference}'s clock - the node's)")
    print(f"{'node':<20} {'offset (ms)':>12} {'bound (ms)':>11}  measured")
    for row in rows:
        at = time.strftime("%H:%M:%S", time.gmtime(row["measured_at"])) + f".{int(row['measured_at'] % 1 * 1e3):03d}"
        print(f"{row['node']:<20} {row['offset_to_reference'] * 1e3:>+12.3f} {row['uncertainty'] * 1e3:>11.3f}  {at}")
    for node in missing:
        print(f"{node:<20} {'-':>12} {'-':>11}  nothing published")
    return EXIT_OK


def _plot_cluster(store, nodes: list[str], reference: str, args, *, hub_node: str | None, drift_ppm: float) -> None:
    try:
        from .plot import plot_cluster
    except ImportError as exc:
        raise CliError(f"--plot needs matplotlib ({exc}); pip install 'chronotick-ntp[plot]'", EXIT_USAGE) from None
    from . import hub as hub_mod

    since = time.time() - args.hours * 3600
    published = {node: [r["latest"] for r in store.history_since(node, since) if r.get("latest")] for node in nodes}
    series = {node: hub_mod.relative_series(points, published[reference], hub_node=hub_node, max_drift_ppm=drift_ppm)
              for node, points in published.items() if node != reference}
    try:
        plot_cluster(series, reference=reference, output=args.plot, hours=args.hours)
    except OSError as exc:
        raise CliError(f"cannot write {args.plot}: {exc.strerror or exc}", EXIT_USAGE) from None
    print(f"{args.plot}: {sum(map(len, series.values()))} points of {len(series)} node(s) against {reference} "
          f"over {args.hours:g} h", file=sys.stderr)


def _latest_or_none(store, node: str) -> dict | None:
    try:
        return store.latest(node)
    except ValueError:  # not JSON: reported as nothing published
        return None


def cmd_beat(args) -> int:
    config = _load(args)
    nodes = list(config.service.nodes) or [_node(args)]
    if args.node:
        nodes = [_node(args)]
    from .leader import Lease
    from .scheduler import Scheduler
    from .store import Keys, service_client

    _warn(config)
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    lease = Lease(service_client(config.service), Keys(config.service.key_prefix).beat(),
                  ttl_s=config.service.beat_lease_seconds)
    scheduler = Scheduler(config, nodes, lease=lease)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    print(f"beat: {len(nodes)} node(s) ({', '.join(nodes)}); warm-up every "
          f"{config.timing.warm_up_interval_s:g} s for {config.timing.warm_up_duration_s:g} s, "
          f"then every {config.timing.normal_interval_s:g} s; dispatching while it holds {lease.key} "
          f"(other beats stand by)", flush=True)
    try:
        scheduler.run()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


#: Flower's own variables: ``user:password`` pairs, or an OAuth e-mail regex.
FLOWER_AUTH_VARIABLES = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")


def flower_argv(args) -> list[str]:
    """The ``celery flower`` arguments: never a secret among them (Flower reads its env)."""
    from . import flowerconfig

    argv = ["-A", "workers.app", "flower", f"--address={args.address}", f"--port={args.port}",
            f"--conf={flowerconfig.__file__}"]
    if not args.allow_control:
        argv.append("--read_only")
    return argv


def cmd_flower(args) -> int:
    config = _load(args)
    authenticated = any(os.environ.get(name) for name in FLOWER_AUTH_VARIABLES)
    if not authenticated and not args.insecure_no_auth:
        raise CliError("Flower will not start without authentication: set FLOWER_BASIC_AUTH=user:password in "
                       "the environment (never in YAML or on the command line), or pass --insecure-no-auth",
                       EXIT_USAGE)
    _check_broker(config)
    os.environ[config_mod.ENV_CONFIG] = os.path.abspath(args.config)
    print(f"flower: http://{args.address}:{args.port}/ on {config.service.redis_url_redacted} "
          f"({'control allowed' if args.allow_control else 'read-only'}; "
          f"{'authenticated' if authenticated else 'NO AUTHENTICATION'}; "
          "/metrics and /healthcheck are open, as in every Flower)", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "celery", *flower_argv(args)])
    return EXIT_OK  # not reached


def cmd_relay(args) -> int:
    import asyncio
    import socket

    from relay import settings as relay_settings
    from relay.counts import RedisReport
    from relay.server import Relay

    try:  # every check of the file and the flags is relay.settings'
        settings = relay_settings.from_arguments(args.config, bind=args.bind, allow=args.allow,
                                                 timeout_s=args.timeout, client_interval_s=args.client_interval,
                                                 client_burst=args.client_burst)
    except relay_settings.RelayConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    mappings, bind, allow = settings.mappings, settings.bind, settings.allow
    report = None
    url = os.environ.get(config_mod.ENV_REDIS_URL)
    if url:
        service = config_mod.service_from_environment()
        report = RedisReport(redisurl.connect(service.redis_url, service.redis_master_name, timeout_s=2),
                             prefix=args.key_prefix, name=socket.gethostname().split(".")[0])
    logging.getLogger("relay").setLevel(logging.INFO)
    relay = Relay(settings, report=report)
    for m in mappings:
        print(f"relay: {bind}:{m.listen_port} -> {m.upstream}, upstream at most {m.upstream_burst} requests at "
              f"once, then one per {m.min_interval_s:g} s", flush=True)
    print(f"relay: answering {', '.join(str(n) for n in allow)}"
          + (f"; counts to Redis at {redisurl.redact(url)}" if url else ""), flush=True)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, relay.stop)
        try:
            await relay.run()
        except OSError as exc:
            raise CliError(f"cannot listen on {bind}: {exc.strerror or exc}", EXIT_USAGE) from None

    asyncio.run(serve())
    for port in relay.ports:
        print(f"relay: {port.stats.summary()}", flush=True)
    return EXIT_OK


def cmd_up(args) -> int:
    from pathlib import Path

    from .supervisor import InUse, ServiceFailed, Supervisor, SupervisorError

    config = _load(args)
    node = _node(args)
    _warn(config)
    supervisor = Supervisor(os.path.abspath(args.config), node, Path(args.data_dir or defaults.DATA_DIR),
              exporter_port=args.exporter_port,
              redis_port=defaults.REDIS_PORT if args.redis_port is None else args.redis_port)
    try:
        supervisor.run(config, dict(os.environ))  # until a stop signal, or a service's death
    except InUse as exc:
        raise CliError(str(exc), EXIT_IN_USE) from None
    except ServiceFailed as exc:
        raise CliError(str(exc), EXIT_SERVICE_FAILED) from None
    except SupervisorError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
