"""The import rules of the layout, read from the source with ``ast``.

- ``workers`` never imports ``orchestrator`` (the worker registers the callback by name) or ``relay``;
- ``relay`` (the head node's NTP relay) never imports ``orchestrator``: it runs on its own;
- the service (``workers``, ``orchestrator``) never imports the tooling (``simulator``) at module level;
- no module imports the CLI, which imports downward only;
- no cycle among module-level imports.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("workers", "orchestrator", "relay", "simulator")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of one file, as project module names."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    top_level = {id(node) for node in tree.body}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found[name] = found.get(name, False) or id(node) in top_level
    modules = {_module_name(p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    resolve = lambda n: n if n in modules else n.rsplit(".", 1)[0]  # noqa: E731  (from pkg import module)
    return ({resolve(n) for n, top in found.items() if top} - {_module_name(path)},
            {resolve(n) for n in found} - {_module_name(path)})


def _graph():
    return {_module_name(p): _imports(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def test_workers_never_import_the_orchestrator_or_the_relay():
    for module, (_, everything) in _graph().items():
        if module.startswith("workers"):
            assert not any(n.startswith(("orchestrator", "relay")) for n in everything), module


def test_the_relay_never_imports_the_orchestrator():
    for module, (_, everything) in _graph().items():
        if module.startswith("relay"):
            assert not any(n.startswith("orchestrator") for n in everything), module


def test_the_service_never_imports_tooling_at_module_level():
    for module, (top, _) in _graph().items():
        if module.startswith(("workers", "orchestrator", "relay")):
            assert not any(n.startswith("simulator") for n in top), module


def test_nothing_imports_the_cli():
    for module, (_, everything) in _graph().items():
        assert "orchestrator.cli" not in everything, module


def test_no_import_cycles():
    graph = {m: everything for m, (_, everything) in _graph().items()}  # lazy imports too
    state: dict[str, int] = {}

    def visit(module, path):
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in graph.get(module, ()):
            if dep in graph and dep != module and not module.startswith(dep + "."):
                visit(dep, path + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])
