"""What NTS costs a round once cookies are warm: the same chronyd, with and without NTS, in one run.

chronyd 4.3 (``-x``, loopback) serves NTP and NTS-KE.  One real worker; rounds
of one server each, sent as ``measure`` sends them and timed by their record's
``duration_s`` (dispatch to finish), alternating NTS (``nts://127.0.0.1:<ke>``)
and plain (``127.0.0.1:<ntp>``).  The first NTS round pays the NTS-KE
handshake; it is reported on its own.  Below the rounds, the exchange alone:
one protected request and reply against one plain one, in this process.

Run:  python -m bench.nts [--rounds 30]
"""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path

from bench.harness import Bed, bed, parser
from simulator.processes import ChronydNts, chronyd_binary, stop_process
from workers import config as config_mod
from workers.ntp import client, nts, packet

NODE = "ntsbench"


def write(b: Bed, name: str, servers: list[str], ca: Path) -> config_mod.Config:
    return b.config(f"{name}.yaml", servers, ntp={"timeout_seconds": 1.0, "max_retries": 1, "nts_ca_file": str(ca)},
                    service={"key_prefix": "ntsbench", "nodes": [NODE]})


def main() -> None:
    arguments = parser(__file__, __doc__)
    arguments.add_argument("--rounds", type=int, default=30)
    args = arguments.parse_args()
    binary = chronyd_binary()
    if binary is None:
        raise SystemExit("no chronyd: run scripts/bootstrap (it unpacks one into .venv/chrony)")
    with bed("ct-nts-") as b:
        chronyd = b.enter(ChronydNts(binary))
        secured = write(b, "nts", [f"nts://127.0.0.1:{chronyd.ke_port}"], chronyd.cert)
        plain = write(b, "plain", [f"127.0.0.1:{chronyd.ntp_port}"], chronyd.cert)
        from orchestrator import rounds

        worker = b.worker(secured, NODE)

        def round_s(config) -> float:
            record = rounds.dispatch(config, NODE).wait()
            assert record and record["latest"], record
            assert record["latest"]["nts"] == (config is secured)
            return record["duration_s"]

        first_nts = round_s(secured)  # the handshake
        round_s(plain)
        times = {"nts": [], "plain": []}
        for _ in range(args.rounds):
            times["nts"].append(round_s(secured))
            times["plain"].append(round_s(plain))
        stop_process(worker)  # the exchange alone is measured without it
        # The exchange alone, in this process: what the cryptography costs.
        association = nts.Association("127.0.0.1", chronyd.ke_port, str(chronyd.cert))
        exchange = {"nts": [], "plain": []}
        address = ("127.0.0.1", chronyd.ntp_port)
        for _ in range(200):
            started = time.perf_counter()
            header, transmit = packet.make_request()
            request, unique_id, s2c, where = association.prepare(header, timeout_s=2.0)
            client.exchange("nts", socket.AF_INET, where, timeout_s=1.0,
                            nts=client.NtsRequest(request, transmit, unique_id, s2c, association))
            exchange["nts"].append(time.perf_counter() - started)
            started = time.perf_counter()
            client.exchange("plain", socket.AF_INET, address, timeout_s=1.0)
            exchange["plain"].append(time.perf_counter() - started)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ex = {k: statistics.median(v) * 1e3 for k, v in exchange.items()}
    print(f"NTS against plain NTP, same chronyd 4.3 on loopback; {args.rounds} rounds each, alternating\n")
    print(f"  {'':<44}{'NTS':>10}{'plain':>10}{'ratio':>8}")
    print(f"  {'round time, median (dispatch to finish)':<44}{med['nts']:>7.1f} ms{med['plain']:>7.1f} ms"
          f"{med['nts'] / med['plain']:>7.2f}x   (target <= 1.10x)")
    print(f"  {'exchange alone, median (200 each)':<44}{ex['nts']:>7.3f} ms{ex['plain']:>7.3f} ms"
          f"{ex['nts'] / ex['plain']:>7.2f}x")
    print(f"\n  first NTS round, NTS-KE handshake included: {first_nts * 1e3:.1f} ms; "
          f"NTS-KE handshakes in the exchange part: {association.handshakes}")


if __name__ == "__main__":
    main()
