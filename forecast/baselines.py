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
                   initial state, least squares in log space by Levenberg-Marquardt through data/'s
                   RK4, a few seeded starts) and integrated forward: the physics reference, how well anything could do
                   knowing the true model family.

`all_baselines` runs them all on one context; the first two are cheap enough to call anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
def integrate(log_params: np.ndarray, log_initial: np.ndarray, steps: int, substeps: int) -> np.ndarray:
    """(B, 4) log-rates per step, (B, 2) log-initial state -> (B, steps, 2): data/'s RK4, time in steps
    (rates per step are rates per time unit times the step; the forecast is the same either way)."""
    params, state = np.exp(log_params), np.exp(log_initial)
    path, h = [state], 1.0 / substeps
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging trial is rejected by its cost
        for _ in range(steps - 1):
            for _ in range(substeps):
                state = rk4_step(state, params, h)
            path.append(state)
    return np.stack(path, axis=1)  # (B, steps, 2)


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

    if context.shape[1] < 3:  # no central difference to fit: a flat start, left to the fit
        return np.full((len(context), 4), 1e-3)
    alpha, minus_beta = line(y, dx)
    minus_gamma, delta = line(x, dy)
    guess = np.stack([alpha, -minus_beta, -minus_gamma, delta], axis=1)  # (N, 4)
    return np.maximum(np.where(np.isfinite(guess), guess, 1e-3), 1e-3)


def residuals(theta: np.ndarray, observed: np.ndarray, scale: np.ndarray, substeps: int) -> np.ndarray:
    """theta (R, 6) = log-rates, log-initial state -> (R, 2K): (simulated - observed) / context mean."""
    simulated = integrate(theta[:, :4], theta[:, 4:], observed.shape[1], substeps)  # (R, K, 2)
    return ((simulated - observed) / scale).reshape(len(theta), -1)


def fit_lotka_volterra(context: np.ndarray, starts: int = 4, iterations: int = 40, substeps: int = 4,
                       seed: int = 0, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit each system's context (N, K, 2); returns (rates per step (N, 4), initial state (N, 2), the
    mean squared relative error of the fit (N,)).

    Least squares on the log-rates and log-initial state, all systems and starts as one batch of
    N * starts rows, by Levenberg-Marquardt: each iteration takes the Jacobian of the residuals through
    the RK4 integration (forward differences, the 6 shifted copies integrated in the same batch) and
    steps by (J'J + damping diag(J'J))^-1 J'r, kept where it lowers the error. Start 0 is rate_guess,
    the others scale its rates by exp(N(0, 0.7)) each (seeded); the best start per system is kept."""
    N, K, _ = context.shape
    rng = np.random.default_rng(seed)
    guess = np.log(np.repeat(rate_guess(context), starts, axis=0))  # (R, 4), R = N * starts
    guess[np.arange(len(guess)) % starts != 0] += rng.normal(0, 0.7, size=(N * (starts - 1), 4))
    theta = np.concatenate([guess, np.repeat(logs(context[:, 0]), starts, axis=0)], axis=1)  # (R, 6)
    observed = np.repeat(context, starts, axis=0)  # (R, K, 2)
    scale = np.maximum(observed.mean(axis=1, keepdims=True), LOG_FLOOR)  # (R, 1, 2)
    r = residuals(theta, observed, scale, substeps)  # (R, 2K)
    cost, damping = finite_cost(r), np.full(len(theta), 1e-2)
    for _ in range(iterations):
        shifted = (theta[:, None, :] + eps * np.eye(6)[None]).reshape(-1, 6)  # (R * 6, 6)
        r_shifted = residuals(shifted, np.repeat(observed, 6, axis=0), np.repeat(scale, 6, axis=0), substeps)
        J = ((r_shifted.reshape(len(theta), 6, -1) - r[:, None]) / eps).transpose(0, 2, 1)  # (R, 2K, 6)
        JtJ = np.einsum("rki,rkj->rij", J, J)  # (R, 6, 6)
        Jtr = np.einsum("rki,rk->ri", J, r)  # (R, 6)
        lhs = JtJ + damping[:, None, None] * (np.eye(6) * JtJ) + 1e-12 * np.eye(6)
        step = -damped_solve(np.nan_to_num(lhs), np.nan_to_num(Jtr))  # (R, 6)
        trial = np.clip(theta + step, -12.0, 4.0)
        r_trial = residuals(trial, observed, scale, substeps)
        better = finite_cost(r_trial) < cost
        theta[better], r[better], cost[better] = trial[better], r_trial[better], finite_cost(r_trial)[better]
        damping = np.where(better, damping / 3, damping * 4)
    best = cost.reshape(N, starts).argmin(axis=1) + np.arange(N) * starts  # (N,) rows of the best starts
    return np.exp(theta[best, :4]), np.exp(theta[best, 4:]), cost[best]


def damped_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """(R, 6, 6), (R, 6) -> (R, 6): lhs^-1 rhs per row; the pseudo-inverse where a row is singular (a
    context too short or too flat to say anything about some parameter: that parameter stays put)."""
    try:
        return np.linalg.solve(lhs, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum("rij,rj->ri", np.linalg.pinv(lhs), rhs)


def finite_cost(r: np.ndarray) -> np.ndarray:
    """(R, 2K) -> (R,) mean squared residual; inf where the simulation diverged."""
    with np.errstate(over="ignore", invalid="ignore"):
        cost = np.mean(r**2, axis=1)
    return np.where(np.isfinite(cost), cost, np.inf)


def lv_fit(context: np.ndarray, horizon: int, starts: int = 4, iterations: int = 40, substeps: int = 4,
           seed: int = 0) -> tuple[np.ndarray, dict]:
    """(N, K, 2) -> (N, H, 2): the fitted equations integrated on from the fitted initial state.
    A system whose fit or forecast is not finite falls back to persistence, counted as `failed`."""
    rates, initial, error = fit_lotka_volterra(context, starts, iterations, substeps=substeps, seed=seed)
    K = context.shape[1]
    forecast = integrate(np.log(rates), np.log(initial), K + horizon, substeps)[:, K:]
    bad = ~np.isfinite(forecast).all(axis=(1, 2)) | ~np.isfinite(error)
    forecast[bad] = naive_last(context[bad], horizon)
    return forecast, {"failed": int(bad.sum()),
                      "median_fit_error": float(np.median(error[~bad])) if (~bad).any() else None}


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
