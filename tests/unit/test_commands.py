"""orchestrator.commands: the simulator's commands reach the CLI through entry points, as Celery's plug-ins do."""

from __future__ import annotations

from importlib.metadata import EntryPoint

from orchestrator import cli, commands
from simulator import commands as simulator_commands


def _choices() -> dict:
    return next(action for action in cli._parser()._subparsers._group_actions  # type: ignore[union-attr]
                if action.choices).choices


def test_the_installed_entry_points_give_the_simulators_commands():
    found = {command.name: command for command in commands.discovered()}
    assert found["demo"] is simulator_commands.demo and found["simulate"] is simulator_commands.simulate


def test_the_cli_declares_a_plugged_in_command_as_its_own():
    choices = _choices()
    demo = choices["demo"].format_help()
    for flag in ("--config", "--rounds", "--plot", "--node", "--loglevel"):
        assert flag in demo
    assert choices["demo"].parse_args([]).rounds == simulator_commands.DEMO_ROUNDS
    assert choices["demo"].parse_args([]).func is simulator_commands.demo.run
    simulate = choices["simulate"]
    assert "--node" not in simulate.format_help()
    assert simulate.parse_args(["--config", "f.yaml"]).config == "f.yaml"  # required, as every --config


def test_a_broken_or_foreign_entry_point_is_left_out_and_said(monkeypatch, capsys):
    points = [EntryPoint("gone", "simulator.no_such_module:gone", commands.GROUP),
              EntryPoint("number", "simulator.commands:DEMO_ROUNDS", commands.GROUP),
              EntryPoint("renamed", "simulator.commands:demo", commands.GROUP),
              EntryPoint("simulate", "simulator.commands:simulate", commands.GROUP)]
    monkeypatch.setattr(commands, "entry_points", lambda group: [p for p in points if p.group == group])
    assert [command.name for command in commands.discovered()] == ["simulate"]
    said = capsys.readouterr().err
    assert "'gone'" in said and "could not be loaded" in said
    assert "'number'" in said and "'renamed'" in said and "not a Command" in said
