"""docs/design.md opens with the map of a measurement's path: it names every service module, and only real ones."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _map() -> str:
    text = (REPO / "docs" / "design.md").read_text()
    assert text.index("## The map") < text.index("## Measuring one server"), "the map opens design.md"
    return text.split("## The map", 1)[1].split("\n## ", 1)[0]


def test_the_map_names_every_service_module_and_only_real_ones():
    named = set(re.findall(r"`((?:workers|orchestrator)/[\w/]*\.py)`", _map()))
    modules = {p.relative_to(REPO).as_posix() for pkg in ("workers", "orchestrator")
               for p in (REPO / pkg).rglob("*.py") if p.name != "__init__.py"}
    assert not named - modules, f"the map names modules that do not exist: {sorted(named - modules)}"
    assert not modules - named, f"modules missing from the map: {sorted(modules - named)}"


def test_the_map_fits_on_a_page():
    assert len(_map().splitlines()) <= 60
