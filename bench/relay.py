"""What the relay's hop costs: added delay per query, and the round time of 20 clients at once.

One loopback upstream (the simulator) answers; ``chronotick-ntp relay`` runs as
its own process, as on a head node, with the per-client limit and the
upstream's budget raised for the sequential part (one client asking hundreds
of times; the default budget forwards 4 at once, then one per 4 s, and answers
the rest with a RATE kiss of the relay's own: see bench/politeness.py for
what that budget does).  Everything is measured
in one run: each figure through the relay next to the same thing sent straight
to the upstream.

- Sequential queries: round-trip time p50/p99 direct and through the relay;
  the difference is what a client sees the hop add.  The relay's own figure
  (request in to forwarded, plus reply in to sent) comes from its summary.
- 20 clients at once (distinct loopback addresses) on an upstream that
  answers in 200 ms: the time until the last one has its reply, median of
  several rounds.  ChronoTick's ntp_proxy.py forwarded one request per port
  at a time, so its figure would be 20 x 200 ms = 4 s (arithmetic, not run).

Run:  python -m bench.relay [--queries 500] [--rounds 5]
"""

from __future__ import annotations

import re
import select
import socket
import statistics
import subprocess
import time

from bench.harness import bed, child_env, parser, quantile
from simulator.ntpserver import Behaviour, free_udp_ports
from simulator.processes import stop_process
from workers import config as config_mod
from workers.ntp import packet


def query(sock: socket.socket, address: tuple[str, int]) -> float:
    """One request; its round trip (s)."""
    request, transmit = packet.make_request()
    started = time.perf_counter()
    sock.sendto(request, address)
    while True:
        data = sock.recv(2048)
        if packet.parse(data).origin_ts == transmit:
            return time.perf_counter() - started


def concurrent_round(address: tuple[str, int], clients: int) -> float:
    """``clients`` requests at once from distinct loopback addresses; seconds until the last reply."""
    socks = []
    for i in range(clients):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.1.{i + 1}", 0))
        socks.append(s)
    started = time.perf_counter()
    for s in socks:
        s.sendto(packet.make_request()[0], address)
    waiting = set(socks)
    while waiting:
        readable, _, _ = select.select(list(waiting), [], [], 5.0)
        if not readable:
            raise RuntimeError(f"{len(waiting)} of {clients} clients got no reply")
        for s in readable:
            s.recv(2048)
            waiting.discard(s)
    took = time.perf_counter() - started
    for s in socks:
        s.close()
    return took


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--queries", type=int, default=500, help="sequential queries each way")
    arguments.add_argument("--rounds", type=int, default=5, help="rounds of 20 concurrent clients each way")
    args = arguments.parse_args()
    with bed("ct-relay-", redis=False) as b:
        fast = b.servers([Behaviour(delay_s=0.001), Behaviour(delay_s=0.2)])
        fast_port, slow_port = list(fast.behaviours)
        listen_fast, listen_slow = free_udp_ports(2)
        proxy = b.tmp / "proxy.yaml"
        uncapped = "min_interval_s: 0.0001, upstream_burst: 100000"  # the hop's cost, not the budget's
        proxy.write_text("proxy_mappings:\n" + "".join(
            f"  - {{listen_port: {listen}, ntp_server: 127.0.0.1, ntp_port: {port}, {uncapped}}}\n"
            for listen, port in ((listen_fast, fast_port), (listen_slow, slow_port))))
        env = child_env()
        env.pop(config_mod.ENV_REDIS_URL, None)
        relay = b.process(["python", "-m", "orchestrator.cli", "relay", "--config", str(proxy),
                           "--client-interval", "0.0001", "--client-burst", "100000"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.5)
        deadline = time.monotonic() + 30
        while True:  # the relay is up when it answers
            try:
                query(sock, ("127.0.0.1", listen_fast))
                break
            except TimeoutError:
                if time.monotonic() > deadline or relay.poll() is not None:
                    raise RuntimeError("the relay did not start") from None
        sock.settimeout(2.0)
        direct, relayed = [], []
        for _ in range(args.queries):  # interleaved, so both see the same machine
            direct.append(query(sock, ("127.0.0.1", fast_port)))
            relayed.append(query(sock, ("127.0.0.1", listen_fast)))
        rounds_direct, rounds_relayed = [], []
        for _ in range(args.rounds):
            rounds_direct.append(concurrent_round(("127.0.0.1", slow_port), 20))
            rounds_relayed.append(concurrent_round(("127.0.0.1", listen_slow), 20))
        sock.close()
        stop_process(relay)  # it prints its summary as it stops
        summary = relay.stdout.read() if relay.stdout else ""
    hop = re.search(rf"port {listen_fast} .*hop \+([\d.]+)/([\d.]+) ms", summary)
    print(f"relay hop on loopback: {args.queries} sequential queries each way (upstream 1 ms), "
          f"{args.rounds} rounds of 20 clients at once (upstream 200 ms)\n")
    print(f"  {'':<36}{'direct':>12}{'via relay':>12}{'added':>12}")
    for label, q in (("query round trip p50", 0.5), ("query round trip p99", 0.99)):
        d, r = quantile(direct, q) * 1e3, quantile(relayed, q) * 1e3
        print(f"  {label:<36}{d:>9.3f} ms{r:>9.3f} ms{r - d:>9.3f} ms")
    d, r = statistics.median(rounds_direct) * 1e3, statistics.median(rounds_relayed) * 1e3
    print(f"  {'20 clients at once, last reply':<36}{d:>9.1f} ms{r:>9.1f} ms{r - d:>9.1f} ms")
    if hop:
        print(f"\n  the relay's own count of its hop (in to forwarded + reply in to sent): "
              f"p50 {hop.group(1)} ms, p99 {hop.group(2)} ms")
    print("  ChronoTick's ntp_proxy.py, serial per port: 20 x 200 ms = 4,000 ms for the last of 20 clients")


if __name__ == "__main__":
    main()
