"""orchestrator/sources.py: each server's reach register and state, against an oracle over random rounds.

As chrony's test/unit/sources.c checks its selection against random sources, every check here replays
seeded random rounds and compares what the module says with what an oracle written from the definitions
says: the reach register of ``sources.c`` (eight bits, the newest round in bit 0, set where the server gave
a usable reply; unreachable after eight rounds with none) and the table of states in the module's
docstring.  The register is shifted by the script the store runs in Redis (:data:`orchestrator.store.SHIFT_REACH`,
on the tests' private redis-server) and read back through :meth:`Reach.registers`, as ``servers``, the
exporter and the planning of a round read it.
"""

from __future__ import annotations

import random

import pytest
import redis

from orchestrator import sources
from orchestrator.counting import NO_REPLY_REASONS
from orchestrator.outcomes import Quality, ServerStatus
from orchestrator.sources import Reach, ServerState, state_of
from orchestrator.store import SHIFT_REACH
from workers.contracts import Reason

ROUNDS = 400  # random rounds per seed
SEEDS = range(5)


# -- the oracle ------------------------------------------------------------------------------------------

class ReachOracle:
    """chrony's reach register, kept as the list of every round's bit (newest last): no arithmetic shared."""

    def __init__(self) -> None:
        self.bits: list[bool] = []

    def shift(self, usable: bool) -> None:
        self.bits.append(usable)

    @property
    def register(self) -> int:
        return sum(1 << age for age, usable in enumerate(reversed(self.bits[-8:])) if usable)

    @property
    def rounds(self) -> int:
        return min(8, len(self.bits))

    @property
    def unreachable(self) -> bool:
        return len(self.bits) >= 8 and not any(self.bits[-8:])


#: The docstring's table, row by row: the states a server's part in a round can give by itself.
BY_STATUS = {ServerStatus.CHOSEN: ServerState.OK, ServerStatus.COMBINED: ServerState.OK,
             ServerStatus.ACCEPTED: ServerState.OK, ServerStatus.FALSETICKER: ServerState.FALSETICKER,
             ServerStatus.REJECTED: ServerState.REFUSED}


def expected_state(entry: dict | None, reach: ReachOracle | None) -> ServerState:
    """The state the docstring's table gives ``entry`` (its newest round's) with ``reach`` (``None``: no register)."""
    if entry is None:
        return ServerState.UNKNOWN  # in no round yet
    if entry["status"] in BY_STATUS:
        return BY_STATUS[entry["status"]]
    if entry["status"] == ServerStatus.LATE and entry.get("sample") is not None:
        return ServerState.LATE  # answered, after the round was decided without it
    reason = entry.get("reason")
    kissed = entry.get("kiss_code") is not None or (reason is not None and reason.startswith("kod_"))
    if kissed:
        return ServerState.KOD  # a kiss, or the back-off after one
    if reason is not None and reason not in NO_REPLY_REASONS:
        return ServerState.REFUSED  # a reply came, and a check refused it
    if reach is not None and reach.unreachable:
        return ServerState.UNREACHABLE
    return ServerState.FAILING


def random_entry(rng: random.Random, server: str) -> dict:
    """A server's entry in a round record: any status, with or without a sample, a reason, a kiss code."""
    status = rng.choice(list(ServerStatus))
    entry: dict = {"server": server, "status": str(status)}
    if rng.random() < 0.5:
        entry["sample"] = {"offset_s": rng.uniform(-0.01, 0.01), "delay_s": rng.uniform(0.001, 0.1),
                           "uncertainty_s": rng.uniform(0.001, 0.05)}
    if rng.random() < 0.7:
        entry["reason"] = rng.choice([*map(str, Reason), "kod_xyzw"])
    if rng.random() < 0.1:
        entry["kiss_code"] = rng.choice(["RATE", "DENY", "RSTR", "XYZW"])
    return entry


