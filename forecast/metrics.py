"""Judging forecasts the way a reviewer does: a scaled error, intervals, paired differences, samples.

- Scaled error (MASE): a system's forecast MAE divided by the MAE of one-step persistence inside its own
  context (mean |v[t] - v[t-1]| over the context's steps and both variables), so a system that moves
  a lot and one that barely moves weigh alike. 1.0 = as far off, per step of the horizon, as
  "tomorrow = today" is within the context. A system whose context never changes has no scale; its
  MASE is NaN and left out of the means (nanmean).
- Intervals: a percentile bootstrap over systems (resample the systems with replacement, average,
  take the 2.5% and 97.5% quantiles of the averages). The same seed draws the same resamples for every
  entry of a table, so entries and their differences are judged on the same draws.
- Paired difference: per system, model error minus baseline error, bootstrapped the same way; "beats"
  only when the whole 95% interval is below 0.
- Samples: CRPS estimated from the samples, E|X - y| - E|X - X'| / 2 (X, X' independent samples, y the
  truth), averaged over the horizon and both variables; and the coverage of the 10-90% interval (the
  share of true values between the samples' 10% and 90% quantiles; 0.8 if calibrated).
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95


def persistence_scale(context: np.ndarray) -> np.ndarray:
    """(N, K, 2) -> (N,): mean |v[t] - v[t-1]| inside each context; NaN where it is 0 (or K < 2)."""
    if context.shape[1] < 2:
        return np.full(len(context), np.nan)
    scale = np.mean(np.abs(np.diff(context, axis=1)), axis=(1, 2))
    return np.where(scale > 0, scale, np.nan)


def scaled_errors(forecast: np.ndarray, target: np.ndarray, context: np.ndarray) -> dict:
    """MASE overall, per system (N,) and per horizon step (H,)."""
    abs_err = np.abs(np.asarray(forecast, dtype=np.float64) - target)  # (N, H, 2)
    per_step_system = abs_err.mean(axis=2) / persistence_scale(context)[:, None]  # (N, H)
    per_system = per_step_system.mean(axis=1)
    return {"mase": nanmean(per_system), "per_system_mase": per_system.tolist(),
            "per_step_mase": [nanmean(per_step_system[:, k]) for k in range(abs_err.shape[1])]}


def nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


def bootstrap_means(per_system: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(N,) -> (resamples,) means of resampled systems (NaNs left out of each mean)."""
    per_system = np.asarray(per_system, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(per_system), size=(resamples, len(per_system)))
    draws = per_system[idx]  # (resamples, N)
    finite = np.isfinite(draws)
    return np.where(finite, draws, 0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)


def bootstrap_interval(per_system: np.ndarray, resamples: int = 1000, seed: int = 0,
                       level: float = LEVEL) -> list[float]:
    """The percentile bootstrap interval of the mean over systems: [low, high]."""
    means = bootstrap_means(per_system, resamples, seed)
    tail = (1 - level) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


def add_intervals(result: dict, resamples: int, seed: int) -> dict:
    """result["ci"] = {metric: [low, high]} for each per-system metric the result carries."""
    result["ci"] = {m: bootstrap_interval(result[f"per_system_{m}"], resamples, seed)
                    for m in ("mae", "mse", "mase", "crps") if f"per_system_{m}" in result}
    if "per_system_step_mae" in result:  # each step's MAE, on the same resamples
        by_step = np.asarray(result["per_system_step_mae"])  # (N, H)
        for k, step in enumerate(result["per_step"]):
            step["mae_ci"] = bootstrap_interval(by_step[:, k], resamples, seed)
    return result


def paired_difference(model: np.ndarray, baseline: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """Mean of model - baseline over systems (paired), its interval, and the verdict."""
    diff = np.asarray(model, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    low, high = bootstrap_interval(diff, resamples, seed)
    verdict = "beats" if high < 0 else "loses to" if low > 0 else "cannot be told apart from"
    return {"diff": nanmean(diff), "ci": [low, high], "verdict": verdict}


def comparisons(results: dict, models: list[str], baselines: list[str], reference: str | None,
                resamples: int, seed: int) -> list[dict]:
    """Each model against the best baseline (lowest MAE; the physics `reference` is not a baseline
    here) and against the reference, on MAE and on MASE."""
    best = min(baselines, key=lambda b: results[b]["mae"])
    out = []
    for model in models:
        for other, role in ((best, "best baseline"), (reference, "physics reference")):
            if other is None or other not in results:
                continue
            for metric in ("mae", "mase"):
                d = paired_difference(results[model][f"per_system_{metric}"], results[other][f"per_system_{metric}"],
                                      resamples, seed)
                out.append({"model": model, "baseline": other, "role": role, "metric": metric, **d})
    return out


def crps_from_samples(samples: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(S, N, H, 2) samples, (N, H, 2) truth -> (N,) CRPS per system (mean over steps and variables)."""
    samples, target = np.asarray(samples, dtype=np.float64), np.asarray(target, dtype=np.float64)
    to_truth = np.abs(samples - target[None]).mean(axis=0)  # (N, H, 2)
    spread = np.abs(samples[:, None] - samples[None, :]).mean(axis=(0, 1))  # (S, S, N, H, 2) -> (N, H, 2)
    return (to_truth - 0.5 * spread).mean(axis=(1, 2))


def interval_coverage(samples: np.ndarray, target: np.ndarray, low: float = 0.1, high: float = 0.9) -> np.ndarray:
    """(S, N, H, 2), (N, H, 2) -> (N,) share of true values within the samples' [low, high] quantiles."""
    lo, hi = np.quantile(samples, [low, high], axis=0)  # (N, H, 2) each
    return ((target >= lo) & (target <= hi)).mean(axis=(1, 2))
