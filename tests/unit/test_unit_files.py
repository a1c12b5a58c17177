"""tests/unit mirrors the service's modules, as chrony's test/unit mirrors its sources: one file per module.

Every module of ``workers/``, ``orchestrator/`` and ``relay/`` **with logic** -- a function, or a class
with a method, of its own (read with ``ast``) -- has its unit test file, and that file imports it (a
file named after a module that never imports it tests something else).  Its file is

- ``tests/unit/test_<module>.py``, or ``test_<module>_<aspect>.py`` where the module's tests are split by
  aspect (``test_warmup_policy.py``); for ``relay/``, whose names are generic (``server``, ``settings``,
  ``stats``), ``test_relay_<module>[_<aspect>].py`` as well;
- or, listed in :data:`TESTED_UNDER_ANOTHER_NAME`, a file named before the module was (renaming it is left
  to a commit that touches nothing else);
- or none, for a module listed in :data:`INTEGRATION_ONLY` with the reason a unit test cannot reach it
  (a Celery worker, a live Redis round, sockets) and the integration tests that exercise it.

Not modules with logic, whatever they hold: :data:`NOT_LOGIC`.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "tests" / "unit"
INTEGRATION = REPO / "tests" / "integration"
PACKAGES = ("workers", "orchestrator", "relay")

#: Files that are not modules with logic, and why.
NOT_LOGIC = {
    "orchestrator/consumer.py": "ChronoTick's import shim: re-exports orchestrator.reader, holds nothing",
    "orchestrator/flowerconfig.py": "Flower's settings file (flower --conf): settings Flower reads, not the service's",
}

#: Modules whose unit tests were named before the module (or by what they test): module -> test files.
TESTED_UNDER_ANOTHER_NAME = {
    "relay/server.py": ("test_relay_resolve.py", "test_relay_bounds.py"),  # by aspect, without the module's name
    "workers/ntp/sanity.py": ("test_packet.py",),  # RFC 5905's checks, with the packets they check
}

#: Modules with logic that only integration tests exercise: module -> (why no unit test, the tests that do).
#: None today: every module's logic is reached without a Redis, a worker or a socket beyond loopback (a Redis in
#: memory, tests/unit/memory_redis.py; an NTP responder on 127.0.0.1, tests/unit/loopback_ntp.py; Celery's
#: sending replaced by recorders).  A module listed here must say why a unit test cannot reach it.
INTEGRATION_ONLY: dict[str, tuple[str, tuple[str, ...]]] = {}


def _has_logic(path: Path) -> bool:
    """A function, or a class with a method, defined at the module's top level."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return True
        if isinstance(node, ast.ClassDef) and any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                                                  for n in ast.walk(node)):
            return True
    return False


def _modules() -> list[str]:
    """Every module of the service's packages (``workers/ntp/client.py``), ``__init__`` aside."""
    return sorted(str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                  if p.name != "__init__.py")


def _dotted(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def _imports(test_file: Path, module: str) -> bool:
    """Whether ``test_file`` imports ``module`` (``import a.b``, ``from a import b``, ``from a.b import x``)."""
    dotted = _dotted(module)
    package, _, name = dotted.rpartition(".")
    for node in ast.walk(ast.parse(test_file.read_text())):
        if isinstance(node, ast.Import) and any(alias.name == dotted for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module == dotted or (node.module == package and any(a.name == name for a in node.names)):
                return True
    return False


def _unit_files(module: str) -> list[Path]:
    """The unit test files the naming rule gives ``module``."""
    stem = Path(module).stem
    prefixes = [f"test_{stem}"] + ([f"test_relay_{stem}"] if module.startswith("relay/") else [])
    return sorted(p for p in UNIT.glob("test_*.py")
                  if any(p.stem == prefix or p.stem.startswith(prefix + "_") for prefix in prefixes))


def _with_logic() -> list[str]:
    return [m for m in _modules() if m not in NOT_LOGIC and _has_logic(REPO / m)]


def test_every_module_with_logic_has_its_unit_test_file():
    missing = [m for m in _with_logic()
               if not _unit_files(m) and m not in TESTED_UNDER_ANOTHER_NAME and m not in INTEGRATION_ONLY]
    assert not missing, (f"modules with logic and no tests/unit/test_<module>.py: {missing} -- add one, or list "
                         "the module in INTEGRATION_ONLY with the reason and the integration tests that run it")


def test_each_modules_unit_test_file_imports_it():
    wrong = {m: [p.name for p in files] for m in _with_logic()
             if (files := _unit_files(m)) and not any(_imports(p, m) for p in files)}
    assert not wrong, f"unit test files named after a module that none of them imports: {wrong}"


def test_files_tested_under_another_name_exist_and_import_their_module():
    for module, names in TESTED_UNDER_ANOTHER_NAME.items():
        assert (REPO / module).is_file(), f"TESTED_UNDER_ANOTHER_NAME names a module that is gone: {module}"
        assert not _unit_files(module), f"{module} has a test file by the rule now: drop it from the list"
        for name in names:
            assert (UNIT / name).is_file(), f"{module}'s test file {name} is gone"
            assert _imports(UNIT / name, module), f"{name} does not import {module}"


def test_integration_only_modules_are_listed_with_a_reason_and_real_tests():
    for module, (reason, tests) in INTEGRATION_ONLY.items():
        assert (REPO / module).is_file(), f"INTEGRATION_ONLY names a module that is gone: {module}"
        assert _has_logic(REPO / module), f"{module} has no logic of its own now: drop it from INTEGRATION_ONLY"
        assert not _unit_files(module), f"{module} has a unit test file now: drop it from INTEGRATION_ONLY"
        assert reason and tests, f"{module}: a reason and the integration tests that exercise it"
        for name in tests:
            assert (INTEGRATION / name).is_file(), f"{module}: no tests/integration/{name}"


def test_not_logic_files_hold_no_logic_of_their_own_or_are_config():
    assert not _has_logic(REPO / "orchestrator/consumer.py"), "the shim re-exports only"
    for module in NOT_LOGIC:
        assert (REPO / module).is_file(), f"NOT_LOGIC names a module that is gone: {module}"


def test_the_rule_sees_a_module_without_its_test_file(tmp_path):
    """The check itself: a module with a function is logic; one with constants and a dataclass is not."""
    logic, data = tmp_path / "logic.py", tmp_path / "data.py"
    logic.write_text("X = 1\n\ndef f():\n    return X\n")
    data.write_text("from dataclasses import dataclass\n\nX = 1\n\n@dataclass\nclass D:\n    x: int = 0\n")
    assert _has_logic(logic) and not _has_logic(data)
    assert _unit_files("workers/no_such_module.py") == []
    assert [p.name for p in _unit_files("workers/warmup.py")] == ["test_warmup_policy.py"]
