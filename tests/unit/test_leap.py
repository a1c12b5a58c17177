"""Leap seconds and smearing (orchestrator/leap.py): the list, the window, the timescales, and rounds near a leap.

The oracle test runs thousands of seeded random rounds through the production
paths (the chord callback's :func:`orchestrator.callback.build_record` and the
worker's :func:`orchestrator.callback.decide_early`) and holds them to the slow,
obvious rule: inside a leap window nothing published ever mixes timescales --
it is plain selection over the servers of ``leap_timescale`` alone -- and
outside one the result is plain selection, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

import pytest

from orchestrator import callback, early, leap, selection
from orchestrator.counting import round_counters
from orchestrator.outcomes import RoundMeta
from orchestrator.reader import Measurement
from orchestrator.records import compact, compact_server, expand, late_entry, late_of
from orchestrator.store import record_of
from workers import config as config_mod
from workers import inflight
from workers.contracts import Reason, Selection
from workers.quality import Thresholds

SYSTEM_FILE = "/usr/share/zoneinfo/leap-seconds.list"
NTP_UNIX = 2_208_988_800
DAY = 86400
HALF = 12 * 3600

#: The list's last lines (NTP seconds): 1 Jul 2012's offset, then the leap seconds of 1 Jul 2015 and 1 Jan 2017.
LINES = [(3550089600, 35), (3644697600, 36), (3692217600, 37)]
LEAP_2015 = 3644697600 - NTP_UNIX
LEAP_2017 = 3692217600 - NTP_UNIX
EXPIRES_NTP = 3707596800  # 28 Jun 2017


def _text(lines=LINES, *, expires=EXPIRES_NTP, updated=3676924800, hashed=True, extra=()) -> str:
    """A leap-seconds.list in the IERS layout, its hash right when ``hashed``."""
    out = ["#\tATOMIC TIME", "#", f"#$\t{updated}" if updated is not None else "#", f"#@\t{expires}", "#"]
    out += [f"{at}\t{value}\t# comment" for at, value in lines]
    out += list(extra)
    if hashed:
        numbers = ("" if updated is None else str(updated)) + str(expires) + "".join(f"{a}{v}" for a, v in lines)
        digest = hashlib.sha1(numbers.encode()).hexdigest()
        out.append("#h\t" + " ".join(digest[i:i + 8] for i in range(0, 40, 8)))
    return "\n".join(out) + "\n"


# -- the list ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(SYSTEM_FILE), reason="no system leap-seconds.list")
def test_the_systems_own_list_parses_and_its_hash_holds():
    text = Path(SYSTEM_FILE).read_text()
    table = leap.parse_leap_seconds(text, SYSTEM_FILE)
    assert table.offsets[0] == (2272060800 - NTP_UNIX, 10)  # 1 Jan 1972: TAI - UTC = 10 s, no leap
    assert LEAP_2017 in table.leaps and LEAP_2015 in table.leaps
    assert len(table.leaps) == len(table.offsets) - 1 >= 27
    expiry = int(re.search(r"^#@\s*(\d+)", text, re.M).group(1))
    assert table.expires_at == expiry - NTP_UNIX
    assert leap.leap_window(LEAP_2017, table) == (LEAP_2017 - HALF, LEAP_2017 + HALF)
    if re.search(r"^#h", text, re.M):  # the expiry moved by a second: the hash says the file is damaged
        damaged = re.sub(r"^#@(\s*)(\d+)", lambda m: f"#@{m.group(1)}{int(m.group(2)) + 1}", text, flags=re.M)
        with pytest.raises(leap.LeapFileError, match="hash"):
            leap.parse_leap_seconds(damaged, SYSTEM_FILE)


def test_a_synthetic_list_parses_to_unix_times():
    table = leap.parse_leap_seconds(_text(), "synthetic")
    assert table.offsets == tuple((float(a - NTP_UNIX), v) for a, v in LINES)
    assert table.leaps == (LEAP_2015, LEAP_2017)  # the first line only sets the offset
    assert table.expires_at == EXPIRES_NTP - NTP_UNIX and table.updated_at == 3676924800 - NTP_UNIX
    assert leap.parse_leap_seconds(_text(hashed=False, updated=None), "synthetic").updated_at is None
    # NIST writes hash words without their leading zeros
    numbers = "3676924800" + str(EXPIRES_NTP) + "".join(f"{a}{v}" for a, v in LINES)
    words = [hashlib.sha1(numbers.encode()).hexdigest()[i:i + 8] for i in range(0, 40, 8)]
    short = _text(hashed=False) + "#h\t" + " ".join(w.lstrip("0") or "0" for w in words) + "\n"
    assert leap.parse_leap_seconds(short, "nist").leaps == (LEAP_2015, LEAP_2017)


def test_the_expiry_is_honoured():
    table = leap.parse_leap_seconds(_text(expires=LEAP_2017 + NTP_UNIX + HALF // 2), "short-lived")
    assert leap.leap_window(LEAP_2017 - 1, table) == (LEAP_2017 - HALF, LEAP_2017 + HALF)
    assert leap.leap_window(LEAP_2017 + HALF // 2 - 1e-6, table) is not None
    assert table.expired(LEAP_2017 + HALF // 2)
    assert leap.leap_window(LEAP_2017 + HALF // 2, table) is None  # expired: no window is known


BAD = [
    (["3644697600\t36\textra\t# c"], "expected 'NTP_SECONDS TAI-UTC"),
    (["3644697600x\t36"], "the NTP time is not a whole number"),
    (["3644697600\t-36"], "TAI-UTC is not a whole number"),
    (["3644697601\t36"], "is not a midnight UTC"),
    (["3550089600\t36"], "is not after the line before's"),
    (["3644697600\t38"], "TAI-UTC goes from 35 to 38"),
]


@pytest.mark.parametrize(("lines", "reason"), BAD)
def test_a_bad_line_is_named_by_file_line_and_reason(lines, reason):
    body = ["#@\t3707596800", "3439756800\t34", "3550089600\t35", *lines]
    with pytest.raises(leap.LeapFileError, match=re.escape(reason)) as raised:
        leap.parse_leap_seconds("\n".join(body), "/etc/leap.list")
    assert raised.value.path == "/etc/leap.list" and raised.value.line == 4
    assert str(raised.value).startswith("/etc/leap.list:4: ")


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("#@\t3707596800\n#\n", 0, "no leap second lines"),
    ("2272060800\t10\n", 0, "no expiry line"),
    ("#@\t3707596800\n#@\t3707596800\n2272060800\t10\n", 2, "a second expiry (#@) line"),
    ("#$\tsoon\n#@\t3707596800\n2272060800\t10\n", 1, "last update (#$) is not a whole number"),
    ("#@\t3707596800\n2272060800\t10\n#h\tnot hex\n", 3, "not hex words"),
    ("#@\t3707596800\n2272060800\t10\n#h\t" + "0" * 8 + " 1 2 3 4\n", 3, "does not match"),
])
def test_a_bad_file_is_named(text, line, reason):
    with pytest.raises(leap.LeapFileError, match=re.escape(reason)) as raised:
        leap.parse_leap_seconds(text, "f")
    assert raised.value.line == line


def test_the_file_is_parsed_once_per_modification_and_its_problems_said_once(tmp_path, monkeypatch, caplog):
    path = tmp_path / "leap-seconds.list"
    path.write_text(_text())
    parsed = []
    real = leap.parse_leap_seconds
    monkeypatch.setattr(leap, "parse_leap_seconds", lambda text, p: parsed.append(p) or real(text, p))
    first = leap.load(str(path))
    assert leap.load(str(path)) is first and len(parsed) == 1
    path.write_text(_text(expires=EXPIRES_NTP + DAY))
    os.utime(path, ns=(1, 2))  # a new modification time: read again
    assert leap.load(str(path)).expires_at == EXPIRES_NTP + DAY - NTP_UNIX and len(parsed) == 2
    with caplog.at_level(logging.WARNING, logger="orchestrator.leap"):
        for _ in range(3):
            assert leap.window_at(EXPIRES_NTP + 2 * DAY - NTP_UNIX, str(path)) is None  # expired
            assert leap.load(str(tmp_path / "missing")) is None
        path.write_text("#@\t3707596800\n2272060800\tten\n")
        os.utime(path, ns=(3, 4))
        for _ in range(3):
            assert leap.load(str(path)) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert any("expired on 2017-06-29" in s for s in said) and any("cannot be read" in s for s in said)
    assert any(f"{path}:2: TAI-UTC is not a whole number" in s for s in said)


# -- the window ------------------------------------------------------------------------------------------

def test_the_window_runs_from_noon_to_noon_around_the_leap():
    table = leap.parse_leap_seconds(_text(), "t")
    window = (LEAP_2017 - HALF, LEAP_2017 + HALF)
    assert leap.leap_window(LEAP_2017 - HALF, table) == window  # noon before: in
    assert leap.leap_window(LEAP_2017 - HALF - 1e-6, table) is None
    assert leap.leap_window(LEAP_2017, table) == window
    assert leap.leap_window(LEAP_2017 + HALF - 1e-6, table) == window
    assert leap.leap_window(LEAP_2017 + HALF, table) is None  # noon after: out
    assert leap.leap_window(LEAP_2015 + 3600, table) == (LEAP_2015 - HALF, LEAP_2015 + HALF)
    assert leap.leap_window(3550089600 - NTP_UNIX, table) is None  # the first line sets the offset: no leap
    assert leap.leap_window((LEAP_2015 + LEAP_2017) / 2, table) is None


def test_a_negative_leap_second_has_its_window_too():
    lines = [*LINES, (3707856000, 36)]  # a second taken away on 1 Jul 2017 (never yet, but allowed)
    table = leap.parse_leap_seconds(_text(lines, expires=3723321600), "t")
    at = 3707856000 - NTP_UNIX
    assert table.leaps[-1] == at and leap.leap_window(at + 3600, table) == (at - HALF, at + HALF)


# -- the timescales --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("server", "smearing", "expected"), [
    ("time.google.com", (), "smear"), ("time1.google.com", (), "smear"), ("time4.google.com:123", (), "smear"),
    ("nts://time.google.com", (), "smear"), ("nts://time.google.com:4460", (), "smear"),
    ("TIME2.Google.COM", (), "smear"), ("ntp.corp.google.com", (), "smear"),
    ("time.cloudflare.com", (), "step"), ("time.nist.gov", (), "step"), ("0.pool.ntp.org", (), "step"),
    ("google.com.evil.example", (), "step"), ("notgoogle.com", (), "step"), ("time.google.co", (), "step"),
    ("216.239.35.0", (), "step"), ("[2001:4860:4806::]:123", (), "step"),  # Google's addresses: not guessed
    ("216.239.35.0", ("216.239.35.0",), "smear"), ("head:12301", ("head:12301",), "smear"),
    ("time.nist.gov", ("time.cloudflare.com",), "step"),
])
def test_timescale_of(server, smearing, expected):
    assert leap.timescale_of(server, smearing) == expected


# -- rounds: the oracle ----------------------------------------------------------------------------------

GOOGLE = ["time.google.com", "time1.google.com", "time2.google.com", "time3.google.com", "time4.google.com",
          "nts://time.google.com"]
STEPPING = ["time.cloudflare.com", "time.nist.gov", "0.pool.ntp.org", "1.pool.ntp.org", "2.pool.ntp.org",
            "time.apple.com", "ntp.example.net:1123", "192.0.2.10"]
LISTABLE = ["smear.example.org", "198.51.100.7", "head:12301"]
ROUNDS = int(os.environ.get("CHRONOTICK_LEAP_ROUNDS", "3000"))


def _obvious_timescale(name: str, listed: list[str]) -> str:
    """The rule, written out slowly: listed, or a Google name (never an address)."""
    if name in listed:
        return "smear"
    host = name[len("nts://"):] if name.startswith("nts://") else name
    if host.count(":") == 1:
        host = host.split(":")[0]
    host = host.lower().rstrip(".")
    if re.fullmatch(r"[0-9.]+", host) or ":" in host or host.startswith("["):
        return "step"
    return "smear" if host == "google.com" or host.endswith(".google.com") else "step"


def _obvious_inside(now: float, leaps: list[float], expires: float) -> bool:
    return now < expires and any(at - HALF <= now < at + HALF for at in leaps)


def _smeared_by(now: float) -> float:
    """What a smearing server reads minus a stepping one (s), at ``now``, near the 2017 leap."""
    start = LEAP_2017 - HALF
    if not start <= now < LEAP_2017 + HALF:
        return 0.0
    elapsed = (now - start) / DAY
    return -elapsed if now < LEAP_2017 else 1.0 - elapsed


def _now(rng: random.Random, variant: str) -> float:
    if variant == "expired":  # a list that expired in the middle of the window
        return LEAP_2017 + rng.uniform(-HALF, HALF)
    kind = rng.random()
    if kind < 0.5:
        return LEAP_2017 + rng.uniform(-HALF, HALF)
    if kind < 0.7:  # the edges
        return rng.choice([LEAP_2017 - HALF, LEAP_2017 + HALF, LEAP_2015 - HALF, LEAP_2015 + HALF]) \
            + rng.choice([-1e-3, 0.0, 1e-3])
    if kind < 0.8:
        return LEAP_2015 + rng.uniform(-HALF, HALF)
    return LEAP_2017 + rng.choice([-1, 1]) * rng.uniform(HALF, 60 * DAY)


def _sample(name: str, rng: random.Random, offset: float, unc: float, now: float) -> dict:
    delay = rng.uniform(max(0.002, unc), 2 * unc)
    return {"server": name, "address": "192.0.2.1", "port": 123, "offset_s": offset, "delay_s": delay,
            "uncertainty_s": unc, "stratum": rng.choice([1, 2, 3]), "leap": rng.choice([0, 0, 1]),
            "root_delay_s": 0.0, "root_dispersion_s": 0.0, "precision_s": 2 ** -20, "ref_id": "GPS",
            "t1_ns": 0, "t4_ns": 0, "kernel_rx_timestamp": True, "nts": name.startswith("nts://"),
            "measured_at": now}


def _round(rng: random.Random, paths: dict[str, tuple[str, float]]):
    """A random round near the 2017 leap: settings, ``now``, outcomes, and the oracle's facts."""
    names = rng.sample(GOOGLE + STEPPING + LISTABLE, rng.randint(1, 10))
    listed = [n for n in names if n in LISTABLE or rng.random() < 0.05]
    variant = rng.choice(["good"] * 5 + ["expired"])
    path, expires = paths[variant]
    kept = rng.choice(["step", "smear"])
    ntp = config_mod.ntp_from_mapping({
        "servers": names, "smearing_servers": listed, "leap_timescale": kept, "leap_seconds_file": path,
        "selection": rng.choice(["best", "combine"]), "enable_fallback": rng.random() < 0.5,
        "max_acceptable_uncertainty": 0.03, "max_delay": 0.08})
    now = _now(rng, variant)
    smear = _smeared_by(now)
    outcomes = []
    for name in names:
        if rng.random() < 0.12:
            outcomes.append({"status": "failed", "server": name, "reason": "timeout", "detail": "", "attempts": 1,
                             "history": [{"attempt": 1, "reason": "timeout"}], "worker": "w"})
            continue
        unc = rng.choice([rng.uniform(0.001, 0.01), rng.uniform(0.01, 0.05)])
        offset = rng.uniform(-0.8, 0.8) * unc  # honest, stepping
        if _obvious_timescale(name, listed) == "smear":
            # Adversarial: where the smear has it, half a second away, or right beside the stepping servers.
            offset = rng.choice([smear + offset, rng.choice([-0.5, 0.5]) + offset, offset, offset / 10])
        if rng.random() < 0.08:
            offset = rng.uniform(-0.6, 0.6)  # a liar
        outcomes.append({"status": "ok", "server": name, "sample": _sample(name, rng, offset, unc, now),
                         "attempts": 1, "history": [{"attempt": 1, "reason": None}], "worker": "w"})
    meta = RoundMeta(round_id=f"n1-{rng.getrandbits(32):08x}", node="n1", dispatched_at=now, deadline_at=now + 30,
                     key_prefix="chronotick", history_length=100, ntp=ntp)
    inside = _obvious_inside(now, [LEAP_2015, LEAP_2017], expires)
    timescale = {n: _obvious_timescale(n, listed) for n in names}
    return meta, outcomes, inside, timescale


