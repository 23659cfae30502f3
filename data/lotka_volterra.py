"""Lotka–Volterra predator–prey trajectories: a simulator, the coursework's HDF5 format, and splits.

The equations, for prey x and predator y:

    dx/dt = alpha * x - beta * x * y        (prey grow, and are eaten)
    dy/dt = delta * x * y - gamma * y       (predators grow by eating, and die)

Each simulated system draws its own parameters and initial state, uniformly:

    alpha in [0.1, 0.4]   beta in [0.2, 0.8]   gamma in [0.1, 0.4]   delta in [0.1, 0.3]
    x(0), y(0) in [0.8, 1.2]

and is integrated with classic RK4 (all systems at once, in numpy) at 20 internal steps per output
interval, sampled on `time = linspace(0, 200, 100)`. These ranges were chosen to resemble the
coursework's dataset: with 1,000 systems prey stay within about 0–15 and predators within about
0–5 (coursework: prey 0.002–13.7, predator 4e-5–4.8), always positive.

    python -m data.lotka_volterra --out lv.h5 --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import UserError, run_cli
from common.files import atomic_path

PARAM_RANGES = {"alpha": (0.1, 0.4), "beta": (0.2, 0.8), "gamma": (0.1, 0.4), "delta": (0.1, 0.3)}
INITIAL_RANGE = (0.8, 1.2)


@dataclass
class Trajectories:
    """`values` (N, T, 2) float32 — [..., 0] prey, [..., 1] predator — sampled at `time` (T,) float64."""

    values: np.ndarray
    time: np.ndarray
    source: str = "simulated"

    def __len__(self) -> int:
        return len(self.values)


# --------------------------------------------------------------------------------------- simulator
def lv_rhs(state: np.ndarray, params: np.ndarray) -> np.ndarray:
    """d(state)/dt for many systems at once: state (..., 2), params (..., 4) = alpha, beta, gamma, delta."""
    x, y = state[..., 0], state[..., 1]
    alpha, beta, gamma, delta = (params[..., k] for k in range(4))
    return np.stack([alpha * x - beta * x * y, delta * x * y - gamma * y], axis=-1)


def rk4_step(state: np.ndarray, params: np.ndarray, h: float) -> np.ndarray:
    """One classic RK4 step of size h from state (..., 2) (forecast/baselines.py's fit steps with it too)."""
    k1 = lv_rhs(state, params)
    k2 = lv_rhs(state + 0.5 * h * k1, params)
    k3 = lv_rhs(state + 0.5 * h * k2, params)
    k4 = lv_rhs(state + h * k3, params)
    return state + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def integrate_rk4(initial: np.ndarray, params: np.ndarray, time: np.ndarray, substeps: int = 20) -> np.ndarray:
    """RK4 from `initial` (N, 2) with `substeps` equal steps per output interval -> (N, T, 2) float64."""
    state = initial.astype(np.float64)
    out = np.empty((len(initial), len(time), 2))
    out[:, 0] = state
    for i in range(len(time) - 1):
        h = (time[i + 1] - time[i]) / substeps
        for _ in range(substeps):
            state = rk4_step(state, params, h)
        out[:, i + 1] = state
    return out


def sample_systems(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (initial (n, 2), params (n, 4)) from the documented ranges; the same for the same seed."""
    rng = np.random.default_rng(seed)
    params = np.stack([rng.uniform(*PARAM_RANGES[k], size=n) for k in ("alpha", "beta", "gamma", "delta")], axis=1)
    initial = rng.uniform(*INITIAL_RANGE, size=(n, 2))
    return initial, params


def simulate(n: int = 1000, seed: int = 0, steps: int = 100, t_max: float = 200.0, substeps: int = 20) -> Trajectories:
    if n < 1 or steps < 2:
        raise UserError("simulate needs at least 1 system and 2 timesteps")
    time = np.linspace(0.0, t_max, steps)
    initial, params = sample_systems(n, seed)
    values = integrate_rk4(initial, params, time, substeps).astype(np.float32)
    return Trajectories(values, time, source=f"simulated(n={n}, seed={seed})")


# ------------------------------------------------------------------------------------ HDF5 format
def load_h5(path: str | Path) -> Trajectories:
    """Read and validate the coursework format: `trajectories` (N, T, 2) and `time` (T,)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file") from None
    with f:
        for name in ("trajectories", "time"):
            if name not in f:
                raise UserError(f"{path} has no dataset {name!r} (found: {', '.join(f.keys()) or 'nothing'})")
        values, time = np.asarray(f["trajectories"][()]), np.asarray(f["time"][()])
    where = f"{path}: "
    if values.ndim != 3 or values.shape[-1] != 2:
        raise UserError(where + f"'trajectories' must have shape (N, T, 2) (prey, predator); it has {values.shape}")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise UserError(where + f"'trajectories' is empty (shape {values.shape})")
    if time.ndim != 1 or len(time) != values.shape[1]:
        raise UserError(where + f"'time' must have shape ({values.shape[1]},) to match 'trajectories'; it has {time.shape}")
    if not np.issubdtype(values.dtype, np.number):
        raise UserError(where + f"'trajectories' must be numeric, not {values.dtype}")
    bad = ~np.isfinite(values)
    if bad.any():
        system, step, var = np.argwhere(bad)[0]
        raise UserError(where + f"'trajectories' has {int(bad.sum())} non-finite value(s) (NaN/inf), "
                        f"first at system {system}, step {step}, variable {var}")
    if (values < 0).any():
        system, step, var = np.argwhere(values < 0)[0]
        raise UserError(where + f"'trajectories' has {int((values < 0).sum())} negative population(s), "
                        f"first at system {system}, step {step}, variable {var}")
    if len(time) > 1 and not (np.diff(time) > 0).all():
        raise UserError(where + "'time' must be strictly increasing")
    return Trajectories(values.astype(np.float32), time.astype(np.float64), source=str(path))


def save_h5(traj: Trajectories, path: str | Path) -> None:
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("trajectories", data=traj.values.astype(np.float32))
            f.create_dataset("time", data=traj.time.astype(np.float64))


def load_trajectories(path: str | Path | None = None, n: int = 1000, seed: int = 0) -> Trajectories:
    """The file at `path`, or the built-in simulator's dataset when no file is given."""
    return load_h5(path) if path else simulate(n=n, seed=seed)


# ------------------------------------------------------------------------------------------ splits
def split_indices(n: int, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Train/validation/test system indices: a seeded permutation cut by `fractions` (whole systems,
    so no system's future leaks into training)."""
    if n < 3:
        raise UserError(f"need at least 3 systems to split into train/val/test, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = max(1, int(round(fractions[1] * n)))
    n_train = min(n_train, n - n_val - 1)
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}


def main(argv=None):
    p = argparse.ArgumentParser(description="Simulate Lotka–Volterra systems and write the coursework's HDF5 format.", allow_abbrev=False)
    p.add_argument("--out", required=True, help="where to write the .h5 file")
    p.add_argument("--n", type=int, default=1000, help="number of systems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100, help="timesteps per system")
    p.add_argument("--t-max", type=float, default=200.0)
    args = p.parse_args(argv)
    traj = simulate(args.n, args.seed, args.steps, args.t_max)
    save_h5(traj, args.out)
    v = traj.values
    print(f"wrote {args.out}: {v.shape[0]} systems x {v.shape[1]} steps; prey {v[..., 0].min():.3g}–{v[..., 0].max():.3g}, "
          f"predator {v[..., 1].min():.3g}–{v[..., 1].max():.3g}")


if __name__ == "__main__":
    run_cli(main)
