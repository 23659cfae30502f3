"""forecast/baselines.py: each baseline does what its name says, and none reads past the context."""

import numpy as np
import pytest

import eval as ev
import forecast.baselines as fb
from data import Scaler, simulate
from data.lotka_volterra import integrate_rk4
from data.windows import forecast_task


def periodic(period: int, steps: int, systems: int = 3) -> np.ndarray:
    """(systems, steps, 2) smooth positive series repeating exactly every `period` steps."""
    t = np.arange(steps)[None, :]
    phase = np.arange(systems)[:, None]
    prey = 3 + np.sin(2 * np.pi * (t + phase) / period) + 0.4 * np.cos(4 * np.pi * t / period)
    predator = 2 + np.cos(2 * np.pi * (t + phase) / period)
    return np.stack([prey, predator], axis=-1)


@pytest.mark.parametrize("period", [7, 12])
def test_seasonal_naive_forecasts_a_periodic_series_exactly(period):
    series = periodic(period, 48 + 30)
    context, target = series[:, :48], series[:, 48:]
    forecast, info = fb.seasonal_naive(context, 30)
    assert info["periods"] == [period] * 3 and info["no_period"] == 0
    np.testing.assert_allclose(forecast, target, atol=1e-12)
    assert np.abs(fb.naive_last(context, 30) - target).mean() > 0.3  # persistence is far off on the same series


def test_seasonal_naive_falls_back_to_persistence_and_counts_it():
    context = np.concatenate([np.full((1, 30, 2), 2.5), periodic(9, 30, 1)])  # a constant system, a periodic one
    forecast, info = fb.seasonal_naive(context, 5)
    assert info["no_period"] == 1 and info["periods"] == [0, 9]
    np.testing.assert_array_equal(forecast[0], np.full((5, 2), 2.5))


def test_autoregression_recovers_the_coefficients_of_an_ar_process():
    rng = np.random.default_rng(0)
    weights = np.array([[[0.5, 0.1], [-0.2, 0.6]], [[0.2, 0.0], [0.1, -0.3]]])  # (p=2, from, to)
    bias = np.array([0.1, -0.05])
    logs = np.zeros((40, 200, 2))
    for t in range(2, 200):
        logs[:, t] = bias + logs[:, t - 1] @ weights[0] + logs[:, t - 2] @ weights[1] + 0.1 * rng.normal(size=(40, 2))
    model = fb.fit_autoregression(np.exp(logs), p=2)
    np.testing.assert_allclose(model.weights, weights, atol=0.03)
    np.testing.assert_allclose(model.bias, bias, atol=0.01)


def test_autoregression_picks_p_on_validation_and_forecasts_in_log_space():
    """A noiseless AR(1) in the logs: whichever p validation picks fits it exactly, so the forecast
    (made in logs, turned back into values) continues the process exactly."""
    t = np.arange(60)
    values = np.exp(np.stack([0.9**t * np.ones((6, 1)), -(0.8**t) * np.ones((6, 1))], axis=-1))  # (6, 60, 2)
    forecast, info = fb.autoregression(values[:2, :20], 10, train=values[2:4], val=values[4:])
    np.testing.assert_allclose(forecast, values[:2, 20:30], rtol=1e-6)
    assert 1 <= info["p"] <= 20


def test_integration_in_steps_is_data_s_rk4():
    rates = np.array([[0.3, 0.5, 0.2, 0.25], [0.15, 0.7, 0.35, 0.1]])
    initial = np.array([[1.0, 0.9], [1.1, 1.2]])
    time = np.arange(30) * 2.0  # 2 time units per step
    reference = integrate_rk4(initial, rates, time, substeps=4)
    ours = fb.integrate(np.log(rates * 2.0), np.log(initial), 30, substeps=4)  # rates per step
    np.testing.assert_allclose(ours, reference, rtol=1e-12)


def test_lotka_volterra_fit_recovers_known_parameters_and_forecasts():
    traj = simulate(3, seed=4)  # clean RK4 trajectories, 20 substeps per step
    from data.lotka_volterra import sample_systems

    initial, params = sample_systems(3, seed=4)
    dt = traj.time[1] - traj.time[0]
    context, target = traj.values[:, :50].astype(np.float64), traj.values[:, 50:70].astype(np.float64)
    rates, start, error = fb.fit_lotka_volterra(context)
    np.testing.assert_allclose(rates / dt, params, rtol=0.03)
    np.testing.assert_allclose(start, initial, rtol=0.03)
    assert (error < 1e-3).all()
    forecast, info = fb.lv_fit(context, 20)
    assert info["failed"] == 0
    assert np.abs(forecast - target).mean() < 0.02 * np.abs(target).mean()
    assert np.abs(forecast - target).mean() < 0.2 * np.abs(fb.naive_last(context, 20) - target).mean()


def test_no_baseline_reads_past_the_context():
    values = simulate(12, seed=1).values.astype(np.float64)
    train, val, test = values[:6], values[6:9], values[9:]
    changed = test.copy()
    changed[:, 40:] = changed[:, 40:] * 3 + 1  # a different future, the same past
    tasks = [forecast_task(v, Scaler(1.0), 2, context_steps=40, horizon=10) for v in (test, changed)]
    assert not np.allclose(tasks[0].target, tasks[1].target)
    first, second = (ev.baseline_results(task, train, val) for task in tasks)
    assert list(first) == ["naive_last", "naive_linear", "seasonal_naive", "autoregression", "lv_fit"]
    for name in first:
        np.testing.assert_array_equal(first[name][0], second[name][0], err_msg=name)
        assert first[name][1]["mae"] != second[name][1]["mae"]  # ...while the errors did see the new target