def _plain(meta: RoundMeta, outcomes: list[dict]) -> dict:
    ntp = meta.ntp
    return selection.select(outcomes, meta.strict, enable_fallback=ntp.enable_fallback, method=ntp.selection,
                            groups=[list(g) for g in ntp.server_groups], auth_select=ntp.auth_select)


def _never_mixed(record: dict, meta: RoundMeta, timescale: dict[str, str], outcomes: list[dict]) -> None:
    """Inside a window: nothing of the other timescale votes, is chosen or combined; its replies are kept,
    ``rejected`` for ``other_timescale`` (their server answered: its reach bit and counters say so)."""
    kept = meta.ntp.leap_timescale
    used = {s["server"] for s in record["servers"] if s["status"] in ("chosen", "combined", "accepted")}
    assert all(timescale[n] == kept for n in used), (kept, used)
    agreement = record["agreement"] or {}
    voters = set(agreement.get("truechimers", [])) | set(agreement.get("falsetickers", []))
    assert all(timescale[n] == kept for n in voters), (kept, voters)
    latest = record["latest"]
    if latest is not None:
        members = latest.get("combined", [latest["server"]])
        assert all(timescale[n] == kept for n in [latest["server"], *members]), (kept, latest)
    entries = {s["server"]: s for s in record["servers"]}
    apart = 0
    for outcome in outcomes:
        if timescale[outcome["server"]] != kept and outcome["status"] == "ok":
            entry = entries[outcome["server"]]
            assert (entry["status"], entry["reason"]) == ("rejected", Reason.OTHER_TIMESCALE), entry
            assert entry["sample"] == outcome["sample"]
            apart += 1
        elif outcome["server"] in entries and entries[outcome["server"]]["status"] == "failed":  # its own reason
            assert entries[outcome["server"]]["reason"] == outcome["reason"]
    assert round_counters(record).get("rejected:other_timescale", 0) == apart


