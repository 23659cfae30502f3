"""Qwen2 / Llama decoder in plain PyTorch, top to bottom: RMSNorm -> RoPE -> attention -> MLP -> block -> model.

Module and parameter names mirror the Hugging Face checkpoint (`model.layers.0.self_attn.q_proj.weight`,
...), so loading a checkpoint is a name-for-name copy and a PEFT adapter's keys are ours with a prefix.
Numerics follow transformers' Qwen2ForCausalLM op for op (fp32 RMSNorm statistics, fp32 RoPE angles,
rotate-half layout, fp32 softmax), so logits agree to float precision.

Shapes: B batch, T new tokens, L keys visible (cache + new), D hidden, H query heads, K key/value
heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 and the result cast back before the weight
    (the order matters in bf16: it is what the checkpoints were trained with)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------------------------- RoPE
# Rotary position embedding: each pair of coordinates (i, i + hd/2) of a query or key at position m is
# rotated by the angle m * theta^(-2i/hd). A rotation keeps lengths and turns dot products into
# functions of the angle *difference*, so q_m . k_n depends on the positions only through m - n: the
# model sees how far apart two tokens are, never where they are. theta (1e6 in Qwen2.5, from
# config.json) sets the slowest frequency, and with it how far apart positions stay distinguishable.
def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), built exactly as transformers builds them (in fp32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """Angles in fp32 (bf16 positions would be wrong past 256), then cast: (B, T) -> 2 x (B, 1, T, hd)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): rotate-half layout, not interleaved pairs
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the head dim: HF's layout, pairs (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # (B, heads, T, hd)


# ------------------------------------------------------------------------------------------ KV cache
class KVCache:
    """A static cache (as in gpt-fast): keys and values preallocated for `max_len` positions per layer.

    It also remembers, per row, which cached positions hold real tokens (left padding does not) and
    the next RoPE position of each row, so a left-padded batch decodes exactly like its rows alone.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)  # (B, K, L_max, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, L_max)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.length = 0  # positions filled so far (the same for every row)

    def add_tokens(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Book T new tokens (`real` (B, T): False for left padding) before the layers write them.

        Returns their RoPE positions (B, T), which continue each row's own count, and which of all
        keys so far are real (B, L = length + T).
        """
        start, T = self.length, real.shape[1]
        self.key_valid[:, start : start + T] = real
        positions = rope_positions(real, offset=self.next_pos[:, None])
        self.next_pos += real.long().sum(1)
        self.length = start + T
        return positions, self.key_valid[:, : start + T]

    def repeat_rows(self, n: int) -> None:
        """Each row becomes n consecutive copies (row i -> rows i*n ... i*n + n - 1): one prefill, then
        n continuations that decode independently from the same prompt."""
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]  # (B * n, K, L_max, hd)
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        self.key_valid = self.key_valid.repeat_interleave(n, dim=0)  # (B * n, L_max)
        self.next_pos = self.next_pos.repeat_interleave(n, dim=0)  # (B * n,)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write this chunk's keys/values at [start, start + T) and return all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, K, L, hd)


# ------------------------------------------------------------------------------------------ attention
class Attention(nn.Module):
    r"""Grouped-query attention: K key/value heads, each serving H/K *consecutive* query heads.

    Qwen2.5-0.5B has H = 14 query heads and K = 2 key/value heads, so groups of 7:

        query heads   q0 q1 q2 q3 q4 q5 q6   q7 q8 q9 q10 q11 q12 q13
                      \_________ _________/   \___________ ___________/
                                v                           v
        kv heads               kv0                         kv1

    Query head h reads key/value head h // 7 (not h % 2): that is how the checkpoint's k_proj and
    v_proj rows are laid out, and the same in both paths below. `impl="matmul"` spells attention
    out, softmax(q k^T / sqrt(hd)) v, copying each KV head 7 times with repeat_interleave (for
    reading and for FLOP counting); `impl="sdpa"` calls torch's fused kernel with `enable_gqa=True`,
    which does the same indexing without the copies. The two are tested equal.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_proj_bias)  # none in Qwen2
        self.impl = "sdpa"

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, K, L, hd)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        else:
            y = self._matmul_attention(q, k, v, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)

    def _matmul_attention(self, q, k, v, mask, is_causal):
        groups = self.n_heads // self.n_kv
        k = k.repeat_interleave(groups, dim=1)  # (B, H, L, hd): query head h reads kv head h // groups
        v = v.repeat_interleave(groups, dim=1)  # (B, H, L, hd)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5  # (B, H, T, L)
        if is_causal:
            T, L = scores.shape[-2:]
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, L)
        return torch.matmul(probs, v)  # (B, H, T, hd)


# ------------------------------------------------------------------------------------------------ MLP
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
        if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
            return self.down_proj(F.silu(gate) * up)  # the definition: (B, T, D)
        # training: the same values and gradients, one (B, T, I) activation fewer kept for the backward
        return self.down_proj(SwiGLUWithoutStoredSilu.apply(gate, up))  # (B, T, D)


class SwiGLUWithoutStoredSilu(torch.autograd.Function):
    """silu(gate) * up, equal to the plain expression in value and gradient, keeping only `gate` and
    `up` for the backward pass.

    Plain autograd also keeps silu(gate), a third (B, T, I) tensor per layer: for Qwen2.5-0.5B at
    4 x 512 tokens, 40 MB x 24 layers. Here it is recomputed in the backward, a few elementwise ops.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # in place: one (B, T, I) temporary fewer per layer

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        # torch's fused kernel for (grad * up) * silu'(gate): one pass instead of six temporaries
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


