"""``up``'s decisions that need no process: which Redis, the data directory's lock, a port in use, the exit codes.

The processes themselves (stopping order, signals, restarts) are in tests/integration/test_up.py.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator import supervisor as supervisor
from workers import config as config_mod

REPO = Path(__file__).resolve().parent.parent.parent


def _supervisor(data_dir: Path) -> supervisor.Supervisor:
    return supervisor.Supervisor("unused.yaml", "n", data_dir)


@pytest.mark.parametrize(("file_service", "environ", "configured"), [
    ({}, {}, False),
    ({}, {config_mod.ENV_REDIS_PASSWORD: "secret"}, False),  # a password alone: still the private Redis
    ({}, {config_mod.ENV_REDIS_URL: "redis://10.0.0.1:6379/0"}, True),
    # named, even as the default: configured
    ({"redis_url": "redis://127.0.0.1:6379/0"}, {config_mod.ENV_REDIS_PASSWORD: "secret"}, True),
])
def test_a_redis_is_configured_only_when_one_is_named(tmp_path, file_service, environ, configured):
    path = tmp_path / "c.yaml"
    path.write_text("clock_measurement: {ntp: {servers: [127.0.0.1]}}\n"
                    + (f"ntp_service: {{redis_url: '{file_service['redis_url']}'}}\n" if file_service else ""))
    assert supervisor._redis_configured(str(path), environ) is configured


def test_the_data_dir_is_locked_for_one_up_at_a_time(tmp_path):
    first, second = _supervisor(tmp_path / "data"), _supervisor(tmp_path / "data")
    first._lock_data_dir()
    with pytest.raises(supervisor.InUse, match=rf"{re.escape(str(tmp_path / 'data'))} is in use .*pid {os.getpid()}\)"):
        second._lock_data_dir()
    first.stop()  # releases it
    second._lock_data_dir()
    second.stop()


def test_a_data_dir_that_is_a_file_is_a_box_error(tmp_path):
    (tmp_path / "data").write_text("")
    for where in (tmp_path / "data", tmp_path / "data" / "sub"):
        with pytest.raises(supervisor.SupervisorError) as caught:
            _supervisor(where)._lock_data_dir()
        assert type(caught.value) is supervisor.SupervisorError and str(where) in str(caught.value)


def test_a_port_in_use_names_its_holder():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(supervisor.InUse, match=rf"127\.0\.0\.1:{port} is in use by .*\(pid {os.getpid()}\)"):
            supervisor._check_free("127.0.0.1", port, "the test's port", "advice")
    supervisor._check_free("127.0.0.1", port, "the test's port", "advice")  # free again


def test_up_exit_codes_are_in_the_contract_and_in_its_help():
    up_codes = {cli.EXIT_OK, cli.EXIT_SERVICE_FAILED, cli.EXIT_USAGE, cli.EXIT_IN_USE}
    contract = (REPO / "docs" / "contract.md").read_text()
    table = contract[contract.index("Exit codes (`EXIT_*`"):]
    table = table[:table.index("\n\n", table.index("| code |"))]
    rows = {int(code): text for code, text in re.findall(r"^\| (\d+) \| (.*) \|$", table, re.M)}
    assert set(rows) <= {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    assert all("`up`" in rows[code] for code in up_codes), rows
    usage = next(action for action in cli._parser()._subparsers._group_actions  # type: ignore[union-attr]
                 if action.choices).choices["up"].format_help()
    listed = {int(m) for m in re.findall(r"^  (\d)  ", usage, re.M)}
    assert listed == up_codes
