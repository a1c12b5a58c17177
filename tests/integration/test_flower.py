"""Flower: refuses to start open, shows a round's tasks with their server and node, behind auth."""

import base64
import contextlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator import cli, rounds
from simulator.ntpserver import Behaviour
from simulator.processes import free_tcp_port, stop_process
from workers import config as config_mod

from ..conftest import REPO, TEST_NODE, wait_for, write_config

pytestmark = pytest.mark.integration

USER, PASSWORD = "ops", "correct-horse"


def _get(url: str, *, auth: bool = True):
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, ConnectionError):
        return None, b""


def test_flower_refuses_to_start_without_auth(tmp_path, capsys, monkeypatch):
    for name in cli.FLOWER_AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = write_config(tmp_path, ["127.0.0.1:9"])
    assert cli.main(["flower", "--config", str(path)]) == cli.EXIT_USAGE
    assert "Flower will not start without authentication" in capsys.readouterr().err


def test_flower_shows_a_rounds_tasks_behind_auth(worker, redis_url, simulator, tmp_path, key_prefix):
    sim, servers = simulator({"a": Behaviour(delay_s=0.003), "b": Behaviour(delay_s=0.004)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, retry_delay=0.2)
    port = free_tcp_port()
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO),
           "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    log = tmp_path / "flower.log"
    flower = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "flower", "--config", str(path),
                               "--port", str(port)], env=env, cwd=str(REPO), stdout=open(log, "wb"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/healthcheck", auth=False)[0] == 200, what="Flower to answer")
        # Flower turns task events on in the workers it sees; wait until this one reports in.
        wait_for(lambda: TEST_NODE in _get(f"{base}/api/workers?refresh=1")[1].decode(), what="the worker in Flower")
        config = config_mod.load(path)

        def round_seen():
            record = rounds.dispatch(config, TEST_NODE).wait()
            status, body = _get(f"{base}/api/tasks?limit=1000")
            tasks = json.loads(body) if status == 200 else {}
            mine = [t for t in tasks.values() if record["round_id"] in (t.get("kwargs") or "") + (t.get("args") or "")]
            names = sorted(t["name"] for t in mine)
            return mine if names == ["chronotick.finish_round", *["chronotick.query_server"] * 2] else None

        # Events are switched on asynchronously: the first round may predate them.
        mine = wait_for(round_seen, timeout_s=30, interval_s=0.5, what="a round's three tasks in Flower")
        queries = [t for t in mine if t["name"] == "chronotick.query_server"]
        assert {f"server={s}" for s in servers.values()} == {q["kwargs"].split(",")[0].lstrip("{") for q in queries}
        assert all(f"node={TEST_NODE}" in q["kwargs"] for q in queries)
        assert all(t["worker"].startswith(f"{TEST_NODE}@") for t in mine)
        # A retry shows up too: make server "a" drop its next request.
        port_a = int(servers["a"].rsplit(":", 1)[1])
        sim.set_behaviour(port_a, Behaviour(delay_s=0.003, drop_first=sim.stats[port_a].received + 1))
        retried = rounds.dispatch(config, TEST_NODE).wait()
        assert next(x for x in retried["servers"] if x["server"] == servers["a"])["attempts"] == 2

        def retry_in_flower():
            tasks = json.loads(_get(f"{base}/api/tasks?limit=1000")[1] or b"{}")
            return [t for t in tasks.values() if retried["round_id"] in (t.get("kwargs") or "")
                    and f"server={servers['a']}," in t["kwargs"] and "attempt=2" in t["kwargs"]
                    and t.get("retries") == 1]

        wait_for(retry_in_flower, what="the retried query in Flower")
        assert _get(f"{base}/api/tasks", auth=False)[0] == 401  # the API needs the password
        assert _get(f"{base}/", auth=False)[0] == 401  # and so does the UI
        # Read-only by default: no revoking through the API.
        request = urllib.request.Request(f"{base}/api/task/revoke/{queries[0]['uuid']}", method="POST")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code in (403, 405)
    finally:
        stop_process(flower)
    assert PASSWORD not in log.read_text()


@contextlib.contextmanager
def _flower(path, redis_url, tmp_path):
    """Flower through ``chronotick-ntp flower`` with the password, once it knows the test worker."""
    port = free_tcp_port()
    env = {**os.environ, config_mod.ENV_REDIS_URL: redis_url, "PYTHONPATH": str(REPO),
           "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    flower = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "flower", "--config", str(path),
                               "--port", str(port)], env=env, cwd=str(REPO), stdout=open(tmp_path / "flower.log", "wb"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/healthcheck", auth=False)[0] == 200, what="Flower to answer")
        wait_for(lambda: TEST_NODE in _get(f"{base}/api/workers?refresh=1")[1].decode(), what="the worker in Flower")
        yield base, port
    finally:
        stop_process(flower)


def _successes(base: str, record: dict) -> int:
    """How many of the round's tasks Flower shows as SUCCESS."""
    tasks = json.loads(_get(f"{base}/api/tasks?limit=1000")[1] or b"{}")
    return sum(1 for t in tasks.values() if record["round_id"] in (t.get("kwargs") or "") + (t.get("args") or "")
               and t["state"] == "SUCCESS")


def _chromium(*args, cwd):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed (Debian: chromium); scripts/bootstrap installs it")
    # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=8000", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _rows(dom: str) -> list[str]:
    """The text of each table row of a dumped page."""
    return [html.unescape(re.sub(r"<[^>]+>", " ", row)) for row in re.findall(r"<tr.*?</tr>", dom, flags=re.S)]


def test_flower_in_a_browser_shows_which_server_failed(worker, redis_url, simulator, tmp_path, key_prefix):
    """A person opens the tasks page: every query is SUCCESS to Celery, yet the dead one reads "failed"."""
    _, servers = simulator({"good": Behaviour(delay_s=0.003), "dead": Behaviour(loss=1.0)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, timeout_seconds=0.2,
                        retry_delay=0.1, max_retries=2)
    config = config_mod.load(path)
    with _flower(path, redis_url, tmp_path) as (base, port):
        # Events are switched on asynchronously.  Rounds of the good server alone show when Flower sees
        # them; repeating the dead one's rounds instead would make it unreachable (eight silent rounds),
        # and an unreachable server gets one request and no retry.
        warm = config_mod.load(write_config(tmp_path, [servers["good"]], key_prefix=key_prefix, name="warm.yaml"))
        wait_for(lambda: _successes(base, rounds.dispatch(warm, TEST_NODE).wait()) == 2, timeout_s=40,
                 interval_s=0.5, what="Flower to see a round's tasks")
        record = rounds.dispatch(config, TEST_NODE).wait()
        assert next(s for s in record["servers"] if s["server"] == servers["dead"])["attempts"] == 2
        wait_for(lambda: _successes(base, record) == 3, what="the round's three tasks in Flower")
        url = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/tasks"
        dumped = _chromium("--dump-dom", url, cwd=tmp_path)
        rows = [r for r in _rows(dumped.stdout) if record["round_id"] in r]
        assert len(rows) == 3, "\n".join(_rows(dumped.stdout))
        dead = next(r for r in rows if f"server={servers['dead']}," in r)
        good = next(r for r in rows if f"server={servers['good']}," in r)
        callback = next(r for r in rows if "chronotick.finish_round" in r)
        assert "chronotick.query_server" in dead and "SUCCESS" in dead
        assert "failed: timeout x2" in dead  # what a person needs to see, in the result column
        assert re.search(r"ok [+-]\d+\.\d{3} ms ±\d+\.\d{3} ms", good)
        assert f"strict: {servers['good']}" in callback and "1/2 servers" in callback
        shot = _chromium("--window-size=1400,700", f"--screenshot={tmp_path / 'flower-tasks.png'}", url, cwd=tmp_path)
        assert (tmp_path / "flower-tasks.png").stat().st_size > 10_000, shot.stderr[-2000:]
        docs = os.environ.get("CHRONOTICK_DOCS_DIR")  # to refresh docs/operations.md's picture
        if docs:
            shutil.copy(tmp_path / "flower-tasks.png", Path(docs) / "flower-tasks.png")
