"""The import rules of the layout, read from the source with ``ast`` (imports inside functions included).

- ``workers`` never imports ``orchestrator`` (the worker registers the callback by name) or ``relay``;
- ``relay`` (the head node's NTP relay) reaches no ``orchestrator`` module: it runs on its own;
- the service (``workers``, ``orchestrator``) never imports the tooling (``simulator``) at module level;
- no module imports the CLI, which imports downward only;
- the orchestrator names no ``simulator`` module: the simulator's commands reach the CLI through the
  ``chronotick_ntp.commands`` entry points (:mod:`orchestrator.commands`);
- no cycle among modules, nor among the top-level packages (``workers``, ``orchestrator``, ...), lazy imports
  included: a function's ``import`` runs as surely as a module's, only later;
- the reader (:mod:`orchestrator.reader`, ChronoTick's :mod:`orchestrator.consumer`) reaches no Celery through
  any project module it imports: ChronoTick's process loads no task queue;
- the store (:mod:`orchestrator.store`) imports no selection (:mod:`orchestrator.selection`): it keeps records,
  it does not choose them.
"""

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("workers", "orchestrator", "relay", "simulator")

#: The reader's modules: what ChronoTick imports.
READER = ("orchestrator.reader", "orchestrator.consumer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> frozenset[str]:
    return frozenset(_module_name(p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _imports(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(module-level imports, all imports) of one file as project module names, and its third-party imports
    (top-level names: ``celery``, ``redis``), wherever they are in the file."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    top_level = {id(node) for node in tree.body}
    found: dict[str, bool] = {}
    outside: set[str] = set()
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
            elif name:
                outside.add(name.split(".")[0])
    modules = _modules()
    resolve = lambda n: n if n in modules else n.rsplit(".", 1)[0]  # noqa: E731  (from pkg import module)
    return ({resolve(n) for n, top in found.items() if top} - {_module_name(path)},
            {resolve(n) for n in found} - {_module_name(path)}, outside)


@cache
def _graph() -> dict[str, tuple[set[str], set[str], set[str]]]:
    return {_module_name(p): _imports(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _parents(module: str) -> list[str]:
    """The packages importing ``module`` imports first: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _reach(start: str, graph=None) -> dict[str, list[str]]:
    """Every project module importing ``start`` may import (lazy imports too), each with the path to it."""
    graph = graph or _graph()
    paths = {start: [start]}
    todo = [start]
    while todo:
        module = todo.pop()
        for dep in sorted(graph[module][1] | set(_parents(module))):
            if dep in graph and dep not in paths:
                paths[dep] = paths[module] + [dep]
                todo.append(dep)
    return paths


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (node -> the nodes it points to), as a path from a node back to it; ``None``."""
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            return path[path.index(node):] + [node]
        if state.get(node) == 2:
            return None
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep in graph and dep != node:
                found = visit(dep, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def _package_graph(graph) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {pkg: set() for pkg in PACKAGES}
    for module, (_, everything, _) in graph.items():
        packages[module.split(".")[0]] |= {dep.split(".")[0] for dep in everything}
    return packages


def test_workers_never_import_the_orchestrator_or_the_relay():
    for module, (_, everything, _) in _graph().items():
        if module.startswith("workers"):
            assert not any(n.startswith(("orchestrator", "relay")) for n in everything), module


def test_the_relay_reaches_no_orchestrator_module():
    for module in _graph():
        if module.split(".")[0] == "relay":
            reached = [path for dep, path in _reach(module).items() if dep.split(".")[0] == "orchestrator"]
            assert not reached, " -> ".join(reached[0])


def test_the_service_never_imports_tooling_at_module_level():
    for module, (top, _, _) in _graph().items():
        if module.startswith(("workers", "orchestrator", "relay")):
            assert not any(n.startswith("simulator") for n in top), module


def test_the_orchestrator_names_no_simulator_module():
    for module, (_, everything, _) in _graph().items():
        if module.startswith("orchestrator"):
            assert not any(n.split(".")[0] == "simulator" for n in everything), module


def test_nothing_imports_the_cli():
    for module, (_, everything, _) in _graph().items():
        assert "orchestrator.cli" not in everything, module


def test_no_import_cycles():
    graph = {m: {dep for dep in everything if not m.startswith(dep + ".")}  # a package's own parent: not a cycle
             for m, (_, everything, _) in _graph().items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_among_the_packages():
    cycle = _find_cycle(_package_graph(_graph()))
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_the_reader_reaches_no_celery():
    graph = _graph()
    for start in READER:
        for module, path in _reach(start, graph).items():
            assert "celery" not in graph[module][2] and "kombu" not in graph[module][2], (
                " -> ".join(path) + " imports Celery")


def test_the_store_imports_no_selection():
    _, everything, _ = _graph()["orchestrator.store"]
    assert "orchestrator.selection" not in everything


def test_the_rules_see_what_they_look_for():
    """Each rule's check finds its fault when one is there: a cycle, a package cycle, a module reached."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    fake = {"workers": (set(), set(), set()), "workers.app": (set(), set(), {"celery"}),
            "orchestrator": (set(), set(), set()),
            "orchestrator.reader": (set(), {"workers.x"}, {"redis"}),
            "workers.x": (set(), set(), set()), "workers.y": (set(), set(), set()),
            "simulator": (set(), set(), set()), "simulator.demo": (set(), {"orchestrator.reader"}, set()),
            "relay": (set(), set(), set())}
    assert set(_reach("orchestrator.reader", fake)) == {"orchestrator.reader", "orchestrator", "workers.x", "workers"}
    fake["workers.x"] = (set(), {"workers.app"}, set())  # the reader now reaches Celery through workers.x
    assert _reach("orchestrator.reader", fake)["workers.app"] == ["orchestrator.reader", "workers.x", "workers.app"]
    assert _find_cycle(_package_graph(fake)) is None
    fake["workers.y"] = (set(), {"simulator.demo"}, set())  # workers -> simulator -> orchestrator -> workers
    assert _find_cycle(_package_graph(fake)) is not None
