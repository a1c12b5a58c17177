"""Pictures of a node's rounds (matplotlib, Agg: no display needed).

:func:`plot_node`: three panels from the round records of a window:

1. the published offset with its ±uncertainty band, each round coloured by
   quality (strict, relaxed), rounds that published nothing (starvation,
   outlier) marked on the axis;
2. every server's offset in every round (falsetickers and refusals included,
   so a liar shows as a line apart);
3. the distribution of round times, with ChronoTick's 500 ms mean and 2 s p99
   targets drawn in.

:func:`plot_cluster`: every node's clock against a reference node over time
(``chronotick-ntp cluster --plot``), each point with its bound
(:func:`orchestrator.hub.relative_series`).
"""

from __future__ import annotations

from datetime import UTC, datetime

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402

from .outcomes import Quality  # noqa: E402
from .targets import ROUND_TIME_AVG, ROUND_TIME_P99, TARGETS  # noqa: E402

#: Colours by round quality.
QUALITY_COLOURS = {"strict": "#1b7837", "relaxed": "#e08214", "starvation": "#b2182b", "outlier": "#762a83"}


#: The servers' panel is linear within this many ms of zero, logarithmic beyond.
SERVER_LINEAR_RANGE_MS = 50.0


def _time(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, tz=UTC)


def plot_node(records: list[dict], *, node: str, output: str, hours: float | None = None) -> None:
    """Draw ``records`` (oldest first) of ``node`` to the PNG ``output``."""
    limits = {t.name: t.limit for t in TARGETS}
    fig, (ax_offset, ax_servers, ax_time) = plt.subplots(
        3, 1, figsize=(11, 11), gridspec_kw={"height_ratios": [3, 3, 2]}, constrained_layout=True)
    window = f"last {hours:g} h" if hours else "history"
    fig.suptitle(f"chronotick-ntp: node {node}, {len(records)} rounds ({window})")

    # 1. Published offsets by quality, with the uncertainty band.
    for quality in (Quality.STRICT, Quality.RELAXED):
        points = [r["latest"] for r in records if r.get("latest") and r["latest"]["quality"] == quality]
        if not points:
            continue
        xs = [_time(p["measured_at"]) for p in points]
        ys = [p["offset"] * 1e3 for p in points]
        err = [p["uncertainty"] * 1e3 for p in points]
        ax_offset.errorbar(xs, ys, yerr=err, fmt="o", ms=3, capsize=2, lw=0.8, color=QUALITY_COLOURS[quality],
                           label=f"{quality} ({len(points)})")
    for quality in (Quality.STARVATION, Quality.OUTLIER):
        times = [_time(r["finished_at"]) for r in records if r["quality"] == quality]
        for i, t in enumerate(times):
            ax_offset.axvline(t, color=QUALITY_COLOURS[quality], lw=1, ls="--", alpha=0.7,
                              label=f"{quality} ({len(times)})" if i == 0 else None)
    ax_offset.set_ylabel("offset (ms), ± uncertainty")
    ax_offset.set_title("published offset (true time = local + offset)")
    ax_offset.legend(loc="best", fontsize=8)
    ax_offset.grid(alpha=0.3)

    # 2. Every server's offset, per round.
    per_server: dict[str, tuple[list, list]] = {}
    for r in records:
        for s in r["servers"]:
            sample = s.get("sample")
            if sample:
                xs, ys = per_server.setdefault(s["server"], ([], []))
                xs.append(_time(sample.get("measured_at", r["dispatched_at"])))  # compact: the round's time
                ys.append(sample["offset_s"] * 1e3)
    for server, (xs, ys) in sorted(per_server.items()):
        ax_servers.plot(xs, ys, ".-", ms=3, lw=0.6, label=server)
    # Linear near zero, logarithmic beyond: a liar half a second off does not flatten the honest servers.
    ax_servers.set_yscale("symlog", linthresh=SERVER_LINEAR_RANGE_MS)
    ax_servers.yaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax_servers.axhspan(-SERVER_LINEAR_RANGE_MS, SERVER_LINEAR_RANGE_MS, color="0.95", zorder=0)
    ax_servers.set_ylabel(f"offset (ms; linear within ±{SERVER_LINEAR_RANGE_MS:g})")
    ax_servers.set_title("each server's offset (falsetickers and refused samples included)")
    if per_server:
        ax_servers.legend(loc="best", fontsize=7, ncol=2)
    ax_servers.grid(alpha=0.3)
    for ax in (ax_offset, ax_servers):
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
        ax.set_xlabel("UTC")

    # 3. Round times against the targets.
    durations = [r["duration_s"] * 1e3 for r in records]
    # Bins over a range that shows both targets, whatever the rounds took.
    top = max(limits[ROUND_TIME_P99] * 1e3 * 1.1, max(durations) * 1.05)
    ax_time.hist(durations, bins=[top * i / 60 for i in range(61)], color="#4393c3", edgecolor="white")
    for name, style in ((ROUND_TIME_AVG, "--"), (ROUND_TIME_P99, ":")):
        ax_time.axvline(limits[name] * 1e3, color="#b2182b", ls=style,
                        label=f"target {'mean' if name == ROUND_TIME_AVG else 'p99'} {limits[name] * 1e3:.0f} ms")
    ax_time.set_xlabel("round time, dispatch to finish (ms)")
    ax_time.set_ylabel("rounds")
    ax_time.set_title("round times")
    ax_time.legend(loc="best", fontsize=8)
    ax_time.grid(alpha=0.3)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def plot_cluster(series: dict[str, list], *, reference: str, output: str, hours: float | None = None) -> None:
    """Draw each node's ``offset_to_reference`` (ms) with its bound over time to the PNG ``output``.

    ``series``: node -> :class:`orchestrator.hub.Relative` points, oldest first.
    """
    fig, ax = plt.subplots(1, 1, figsize=(11, 6), constrained_layout=True)
    window = f"last {hours:g} h" if hours else "history"
    fig.suptitle(f"chronotick-ntp: each node's clock against {reference}'s ({window})")
    for node, points in sorted(series.items()):
        if not points:
            continue
        xs: list = [_time(p.measured_at) for p in points]  # datetimes: matplotlib's dates
        ys = [p.offset_to_reference * 1e3 for p in points]
        err = [p.uncertainty * 1e3 for p in points]
        line = ax.plot(xs, ys, ".-", ms=3, lw=0.7, label=f"{node} ({len(points)})")[0]
        low, high = [y - e for y, e in zip(ys, err, strict=True)], [y + e for y, e in zip(ys, err, strict=True)]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_ylabel(f"{reference}'s clock - node's clock (ms), ± bound")
    ax.set_title("node-to-node offsets, bounded by the LAN legs (the hub's leg cancels)")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(output, dpi=110)
    plt.close(fig)
