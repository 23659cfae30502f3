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


def sample_next(logits: torch.Tensor, temperature: float,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) indices; temperature 0 is greedy.

    `generator` may be a list with one generator per row: each row then draws by inverting its CDF
    with a uniform number from its own stream, so what a row samples depends on its own seed alone,
    not on which batch (or process) it ran in."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generator])  # (B,) in [0, 1)
    cdf = probs.cumsum(-1)  # (B, V)
    # the first index whose CDF exceeds u (right=True never lands on a token of probability 0)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (B,)
    return index.clamp(max=probs.shape[-1] - 1)


class LogitSpace:
    """The space the next token is chosen in, one of two.

    Plain: lm_head over the whole vocabulary. The logits are (B, V), indexed by token id; tokens that
    may not be chosen (the embedding's padding rows past `vocab_limit`, anything outside `allowed`) are
    set to -inf by `process_logits`, and the chosen index is the token id.

    Allowed only: when decoding is constrained to a few tokens (LLMTIME's 15 of Qwen2.5's 151,936) and
    lm_head is a plain Linear, only the allowed tokens' rows of lm_head are computed. The logits are
    (B, A), indexed by position in `allowed`, so a chosen position becomes a token id through
    `allowed[position]`. This skips the rest of the vocabulary, a quarter of Qwen2.5-0.5B's work per
    token, and samples the very same distribution: a softmax over the allowed logits is the
    renormalised full one (tests/test_eval.py checks both spaces choose the same tokens).
    """

    def __init__(self, model: Transformer, allowed: torch.Tensor | None, vocab_limit: int | None,
                 cut_head: bool = True):
        """`allowed`: (A,) token ids, or None for any token. `cut_head=False` keeps the plain space even
        where lm_head could be cut (tests compare the two)."""
        self.allowed, self.vocab_limit = allowed, vocab_limit
        head = model.lm_head
        self.head_rows = None  # lm_head's allowed rows, (weight (A, D), bias (A,) or None), in the second space
        if cut_head and allowed is not None and type(head) is torch.nn.Linear:
            self.head_rows = head.weight[allowed], None if head.bias is None else head.bias[allowed]

    @property
    def allowed_only(self) -> bool:
        return self.head_rows is not None

    def next_logits(self, model: Transformer, ids, pad_mask, cache) -> torch.Tensor:
        """Logits of the next token: (B, V) by token id, or (B, A) by position in `allowed`."""
        if not self.allowed_only:
            return model(ids, pad_mask=pad_mask, cache=cache, last_only=True)[:, -1]  # (B, V)
        h = model.hidden_states(ids, pad_mask, cache)[:, -1]  # (B, D)
        return torch.nn.functional.linear(h, *self.head_rows).float()  # (B, D) @ (D, A) -> (B, A)

    def choose(self, logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator) -> torch.Tensor:
        """(B,) token ids chosen from `next_logits`' output: the plain step first, then the cut one."""
        if not self.allowed_only:
            logits = process_logits(logits, temperature, top_k, top_p, self.vocab_limit, self.allowed)
            return sample_next(logits, temperature, generator)  # indices are token ids
        position = sample_next(process_logits(logits, temperature, top_k, top_p), temperature, generator)
        return self.allowed[position]  # positions in `allowed` -> token ids


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one (B, T) batch, padded on the left so that every row's last
    token is at T - 1; and the (B, T) mask of real tokens."""
    B, T = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pad_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        pad_mask[i, T - len(p):] = True
    return ids.to(device), pad_mask.to(device)


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             samples: int = 1, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_ids: Sequence[int] = (), vocab_limit: int | None = None,
             allowed_ids: Sequence[int] | None = None, stop: Callable[[list[int]], bool] | None = None,
             generator: torch.Generator | Sequence[torch.Generator] | None = None, pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None, stats: dict | None = None) -> list[list[int]]:
    """Continue each prompt `samples` times; returns the new tokens per row (end tokens not included),
    rows prompt-major: prompt i's samples are rows i * samples ... (i + 1) * samples - 1.

    Each prompt is prefilled once and its cache copied to its samples, which then decode as
    independent rows. A row stops at any of `eos_ids`, when `stop(new_tokens)` says so, or after
    `max_new_tokens`. `generator`: one for the batch, or one per row (see `sample_next`).
    `on_token(row, token)` is called as tokens arrive (for streaming). `stats`, if given, receives the
    work done, flops.generation's arguments: {"batch", "prompt_len" (padded), "decode_steps",
    "samples", "head_vocab" (lm_head rows computed per token)}.
    """
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    ids, pad_mask = left_padded(prompts, pad_id, device)  # (B, T) each
    (B, T), rows = ids.shape, len(prompts) * samples
    allowed = torch.tensor(list(allowed_ids), device=device) if allowed_ids is not None else None
    space = LogitSpace(model, allowed, vocab_limit)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)

    cache = KVCache(model.config, B, T + max_new_tokens, dtype, device)
    logits = space.next_logits(model, ids, None if pad_mask.all() else pad_mask, cache)  # (B, V or A)
    if samples > 1:  # every sample starts from its prompt's cache and logits
        cache.repeat_rows(samples)
        logits = logits.repeat_interleave(samples, dim=0)  # (B * samples, V or A)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    if stats is not None:
        stats.update(batch=B, prompt_len=T, decode_steps=0, samples=samples,
                     head_vocab=len(allowed) if space.allowed_only else 0)
    for step in range(max_new_tokens):
        token = space.choose(logits, temperature, top_k, top_p, generator)  # (rows,) token ids
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
        logits = space.next_logits(model, token[:, None], None, cache)  # (rows, V or A)
        if stats is not None:
            stats["decode_steps"] += 1
    return out
