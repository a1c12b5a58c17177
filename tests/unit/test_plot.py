"""orchestrator.plot: a node's rounds and the cluster's node-to-node offsets drawn to PNG files with
matplotlib's Agg backend (no display) into a temporary directory, and read back: the size the figure
promises, and each quality's colour where -- and only where -- rounds of that quality were drawn.

The ``plot`` command against a real history: tests/integration/test_status.py and test_demo.py.
"""

from __future__ import annotations

import random

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from orchestrator import plot, records
from orchestrator.callback import build_record
from orchestrator.hub import Relative
from orchestrator.outcomes import Quality, RoundMeta
from workers import config as config_mod

from .samples import failed, ok

SEED = 20270312
SERVERS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def _rounds(rng: random.Random, n: int, *, outliers: bool) -> list[dict]:
    """Rounds a node published (strict and relaxed), starved, or held back as outliers, as history gives them back."""
    meta = RoundMeta(round_id="r", node="n1", dispatched_at=0.0, deadline_at=30.0, key_prefix="t",
                     history_length=100, ntp=config_mod.ntp_from_mapping({"servers": SERVERS}))
    out = []
    for i in range(n):
        start = 1.7e9 + 120.0 * i
        kind = rng.choice(["strict", "relaxed", "starvation"] + (["outlier"] if outliers else []))
        unc = {"strict": 0.002, "relaxed": 0.015}.get(kind, 0.002)  # the relaxed gate: 2x the strict 10 ms
        outcomes = ([failed(s) for s in SERVERS] if kind == "starvation" else
                    [ok(s, delay=2 * unc, unc=unc, offset=rng.uniform(-1e-3, 1e-3)) for s in SERVERS])
        for o in outcomes:
            if o.get("sample"):
                o["sample"]["measured_at"] = start
        record = build_record(RoundMeta(**{**meta.__dict__, "round_id": f"r{i}", "dispatched_at": start}),
                              outcomes, finished_at=start + rng.uniform(0.05, 3.0))
        record["closed_by"] = "callback"
        if kind == "outlier":  # what the temporal filter makes of one: nothing published
            record["quality"], record["latest"] = Quality.OUTLIER, None
        out.append(records.expand(records.compact(record)))
    return out


def _pixels_near(image: np.ndarray, colour: str, *, alpha: float = 1.0, tolerance: float = 0.02) -> int:
    """How many pixels are ``colour``, drawn with ``alpha`` on white."""
    rgb = alpha * np.array(to_rgb(colour)) + (1 - alpha)
    return int((np.abs(image[:, :, :3] - rgb).max(axis=2) < tolerance).sum())


def _offset_panel(image: np.ndarray) -> np.ndarray:
    """The top panel's rows (3 of the figure's 3 + 3 + 2 parts): where the rounds' qualities are drawn."""
    return image[: image.shape[0] * 3 // 8]


def test_a_nodes_rounds_are_drawn_each_quality_in_its_colour(tmp_path):
    rng = random.Random(SEED)
    drawn = _rounds(rng, 16, outliers=True)
    qualities = {r["quality"] for r in drawn}
    assert {Quality.STRICT, Quality.RELAXED, Quality.STARVATION, Quality.OUTLIER} <= qualities
    output = tmp_path / "n1.png"
    plot.plot_node(drawn, node="n1", output=str(output), hours=2)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(output)
    assert image.shape[:2] == (1100, 1100), "11 x 11 inches at 100 dpi"
    image = _offset_panel(image)
    for quality in (Quality.STRICT, Quality.RELAXED):  # published: points
        assert _pixels_near(image, plot.QUALITY_COLOURS[quality]) > 20, quality
    for quality in (Quality.STARVATION, Quality.OUTLIER):  # nothing published: a line where the round was
        assert _pixels_near(image, plot.QUALITY_COLOURS[quality], alpha=0.7) > 20, quality

    calm = [r for r in drawn if r["quality"] == Quality.STRICT]
    calm_output = tmp_path / "calm.png"
    plot.plot_node(calm, node="n1", output=str(calm_output))
    calm_image = _offset_panel(matplotlib.image.imread(calm_output))
    assert _pixels_near(calm_image, plot.QUALITY_COLOURS[Quality.STRICT]) > 20
    assert _pixels_near(calm_image, plot.QUALITY_COLOURS[Quality.RELAXED]) == 0, "no relaxed round, no relaxed colour"
    assert _pixels_near(calm_image, plot.QUALITY_COLOURS[Quality.OUTLIER], alpha=0.7) == 0, "no outlier round"


def test_the_cluster_is_drawn_node_by_node_against_the_reference(tmp_path):
    rng = random.Random(SEED + 1)
    series = {node: [Relative(node, "head", rng.uniform(-2e-4, 2e-4), rng.uniform(1e-5, 5e-5), 1.7e9 + 60.0 * i)
                     for i in range(30)] for node in ("n1", "n2")}
    series["n3"] = []  # a node with no measurement yet: left out, not an error
    output = tmp_path / "cluster.png"
    plot.plot_cluster(series, reference="head", output=str(output), hours=1)
    image = matplotlib.image.imread(output)
    assert image.shape[:2] == (660, 1210), "11 x 6 inches at 110 dpi"
    assert _pixels_near(image, "C0") > 20 and _pixels_near(image, "C1") > 20, "one colour per node drawn"
    assert _pixels_near(image, "C2") == 0, "the node with no points drew nothing"


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_a_window_with_no_rounds_cannot_be_drawn_and_the_cli_says_so_first(tmp_path):
    """(``chronotick-ntp plot`` refuses an empty window before it draws: orchestrator/cli.py's ``cmd_plot``.)"""
    with pytest.raises(ValueError):
        plot.plot_node([], node="n1", output=str(tmp_path / "empty.png"))
