"""From texts to training windows and forecast prompts.

Training sees each system's text cut into windows of `context_length` tokens, overlapping by
`context_length - stride`. Windows never cross from one system into another; the last window of a
system is padded, and `real` marks which positions hold text so padding never reaches the loss.
Any text source (LLMTIME trajectories, or instruction data later) can feed `make_windows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common import UserError

from .llmtime import STEP_SEP, Scaler, encode


@dataclass
class TokenWindows:
    input_ids: torch.Tensor  # (N, L) long, padded with the tokenizer's pad id
    real: torch.Tensor  # (N, L) bool: True where the token is text, False where padding

    def __len__(self) -> int:
        return len(self.input_ids)


def window_starts(n_tokens: int, context_length: int, stride: int) -> list[int]:
    """Start offsets so that every token is covered and the last window reaches the end."""
    return list(range(0, max(n_tokens - context_length, 0) + stride, stride)) if n_tokens else []


def make_windows(token_lists: list[list[int]], context_length: int, stride: int, pad_id: int) -> TokenWindows:
    rows, reals = [], []
    for tokens in token_lists:
        for s in window_starts(len(tokens), context_length, stride):
            chunk = tokens[s : s + context_length]
            if len(chunk) < 2:  # nothing to predict
                continue
            rows.append(chunk + [pad_id] * (context_length - len(chunk)))
            reals.append([True] * len(chunk) + [False] * (context_length - len(chunk)))
    if not rows:
        return TokenWindows(torch.zeros(0, context_length, dtype=torch.long), torch.zeros(0, context_length, dtype=torch.bool))
    return TokenWindows(torch.tensor(rows, dtype=torch.long), torch.tensor(reals, dtype=torch.bool))


def trajectory_texts(values: np.ndarray, scaler: Scaler, decimals: int) -> list[str]:
    """(N, T, 2) populations -> one LLMTIME text per system."""
    return [encode(scaler.scale(v), decimals) for v in values]


@dataclass
class ForecastTask:
    prompts: list[str]  # the first K steps as text, ending with ';' so the model writes step K+1 next
    context: np.ndarray  # (N, K, 2) the same K steps as numbers, original units
    target: np.ndarray  # (N, H, 2) the true next H steps, original units


def forecast_task(values: np.ndarray, scaler: Scaler, decimals: int, context_steps: int, horizon: int) -> ForecastTask:
    if context_steps < 1 or horizon < 1 or context_steps + horizon > values.shape[1]:
        raise UserError(f"context steps ({context_steps}) + horizon ({horizon}) must fit in the "
                        f"{values.shape[1]} timesteps of each system, each at least 1")
    context = values[:, :context_steps]
    prompts = [encode(scaler.scale(c), decimals) + STEP_SEP for c in context]
    return ForecastTask(prompts, context.astype(np.float64), values[:, context_steps:context_steps + horizon].astype(np.float64))
