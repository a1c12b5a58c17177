"""What every ``chronotick-ntp`` command shares -- its exit codes, its one-line failure -- and the commands other
packages add.

As ``celery`` finds the sub-commands other packages provide in the ``celery.commands`` entry points,
``chronotick-ntp`` (:mod:`orchestrator.cli`) finds more commands in the :data:`GROUP` entry points: each names a
:class:`Command`.  The simulator registers ``demo`` and ``simulate`` there (``pyproject.toml``;
:mod:`simulator.commands`), so the CLI names no simulator module and the packages import one way: ``simulator``
-> ``orchestrator`` -> ``workers`` (``tests/unit/test_layout.py``).  An entry point is loaded at every start of
the CLI: the module it names imports only what declaring its commands needs, and each command imports its work
when it runs.

The exit codes are declared here for every command, a plug-in's too; what each means is in :mod:`orchestrator.cli`
and docs/contract.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

#: The entry-point group of the commands other packages add to ``chronotick-ntp``.
GROUP = "chronotick_ntp.commands"

EXIT_OK, EXIT_STARVATION, EXIT_USAGE, EXIT_NO_WORKER, EXIT_NO_BROKER, EXIT_IN_USE = 0, 1, 2, 3, 4, 5
#: ``up``: a service or Redis exited by itself (``up`` stopped the rest): 1, the code of an outcome that failed.
EXIT_SERVICE_FAILED = EXIT_STARVATION
#: stdout's reader went away (``chronotick-ntp latest | head -1``): 128 + SIGPIPE, what a shell reports for
#: a program SIGPIPE ends, so ``set -o pipefail`` sees the same as with any Unix tool; no traceback.
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE


class CliError(Exception):
    """A failure to report in one line and exit with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command with only the common options."""


@dataclass(frozen=True)
class Command:
    """A command another package adds to ``chronotick-ntp``: what an entry point of :data:`GROUP` names.

    The CLI declares the options every command has (``--loglevel``; ``--config FILE``, required, unless
    ``config`` is false; ``--node`` unless ``node`` is false), then :attr:`arguments` the command's own.
    :attr:`run` returns the exit code; a failure to say in one line raises :class:`CliError` (or
    :class:`workers.config.ConfigError`, exit 2).
    """

    #: The command's name on the command line: the entry point's name too.
    name: str
    #: One line: the command's help in ``chronotick-ntp --help`` and its description.
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    config: bool = True
    node: bool = True


def discovered() -> list[Command]:
    """The commands of every installed package's :data:`GROUP` entry points, by name.

    One that cannot be loaded, or names no :class:`Command` of its own name, is left out, said on stderr:
    every other command still works.
    """
    found: dict[str, Command] = {}
    for point in entry_points(group=GROUP):
        try:
            command = point.load()
        except Exception as exc:  # a broken plug-in must not take every command down
            print(f"warning: command {point.name!r} ({point.value}) could not be loaded: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if not isinstance(command, Command) or command.name != point.name:
            print(f"warning: entry point {point.name!r} ({point.value}) of {GROUP} is not a Command named "
                  f"{point.name!r}; left out", file=sys.stderr)
            continue
        found.setdefault(command.name, command)
    return [found[name] for name in sorted(found)]