def _same_publication(record: dict, expected: dict) -> None:
    latest, chosen = record["latest"], expected["chosen"]
    if chosen is None:
        assert latest is None and record["quality"] in ("starvation", "outage"), record["quality"]
        return
    assert latest is not None and record["quality"] == expected["quality"]
    assert (latest["server"], latest["offset"], latest["uncertainty"]) == \
        (chosen["server"], chosen["offset_s"], chosen["uncertainty_s"])
    assert latest.get("combined", [chosen["server"]]) == chosen.get("combined", [chosen["server"]])


@pytest.fixture(scope="module")
def leap_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("leap")
    good, expired = folder / "good.list", folder / "expired.list"
    good.write_text(_text())
    expired_at = LEAP_2017 - HALF // 2  # expires 6 h into the 2017 window
    expired.write_text(_text(expires=expired_at + NTP_UNIX))
    return {"good": (str(good), EXPIRES_NTP - NTP_UNIX), "expired": (str(expired), expired_at)}


def test_no_published_round_ever_mixes_timescales_inside_a_window(leap_files):
    """The callback's path: inside, plain selection over the kept timescale alone; outside, plain selection."""
    rng = random.Random(20161231)
    seen = {"inside": 0, "outside": 0, "set_apart": 0, "published_inside": 0, "prevented": 0}
    kinds = set()
    for _ in range(ROUNDS):
        meta, outcomes, inside, timescale = _round(rng, leap_files)
        record = callback.build_record(meta, outcomes, finished_at=meta.dispatched_at + 0.5)
        if record["latest"] is not None:
            kinds.add((meta.ntp.leap_timescale, meta.ntp.selection, inside))
        if not inside:
            seen["outside"] += 1
            expected = _plain(meta, outcomes)
            _same_publication(record, expected)
            assert record["servers"] == expected["servers"]
            continue
        seen["inside"] += 1
        _never_mixed(record, meta, timescale, outcomes)
        kept = [o for o in outcomes if timescale[o["server"]] == meta.ntp.leap_timescale]
        _same_publication(record, _plain(meta, kept))  # the others, as if never asked
        seen["set_apart"] += any(s.get("reason") == Reason.OTHER_TIMESCALE for s in record["servers"])
        seen["published_inside"] += record["latest"] is not None
        plain = _plain(meta, outcomes)["chosen"]  # without the rule: another timescale's server, or a mix
        seen["prevented"] += plain is not None and any(
            timescale[n] != meta.ntp.leap_timescale for n in [plain["server"], *plain.get("combined", [])])
    # The rounds test something: both sides, replies set apart, published results, and mixes prevented.
    assert min(seen.values()) >= ROUNDS // 100, seen
    assert len(kinds) == 8, kinds  # each leap_timescale, each selection, inside and outside a window


