"""``chronotick-ntp status`` and ``plot`` over real rounds: the targets, the exit codes, the picture."""

import json

import pytest

from orchestrator import cli, rounds
from simulator.ntpserver import Behaviour
from simulator.processes import free_tcp_port
from workers import config as config_mod

from ..conftest import TEST_NODE, write_config

pytestmark = pytest.mark.integration


def _status(path, capsys, *extra):
    code = cli.main(["status", "--config", str(path), *extra])
    return code, capsys.readouterr()


def _rounds(path, n):
    config = config_mod.load(path)
    return [rounds.dispatch(config, TEST_NODE).wait() for _ in range(n)]


def test_status_passes_a_healthy_node_and_names_each_figure(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({f"s{i}": Behaviour(delay_s=0.002 * (i + 1)) for i in range(3)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    records = _rounds(path, 4)
    code, out = _status(path, capsys, "--json")
    assert code == cli.EXIT_OK, out.out
    report = json.loads(out.out)
    assert report["ok"] is True and list(report["nodes"]) == [TEST_NODE]
    node = report["nodes"][TEST_NODE]
    assert node["rounds"] == 4 and 0 <= node["latest_age_s"] < 60
    targets = node["targets"]
    assert set(targets) == {"round_time_avg_s", "round_time_p99_s", "starvation_events", "fallback_rate",
                            "retry_rate", "rejection_rate"}
    durations = [r["duration_s"] for r in records]
    assert targets["round_time_avg_s"]["value"] == pytest.approx(sum(durations) / 4, abs=1e-6)  # kept to 1 us
    assert targets["round_time_p99_s"]["value"] == pytest.approx(max(durations), abs=1e-6)
    assert targets["round_time_avg_s"]["limit"] == 0.5 and targets["round_time_p99_s"]["limit"] == 2.0
    assert all(t["ok"] for t in targets.values())
    code, out = _status(path, capsys, "--node", TEST_NODE)
    assert code == cli.EXIT_OK and "MISS" not in out.out and "1 of 1 node(s) meet every target" in out.out


def test_status_fails_a_node_that_misses_and_says_which(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({"good": Behaviour(delay_s=0.002), "dead": Behaviour(loss=1.0),
                            "liar": Behaviour(delay_s=0.002, bad_origin=True)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix, max_retries=2,
                        timeout_seconds=0.2, retry_delay=0.1)
    _rounds(path, 2)
    code, out = _status(path, capsys, "--json")
    assert code == cli.EXIT_STARVATION
    targets = json.loads(out.out)["nodes"][TEST_NODE]["targets"]
    # Per round: good 1 request; dead 2 (1 retry); liar 2 (1 retry), both replies refused.
    assert targets["retry_rate"]["value"] == pytest.approx(2 / 5) and not targets["retry_rate"]["ok"]
    assert targets["rejection_rate"]["value"] == pytest.approx(2 / 3) and not targets["rejection_rate"]["ok"]
    assert targets["starvation_events"]["ok"] and targets["fallback_rate"]["ok"]
    code, out = _status(path, capsys)
    assert code == cli.EXIT_STARVATION
    lines = {line.split("  ")[1].strip(): line
             for line in out.out.splitlines() if line.startswith("  ") and "<=" in line}
    assert lines["retries / attempts"].endswith("MISS") and lines["refused / received replies"].endswith("MISS")
    assert lines["starvation rounds"].endswith("ok")


def test_status_of_a_configured_node_that_never_published_is_stale_and_exits_1(worker, tmp_path, key_prefix,
                                                                                   capsys):
    """A configured node that never published is stale: a miss, not a pass."""
    path = write_config(tmp_path, ["127.0.0.1:9"], key_prefix=key_prefix)
    code, out = _status(path, capsys, "--node", "never-ran", "--json")
    assert code == cli.EXIT_STARVATION, "a stale node is exit 1"
    assert json.loads(out.out)["nodes"]["never-ran"]["stale"] is True, "the JSON says stale"


def test_status_refuses_a_window_of_no_hours_as_usage(tmp_path, key_prefix):
    path = write_config(tmp_path, ["127.0.0.1:9"], key_prefix=key_prefix)
    with pytest.raises(SystemExit) as usage:
        cli.main(["status", "--config", str(path), "--hours", "0"])
    assert usage.value.code == cli.EXIT_USAGE, "--hours 0 is a usage error"


def test_status_without_redis_exits_4_and_says_so(tmp_path, key_prefix, capsys, monkeypatch):
    path = write_config(tmp_path, ["127.0.0.1:9"], key_prefix=key_prefix)
    monkeypatch.setenv(config_mod.ENV_REDIS_URL, f"redis://127.0.0.1:{free_tcp_port()}/0")
    code, out = _status(path, capsys)
    assert code == cli.EXIT_NO_BROKER, "no Redis is exit 4"
    assert "cannot reach Redis" in out.err, "the one line names Redis"


def test_plot_draws_a_png_of_the_window(worker, simulator, tmp_path, key_prefix, capsys):
    _, servers = simulator({"a": Behaviour(delay_s=0.002, offset_s=0.003), "b": Behaviour(delay_s=0.004)})
    path = write_config(tmp_path, list(servers.values()), key_prefix=key_prefix)
    _rounds(path, 3)
    out = tmp_path / "node.png"
    assert cli.main(["plot", "--config", str(path), "--node", TEST_NODE, "--hours", "1", "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "3 rounds" in capsys.readouterr().out
    # No rounds for a node: a clear message, no file.
    empty = tmp_path / "empty.png"
    assert cli.main(["plot", "--config", str(path), "--node", "nobody", "-o", str(empty)]) == cli.EXIT_STARVATION
    assert "no rounds for node 'nobody'" in capsys.readouterr().err and not empty.exists()
