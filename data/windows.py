"""From texts to training windows and forecast prompts.

Training sees each system's text cut into windows of `context_length` tokens, overlapping by
`context_length - stride`. Windows never cross from one system into another; the last window of a
system is padded, and `real` marks which positions hold text so padding never reaches the loss.
Chat data (chat.py) makes windows of its own, with a loss mask and, packed, several conversations
per window. Both hand train.py one small thing, `TrainingData`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.cli import UserError

from .llmtime import STEP_SEP, Scaler, encode
from .lotka_volterra import split_indices


@dataclass
class TokenWindows:
    """Fixed-length rows of tokens and what the loss and attention must know about each position."""

    input_ids: torch.Tensor  # (N, L) long, padded with the tokenizer's pad id
    real: torch.Tensor  # (N, L) bool: True where the token is text, False where padding
    supervised: torch.Tensor | None = None  # (N, L) bool: tokens the loss learns to predict (None: every real one)
    segments: torch.Tensor | None = None  # (N, L) long: packed windows, which sequence a token belongs to (1, 2, ...; 0 pad)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: torch.Tensor, device) -> dict:
        """Rows `idx` as keyword arguments of model.loss.lm_loss_sum, on `device`."""
        pick = lambda t: None if t is None else t[idx].to(device)  # noqa: E731
        return {"input_ids": pick(self.input_ids), "real": pick(self.real), "supervised": pick(self.supervised),
                "segments": pick(self.segments)}

    def target_count(self, idx: torch.Tensor) -> int:
        """How many targets the loss has in rows `idx` (model.loss.target_mask)."""
        from model.loss import target_mask

        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return int(target_mask(self.real[idx], pick(self.supervised), pick(self.segments)).sum())

    def head(self, n: int) -> "TokenWindows":
        """The first n windows (validation uses a fixed prefix)."""
        cut = lambda t: None if t is None else t[:n]  # noqa: E731
        return TokenWindows(self.input_ids[:n], self.real[:n], cut(self.supervised), cut(self.segments))


@dataclass
class TrainingData:
    """What train.py needs from any kind of data (forecasting text or chat): token windows to train and
    validate on, `identity` (stored in config.json; resuming on data that gives another identity is
    refused, since the run would silently change), `info` (counts for config.json) and a summary line."""

    train: TokenWindows
    val: TokenWindows
    identity: dict
    info: dict
    summary: str


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


def forecasting_data(tok, trajectories, systems: int | None, seed: int, context_length: int, stride: int | None,
                     decimals: int) -> TrainingData:
    """LLMTIME windows of the train and validation systems, scaled by alpha fitted on train alone."""
    values = trajectories.values[:systems] if systems else trajectories.values
    split = split_indices(len(values), seed=seed)
    scaler = Scaler.fit(values[split["train"]])
    stride = stride or max(1, context_length // 2)
    step_tokens = len(tok.encode(trajectory_texts(values[:1, :1], scaler, decimals)[0] + STEP_SEP))
    if context_length <= step_tokens:
        raise UserError(f"--context-length {context_length} is shorter than one timestep "
                        f"({step_tokens} tokens at {decimals} decimals); use at least {step_tokens + 1}")
    windows = {name: make_windows(tok.encode_batch(trajectory_texts(values[split[name]], scaler, decimals)),
                                  context_length, stride, tok.pad_id) for name in ("train", "val")}
    if len(windows["train"]) == 0 or len(windows["val"]) == 0:
        raise UserError("no training or validation windows: the dataset is too small for this context length")
    info = {"source": trajectories.source, "systems": len(values), "timesteps": int(values.shape[1]),
            "split_sizes": {k: int(len(v)) for k, v in split.items()}, "stride": stride,
            "train_windows": len(windows["train"]), "val_windows": len(windows["val"]), "tokens_per_step": step_tokens}
    summary = (f"data: {trajectories.source}, {info['split_sizes']['train']} train / {info['split_sizes']['val']} val "
               f"/ {info['split_sizes']['test']} test systems, {info['train_windows']} training windows of {context_length} "
               f"tokens; scaling alpha {scaler.alpha:.4g}")
    return TrainingData(windows["train"], windows["val"], {"scaler": scaler.to_dict()}, info, summary)


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
