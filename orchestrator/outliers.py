"""The temporal filter: refuse a result that is far from the node's recent accepted ones.

ChronoTick's keys keep their meaning: ``outlier_window_size`` accepted results
are remembered per node (in Redis), and a new one is an outlier when it sits
more than ``outlier_sigma_threshold`` robust standard deviations from what the
window predicts.  Three things make it sturdier than the old EMA z-score:

* the prediction is a least-squares line through the window, so a clock that
  drifts steadily (a few ppm is 1 ms per 2-minute round) is not mistaken for
  one that jumps;
* the scale is 1.4826 x the median absolute residual -- a standard deviation
  that one earlier outlier cannot inflate -- floored at 1 us;
* a result is only an outlier if its *whole* uncertainty interval stays that
  far from the prediction: a wide result that could be right is not refused.

A real step of the local clock would otherwise be refused forever (the old
filter's "death spiral"): after :data:`ACCEPT_AFTER_OUTLIERS` outliers in a
row the next result is accepted and the window starts again from it.
"""

from __future__ import annotations

import statistics
from typing import Any

#: Below this many remembered results the filter accepts everything (as ChronoTick did).
MIN_SAMPLES = 5

#: MAD to standard deviation for normally distributed residuals.
MAD_TO_SIGMA = 1.4826

#: The smallest scale the filter assumes (s): ChronoTick's 0.001 ms floor.
SCALE_FLOOR_S = 1e-6

#: Consecutive outliers after which a new level is believed.
ACCEPT_AFTER_OUTLIERS = 3


def judge(offset_s: float, uncertainty_s: float, measured_at: float, window: list[list[float]], *,
          sigma_threshold: float, consecutive_outliers: int = 0, max_gap_s: float | None = None) -> dict:
    """Decide whether a result is an outlier against ``window``.

    Parameters
    ----------
    offset_s, uncertainty_s, measured_at:
        The candidate for publication.
    window:
        Recent accepted results as ``[measured_at, offset_s]``, oldest first.
    sigma_threshold:
        ``outlier_sigma_threshold``.
    consecutive_outliers:
        How many rounds in a row were refused just before this one.
    max_gap_s:
        A window whose newest result is older than this before the candidate
        (the node's staleness limit) predicts nothing: it restarts from the
        candidate (``reset``).  Extrapolated over a minute's outage, a line
        fitted to a few seconds of results refused the first good rounds back.

    Returns
    -------
    ``{"outlier": bool, "reset": bool, "predicted_s", "scale_s", "z"}`` --
    ``reset`` means the window should restart from this result.
    """
    verdict: dict[str, Any] = {"outlier": False, "reset": False, "predicted_s": None, "scale_s": None, "z": None}
    if window and max_gap_s is not None and measured_at - max(t for t, _ in window) > max_gap_s:
        verdict["reset"] = True
        return verdict
    if len(window) < MIN_SAMPLES:
        return verdict
    times = [t for t, _ in window]
    offsets = [o for _, o in window]
    slope, intercept = _line(times, offsets)
    residuals = [o - (slope * t + intercept) for t, o in zip(times, offsets, strict=True)]
    centre = statistics.median(residuals)
    scale = max(MAD_TO_SIGMA * statistics.median(abs(r - centre) for r in residuals), SCALE_FLOOR_S)
    predicted = slope * measured_at + intercept + centre
    distance = max(0.0, abs(offset_s - predicted) - uncertainty_s)
    z = distance / scale
    verdict.update(predicted_s=predicted, scale_s=scale, z=z)
    if z > sigma_threshold:
        if consecutive_outliers >= ACCEPT_AFTER_OUTLIERS:
            verdict["reset"] = True
        else:
            verdict["outlier"] = True
    return verdict


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept (flat when every x is the same)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, mean_y
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, mean_y - slope * mean_x