def test_the_early_decider_never_mixes_timescales_either(leap_files, monkeypatch):
    """The worker's path (decide_early, early.decide): the same rule on rounds decided with servers still out."""
    rng = random.Random(1483228800)
    published = {"inside": 0, "outside": 0}
    for _ in range(ROUNDS):
        meta, outcomes, inside, timescale = _round(rng, leap_files)
        store = _FakeStore(meta)
        monkeypatch.setattr(callback, "_store", lambda prefix, store=store: store)
        hand = [o for o in outcomes if rng.random() < 0.7]
        out = [n for n in meta.servers if n not in {o["server"] for o in hand}]
        bounds = {n: rng.choice([0.0, rng.uniform(0.0, 0.06)]) for n in out}
        view = inflight.RoundView("chronotick", meta.node, meta.round_id, hand, bounds, {},
                                  retrying=frozenset(n for n in out if rng.random() < 0.2))
        verdict = callback.decide_early(view)
        if not verdict.published:
            assert not store.records
            continue
        (record,) = store.records
        assert {s["server"] for s in record["servers"]} == set(meta.servers)
        assert {s["server"] for s in record["servers"] if s["status"] == "late"} == set(out)
        if inside:
            published["inside"] += 1
            _never_mixed(record, meta, timescale, hand)
        else:  # outside: what the decider decides without any of this
            published["outside"] += 1
            ntp = meta.ntp
            outstanding = [early.Outstanding(n, bounds[n], n.startswith("nts://"), retrying=n in view.retrying)
                           for n in out]
            plain = early.decide(hand, outstanding, strict=meta.strict, enable_fallback=ntp.enable_fallback,
                                 method=ntp.selection, groups=[], auth_select=ntp.auth_select)
            assert plain.publish
            _same_publication(record, plain.picked)
    assert min(published.values()) >= ROUNDS // 100, published


