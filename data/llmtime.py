"""The LLMTIME text scheme: numbers as text a language model can continue.

A trajectory (T, 2) becomes `0.25,1.50;0.27,1.47;0.31,1.42`: each value with a fixed number of
decimals, the two variables joined by `,`, timesteps by `;`, no spaces. Qwen2.5 tokenizes every digit
separately, so `1.50` is four tokens and a value below 10 costs 4 tokens at 2 decimals.

Scaling. Values are divided by one scalar `alpha` for the whole dataset, fitted on the training
split only: alpha = (99th percentile of all training values, prey and predator together) / 10.
So 99% of training values land in [0, 10] (one integer digit), and what the model reads is
in the same units for every system. The rule and alpha are stored with every run and reused at
evaluation, and `Scaler.unscale` maps model output back to populations.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

STEP_SEP, VAR_SEP = ";", ","
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_PARTIAL = re.compile(r"-?\d*(\.\d*)?")  # a number that may have been cut off anywhere


@dataclass(frozen=True)
class Scaler:
    alpha: float
    percentile: float = 99.0
    target: float = 10.0

    @classmethod
    def fit(cls, train_values: np.ndarray, percentile: float = 99.0, target: float = 10.0) -> "Scaler":
        q = float(np.percentile(np.asarray(train_values, dtype=np.float64), percentile))
        return cls(alpha=q / target if q > 0 else 1.0, percentile=percentile, target=target)

    def scale(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) / self.alpha

    def unscale(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * self.alpha

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "percentile": self.percentile, "target": self.target}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(float(d["alpha"]), float(d.get("percentile", 99.0)), float(d.get("target", 10.0)))


def encode(values: np.ndarray, decimals: int = 2) -> str:
    """(T, n_vars) scaled values -> `a,b;c,d;...` (no trailing separator)."""
    values = np.round(np.asarray(values, dtype=np.float64), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    fmt = f"{{:.{decimals}f}}"
    return STEP_SEP.join(VAR_SEP.join(fmt.format(v) for v in step) for step in values)


@dataclass
class Decoded:
    """What could be read from model output.

    `values` (n, n_vars) are the well-formed timesteps in order; `first_bad` is the index (among all
    timesteps) of the first malformed one, so callers can keep only the aligned prefix; `problems`
    counts each kind: 'empty', 'fields' (wrong count), 'non-numeric', 'truncated' (the final step
    stopped mid-value).
    """

    values: np.ndarray
    problems: Counter = field(default_factory=Counter)
    first_bad: int | None = None

    @property
    def malformed(self) -> int:
        return sum(self.problems.values())

    @property
    def aligned(self) -> np.ndarray:
        """The timesteps before the first malformed one: those whose position in time is certain."""
        return self.values if self.first_bad is None else self.values[: self.first_bad]


def decode(text: str, n_vars: int = 2, decimals: int | None = None) -> Decoded:
    """Parse arbitrary text as LLMTIME timesteps; never raises.

    A final step without its `;` is kept when it is complete; with `decimals` given, a final value
    with fewer decimals than that is counted as truncated (generation stopped mid-number).
    """
    parts = text.split(STEP_SEP)
    terminated = parts[-1] == ""
    if terminated:
        parts = parts[:-1]
    rows, problems, first_bad = [], Counter(), None
    for i, part in enumerate(parts):
        fields = part.split(VAR_SEP)
        if part.strip() == "":
            problem = "empty"
        elif i == len(parts) - 1 and not terminated and _cut_short(fields, n_vars, decimals):
            problem = "truncated"
        elif len(fields) != n_vars:
            problem = "fields"
        elif not all(_NUMBER.fullmatch(f) for f in fields):
            problem = "non-numeric"
        else:
            problem = None
        if problem:
            problems[problem] += 1
            first_bad = len(rows) if first_bad is None else first_bad
            continue
        rows.append([float(f) for f in fields])
    values = np.array(rows, dtype=np.float64).reshape(len(rows), n_vars)
    return Decoded(values, problems, first_bad)


def _cut_short(fields: list[str], n_vars: int, decimals: int | None) -> bool:
    """Is this unterminated final step the beginning of a valid one (text that stopped mid-step)?"""
    *done, last = fields
    if len(fields) > n_vars or not all(_NUMBER.fullmatch(f) for f in done) or not _PARTIAL.fullmatch(last):
        return False
    incomplete_value = not _NUMBER.fullmatch(last) or (decimals is not None and len(last.partition(".")[2]) < decimals)
    return len(fields) < n_vars or incomplete_value
