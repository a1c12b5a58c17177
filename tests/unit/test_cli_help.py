"""CLI help built from the declared defaults (issue #27): no help names a default of its own.

Every option of every sub-command is read from the parser itself.  A help's
"(default ...)" clause must name the option's default -- argparse's, or, for
an option left ``None`` and resolved later, the constant it resolves to
(:data:`RESOLVED_LATER`) -- and no help names any other number.  Hard-code
"default 9124" in a help and change the exporter's port, and this fails.
"""

from __future__ import annotations

import argparse
import re

import pytest

from orchestrator import cli, defaults, exporter
from relay import settings as relay_settings
from workers import config as config_mod

#: Options whose argparse default is ``None`` because the value is resolved after parsing: what they resolve to.
RESOLVED_LATER: dict[tuple[str, str], object] = {
    ("exporter", "--address"): defaults.EXPORTER_ADDRESS,
    ("exporter", "--port"): defaults.EXPORTER_PORT,
    ("up", "--exporter-port"): defaults.EXPORTER_PORT,
    ("up", "--redis-port"): defaults.REDIS_PORT,
    ("up", "--data-dir"): defaults.DATA_DIR,
    ("relay", "--bind"): relay_settings.DEFAULT_BIND,
    ("relay", "--timeout"): relay_settings.DEFAULT_TIMEOUT_S,
    ("relay", "--client-interval"): relay_settings.DEFAULT_CLIENT_INTERVAL_S,
    ("relay", "--client-burst"): relay_settings.DEFAULT_CLIENT_BURST,
    ("hub", "--chronyd"): defaults.CHRONYD,
    ("hub", "--run-dir"): defaults.HUB_RUN_DIR,
    ("hub", "--worker-user"): defaults.HUB_WORKER_USER,
}

#: Numbers a help names that are not its default, and what they are.
OTHER_NUMBERS = {("up", "--redis-port"): {"0"}}  # "0: any free port"

_DEFAULT = re.compile(r"default[: ]+(?P<clause>[^;)]*)")
_NUMBER = re.compile(r"(?<![\w.$-])\d+(?:\.\d+)*(?![\w.])")


def _options() -> list[tuple[str, argparse.Action, str]]:
    """(sub-command, action, its help as the user sees it) for every option of every sub-command."""
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.help and action.option_strings:
                help_text = sub._get_formatter()._expand_help(action)
                found.append((name, action, help_text))
    return found


def _text_of(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _declared(command: str, action: argparse.Action) -> object:
    if action.default is not None:
        return action.default
    return RESOLVED_LATER.get((command, action.option_strings[-1]))


def test_every_option_is_seen():
    seen = {(command, action.option_strings[-1]) for command, action, _ in _options()}
    assert {("status", "--hours"), ("flower", "--port"), ("up", "--redis-port"), ("relay", "--timeout")} <= seen
    assert set(RESOLVED_LATER) <= seen, "an entry of RESOLVED_LATER names an option that is gone"


@pytest.mark.parametrize(("command", "action", "help_text"), _options(),
                         ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_a_help_names_only_its_declared_default(command, action, help_text):
    option = action.option_strings[-1]
    declared = _declared(command, action)
    clauses = [m.group("clause") for m in _DEFAULT.finditer(help_text)]
    for clause in clauses:
        if isinstance(declared, bool) or declared is None:
            assert not _NUMBER.search(clause), (
                f"{command} {option}: its help names a default ({clause!r}) that no declaration gives; "
                "take it from the constant it describes (and add it to RESOLVED_LATER)")
        else:
            assert _text_of(declared) in clause, (
                f"{command} {option}: its help says default {clause!r}, its declared default is {declared!r}")
    named = set(_NUMBER.findall(help_text))
    allowed = {*OTHER_NUMBERS.get((command, option), ()),
               *(_NUMBER.findall(_text_of(declared)) if clauses and declared is not None else ())}
    assert named <= allowed, f"{command} {option}: its help names {sorted(named - allowed)}: {help_text!r}"


def test_the_options_resolved_later_resolve_to_what_their_help_says():
    """The constants :data:`RESOLVED_LATER` holds the helps to are the ones the code uses."""
    assert exporter.listen_address(None, None, {}) == (defaults.EXPORTER_ADDRESS, defaults.EXPORTER_PORT)
    settings = relay_settings.RelaySettings(mappings=())
    assert (settings.bind, settings.timeout_s, settings.client_interval_s, settings.client_burst) == (
        relay_settings.DEFAULT_BIND, relay_settings.DEFAULT_TIMEOUT_S, relay_settings.DEFAULT_CLIENT_INTERVAL_S,
        relay_settings.DEFAULT_CLIENT_BURST)
    relay = cli._parser().parse_args(["relay", "--config", "proxy.yaml"])
    assert relay.key_prefix == config_mod.ServiceSettings.key_prefix