# ---------------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------- model
class Decoder(nn.Module):
    """The stack HF calls `model`: embeddings, blocks, final norm (named so the checkpoint keys match)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """The causal language model: `forward(input_ids) -> logits (B, T, V)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # per device; a plain attribute, so
        self.grad_checkpoint = False  # model.to(bfloat16) cannot round the RoPE frequencies
        self.tie_weights()

    def tie_weights(self):
        """Tied embeddings are one shared Parameter, so the checkpoint carries no `lm_head.weight`."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def inv_freq(self, device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config.head_dim, self.config.rope_theta).to(device)
        return self._inv_freq[device]

    def compile_blocks(self):
        """torch.compile each block in place, keeping its names and state dict: the compiler fuses the
        elementwise work between the matmuls (norms, RoPE, SwiGLU, residuals, LoRA scaling). The blocks
        share one compiled graph, so the cost is one compilation, not one per layer."""
        for block in self.model.layers:
            block.compile()

    def set_attention(self, impl: str):
        assert impl in ("sdpa", "matmul"), impl
        for block in self.model.layers:
            block.self_attn.impl = impl

    def hidden_states(self, input_ids, pad_mask=None, cache: KVCache | None = None, segments=None):
        """Final-norm hidden states (B, T, D); the loss applies lm_head itself, in chunks.

        pad_mask (B, T) marks real tokens (True) among left padding; with a cache, the chunk is written
        after `cache.length` positions and attends to everything before it. segments (B, T) packs
        several sequences in a row (training only): each sees only itself, from position 0.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if segments is not None:
            positions, mask, is_causal = segment_positions(segments), segment_mask(segments), False
        elif cache is None and pad_mask is None:  # training and scoring: every token real, plain causal
            positions, mask, is_causal = torch.arange(T, device=input_ids.device).expand(B, T), None, True
        else:
            real = pad_mask if pad_mask is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            positions, key_valid = cache.add_tokens(real) if cache is not None else (rope_positions(real), real)
            mask, is_causal = attention_mask(key_valid, start)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(positions, self.inv_freq(x.device), x.dtype)  # (B, 1, T, hd) each
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, cache, i, start)
        return self.model.norm(x)

    def forward(self, input_ids, pad_mask=None, cache: KVCache | None = None, last_only: bool = False, segments=None):
        h = self.hidden_states(input_ids, pad_mask, cache, segments)
        if last_only:  # generation needs one row of logits, not (B, T, V)
            h = h[:, -1:]
        return self.lm_head(h)  # (B, T, V)


# -------------------------------------------------------------------------------- positions and masks
def rope_positions(real: torch.Tensor, offset=0) -> torch.Tensor:
    """RoPE position of each token (B, T): a row's count of real tokens so far, so left padding does
    not shift the positions of the text after it (a padded row then matches the row alone)."""
    return (offset + real.long().cumsum(1) - 1).clamp(min=0)


def attention_mask(key_valid: torch.Tensor, start: int) -> tuple[torch.Tensor | None, bool]:
    """(mask (B, 1, T, L) or None, is_causal) for T = L - start queries over L keys.

    key_valid (B, L) says which keys are real tokens; query j sits at absolute index start + j. A query
    attends to key i when i <= its index (causal) and key i is real. Worked example: T = 3 new tokens
    after L = 2 cached (start = 2), and row 0 began with one left pad (key 0):

                        key 0 (pad)   key 1   key 2   key 3   key 4
        query 2 (j=0)        .          x       x       .       .
        query 3 (j=1)        .          x       x       x       .
        query 4 (j=2)        .          x       x       x       x

    A padding query would see nothing at all, and a softmax over nothing is NaN; it is let see
    itself (its output is never used). With no padding anywhere, no mask is needed: from start = 0
    it is SDPA's own causal mode, and one new token (T = 1) sees every key. SDPA's `is_causal`
    aligns its triangle to the top-left corner, which is wrong once a cache offsets the queries
    (start > 0, T > 1): that case always gets the explicit mask.
    """
    L = key_valid.shape[1]
    T = L - start
    if bool(key_valid.all()) and (start == 0 or T == 1):
        return None, start == 0
    q_idx = torch.arange(start, L, device=key_valid.device)[:, None]  # (T, 1) absolute query index
    k_idx = torch.arange(L, device=key_valid.device)[None, :]  # (1, L)
    mask = ((k_idx <= q_idx) & key_valid[:, None, :]) | (k_idx == q_idx)  # (B, T, L)
    return mask[:, None], False  # (B, 1, T, L)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, T) of packed rows: counting restarts at 0 where the segment id changes.

        segments   1 1 1 2 2 3 3 3 0 0
        positions  0 1 2 0 1 0 1 2 0 1
    """
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    starts_here = torch.ones_like(segments, dtype=torch.bool)
    starts_here[:, 1:] = segments[:, 1:] != segments[:, :-1]
    segment_start = torch.where(starts_here, index, 0).cummax(dim=1).values  # (B, T) index where each run began
    return index - segment_start


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) attention mask of packed rows: causal, and only within the query's own segment
    (block-diagonal). Padding (segment 0) attends among itself and its output is never used."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)
