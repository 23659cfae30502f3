"""Next-token cross-entropy: the plain definition, then the version training uses.

The definition, in five lines (`lm_loss_sum_reference`): full logits, then the sum of
F.cross_entropy over the positions whose next token is real text. Training uses `lm_loss_sum`, which
returns exactly that sum (tested to float precision, loss and gradients) without ever forming the
(B, T, V) logits: for Qwen2.5 at 4 x 512 tokens those are 4 x 512 x 151,936 floats, 1.2 GB in fp32,
and the plain backward keeps several copies alive. The lm_head and the loss run a chunk of rows at a
time; and because d(loss)/d(hidden) = (softmax(logits) - onehot(target)) @ W is cheap to form while
the chunk's logits are at hand, the gradient is computed in the same pass and kept (only (N, D)). The
backward then just scales it: the same FLOPs as the plain way, a fraction of the memory.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def target_mask(real: torch.Tensor, supervised: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) masks -> (B, T-1): position t predicts token t+1, and counts where t is real text and
    token t+1 is supervised (every real token when `supervised` is None: right padding neither
    predicts nor is predicted). In packed rows no target crosses into the next segment."""
    keep = real[:, :-1] & (real if supervised is None else supervised & real)[:, 1:]
    if segments is not None:
        keep = keep & (segments[:, 1:] == segments[:, :-1])
    return keep


def lm_loss_sum_reference(model, input_ids: torch.Tensor, real: torch.Tensor, supervised=None,
                          segments=None) -> tuple[torch.Tensor, int]:
    """The definition: (sum of next-token losses over the targets, their count), with full logits."""
    keep = target_mask(real, supervised, segments)  # (B, T-1)
    logits = model(input_ids, segments=segments)[:, :-1]  # (B, T-1, V)
    loss = F.cross_entropy(logits[keep].float(), input_ids[:, 1:][keep], reduction="sum")
    return loss, int(keep.sum())


def lm_loss_sum(model, input_ids: torch.Tensor, real: torch.Tensor, chunk: int = 512, supervised=None,
                segments=None) -> tuple[torch.Tensor, int]:
    """Equal to `lm_loss_sum_reference`, computed `chunk` rows of logits at a time.

    Returning the sum (not the mean) lets the caller divide by the token count of a whole accumulated
    batch.
    """
    hidden = model.hidden_states(input_ids, segments=segments)  # (B, T, D)
    keep = target_mask(real, supervised, segments)  # (B, T-1)
    h = hidden[:, :-1][keep]  # (n, D): only rows that enter the loss
    y = input_ids[:, 1:][keep]  # (n,)
    if len(y) == 0:
        return hidden.sum() * 0.0, 0
    return ChunkedLinearCrossEntropy.apply(h, model.lm_head.weight, y, chunk), int(len(y))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over rows of h (N, D), with W (V, D), computed `chunk` rows at a time.

    W's gradient is formed only when W trains (full fine-tuning; LoRA keeps lm_head frozen).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], targets[s : s + chunk]
            logits = (h @ weight.T).float()  # (n, V)
            target_logit = logits.gather(1, y[:, None]).squeeze(1)  # (n,)
            # a stable log-sum-exp written in place: no (n, V) temporaries beyond the logits themselves
            peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            sums = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)  # logits now hold exp(l - max)
            lse = (peak + sums.log()).squeeze(1)  # (n,)
            total += (lse - target_logit).sum()
            if need_h or need_w:
                probs = logits.div_(sums)  # softmax, in place
                probs[torch.arange(len(y), device=y.device), y] -= 1.0  # d CE / d logits
                probs = probs.to(weight.dtype)
                if need_h:
                    grad_h[s : s + chunk] = probs @ weight  # (n, V) @ (V, D) -> (n, D)
                if need_w:
                    grad_w += (probs.T @ h).float()  # (V, n) @ (n, D) -> (V, D)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


@torch.no_grad()
def mean_loss(model, windows, batch_size: int, chunk: int = 512, autocast=contextlib.nullcontext) -> float:
    """Mean next-token loss per target over `windows` (data.TokenWindows), in batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(windows), batch_size):
        with autocast():
            loss_sum, n = lm_loss_sum(model, chunk=chunk, **windows.batch(torch.arange(s, min(s + batch_size, len(windows))), device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)