class _FakeStore:
    """What decide_early and finish ask of the store, for one open round."""

    def __init__(self, meta: RoundMeta):
        self.entry = {"meta": meta.as_dict()}
        self.records: list[dict] = []

    def open_round_entry(self, node, round_id):
        return self.entry

    def record_round(self, node, round_id, build, **kw):
        record = build([], 0, self.entry["meta"]["dispatched_at"] + 0.5)
        self.records.append(record)
        return record

    def latest(self, node):
        return None


def test_a_server_still_out_of_the_other_timescale_does_not_vote_and_is_recorded_late(leap_files):
    path, _ = leap_files["good"]
    ntp = config_mod.ntp_from_mapping({"servers": ["a.example", "b.example", "c.example", "time.google.com",
                                                   "time1.google.com"], "leap_seconds_file": path})
    answered = [{"status": "ok", "server": n, "attempts": 1, "history": [{"attempt": 1, "reason": None}],
                 "sample": _sample(n, random.Random(1), 0.001 * i, 0.004, LEAP_2017)}
                for i, n in enumerate(["a.example", "b.example", "c.example", "time.google.com"])]
    split = leap.one_timescale(answered, [s.name for s in ntp.servers], ntp, LEAP_2017)
    assert split.apart == {"time.google.com", "time1.google.com"}
    assert [o["status"] for o in split.outcomes] == ["ok", "ok", "ok", "failed"]
    assert split.outcomes[3]["sample"] == answered[3]["sample"] and "stepping servers vote" in \
        split.outcomes[3]["detail"]
    gate = Thresholds(max_delay_s=0.1, max_uncertainty_s=0.03, min_stratum=1, max_stratum=15)
    still_out = [early.Outstanding("time1.google.com", 0.0, retrying=True), early.Outstanding("d.example", 0.02)]
    decided = early.decide(split.outcomes, still_out, strict=gate, enable_fallback=False, apart=split.apart,
                           method=Selection.BEST)
    assert decided.publish and decided.late == ("d.example", "time1.google.com")  # both recorded late
    agreement = decided.picked["agreement"]
    assert (agreement["votes"], agreement["outstanding_votes"]) == (4, 1)  # a, b, c and d: never Google's
    only_google = early.decide(split.outcomes, still_out[:1], strict=gate, enable_fallback=False,
                               apart=split.apart, method=Selection.BEST)
    assert not only_google.publish and "no outstanding server can vote" in only_google.why  # the callback's


