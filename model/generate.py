"""Generation with a static KV cache: prefill the prompts once, then one token per step.

Prompts of different lengths are left-padded into one batch; the cache keeps each row's padding out
of attention and its RoPE positions unshifted, so a row decodes exactly as it would alone.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .transformer import KVCache, Transformer


def process_logits(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, vocab_limit: int | None = None,
                   allowed_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) fp32 logits with every forbidden token at -inf.

    `vocab_limit` drops the embedding's padding rows (ids the tokenizer cannot decode); `allowed_ids`
    restricts sampling to a set (LLMTIME decoding allows only digits and separators).
    """
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if allowed_ids is not None:
        keep = torch.full_like(logits, float("-inf"))
        keep[:, allowed_ids] = 0.0
        logits = logits + keep
    if temperature > 0:
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # tokens entirely past the nucleus; keeps the top 1
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_ids: Sequence[int] = (), vocab_limit: int | None = None,
             allowed_ids: Sequence[int] | None = None, stop: Callable[[list[int]], bool] | None = None,
             generator: torch.Generator | None = None, pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None, stats: dict | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (end tokens not included).

    A row stops at any of `eos_ids`, when `stop(new_tokens)` says so, or after `max_new_tokens`.
    `on_token(row, token)` is called as tokens arrive (for streaming). `stats`, if given, receives the
    work done: {"batch", "prompt_len" (padded), "decode_steps"} (what flops.generation counts).
    """
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    B, T = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)  # left padding
        pad_mask[i, T - len(p):] = True
    ids, pad_mask = ids.to(device), pad_mask.to(device)
    allowed = torch.tensor(list(allowed_ids), device=device) if allowed_ids is not None else None
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)

    cache = KVCache(model.config, B, T + max_new_tokens, dtype, device)
    logits = model(ids, pad_mask=None if pad_mask.all() else pad_mask, cache=cache, last_only=True)[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if stats is not None:
        stats.update(batch=B, prompt_len=T, decode_steps=0)
    for step in range(max_new_tokens):
        logits = process_logits(logits, temperature, top_k, top_p, vocab_limit, allowed)
        token = sample_next(logits, temperature, generator)  # (B,)
        is_end = torch.isin(token, eos) & ~done
        for i in torch.nonzero(~done & ~is_end).flatten().tolist():
            out[i].append(int(token[i]))
            if on_token is not None:
                on_token(i, int(token[i]))
            if stop is not None and stop(out[i]):
                done[i] = True
        done |= is_end
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache, last_only=True)[:, -1]  # (B, V)
        if stats is not None:
            stats["decode_steps"] += 1
    return out
