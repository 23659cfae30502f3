"""Forecasts without a language model: what fine-tuning has to beat, from the weakest to the physics.

Every baseline maps the same (N, K, 2) context the model reads (prey, predator; original units) to an
(N, H, 2) forecast, and never sees the target. Named in tables exactly as the functions here:

- naive_last:      the last observed value, repeated (persistence: the weakest baseline there is);
- naive_linear:    the line through the last two observed values, extended;
- seasonal_naive:  the last period repeated, the period read off the context's autocorrelation
                   (estimate_period); persistence where no period can be found, counted;
- autoregression:  next (log prey, log predator) as a linear function of the last p steps of both,
                   least squares on the training split, iterated over the horizon; p chosen on the
                   validation split (the "same data, no language model" comparison);
- lv_fit:          the Lotka-Volterra equations fitted to each system's context (four rates and the
                   initial state, gradient descent in log space through data/'s RK4, a few seeded
                   starts) and integrated forward: the physics reference, how well anything could do
                   knowing the true model family.

`all_baselines` runs them all on one context; the first two are cheap enough to call anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.lotka_volterra import rk4_step

LOG_FLOOR = 1e-6  # populations are positive; a 0 in the data is read as this before taking logs


# ------------------------------------------------------------------------------------------ naive
def naive_last(context: np.ndarray, horizon: int) -> np.ndarray:
    """(N, K, 2) -> (N, H, 2): the last observed value, repeated."""
    return np.repeat(context[:, -1:], horizon, axis=1)


def naive_linear(context: np.ndarray, horizon: int) -> np.ndarray:
    """(N, K, 2) -> (N, H, 2): last + k * (last - previous), k = 1..H (needs K >= 2)."""
    slope = context[:, -1] - context[:, -2] if context.shape[1] > 1 else np.zeros_like(context[:, -1])
    k = np.arange(1, horizon + 1)[None, :, None]
    return context[:, -1:] + k * slope[:, None]


# -------------------------------------------------------------------------------- seasonal naive
def autocorrelation(context: np.ndarray) -> np.ndarray:
    """(N, K, 2) -> (N, K) autocorrelation at lags 0..K-1, both variables together.

    Each variable is centred and divided by its own standard deviation (so prey and predator weigh
    alike), and lag l averages z[t] * z[t + l] over its K - l pairs and both variables. A constant
    variable adds nothing; a system with both constant has all zeros."""
    z = context - context.mean(axis=1, keepdims=True)
    std = z.std(axis=1, keepdims=True)
    z = np.divide(z, std, out=np.zeros_like(z), where=std > 1e-12)
    K = context.shape[1]
    # products[:, l] = mean over t, v of z[:, t, v] * z[:, t + l, v]
    return np.stack([np.mean(z[:, : K - lag] * z[:, lag:], axis=(1, 2)) for lag in range(K)], axis=1)


def estimate_period(context: np.ndarray) -> np.ndarray:
    """(N, K, 2) -> (N,) period in steps, 0 where none is found.

    The period is the first peak of the autocorrelation after its first zero crossing: the first lag
    l > 1 with acf[l] > 0, acf[l] >= acf[l - 1] and acf[l] > acf[l + 1], after a lag where acf < 0.
    Lags are searched up to 3K/4, so at least a quarter of the context takes part in each estimate."""
    acf = autocorrelation(context)
    max_lag = min(3 * context.shape[1] // 4, context.shape[1] - 2)
    periods = np.zeros(len(context), dtype=int)
    for i, a in enumerate(acf):
        negative = np.flatnonzero(a[1 : max_lag + 1] < 0)
        if len(negative) == 0:
            continue
        for lag in range(negative[0] + 2, max_lag + 1):
            if a[lag] > 0 and a[lag] >= a[lag - 1] and a[lag] > a[lag + 1]:
                periods[i] = lag
                break
    return periods


def seasonal_naive(context: np.ndarray, horizon: int) -> tuple[np.ndarray, dict]:
    """(N, K, 2) -> (N, H, 2) and {"no_period": systems that fell back to persistence}.

    Step h (0-based) repeats context step K - P + (h mod P): the last period, over and over."""
    K = context.shape[1]
    periods = estimate_period(context)
    forecast = naive_last(context, horizon)
    h = np.arange(horizon)
    for i in np.flatnonzero(periods):
        forecast[i] = context[i, K - periods[i] + h % periods[i]]
    return forecast, {"no_period": int(np.sum(periods == 0)), "periods": periods.tolist()}


# -------------------------------------------------------------------------------- autoregression
@dataclass
class Autoregression:
    """log v[t] = bias + sum over lags j = 1..p of log v[t - j] @ weights[j - 1], per (prey, predator).

    weights (p, 2, 2): weights[j - 1][u, w] is the effect of variable u at lag j on variable w."""

    weights: np.ndarray
    bias: np.ndarray  # (2,)
    log_range: tuple[float, float]  # the training data's log range; forecasts are clipped to it

    @property
    def p(self) -> int:
        return len(self.weights)


def logs(values: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(values, LOG_FLOOR))


def fit_autoregression(train: np.ndarray, p: int) -> Autoregression:
    """Least squares over every window of p + 1 consecutive steps of every training system (N, T, 2)."""
    v = logs(train)
    windows = np.lib.stride_tricks.sliding_window_view(v, p + 1, axis=1)  # (N, T - p, 2, p + 1)
    past = windows[..., :p][..., ::-1]  # (N, T - p, 2, p): lag 1 first
    X = past.transpose(0, 1, 3, 2).reshape(-1, 2 * p)  # (rows, p * 2): lag-major, then variable
    X = np.concatenate([X, np.ones((len(X), 1))], axis=1)  # (rows, 2p + 1)
    Y = windows[..., p].reshape(-1, 2)  # (rows, 2)
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)  # (2p + 1, 2)
    return Autoregression(coef[:-1].reshape(p, 2, 2), coef[-1], (float(v.min()), float(v.max())))


def ar_forecast(model: Autoregression, context: np.ndarray, horizon: int) -> np.ndarray:
    """(N, K, 2) -> (N, H, 2): one step at a time, each prediction fed back as the newest lag."""
    history = list(np.moveaxis(logs(context[:, -model.p :]), 1, 0))  # K' arrays (N, 2), oldest first
    out = []
    for _ in range(horizon):
        lagged = np.stack(history[::-1][: model.p], axis=1)  # (N, p, 2): lag 1 first
        nxt = np.einsum("npu,puw->nw", lagged, model.weights) + model.bias  # (N, 2)
        nxt = np.clip(nxt, *model.log_range)
        history.append(nxt)
        out.append(nxt)
    return np.exp(np.stack(out, axis=1))


def autoregression(context: np.ndarray, horizon: int, train: np.ndarray, val: np.ndarray,
                   max_p: int = 24) -> tuple[np.ndarray, dict]:
    """Fit on `train` (N, T, 2) for each p = 1..min(max_p, K); keep the p whose forecasts of the
    validation systems (their first K steps in, the next H out) have the lowest MAE."""
    K = context.shape[1]
    val_context, val_target = val[:, :K], val[:, K : K + horizon]
    scores = {}
    for p in range(1, min(max_p, K) + 1):
        model = fit_autoregression(train, p)
        scores[p] = (float(np.mean(np.abs(ar_forecast(model, val_context, horizon) - val_target))), model)
    p = min(scores, key=lambda q: scores[q][0])
    return ar_forecast(scores[p][1], context, horizon), {"p": p, "val_mae": scores[p][0]}


# ----------------------------------------------------------------------------- Lotka-Volterra fit
def integrate(log_params: torch.Tensor, log_initial: torch.Tensor, steps: int, substeps: int) -> torch.Tensor:
    """(B, 4) log-rates per step, (B, 2) log-initial state -> (B, steps, 2): data/'s RK4, time in steps."""
    params, state = log_params.exp(), log_initial.exp()
    path, h = [state], 1.0 / substeps
    for _ in range(steps - 1):
        for _ in range(substeps):
            state = rk4_step(state, params, h)
        path.append(state)
    return torch.stack(path, dim=1)  # (B, steps, 2)