# -- the reach register, through Redis --------------------------------------------------------------------

@pytest.fixture
def text_client(redis_url):
    """The tests' private Redis, with text replies (as the service's clients read it)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_the_reach_register_matches_chronys_over_random_rounds(text_client, seed):
    """Servers joining at random rounds, each round usable or not (bursts of silence included)."""
    rng = random.Random(seed)
    key = f"test-sources:{seed}:{rng.getrandbits(32):08x}:reach"
    oracles: dict[str, ReachOracle] = {}
    for round_no in range(ROUNDS):
        if len(oracles) < 6 and rng.random() < 0.05 or not oracles:
            oracles[f"10.0.0.{len(oracles)}:123"] = ReachOracle()
        # Some servers go silent for stretches: eight rounds in a row and more happen often.
        silence = round_no // 25 % 3 == 1
        asked = {name: (rng.random() < (0.1 if silence else 0.7)) for name in oracles if rng.random() < 0.95}
        if asked:
            args = [item for name, usable in sorted(asked.items()) for item in (name, int(usable))]
            text_client.eval(SHIFT_REACH, 1, key, *args)
        for name, usable in asked.items():
            oracles[name].shift(usable)
        registers = Reach.registers(text_client.hgetall(key))
        assert set(registers) == {name for name, o in oracles.items() if o.bits}, \
            f"registers kept (seed {seed}, round {round_no})"
        for name, reach in registers.items():
            oracle = oracles[name]
            where = f"{name}, seed {seed}, round {round_no}, bits {oracle.bits[-9:]}"
            assert reach.register == oracle.register, f"reach register: {where}"
            assert reach.rounds == oracle.rounds, f"rounds counted: {where}"
            assert reach.unreachable == oracle.unreachable, f"unreachable: {where}"
    text_client.delete(key)


def test_unreachable_needs_eight_rounds_not_an_empty_register():
    """A register never filled is not an unreachable server: seven misses are not eight (chrony: reach 0, polled)."""
    assert not Reach.decode(7 * 256).unreachable
    assert Reach.decode(8 * 256).unreachable
    assert not Reach.decode(8 * 256 + 0x80).unreachable  # one usable reply, seven rounds ago
    assert Reach.decode(8 * 256 + 0x80) == Reach(0x80, 8)


def test_registers_reads_the_hash_as_redis_returns_it():
    assert Reach.registers({"a:123": "2303", "b:123": "0"}) == {"a:123": Reach(0xFF, 8), "b:123": Reach(0, 0)}


# -- state_of ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_state_of_matches_the_table_over_random_entries(seed):
    rng = random.Random(1000 + seed)
    seen: set[ServerState] = set()
    for case in range(ROUNDS * 5):
        entry = None if rng.random() < 0.05 else random_entry(rng, "s:123")
        oracle = None
        if rng.random() < 0.8:
            oracle = ReachOracle()
            for _ in range(rng.randint(0, 12)):
                oracle.shift(rng.random() < 0.3)
        reach = None if oracle is None else Reach(oracle.register, oracle.rounds)
        expected = expected_state(entry, oracle)
        assert state_of(entry, reach) == expected, \
            f"state (seed {seed}, case {case}): {entry}, {oracle and oracle.bits}"
        seen.add(expected)
    assert seen == set(ServerState), f"every state drawn (seed {seed}): missing {set(ServerState) - seen}"


# -- report: the newest round that heard from each server --------------------------------------------------

def _record(entries: list[dict], *, finished_at: float, quality: str = Quality.STRICT) -> dict:
    return {"servers": entries, "quality": str(quality), "finished_at": finished_at}


def _ok(server: str, offset_s: float, **extra) -> dict:
    return {"server": server, "status": "chosen", "sample": {"offset_s": offset_s, "delay_s": 0.02,
                                                             "uncertainty_s": 0.01},
            "history": [{"attempt": 1, "reason": None}], **extra}


def _failed(server: str, reason: str, attempts: int = 1) -> dict:
    return {"server": server, "status": "failed", "reason": reason,
            "history": [{"attempt": i + 1, "reason": reason} for i in range(attempts)]}


def test_report_states_from_the_newest_round_and_the_last_good_sample_from_any():
    records = [_record([_ok("a", 0.001), _ok("b", 0.002)], finished_at=100.0),
               _record([_failed("a", Reason.TIMEOUT, attempts=3), _ok("b", 0.003)], finished_at=200.0)]
    reach = {"a": Reach(0b10, 2), "b": Reach(0b11, 2)}
    report = sources.report("n1", ["a", "b", "c"], records, reach, now=230.0)
    by_server = {s["server"]: s for s in report["servers"]}
    assert [s["server"] for s in report["servers"]] == ["a", "b", "c"], "servers in the config's order"
    assert by_server["a"]["state"] == ServerState.FAILING, "a timed out in its newest round, reachable before"
    assert by_server["a"]["offset_s"] == 0.001 and by_server["a"]["last_good_at"] == 100.0, "a's last good sample"
    assert by_server["a"]["last_good_age_s"] == 130.0, "its age on the caller's clock"
    assert by_server["a"]["failures"] == {"timeout": 3}, "every failed attempt counted"
    assert by_server["b"]["state"] == ServerState.OK and by_server["b"]["offset_s"] == 0.003, "b's newest sample"
    assert by_server["c"]["state"] == ServerState.UNKNOWN and by_server["c"]["reach"] == 0, "c in no round yet"
    assert by_server["c"]["rounds_seen"] == 0 and by_server["a"]["rounds_seen"] == 2, "rounds each appears in"
    assert (report["reachable"], report["majority"], report["rounds"]) == (2, 2, 2), "the summary line"


def test_an_outage_round_sets_no_servers_state():
    """An outage says nothing of any server (the node's worker or path): the state before it stands."""
    records = [_record([_ok("a", 0.001)], finished_at=100.0),
               _record([_failed("a", Reason.NO_RESULT)], finished_at=200.0, quality=Quality.OUTAGE)]
    report = sources.report("n1", ["a"], records, {"a": Reach(1, 1)}, now=200.0)
    assert report["servers"][0]["state"] == ServerState.OK, "the outage did not make a failing"
    assert report["servers"][0]["failures"] == {"no_result": 1}, "its failure is still counted"


def test_a_late_entry_without_its_outcome_keeps_the_state_before_it():
    """Late, with neither a sample nor a reason yet (the round published early): nothing new about the server."""
    records = [_record([_failed("a", Reason.BOGUS_ORIGIN)], finished_at=100.0),
               _record([{"server": "a", "status": "late"}], finished_at=200.0)]
    report = sources.report("n1", ["a"], records, {"a": Reach(0, 2)}, now=200.0)
    assert report["servers"][0]["state"] == ServerState.REFUSED, "the refused reply of the round before"


def test_servers_no_longer_configured_are_left_out():
    records = [_record([_ok("gone", 0.001), _ok("a", 0.002)], finished_at=100.0)]
    report = sources.report("n1", ["a"], records, {"gone": Reach(1, 1), "a": Reach(1, 1)}, now=100.0)
    assert [s["server"] for s in report["servers"]] == ["a"], "only configured servers"
    assert report["reachable"] == 1 and report["majority"] == 1, "counted over configured servers"


def test_a_job_for_another_node_is_no_refused_reply():
    """``wrong_node``: the worker sent nothing, so the server failed to answer nothing -- not ``refused``."""
    entry = {"server": "a", "status": ServerStatus.FAILED, "reason": Reason.WRONG_NODE, "attempts": 1,
             "history": [{"attempt": 1, "reason": Reason.WRONG_NODE}]}
    assert state_of(entry, None) == ServerState.FAILING
