"""AdamW and the learning-rate schedule, written out.

AdamW (Loshchilov & Hutter), per parameter p with gradient g at step t = 1, 2, ...:

    p <- p - lr * wd * p                       decoupled weight decay: multiplied by lr, not added to g
    m <- b1 * m + (1 - b1) * g                 first moment
    v <- b2 * v + (1 - b2) * g^2               second moment
    m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)      bias corrections
    p <- p - lr * m_hat / (sqrt(v_hat) + eps)  eps outside the square root

This matches `torch.optim.AdamW` step for step. `lr_scale` ({name: factor}) gives some parameters
lr·factor, as a torch parameter group with its own lr would (LoRA+: lora/loraplus.py). The state is
plain tensors keyed by parameter name, so a checkpoint is a dict of tensors and resuming is exact.
"""

from __future__ import annotations

import math

import torch


class AdamW:
    def __init__(self, params: dict[str, torch.nn.Parameter], lr: float = 1e-4, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, lr_scale: dict[str, float] | None = None):
        self.params = dict(params)
        self.lr_scale = dict(lr_scale or {})
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.step_count = 0
        self.m = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in self.params.items()}

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.step_count += 1
        t = self.step_count
        bias1, bias2 = 1 - b1**t, 1 - b2**t
        for name, p in self.params.items():
            if p.grad is None:
                continue
            g, m, v = p.grad, self.m[name], self.v[name]
            lr_p = lr * self.lr_scale[name] if name in self.lr_scale else lr
            if self.weight_decay:
                p.mul_(1 - lr_p * self.weight_decay)
            m.lerp_(g, 1 - b1)  # m = b1 m + (1 - b1) g
            v.mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1 - b2) g^2
            denom = (v / bias2).sqrt_().add_(self.eps)  # sqrt(v_hat) + eps
            p.addcdiv_(m, denom, value=-lr_p / bias1)  # p -= lr * m_hat / denom

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict:
        return {"step": self.step_count, "m": {n: t.clone() for n, t in self.m.items()},
                "v": {n: t.clone() for n, t in self.v.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        for name in self.params:
            self.m[name].copy_(state["m"][name])
            self.v[name].copy_(state["v"][name])


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm` (0 disables); return the norm
    before clipping, which is the number worth watching."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return float(norm)


def lr_at(step: int, base_lr: float, total_steps: int, warmup: int = 0, schedule: str = "constant",
          min_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then constant, cosine or linear
    decay to `min_ratio * base_lr` at `total_steps`. A pure function, so resuming needs no state."""
    if warmup > 0 and step <= warmup:
        return base_lr * step / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return base_lr * (min_ratio + (1 - min_ratio) * factor)
