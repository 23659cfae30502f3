"""Next-token cross-entropy without materialising the full-vocabulary logits.

For Qwen2.5, logits for 4 x 512 tokens are 4 x 512 x 151,936 floats: 1.2 GB in fp32, and a naive
loss keeps several copies alive for the backward pass. Here the lm_head and the loss run in chunks
of rows, and because d(loss)/d(hidden) = (softmax(logits) - onehot(target)) @ W is cheap to form
while the chunk's logits are at hand, the gradient is computed in the same pass and kept (it is only
(N, D)). The backward then just scales it: the same FLOPs as the plain way, a fraction of the memory.
"""

from __future__ import annotations

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over rows of h (N, D), with W (V, D), computed `chunk` rows at a time."""

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
                    grad_w += (probs.T @ h).float()  # (V, n) @ (n, D)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def lm_loss_sum(model, input_ids: torch.Tensor, real: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over real targets, their count) for right-padded windows.

    Position t predicts token t+1; a target counts only where token t+1 is real text. Returning the
    sum lets the caller divide by the token count of the whole accumulated batch.
    """
    hidden = model.hidden_states(input_ids)  # (B, T, D)
    keep = real[:, 1:] & real[:, :-1]  # (B, T-1): a real token predicting a real token
    h = hidden[:, :-1][keep]  # (n, D): only rows that enter the loss
    y = input_ids[:, 1:][keep]  # (n,)
    if len(y) == 0:
        return hidden.sum() * 0.0, 0
    return ChunkedLinearCrossEntropy.apply(h, model.lm_head.weight, y, chunk), int(len(y))