def rate_guess(context: np.ndarray) -> np.ndarray:
    """(N, K, 2) -> (N, 4) rates per step from the equations written for logs (gradient matching):
    d log x/dt = alpha - beta y and d log y/dt = delta x - gamma, two straight-line fits on central
    differences. Clipped to at least 1e-3: a start for the fit, not the answer."""
    v, lv = context, logs(context)
    dx, dy = (lv[:, 2:, 0] - lv[:, :-2, 0]) / 2, (lv[:, 2:, 1] - lv[:, :-2, 1]) / 2  # (N, K - 2)
    x, y = v[:, 1:-1, 0], v[:, 1:-1, 1]

    def line(u, d):  # least squares d = a + b u per system -> (a, b)
        u_c, d_c = u - u.mean(1, keepdims=True), d - d.mean(1, keepdims=True)
        b = (u_c * d_c).sum(1) / np.maximum((u_c**2).sum(1), 1e-12)
        return d.mean(1) - b * u.mean(1), b

    alpha, minus_beta = line(y, dx)
    minus_gamma, delta = line(x, dy)
    return np.maximum(np.stack([alpha, -minus_beta, -minus_gamma, delta], axis=1), 1e-3)


def fit_lotka_volterra(context: np.ndarray, starts: int = 4, iterations: int = 80, lr: float = 0.1,
                       substeps: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit each system's context (N, K, 2); returns (rates per step (N, 4), initial state (N, 2), the
    relative mean squared error of the fit (N,)).

    All systems and starts are one batch of N * starts rows. Start 0 is rate_guess, the others scale
    it by exp(N(0, 0.7)) per rate (seeded). Adam on the log-rates and log-initial state minimises the
    squared error relative to each variable's context mean; the best start per system is kept."""
    N, K, _ = context.shape
    rng = np.random.default_rng(seed)
    guess = np.log(np.repeat(rate_guess(context), starts, axis=0))  # (N * starts, 4)
    guess[np.arange(len(guess)) % starts != 0] += rng.normal(0, 0.7, size=(N * (starts - 1), 4))
    log_params = torch.tensor(guess, requires_grad=True)
    log_initial = torch.tensor(np.repeat(logs(context[:, 0]), starts, axis=0), requires_grad=True)  # (N * starts, 2)
    observed = torch.tensor(np.repeat(context, starts, axis=0))  # (N * starts, K, 2)
    scale = observed.mean(dim=1, keepdim=True).clamp_min(LOG_FLOOR)  # (N * starts, 1, 2)
    opt = torch.optim.Adam([log_params, log_initial], lr=lr)
    for _ in range(iterations):
        loss = fit_error(log_params, log_initial, observed, scale, substeps)  # (N * starts,)
        opt.zero_grad()
        torch.where(torch.isfinite(loss), loss, 0.0).sum().backward()  # rows are independent
        for t in (log_params, log_initial):
            t.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        with torch.no_grad():
            log_params.clamp_(-9.0, 3.0)
    with torch.no_grad():
        loss = fit_error(log_params, log_initial, observed, scale, substeps).nan_to_num(float("inf"))
    best = loss.view(N, starts).argmin(dim=1) + torch.arange(N) * starts  # (N,) rows of the best starts
    return (log_params[best].detach().exp().numpy(), log_initial[best].detach().exp().numpy(), loss[best].numpy())


