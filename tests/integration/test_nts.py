"""NTS (RFC 8915) against chronyd 4.3 as a real NTS server, on loopback.

chronyd serves NTS-KE with a self-signed certificate for 127.0.0.1 and tells
clients (``ntsntpserver``) to send NTP to 127.0.0.3, where a relay of this
test's own forwards to chronyd -- or tampers: it flips one bit of the reply's
transmit timestamp, or strips the reply's extension fields.  A TCP proxy in
front of NTS-KE counts handshakes.  The worker is the session's real Celery
worker; keys and cookies live in its memory.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.store import Store
from simulator.ntpserver import Behaviour
from simulator.processes import ChronydNts, chronyd_binary, free_tcp_port, make_certificate
from workers.ntp import packet

from ..conftest import TEST_NODE, write_config

pytestmark = pytest.mark.integration

#: Where chronyd's NTS-KE sends clients for NTP: this test's relay.
NTP_PATH = "127.0.0.3"


def _chronyd_binary() -> str:
    binary = chronyd_binary()
    if binary is None:
        pytest.fail("no chronyd: run scripts/bootstrap (it unpacks one into .venv/chrony)")
    return binary


class PathRelay:
    """UDP on 127.0.0.3:<chronyd's NTP port>, forwarded to chronyd; ``mode`` says what it does to replies."""

    def __init__(self, ntp_port: int):
        self.mode = "pass"
        self.drop_next = 0  # lose this many requests (then the attempt times out, and is retried)
        self.target = ("127.0.0.1", ntp_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((NTP_PATH, ntp_port))
        self.replies = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                request, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.drop_next > 0:
                self.drop_next -= 1
                continue
            threading.Thread(target=self._forward, args=(request, client), daemon=True).start()

    def _forward(self, request: bytes, client) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(1.0)
            upstream.sendto(request, self.target)
            try:
                reply = upstream.recv(4096)
            except TimeoutError:
                return
        if self.mode == "flip":  # one bit of the transmit timestamp
            reply = reply[:47] + bytes([reply[47] ^ 0x01]) + reply[48:]
        elif self.mode == "strip":  # the extension fields: a plain NTP reply
            reply = reply[:packet.HEADER_LEN]
        self.replies += 1
        self.sock.sendto(reply, client)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class CountingProxy:
    """TCP in front of NTS-KE: counts the handshakes (connections) that reach chronyd."""

    def __init__(self, target_port: int):
        self.port = free_tcp_port()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.target_port = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def nts_server():
    with ChronydNts(_chronyd_binary(), ntp_server=NTP_PATH) as chronyd:
        relay = PathRelay(chronyd.ntp_port)
        yield chronyd, relay
        relay.close()


@pytest.fixture
def ke(nts_server):
    chronyd, relay = nts_server
    relay.mode, relay.drop_next = "pass", 0
    proxy = CountingProxy(chronyd.ke_port)
    yield proxy
    proxy.close()


def _measure(path: Path, capsys) -> dict:
    cli.main(["measure", "--config", str(path), "--node", TEST_NODE, "--json"])
    return json.loads(capsys.readouterr().out)


def _by_server(record: dict) -> dict:
    return {s["server"]: s for s in record["servers"]}


def test_an_nts_round_publishes_authenticated_and_the_second_needs_no_handshake(worker, nts_server, ke, tmp_path,
                                                                                key_prefix, capsys):
    chronyd, _ = nts_server
    server = f"nts://127.0.0.1:{ke.port}"
    path = write_config(tmp_path, [server], key_prefix=key_prefix, nts_ca_file=str(chronyd.cert))
    first = _measure(path, capsys)
    assert first["latest"] is not None and first["latest"]["nts"] is True, first
    assert _by_server(first)[server]["sample"]["nts"] is True
    assert ke.connections == 1
    second = _measure(path, capsys)
    assert second["latest"]["nts"] is True
    assert ke.connections == 1  # cookies, no new NTS-KE
    assert cli.main(["latest", "--config", str(path), "--node", TEST_NODE, "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["nts"] is True
    assert cli.main(["check-config", str(path)]) == cli.EXIT_OK
    assert f"NTS (RFC 8915): 1 of 1 servers ({server})" in capsys.readouterr().out


@pytest.mark.parametrize("mode, reason", [("flip", "nts_auth_failed"), ("strip", "nts_no_authenticator")])
def test_a_reply_altered_on_the_path_is_refused_and_nothing_is_published(worker, nts_server, ke, simulator,
                                                                          tmp_path, key_prefix, capsys, mode,
                                                                          reason, redis_client):
    chronyd, relay = nts_server
    server = f"nts://127.0.0.1:{ke.port}"
    path = write_config(tmp_path, [server], key_prefix=key_prefix, nts_ca_file=str(chronyd.cert), max_retries=1)
    relay.mode = mode
    record = _measure(path, capsys)
    entry = _by_server(record)[server]
    assert entry["status"] == "failed" and entry["reason"] == reason, entry
    assert record["latest"] is None and record["quality"] == "starvation"
    assert relay.replies >= 1  # chronyd answered; the altered answer was refused
    assert Store(redis_client, prefix=key_prefix).stats(TEST_NODE).get(f"rejected:{reason}", 0) == 1


def test_a_wrong_ca_fails_key_establishment_and_the_round_goes_on(worker, nts_server, ke, simulator, tmp_path,
                                                                  key_prefix, capsys):
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca, _ = make_certificate(other, stem="other")
    _, servers = simulator({"plain": Behaviour(delay_s=0.002)})
    nts_name = f"nts://127.0.0.1:{ke.port}"
    path = write_config(tmp_path, [nts_name, servers["plain"]], key_prefix=key_prefix, nts_ca_file=str(wrong_ca),
                        max_retries=1)
    record = _measure(path, capsys)
    entry = _by_server(record)[nts_name]
    assert entry["status"] == "failed" and entry["reason"] == "nts_ke_failed"
    assert "certificate verify failed" in entry["detail"], entry["detail"]
    assert record["latest"]["server"] == servers["plain"] and record["latest"]["nts"] is False


def test_require_never_publishes_an_unauthenticated_server(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({"plain": Behaviour(delay_s=0.002)})
    dead_nts = f"nts://127.0.0.1:{free_tcp_port()}"  # nobody listens: NTS-KE fails
    path = write_config(tmp_path, [servers["plain"], dead_nts], key_prefix=key_prefix, auth_select="require",
                        max_retries=1)
    record = _measure(path, capsys)
    assert record["quality"] == "starvation" and record["latest"] is None
    plain = _by_server(record)[servers["plain"]]
    assert plain["status"] == "rejected" and plain["reason"] == "not_authenticated"
    assert _by_server(record)[dead_nts]["reason"] == "nts_ke_failed"


def test_keys_and_cookies_never_reach_redis(worker, nts_server, ke, tmp_path, key_prefix, capsys, redis_client):
    chronyd, _ = nts_server
    path = write_config(tmp_path, [f"nts://127.0.0.1:{ke.port}"], key_prefix=key_prefix,
                        nts_ca_file=str(chronyd.cert))
    record = _measure(path, capsys)
    assert record["latest"]["nts"] is True
    text = json.dumps(record)
    assert "cookie" not in text.lower() and "c2s" not in text and "s2c" not in text
    for key in redis_client.scan_iter(count=1000):
        kind = redis_client.type(key)
        if kind == "string":  # read as text: a binary value (a key, a cookie) would not even decode
            value = redis_client.get(key) or ""
            assert "cookie" not in value.lower() and "c2s" not in value, key


@pytest.mark.parametrize("selection", ["best", "combine"])
def test_prefer_waits_for_an_nts_server_whose_retry_is_to_come(worker, nts_server, ke, simulator, tmp_path,
                                                                key_prefix, capsys, selection):
    """Issue #24: early published a plain sample while the NTS server waited for its retry; waiting publishes
    the authenticated one."""
    chronyd, relay = nts_server
    _, servers = simulator({f"p{i}": Behaviour(delay_s=0.002) for i in range(3)})
    server = f"nts://127.0.0.1:{ke.port}"
    path = write_config(tmp_path, [server, *servers.values()], key_prefix=key_prefix, nts_ca_file=str(chronyd.cert),
                        auth_select="prefer", selection=selection, timeout_seconds=0.15, retry_delay=0.2,
                        max_retries=2)
    # Its first request is lost: it times out at 0.15 s, before its bound (at most 72.5 ms) could show that it
    # cannot pass a gate, and waits for its retry 0.2 s later.
    relay.drop_next = 1
    record = _measure(path, capsys)
    entry = _by_server(record)[server]
    assert entry["attempts"] == 2 and entry["history"][0]["reason"] == "timeout", json.dumps(record)
    assert record["latest"] is not None and record["latest"]["nts"] is True, record["latest"]
    assert record["latest"]["server"] == server
