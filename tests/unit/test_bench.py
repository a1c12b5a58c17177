"""bench/: a package run as ``python -m bench.NAME``, every bench's set-up in one harness (bench/harness.py).

No bench edits ``sys.path`` (run from the repository's root, the package imports as the tests do); none
starts its own Redis, servers or worker but through :func:`bench.harness.bed`; every one parses its flags
under the name it is run by; and the docs give each command as a module.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
from pathlib import Path

import pytest
import redis

from bench import harness
from workers import config as config_mod

REPO = Path(__file__).resolve().parents[2]
BENCHES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem not in ("__init__", "harness"))

#: What only the harness may use to set up a bench.
SET_UP = {"RedisProcess", "start_node_worker", "NtpSimulator"}


def _tree(name: str) -> ast.Module:
    return ast.parse((REPO / "bench" / f"{name}.py").read_text())


def test_no_bench_edits_sys_path():
    for name in [*BENCHES, "harness"]:
        edits = [node.lineno for node in ast.walk(_tree(name)) if isinstance(node, ast.Attribute)
                 and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert not edits, f"bench/{name}.py touches sys.path at lines {edits}: run it as python -m bench.{name}"


def test_no_bench_sets_up_its_own_redis_servers_or_worker():
    for name in BENCHES:
        used = {alias.name for node in ast.walk(_tree(name)) if isinstance(node, ast.ImportFrom)
                for alias in node.names} & SET_UP
        assert not used, f"bench/{name}.py imports {used}: its bed comes from bench.harness.bed"


@pytest.mark.parametrize("name", BENCHES)
def test_each_bench_runs_as_a_module_and_parses_its_flags(name, monkeypatch, capsys):
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0, f"bench.{name} --help exits 0"
    assert capsys.readouterr().out.startswith(f"usage: python -m bench.{name} "), "named as it is run"


def test_the_docs_give_every_bench_command_as_a_module():
    """``.venv/bin/python -m bench.NAME``, never ``python bench/NAME.py`` (that no longer imports the project)."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").glob("*.py"))]:
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"python3? bench/\w+\.py", line):
                found.append(f"{path.relative_to(REPO)}:{no}: {line.strip()}")
    assert not found, "bench commands as scripts:\n" + "\n".join(found)


def test_quantile_is_the_nearest_rank():
    assert harness.quantile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert harness.quantile(range(1, 101), 0.99) == 100 and harness.quantile(range(1, 101), 0.9) == 91
    assert harness.quantile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        harness.quantile([], 0.5)


def test_a_bed_is_a_private_redis_that_leaves_nothing_behind():
    before = os.environ.get(config_mod.ENV_REDIS_URL)
    with harness.bed("ct-test-bed-") as b:
        assert os.environ[config_mod.ENV_REDIS_URL] == b.url, "configs loaded meanwhile use the bed's Redis"
        assert b.client().ping(), "it answers"
        config = b.config("c.yaml", ["127.0.0.1:8123"], service={"key_prefix": "bedtest"})
        assert config.service.key_prefix == "bedtest" and config.service.redis_url == b.url, "its config"
        with b.scope() as inner:
            assert inner.url == b.url and inner.tmp == b.tmp, "a scope shares the bed"
        process, tmp = b.redis.process, b.tmp
    assert process.poll() is not None, "Redis stopped on leaving"
    assert not tmp.exists(), "the directory removed"
    assert os.environ.get(config_mod.ENV_REDIS_URL) == before, "the environment as it was"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(b.url, socket_connect_timeout=0.5).ping()
