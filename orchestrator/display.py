"""What a person reads: a round, a ``latest``, a ``status`` report, as text.

Shared by the command line and the demo, so both print the same tables.
"""

from __future__ import annotations

from workers.redisclock import latest_age_s

from .outcomes import Quality, ServerStatus
from .targets import TARGETS


def _ms(sample: dict, key: str, fmt: str = "{:.3f}") -> str:
    """A sample's value in milliseconds, or ``-`` when the server gave none."""
    return fmt.format(sample[key] * 1e3) if key in sample else "-"


def format_round(record: dict) -> str:
    """A readable table of every server's outcome and the chosen measurement."""
    lines = [f"round {record['round_id']}  quality {record['quality']}  "
             f"{record['servers_used']}/{record['servers_total']} servers passed  "
             f"{record['duration_s'] * 1e3:.0f} ms",
             f"  {'server':<28} {'status':<11} {'tries':>5} {'offset ms':>11} {'delay ms':>9} "
             f"{'uncert ms':>9} {'str':>3} {'auth':<4}  reason"]
    for s in record["servers"]:
        sample = s.get("sample") or {}
        reason = s.get("reason") or ""
        if s.get("detail") and reason:
            reason = f"{reason} ({s['detail']})"
        offset = _ms(sample, "offset_s", "{:+.3f}")
        lines.append(f"  {s['server']:<28} {s['status']:<11} {s['attempts']:>5} {offset:>11} "
                     f"{_ms(sample, 'delay_s'):>9} {_ms(sample, 'uncertainty_s'):>9} "
                     f"{sample.get('stratum', '-'):>3} {_auth(sample):<4}  {reason}")
    agreement = record.get("agreement")
    falsetickers = [s["server"] for s in record["servers"] if s["status"] == ServerStatus.FALSETICKER]
    if agreement and agreement["majority"]:
        low, high = agreement["interval"]
        lines.append(f"agreement: {agreement['depth']} of {agreement['votes']} votes on "
                     f"{low * 1e3:+.3f}..{high * 1e3:+.3f} ms"
                     + (f"; falsetickers: {', '.join(falsetickers)}" if falsetickers else ""))
    elif agreement:
        lines.append(f"agreement: none -- no majority of {agreement['votes']} votes agrees; nothing published")
    latest = record.get("latest")
    if latest:
        combined = f", combining {len(latest['combined'])} servers" if latest.get("combined") else ""
        auth = ", NTS-authenticated" if latest.get("nts") else ""
        lines.append(f"chosen: {latest['server']}  offset {latest['offset'] * 1e3:+.3f} ms "
                     f"± {latest['uncertainty'] * 1e3:.3f} ms  ({latest['quality']}{combined}{auth})")
    elif record["quality"] == Quality.OUTLIER:
        filt = record["filter"]
        lines.append(f"chosen: nothing -- {record['candidate']['server']} was {filt['z']:.1f} sigma from the "
                     f"recent results (temporal filter); the previous latest stays")
    elif record["quality"] == Quality.OUTAGE:
        lines.append("chosen: nothing -- outage: no server could be asked or reached (the node's worker or "
                     "path, not NTP); the previous latest (if any) stays, with its age")
    else:
        lines.append("chosen: nothing -- starvation; the previous latest (if any) stays, with its age")
    return "\n".join(lines)


def format_servers(report: dict) -> str:
    """``chronotick-ntp servers``: one line per server, as ``chronyc sources`` (reach in octal)."""
    lines = [f"node {report['node']}: {report['reachable']} of {len(report['servers'])} servers reachable "
             f"(a majority is {report['majority']}); failures over the last {report['rounds']} rounds",
             f"  {'server':<28} {'state':<11} {'reach':>5} {'offset ms':>11} {'delay ms':>9} {'uncert ms':>9} "
             f"{'last good':>9}  failures"]
    for s in report["servers"]:
        sample = {k: s[k] for k in ("offset_s", "delay_s", "uncertainty_s") if s[k] is not None}
        age = "never" if s["last_good_age_s"] is None else _age(s["last_good_age_s"])
        failures = ", ".join(f"{reason} x{n}" for reason, n in s["failures"].items()) or "-"
        lines.append(f"  {s['server']:<28} {s['state']:<11} {s['reach']:>5o} {_ms(sample, 'offset_s', '{:+.3f}'):>11} "
                     f"{_ms(sample, 'delay_s'):>9} {_ms(sample, 'uncertainty_s'):>9} {age:>9}  {failures}")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    """An age as chronyc shows one: seconds, minutes, hours or days."""
    for unit, size, from_s in (("d", 86400, 86400), ("h", 3600, 36000), ("m", 60, 600)):
        if seconds >= from_s:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _auth(sample: dict) -> str:
    """The authentication column: ``NTS`` for an authenticated reply, ``-`` for a plain one or none."""
    return "NTS" if sample.get("nts") else "-"