def test_outside_a_window_or_with_one_timescale_the_outcomes_are_left_alone(tmp_path):
    names = ["time.google.com", "a.example"]
    ntp = config_mod.ntp_from_mapping({"servers": names, "leap_seconds_file": str(tmp_path / "none")})
    outcomes = [{"status": "ok", "server": n, "attempts": 1, "history": [],
                 "sample": _sample(n, random.Random(2), 0.0, 0.004, LEAP_2017)} for n in names]
    table = leap.parse_leap_seconds(_text(), "t")
    inside = leap.one_timescale(outcomes, names, ntp, LEAP_2017, table=table)
    assert inside.apart == {"time.google.com"} and inside.window == (LEAP_2017 - HALF, LEAP_2017 + HALF)
    assert [o["status"] for o in inside.outcomes] == ["failed", "ok"] and inside.outcomes[1] is outcomes[1]
    assert outcomes[0]["status"] == "ok"  # the caller's outcomes are not changed
    for now in (LEAP_2017 + HALF, LEAP_2017 - 2 * DAY):
        outside = leap.one_timescale(outcomes, names, ntp, now, table=table)
        assert outside.outcomes == outcomes and outside.apart == frozenset() and outside.window is None
    no_file = leap.one_timescale(outcomes, names, ntp, LEAP_2017)  # the configured file is missing
    assert no_file.outcomes == outcomes and no_file.apart == frozenset()
    smear = config_mod.ntp_from_mapping({"servers": names[:1], "leap_timescale": "smear"})
    alone = leap.one_timescale(outcomes[:1], names[:1], smear, LEAP_2017, table=table)
    assert alone.outcomes == outcomes[:1] and alone.apart == frozenset() and alone.window is None


