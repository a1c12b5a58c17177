"""The cluster test bed as a fixture: built once a session, torn down whatever happens.

Skipped, with the reason printed at the end of the run, only where network
namespaces cannot be made (``ip netns add`` fails: not root, no
CAP_NET_ADMIN/CAP_SYS_ADMIN).  Anything else that goes wrong building it is
an error: CI runs as root, and a bed that silently did not run tests nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .bed import Bed, NamespacesUnavailable, ip_binary

#: A directory to copy every service's log into before the bed is deleted (for a person reading them).
KEEP_LOGS = "CHRONOTICK_BED_LOGS"

#: Why the bed was skipped, for the end of the run (pytest -q shows no skip reason by itself).
_skipped: list[str] = []


@pytest.fixture(scope="session")
def bed():
    """The cluster (tests/cluster/bed.py), every node publishing; deleted at the end of the session."""
    yield from running_bed(Bed, "ct-bed-")


def running_bed(kind: type[Bed], prefix: str, **kwargs):
    """Build a ``kind`` bed (``kwargs`` to its constructor), start its cluster, yield it; tear it down whatever
    happens, copying the logs to ``$CHRONOTICK_BED_LOGS`` first.  Skipped only where namespaces cannot be made."""
    if ip_binary() is None:
        _skip("no `ip` command (Debian package iproute2)")
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = kind(directory, **kwargs)
    try:
        try:
            cluster.build()
        except NamespacesUnavailable as exc:
            _skip(f"{exc}; run as root (CI does)")
        cluster.start_cluster()
        yield cluster
    finally:
        problems = cluster.teardown()
        keep = os.environ.get(KEEP_LOGS)
        if keep and (directory / "logs").is_dir():
            shutil.copytree(directory / "logs", Path(keep) / cluster.prefix)
        shutil.rmtree(directory, ignore_errors=True)
        assert not problems, f"tearing the bed down: {problems}"


def _skip(reason: str) -> None:
    reason = f"tests/cluster skipped: network namespaces cannot be made here: {reason}"
    _skipped.append(reason)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter):
    for reason in dict.fromkeys(_skipped):
        terminalreporter.write_line(reason, yellow=True)