def fit_error(log_params, log_initial, observed, scale, substeps) -> torch.Tensor:
    """Mean over steps and variables of ((simulated - observed) / context mean)^2 -> (rows,)."""
    simulated = integrate(log_params, log_initial, observed.shape[1], substeps)
    return (((simulated - observed) / scale) ** 2).mean(dim=(1, 2))


def lv_fit(context: np.ndarray, horizon: int, starts: int = 4, iterations: int = 80, substeps: int = 4,
           seed: int = 0) -> tuple[np.ndarray, dict]:
    """(N, K, 2) -> (N, H, 2): the fitted equations integrated on from the fitted initial state.
    A system whose fit or forecast is not finite falls back to persistence, counted as `failed`."""
    rates, initial, error = fit_lotka_volterra(context, starts, iterations, substeps=substeps, seed=seed)
    K = context.shape[1]
    with torch.no_grad():
        path = integrate(torch.tensor(np.log(rates)), torch.tensor(np.log(initial)), K + horizon, substeps)
    forecast = path[:, K:].numpy()
    bad = ~np.isfinite(forecast).all(axis=(1, 2)) | ~np.isfinite(error)
    forecast[bad] = naive_last(context[bad], horizon)
    return forecast, {"failed": int(bad.sum()), "median_fit_error": float(np.median(error[~bad])) if (~bad).any() else None}


# ------------------------------------------------------------------------------------------ all
def all_baselines(context: np.ndarray, horizon: int, train: np.ndarray, val: np.ndarray,
                  seed: int = 0) -> dict[str, tuple[np.ndarray, dict]]:
    """{name: (forecast (N, H, 2), what it reports)} for every baseline, in the order of the table.
    `train` and `val` are whole systems (N, T, 2) of the training and validation splits (the
    autoregression learns from them); the forecasts read `context` alone."""
    return {"naive_last": (naive_last(context, horizon), {}),
            "naive_linear": (naive_linear(context, horizon), {}),
            "seasonal_naive": seasonal_naive(context, horizon),
            "autoregression": autoregression(context, horizon, train, val),
            "lv_fit": lv_fit(context, horizon, seed=seed)}