# -- the leap indicator, end to end --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["best", "combine"])
@pytest.mark.parametrize("indicator", [0, 1, 2])
def test_the_leap_indicator_survives_compact_history_and_every_reader(method, indicator):
    names = ["a.example", "b.example", "c.example", "d.example"]
    ntp = config_mod.ntp_from_mapping({"servers": names, "selection": method})
    rng = random.Random(indicator)
    outcomes = [{"status": "ok", "server": n, "attempts": 1, "history": [{"attempt": 1, "reason": None}],
                 "worker": "w", "sample": dict(_sample(n, rng, rng.uniform(-1e-4, 1e-4), 0.006, 1795998582.0),
                                               leap=indicator)}
                for n in names]
    meta = RoundMeta(round_id="n1-1", node="n1", dispatched_at=1795998582.0, deadline_at=1795998612.0,
                     key_prefix="chronotick", history_length=100, ntp=ntp)
    record = callback.build_record(meta, outcomes, finished_at=1795998582.5)
    assert record["latest"]["leap"] == indicator
    stored = compact(record)
    if not indicator:
        assert "leap" not in stored["latest"] and all("l" not in s for s in stored["servers"])  # costs nothing
    entry = ("1795998582500-0", {"record": json.dumps(stored)})
    read = record_of(entry)  # what Store.history, NtpReader.history and the follower read
    assert read["latest"]["leap"] == indicator == Measurement.from_latest(read["latest"]).leap
    assert read["latest"] == record["latest"]
    assert [s["sample"]["leap"] for s in read["servers"]] == [indicator] * len(names)
    assert expand(json.loads(json.dumps(compact(record)))) == read
    # A late server's reply keeps its indicator too (the ``late`` stream).
    late = late_entry(outcomes[0], "a.example")
    fields = {"round": "n1-1", "servers": json.dumps([compact_server(late, None)])}
    assert late_of(fields)[1]["a.example"]["sample"]["leap"] == indicator
