"""The names that cross Celery and Redis: reasons say their value, enums are their strings."""

import json

from orchestrator import outcomes as orchestrator_contracts
from orchestrator.outcomes import Quality, ServerStatus
from workers import kod, measure, tasks
from workers.contracts import OutcomeStatus
from workers.ntp import sanity


def test_every_reason_constant_is_named_after_its_value():
    modules = (sanity, kod, measure, tasks, orchestrator_contracts)
    reasons = {f"{m.__name__}.{name}": value for m in modules for name, value in vars(m).items()
               if name.startswith("REASON_") and name != "REASON_KOD_PREFIX"}
    assert len(reasons) >= 25
    for where, value in reasons.items():
        assert where.rsplit(".", 1)[1] == "REASON_" + value.upper(), where


def test_enums_are_their_strings_in_json_and_back():
    for member in (*OutcomeStatus, *Quality, *ServerStatus):
        assert json.loads(json.dumps({"v": member}))["v"] == member == member.value
        assert f"{member}" == str(member) == member.value
        assert {member.value: 1}[member] == 1
    assert [q.value for q in Quality] == ["strict", "relaxed", "starvation", "outlier", "outage"]


def test_every_reason_is_named_once_and_documented():
    """One vocabulary: each module's REASON_* is a Reason member, and every Reason is in the docs."""
    import pathlib

    from orchestrator import outcomes as orchestrator_contracts
    from orchestrator import selection
    from workers import kod, measure, tasks
    from workers.contracts import Reason, kiss_reason
    from workers.ntp import sanity

    for module in (sanity, kod, measure, tasks, orchestrator_contracts, selection):
        for name in dir(module):
            if name.startswith("REASON_") and name != "REASON_KOD_PREFIX":
                assert isinstance(getattr(module, name), Reason), f"{module.__name__}.{name} is not a Reason"
    docs = " ".join(p.read_text() for p in (pathlib.Path(__file__).resolve().parents[2] / "docs").glob("*.md"))
    missing = [r.value for r in Reason if f"`{r.value}`" not in docs]
    assert not missing, f"reasons not documented in docs/: {missing}"
    assert kiss_reason("RATE") is Reason.KOD_RATE and kiss_reason("INIT") == "kod_init"
