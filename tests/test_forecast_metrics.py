"""forecast/metrics.py: MASE, bootstrap intervals, paired differences, CRPS and coverage on hand-made cases."""

import numpy as np
import pytest

import eval as ev
import forecast.metrics as fm


def test_mase_on_a_hand_made_case():
    # system 0: context steps move by 1 (prey) and 3 (predator): persistence MAE 2; forecast off by 1 and 3
    context = np.array([[[0.0, 0.0], [1.0, 3.0], [2.0, 0.0]], [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]])
    target = np.zeros((2, 2, 2))
    forecast = np.array([[[1.0, 3.0], [1.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]])
    scaled = fm.scaled_errors(forecast, target, context)
    assert scaled["per_system_mase"][0] == pytest.approx(2.0 / 2.0)
    assert np.isnan(scaled["per_system_mase"][1])  # a context that never moves has no scale
    assert scaled["mase"] == pytest.approx(1.0) and scaled["per_step_mase"] == pytest.approx([1.0, 1.0])
    m = ev.error_metrics(forecast, target, context)
    assert m["mase"] == pytest.approx(1.0) and m["per_step"][1]["mase"] == pytest.approx(1.0)
    assert m["per_system_mse"] == pytest.approx([5.0, 1.0])


def test_bootstrap_interval_covers_the_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(300):
        sample = rng.exponential(2.0, size=60)  # true mean 2, skewed
        low, high = fm.bootstrap_interval(sample, resamples=500, seed=trial)
        covered += low <= 2.0 <= high
    assert 0.90 <= covered / 300 <= 0.98  # percentile bootstrap at n = 60 undercovers a little


def test_bootstrap_is_seeded_and_narrows_with_more_systems():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    assert fm.bootstrap_interval(small, 300, seed=5) == fm.bootstrap_interval(small, 300, seed=5)
    assert fm.bootstrap_interval(small, 300, seed=5) != fm.bootstrap_interval(small, 300, seed=6)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(fm.bootstrap_interval(large, 300)) < width(fm.bootstrap_interval(small, 300)) / 5


def test_paired_difference_verdicts():
    rng = np.random.default_rng(2)
    base = rng.uniform(1, 2, size=100)
    assert fm.paired_difference(base - 0.1, base)["verdict"] == "beats"  # better on every system
    assert fm.paired_difference(base + 0.1, base)["verdict"] == "loses to"
    noise = rng.normal(0, 1, size=100)
    tie = fm.paired_difference(base + noise - noise.mean(), base)
    assert tie["verdict"] == "cannot be told apart from" and tie["ci"][0] < 0 < tie["ci"][1]


def test_crps_and_coverage_on_hand_made_samples():
    samples = np.array([0.0, 2.0]).reshape(2, 1, 1, 1) * np.ones((2, 1, 1, 2))  # (S=2, N=1, H=1, 2)
    target = np.ones((1, 1, 2))
    # E|X - y| = 1, E|X - X'| = (0 + 2 + 2 + 0) / 4 = 1: CRPS = 1 - 1/2
    assert fm.crps_from_samples(samples, target) == pytest.approx([0.5])
    one = np.full((1, 1, 1, 2), 3.0)
    assert fm.crps_from_samples(one, target) == pytest.approx([2.0])  # one sample: the absolute error
    many = np.arange(11.0).reshape(11, 1, 1, 1) * np.ones((11, 1, 1, 2))  # 0..10: 10-90% is [1, 9]
    assert fm.interval_coverage(many, np.array([[[0.5, 5.0]]])) == pytest.approx([0.5])


def test_samples_give_median_crps_and_coverage_in_evaluate_forecasts():
    from data import Scaler, simulate
    from data.windows import forecast_task

    task = forecast_task(simulate(1, seed=0).values, Scaler(alpha=1.0), 2, context_steps=10, horizon=1)
    texts = [["1.00,1.00;", "3.00,3.00;", "2.00,2.00;"]]  # median 2; samples 1, 2, 3
    r = ev.evaluate_forecasts(texts, task, Scaler(alpha=1.0), 2, 1)
    np.testing.assert_allclose(r["forecast_values"], [[[2.0, 2.0]]])
    expected = fm.crps_from_samples(np.array([1.0, 3.0, 2.0]).reshape(3, 1, 1, 1) * np.ones((3, 1, 1, 2)), task.target)
    assert r["crps"] == pytest.approx(float(expected[0]))
    assert "crps" not in ev.evaluate_forecasts([["2.00,2.00;"]], task, Scaler(alpha=1.0), 2, 1)


def test_add_intervals_covers_every_metric_and_every_step_on_the_same_resamples():
    rng = np.random.default_rng(3)
    target, forecast = rng.normal(size=(30, 4, 2)), rng.normal(size=(30, 4, 2))
    r = fm.add_intervals(ev.error_metrics(forecast, target, rng.normal(size=(30, 6, 2))), 200, seed=4)
    assert set(r["ci"]) == {"mae", "mse", "mase"}
    for metric, (low, high) in r["ci"].items():
        assert low < r[metric] < high
    by_step = np.asarray(r["per_system_step_mae"])
    for k, step in enumerate(r["per_step"]):
        assert step["mae_ci"] == fm.bootstrap_interval(by_step[:, k], 200, seed=4)
        assert step["mae_ci"][0] < step["mae"] < step["mae_ci"][1]