def format_latest(latest: dict, *, now: float) -> str:
    """One line for a ``latest`` value: offset, bound, source, age.

    ``now`` is Redis' clock: the age is the time since the value was published, on it
    (:func:`workers.redisclock.latest_age_s`), whatever the measuring node's clock says.
    """
    age = latest_age_s(latest, now)
    return (f"node {latest['node']}: offset {latest['offset'] * 1e3:+.3f} ms "
            f"± {latest['uncertainty'] * 1e3:.3f} ms ({latest['quality']}), from {latest['server']} "
            f"(stratum {latest['stratum']}, delay {latest['delay'] * 1e3:.3f} ms), "
            f"{latest['servers_used']}/{latest['servers_total']} servers, "
            + ("published at an unknown time" if age is None else f"published {age:.1f} s ago"))


def format_status(nodes: dict[str, dict], *, hours: float, color: bool = False) -> str:
    """The ``status`` table: every target of every node, a miss marked so the eye finds it."""
    def mark(ok: bool) -> str:
        text = "ok" if ok else "MISS"
        return text if not color else (f"\033[32m{text}\033[0m" if ok else f"\033[1;31m{text}\033[0m")

    def show(value, unit: str) -> str:
        if value is None:
            return "-"
        if unit == "s":
            return f"{value * 1e3:.0f} ms"
        if unit == "rate":
            return f"{value * 100:.1f} %"
        return f"{value:g}"

    lines = []
    for node, n in nodes.items():
        age = "never published" if n["latest_age_s"] is None else f"latest {n['latest_age_s']:.0f} s old"
        lines.append(f"{node}: {mark(n['ok'])}  {n['rounds']} rounds in {hours:g} h; {age} "
                     f"(stale after {n['stale_after_s']:g} s){'  STALE' if n['stale'] else ''}")
        lines.append(f"  {'target':<28} {'value':>10} {'limit':>10}")
        for target in TARGETS:
            t = n["targets"][target.name]
            lines.append(f"  {target.doc:<28} {show(t['value'], target.unit):>10} "
                         f"{'<= ' + show(t['limit'], target.unit):>10}  {mark(t['ok'])}")
        outages = n.get("outages") or []
        if outages:  # no server asked or reached: the node's worker or path, not NTP (no target counts them)
            lines.append(f"  outages: {len(outages)} round(s) in which no server could be asked or reached "
                         f"(not starvation); newest: {outages[-1]['why'] or outages[-1]['round_id']}")
    held = sum(n["ok"] for n in nodes.values())
    lines.append(f"{held} of {len(nodes)} node(s) meet every target")
    return "\n".join(lines)


def summarise_result(result: dict) -> str:
    """A round's result in one line: quality, server, offset ± uncertainty, servers used.

    ``result`` as :func:`orchestrator.store.brief_result` keeps it (``server``
    ``None``: nothing published).  The same line the callback of a round shows in
    Flower (``orchestrator.callback.summarise_round``).
    """
    used = f"{result['servers_used']}/{result['servers_total']} servers"
    if result.get("server") is None:
        return f"{result['quality']}: nothing published, {used}"
    return (f"{result['quality']}: {result['server']} {result['offset'] * 1e3:+.3f} ms "
            f"±{result['uncertainty'] * 1e3:.3f} ms, {used}")


def summarise_late_server(entry: dict) -> str:
    """A late server's outcome: ``<server> ok +1.234 ms`` or ``<server> failed: <reason>``."""
    sample = entry.get("sample")
    return f"{entry['server']} " + (f"ok {sample['offset_s'] * 1e3:+.3f} ms" if sample
                                    else f"failed: {entry['reason']}")


def summarise_early_round(result: dict | None, late: list[dict]) -> str:
    """The callback of a round published early, as Flower shows it: the round's result, then its late servers.

    ``result``: what the round published (``None`` if it is no longer at hand);
    ``late``: the late servers' entries, as :meth:`orchestrator.store.Store.complete_round`
    returns them.
    """
    head = summarise_result(result) if result is not None else "published before these servers answered"
    return f"{head}; late: {'; '.join(summarise_late_server(e) for e in late)}"
