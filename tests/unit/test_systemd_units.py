"""deploy/systemd: every unit verifies with systemd-analyze, runs a real chronotick-ntp command, is hardened.

``systemd-analyze verify`` needs no running systemd; it refuses a unit whose
command is not executable, so the units' install path is pointed at this
checkout's venv for the check.
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator import cli

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
INSTALLED = "/opt/chronotick-ntp/bin/chronotick-ntp"
HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
             "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet=")
COMMANDS = {"chronotick-ntp-worker@.service": "worker", "chronotick-ntp-beat.service": "beat",
            "chronotick-ntp-exporter.service": "exporter", "chronotick-ntp-flower.service": "flower",
            "chronotick-ntp-relay.service": "relay"}


def _exec_start(text: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.split("=", 1)[1])


def test_every_service_has_a_unit():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(COMMANDS)


def test_the_units_verify_with_systemd_analyze(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd); scripts/bootstrap installs it")
    venv = REPO / ".venv" / "bin" / "chronotick-ntp"
    assert venv.is_file(), "run scripts/bootstrap: the units' command must exist for verify"
    names = []
    for unit in UNITS.glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, str(venv)))
        names.append(str(tmp_path / unit.name.replace("@.service", "@ares-comp-11.service")))
    result = subprocess.run([analyze, "verify", *names], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr  # not one warning


@pytest.mark.parametrize("name, command", sorted(COMMANDS.items()))
def test_each_unit_runs_the_documented_command_hardened_with_secrets_from_a_file(name, command):
    text = (UNITS / name).read_text()
    argv = _exec_start(text)
    assert argv[0] == INSTALLED and argv[1] == command
    values = {"%i": "ares-comp-11", "${RELAY_BIND}": "172.20.1.1", "${RELAY_ALLOW}": "172.20.0.0/16"}
    args = cli._parser().parse_args([values.get(a, a) for a in argv[1:]])  # a real chronotick-ntp command line
    assert args.config.startswith("/etc/chronotick-ntp/")
    for directive in HARDENING:
        assert re.search(rf"^{re.escape(directive)}$", text, re.M), (name, directive)
    assert re.search(r"^User=chronotick$", text, re.M)  # never root
    assert re.search(r"^EnvironmentFile=/etc/chronotick-ntp/env$", text, re.M)
    assert not re.search(r"^Environment=.*(PASSWORD|AUTH|redis://)", text, re.M)  # secrets only in the file


def test_the_example_env_file_holds_every_secret_and_nothing_real():
    example = (UNITS / "env.example").read_text()
    for key in ("CHRONOTICK_REDIS_URL", "CHRONOTICK_REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert re.search(rf"^{key}=", example, re.M), key
    assert "change-me" in example
