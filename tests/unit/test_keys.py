"""workers/keys.py: every Redis key name under one prefix, the contract's as docs/contract.md spells them.

The contract's keys are read by ChronoTick and by anyone's scripts: their names are checked against the
table in docs/contract.md.  Every other name must stay under the prefix, and no two things may share a key.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from workers.keys import QUEUE_PREFIX, Keys

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contract.md"

#: Each key-naming method's arguments, for a node, a round, a queue, a host and a relay port.
ARGUMENTS = {"node": "n1", "round_id": "r1", "queue": f"{QUEUE_PREFIX}n1", "hostname": "w1@host", "relay": "head",
             "port": 8123}


def _every_key(keys: Keys, **overrides: object) -> dict[str, str]:
    """Method name -> the key it names, every public method of :class:`Keys` called with :data:`ARGUMENTS`."""
    names = {}
    for name, method in inspect.getmembers(keys, inspect.ismethod):
        if name.startswith("_"):
            continue
        params = inspect.signature(method).parameters
        names[name] = method(**{p: overrides.get(p, ARGUMENTS[p]) for p in params})
    return names


def test_the_contracts_keys_are_named_as_the_contract_documents():
    """docs/contract.md's table: ``chronotick:ntp:<node>:<leaf>`` and ``chronotick:ntp:nodes``."""
    documented = set(re.findall(r"^\| `(chronotick:ntp:[^`]+)`", CONTRACT.read_text(), re.MULTILINE))
    keys = Keys("chronotick")
    named = {keys.nodes(), *(getattr(keys, leaf)("<node>") for leaf in (
        "latest", "history", "updates", "stats", "late", "round_duration", "no_worker"))}
    assert named == documented, f"contract table vs workers.keys: only documented {documented - named}, " \
                                f"only named {named - documented}"


def test_every_key_is_under_the_prefix():
    for name, key in _every_key(Keys("pfx")).items():
        assert key.startswith("pfx:"), f"{name}: {key} is outside the prefix"


def test_no_two_things_share_a_key():
    keys = _every_key(Keys("pfx"))
    by_key: dict[str, list[str]] = {}
    for name, key in keys.items():
        by_key.setdefault(key, []).append(name)
    assert all(len(names) == 1 for names in by_key.values()), \
        f"shared keys: {[names for names in by_key.values() if len(names) > 1]}"


def test_two_nodes_and_two_prefixes_never_share_a_key():
    one, other_node = _every_key(Keys("pfx")), _every_key(Keys("pfx"), node="n2", queue=f"{QUEUE_PREFIX}n2")
    other_prefix = _every_key(Keys("other"))
    per_node = {name for name in one if one[name] != other_node[name]}
    assert {"latest", "history", "stats", "reach", "round_claim"} <= per_node, f"per-node keys: {per_node}"
    assert not set(one.values()) & set(other_prefix.values()), "a key shared across prefixes"


def test_the_default_prefix_is_chronoticks():
    assert Keys().latest("n1") == "chronotick:ntp:n1:latest"
