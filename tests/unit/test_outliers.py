"""The temporal filter (orchestrator/outliers.py): pure logic."""


from orchestrator import outliers


def _window(n=10, *, drift=0.0, start=0.001, spacing=120.0, noise=(0.0,)):
    return [[i * spacing, start + drift * i * spacing + noise[i % len(noise)]] for i in range(n)]


def test_filter_waits_for_five_results():
    assert not outliers.judge(1.0, 1e-4, 0.0, _window(4), sigma_threshold=5)["outlier"]


def test_filter_follows_a_steady_drift():
    window = _window(10, drift=10e-6, noise=(2e-5, -2e-5, 1e-5))  # 10 ppm: 1.2 ms a round
    next_t = 10 * 120.0
    on_trend = 0.001 + 10e-6 * next_t
    assert not outliers.judge(on_trend, 1e-4, next_t, window, sigma_threshold=5)["outlier"]
    assert outliers.judge(on_trend + 0.005, 1e-4, next_t, window, sigma_threshold=5)["outlier"]


def test_filter_does_not_refuse_a_result_whose_interval_reaches_the_prediction():
    window = _window(10, noise=(1e-5, -1e-5))
    assert not outliers.judge(0.006, 0.0049999, 1200.0, window, sigma_threshold=5)["outlier"]


def test_filter_believes_a_new_level_after_three_outliers():
    window = _window(10, noise=(1e-5, -1e-5))
    first = outliers.judge(0.05, 1e-4, 1200.0, window, sigma_threshold=5, consecutive_outliers=0)
    assert first["outlier"] and not first["reset"]
    fourth = outliers.judge(0.05, 1e-4, 1200.0, window, sigma_threshold=5, consecutive_outliers=3)
    assert not fourth["outlier"] and fourth["reset"]


def test_the_homelab_sigma_lets_what_the_default_refuses_through():
    window = _window(10, noise=(1e-5, -1e-5))  # residual scale ~15 us
    assert outliers.judge(0.1, 1e-4, 1200.0, window, sigma_threshold=5.0)["outlier"]
    assert not outliers.judge(0.1, 1e-4, 1200.0, window, sigma_threshold=10000.0)["outlier"]




def test_a_window_older_than_the_staleness_limit_predicts_nothing():
    """After an outage longer than the node's staleness limit the window restarts from the first round back: a
    line fitted before the gap, extrapolated over it, refused the first good rounds (#26's hub bed)."""
    window = _window(10, spacing=2.0, noise=(1e-5, -1e-5))  # the last at 18 s
    after_gap = outliers.judge(0.05, 1e-4, 18.0 + 61.0, window, sigma_threshold=5, max_gap_s=60.0)
    assert not after_gap["outlier"] and after_gap["reset"]
    # Within the limit the same jump is an outlier, as before; without a limit, too.
    assert outliers.judge(0.05, 1e-4, 18.0 + 59.0, window, sigma_threshold=5, max_gap_s=60.0)["outlier"]
    assert outliers.judge(0.05, 1e-4, 18.0 + 61.0, window, sigma_threshold=5)["outlier"]
