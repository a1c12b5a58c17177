"""The names that cross Celery and Redis: reasons say their value, enums are their strings."""

import importlib
import json
from pathlib import Path

from orchestrator.outcomes import ClosedBy, Quality, ServerStatus
from workers.contracts import OutcomeStatus, Reason, kiss_reason

REPO = Path(__file__).resolve().parents[2]


def test_no_module_keeps_a_second_name_for_a_reason_or_a_round_end():
    """One name for each thing (issue #27): ``Reason.TIMEOUT``, never a module's ``REASON_TIMEOUT`` alias."""
    found = []
    for path in sorted(p for pkg in ("workers", "orchestrator", "relay",
                                     "simulator") for p in (REPO / pkg).rglob("*.py")):
        module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
        for name, value in vars(module).items():
            if isinstance(value, (Reason, ClosedBy)) and not name.startswith("_"):
                found.append(f"{module.__name__}.{name} = {type(value).__name__}.{value.name}")
            assert not name.startswith(("REASON_", "CLOSED_BY_")), f"{module.__name__}.{name}"
    assert not found, found


def test_enums_are_their_strings_in_json_and_back():
    for member in (*OutcomeStatus, *Quality, *ServerStatus):
        assert json.loads(json.dumps({"v": member}))["v"] == member == member.value
        assert f"{member}" == str(member) == member.value
        assert {member.value: 1}[member] == 1
    assert [q.value for q in Quality] == ["strict", "relaxed", "starvation", "outlier", "outage"]


def test_every_reason_is_documented():
    docs = " ".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    missing = [r.value for r in Reason if f"`{r.value}`" not in docs]
    assert not missing, f"reasons not documented in docs/: {missing}"
    assert kiss_reason("RATE") is Reason.KOD_RATE and kiss_reason("INIT") == "kod_init"
