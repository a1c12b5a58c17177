"""deploy/systemd: every unit verifies with systemd-analyze, runs a real chronotick-ntp command, is hardened.

``systemd-analyze verify`` needs no running systemd; it refuses a unit whose
command is not executable, so the units' install path is pointed at this
checkout's venv for the check.  The user units (``deploy/systemd/user/``, for a
user manager: ``systemctl --user``) are verified with ``--user`` in a home
directory and runtime directory of the test's own, where ``%h`` finds the venv.
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
            "chronotick-ntp-relay.service": "relay", "chronotick-ntp-hub.service": "hub"}
#: Units started as root, and why: chronyd refuses to start otherwise (it drops to _chrony itself, and the hub
#: runs its worker as chronotick).  No user unit: a user manager cannot start chronyd.
ROOT_UNITS = {"chronotick-ntp-hub.service"}


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
    values = {"%i": "ares-comp-11", "${RELAY_BIND}": "172.20.1.1", "${RELAY_ALLOW}": "172.20.0.0/16",
              "${HUB_BIND}": "172.20.1.1", "${HUB_ALLOW}": "172.20.0.0/16"}
    args = cli._parser().parse_args([values.get(a, a) for a in argv[1:]])  # a real chronotick-ntp command line
    assert args.config.startswith("/etc/chronotick-ntp/")
    for directive in HARDENING:
        if name in ROOT_UNITS and directive == "CapabilityBoundingSet=":
            continue  # only what chronyd's and the worker's switches of user need (below)
        assert re.search(rf"^{re.escape(directive)}$", text, re.M), (name, directive)
    if name in ROOT_UNITS:
        assert not re.search(r"^User=", text, re.M) and args.worker_user == "chronotick", name  # its worker not root
        (bounding,) = re.findall(r"^CapabilityBoundingSet=(.*)$", text, re.M)
        assert "CAP_SYS_TIME" not in bounding and "CAP_SYS_ADMIN" not in bounding, bounding  # chronyd -x: no clock
    else:
        assert re.search(r"^User=chronotick$", text, re.M)  # never root
    assert re.search(r"^EnvironmentFile=/etc/chronotick-ntp/env$", text, re.M)
    assert not re.search(r"^Environment=.*(PASSWORD|AUTH|redis://)", text, re.M)  # secrets only in the file


def test_the_example_env_file_holds_every_secret_and_nothing_real():
    example = (UNITS / "env.example").read_text()
    for key in ("CHRONOTICK_REDIS_URL", "CHRONOTICK_REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert re.search(rf"^{key}=", example, re.M), key
    assert "change-me" in example


# -- user units: the same services under a user manager (docs/operations.md, "Without root") -------------

USER_UNITS = UNITS / "user"
USER_INSTALLED = "%h/chronotick-ntp/bin/chronotick-ntp"
USER_CONFIG_DIR = "%h/.config/chronotick-ntp/"
#: Directives a user manager cannot apply on its own (systemd.exec(5): "only available for system services",
#: or only with PrivateUsers=), and the identity switch it cannot make.
SYSTEM_ONLY = ("User", "Group", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
               "CapabilityBoundingSet", "AmbientCapabilities", "RemoveIPC")
USER_HARDENING = ("NoNewPrivileges=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces=yes",
                  "LockPersonality=yes", "SystemCallArchitectures=native")


def _user_env(tmp_path: Path) -> dict:
    """A home whose ~/chronotick-ntp is this checkout's venv, and a runtime directory, for ``--user``."""
    home, runtime = tmp_path / "home", tmp_path / "run"
    (home / "chronotick-ntp" / "bin").mkdir(parents=True)
    (home / "chronotick-ntp" / "bin" / "chronotick-ntp").symlink_to(REPO / ".venv" / "bin" / "chronotick-ntp")
    runtime.mkdir(mode=0o700)
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd); scripts/bootstrap installs it")
    return analyze


def test_every_service_has_a_user_unit():
    assert sorted(p.name for p in USER_UNITS.glob("*.service")) == sorted(set(COMMANDS) - ROOT_UNITS)


def test_the_user_units_verify_with_systemd_analyze_user(tmp_path):
    analyze = _analyze()
    env = _user_env(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    names = []
    for unit in USER_UNITS.glob("*.service"):
        shutil.copy(unit, units / unit.name)
        names.append(unit.name.replace("@.service", "@ares-comp-11.service"))
    result = subprocess.run([analyze, "--user", "verify", *names], capture_output=True, text=True, timeout=60,
                            env=env, cwd=units)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr  # not one warning


def test_the_user_units_name_only_units_a_user_manager_has(tmp_path):
    """``WantedBy=multi-user.target`` verifies, and is never started: a user manager has no such target."""
    env = _user_env(tmp_path)
    paths = subprocess.run([_analyze(), "--user", "unit-paths"], capture_output=True, text=True, timeout=60,
                           env=env, check=True).stdout.split()
    known = {p.name for d in paths if Path(d).is_dir() for p in Path(d).iterdir()}
    assert "default.target" in known and "multi-user.target" not in known  # the check can tell them apart
    for unit in USER_UNITS.glob("*.service"):
        text = unit.read_text()
        assert re.findall(r"^WantedBy=(.*)$", text, re.M) == ["default.target"], unit.name
        for key in ("WantedBy", "Wants", "Requires", "After", "Before", "BindsTo", "PartOf"):
            for line in re.findall(rf"^{key}=(.*)$", text, re.M):
                for name in line.split():
                    assert name in known, (unit.name, key, name)


@pytest.mark.parametrize("name, command", sorted((n, c) for n, c in COMMANDS.items() if n not in ROOT_UNITS))
def test_each_user_unit_runs_its_system_units_command_from_the_home_directory(name, command):
    text = (USER_UNITS / name).read_text()
    system = _exec_start((UNITS / name).read_text())
    argv = _exec_start(text)
    assert argv[0] == USER_INSTALLED and argv[1] == command
    # The same command line, with the home directory's paths for /etc/chronotick-ntp's.
    assert [a.replace(USER_CONFIG_DIR, "/etc/chronotick-ntp/") for a in argv[1:]] == system[1:]
    for directive in SYSTEM_ONLY:
        assert not re.search(rf"^{directive}=", text, re.M), (name, directive)
    for directive in USER_HARDENING:
        assert re.search(rf"^{re.escape(directive)}$", text, re.M), (name, directive)
    assert re.search(rf"^EnvironmentFile={re.escape(USER_CONFIG_DIR)}env$", text, re.M)
    assert not re.search(r"^Environment=.*(PASSWORD|AUTH|redis://)", text, re.M)  # secrets only in the file

