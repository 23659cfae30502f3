"""4-bit NormalFloat (NF4) weights, as QLoRA defines them and bitsandbytes stores them, in plain PyTorch.

Why a normal-quantile code book. Trained weights are close to normally distributed. With 16 levels,
the levels that waste the fewest of their 4 bits are the ones each taking an equal share of a normal
distribution's probability mass: dense near zero, where most weights are, sparse in the tails. NF4
is those 16 quantiles (made asymmetric so that 0 is exactly representable), scaled to [-1, 1].

Why blocks. One scale for a whole matrix would let a single large weight stretch the grid for all the
others. Each block of 64 consecutive weights gets its own scale, its absolute maximum (absmax), and is
divided by it before rounding to the nearest code: an outlier costs precision only in its own block.
The price is one fp32 absmax per 64 weights: 4 + 32/64 = 4.5 bits per weight.

Why double quantization. Those absmax values are themselves quantized: minus their mean, in blocks of
256, to bitsandbytes' signed 8-bit dynamic code, with one fp32 scale per 256 blocks. That brings the
scales to 8/64 + 32/(64*256) bits per weight: 4.127 bits in all instead of 4.5 (Qwen2.5-0.5B's 358M
linear weights: 185 MB instead of 716 MB in bf16).

Bit for bit as bitsandbytes 0.50 does it on CPU (tests/test_nf4.py compares with it): absmax in fp32,
values multiplied by its reciprocal and clamped to [-1, 1], the code chosen by the midpoints between
neighbouring codes (a value exactly on a midpoint takes the lower code), two codes per byte with the
first element in the high nibble; a size that is not a multiple of 64 gets a shorter last block, an
odd one a zero code to fill its last byte. bitsandbytes' C++ CPU kernel rounds the 8-bit absmax stage
through a table of 65,536 evenly spaced points of [-1, 1]; `quantize_blockwise_8bit` does the same,
so the codes agree there too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# bitsandbytes' get_4bit_type("nf4"): normal quantiles (create_normal_map(offset=0.9677083)), sorted
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# every byte's two values, high nibble first: one lookup per byte instead of a shift, a mask and two lookups
NF4_PAIRS = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 0xF]], dim=1)  # (256, 2)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,): a value above midpoint i takes code i + 1 or more
ABSMAX_BLOCK = 256  # blocks of absmax values per fp32 scale in double quantization
LUT_SIZE = 65536  # bitsandbytes' CPU rounding table for 8-bit codes
CODE_CHUNK = 1 << 16  # values rounded at a time on the CPU: the passes over them stay in the cache


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True): 256 sorted values in [-1, 1], a sign, a decimal
    exponent (0 to -6) and a shrinking linear fraction: fine steps near 0, coarse ones near 1."""
    data = []
    for i in range(7):  # max_exponent_bits = 7, non_sign_bits = 7: one extra fraction bit per exponent
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def grid_codes_8bit() -> torch.Tensor:
    """bitsandbytes' CPU rounding table: for each of 65,536 evenly spaced points of [-1, 1], the index of
    the nearest code of the dynamic map (int64, (65536,))."""
    code = dynamic_map_8bit()
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted((code[:-1] + code[1:]) * 0.5, grid, side="left")


def nf4_code_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Rounding to NF4 by table instead of search: (base, cut), each indexed by a float32's top 16 bits
    (sign, exponent, 7 mantissa bits) plus 32,768, i.e. by the arithmetic shift `bits >> 16` moved to 0.

    The floats sharing their top 16 bits form one interval [lo, hi] of values. `base` is the code of
    lo, i.e. how many midpoints lie below it; `cut` is the one midpoint inside [lo, hi] (at most one
    is: neighbouring midpoints are over 0.04 apart, an interval in [-1, 1] at most 2^-7 wide), +inf
    where there is none. So a value's code is base + (value > cut): the search's answer exactly, ties
    (value == midpoint) included, and NaN too (all its intervals get base 15, as the search gives)."""
    top = (torch.arange(LUT_SIZE, dtype=torch.int64) - LUT_SIZE // 2) & 0xFFFF  # table row -> top 16 bits
    ends = [((top << 16) | low).to(torch.int32).view(torch.float32) for low in (0, 0xFFFF)]
    lo, hi = torch.minimum(*ends), torch.maximum(*ends)  # a negative float grows more negative with its low bits
    inside = (NF4_MIDPOINTS >= lo[:, None]) & (NF4_MIDPOINTS <= hi[:, None])  # (65536, 15)
    assert int(inside.sum(dim=1).max()) <= 1
    base = torch.bucketize(lo, NF4_MIDPOINTS).to(torch.uint8)
    cut = torch.where(inside.any(dim=1), (NF4_MIDPOINTS * inside).sum(dim=1), torch.tensor(float("inf")))
    return base, cut


_BUILDERS = {"nf4_pairs": lambda: NF4_PAIRS, "nf4_midpoints": lambda: NF4_MIDPOINTS,
             "dynamic_map_8bit": dynamic_map_8bit, "grid_codes_8bit": grid_codes_8bit,
             "nf4_base": lambda: nf4_code_tables()[0], "nf4_cut": lambda: nf4_code_tables()[1]}
_ON_DEVICE: dict = {}  # (name, device) -> table


def on_device(name: str, device: torch.device) -> torch.Tensor:
    """One of the constant tables above on `device`, built (and copied there) once per process and
    device. Built per call, the 8-bit code book cost ~170 us of Python in every dequantization (~58 ms
    a step at Qwen2.5-0.5B's shape) and each table a host-to-device copy, which on CUDA, from pageable
    memory, can stall the stream."""
    key = (name, torch.device(device))
    table = _ON_DEVICE.get(key)
    if table is None:
        table = _ON_DEVICE[key] = _BUILDERS[name]().to(device)
    return table


def nf4_codes_by_search(scaled: torch.Tensor) -> torch.Tensor:
    """The plain rule: each value's code is the number of midpoints below it (uint8)."""
    return torch.bucketize(scaled, on_device("nf4_midpoints", scaled.device)).to(torch.uint8)


def nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """The same codes as `nf4_codes_by_search`, by two table lookups and a comparison (nf4_code_tables),
    a chunk at a time on the CPU: ~7x faster than the search, which made loading Qwen2.5-0.5B with NF4
    take seconds."""
    base, cut = on_device("nf4_base", scaled.device), on_device("nf4_cut", scaled.device)
    flat = scaled.reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    chunk = CODE_CHUNK if flat.device.type == "cpu" else max(flat.numel(), 1)
    for start in range(0, flat.numel(), chunk):
        x = flat[start : start + chunk]
        row = (x.view(torch.int32) >> 16).add_(LUT_SIZE // 2)  # (chunk,) int32: the top 16 bits, from 0
        codes[start : start + chunk] = base.index_select(0, row) + (x > cut.index_select(0, row))
    return codes.view(scaled.shape)


def _block_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 absolute maximum of each block of `block` values; the last block may be shorter (padded with
    zeros only then: F.pad copies even when it adds nothing, on a slow path, ~10x the reduction itself)."""
    short = -flat.numel() % block
    return (F.pad(flat.abs(), (0, short)) if short else flat.abs()).view(-1, block).amax(dim=1)  # (blocks,)


def _scale_by_block(flat: torch.Tensor, absmax: torch.Tensor, block: int, divide_last: bool) -> torch.Tensor:
    """Each value times the reciprocal of its block's absmax, clamped to [-1, 1]. bitsandbytes' Python
    kernel (the 4-bit one) divides instead in a shorter last block: `divide_last` does the same, since
    x / a and x * (1 / a) can differ in the last bit, and a code with them."""
    n, safe = flat.numel(), absmax.clamp(min=1e-38)
    full = n - n % block
    scaled = (flat[:full].view(-1, block) * (1.0 / safe[: full // block])[:, None]).reshape(-1)
    if full < n:
        last = flat[full:] / safe[-1] if divide_last else flat[full:] * (1.0 / safe[-1])
        scaled = torch.cat([scaled, last])
    return scaled.clamp_(-1, 1)


def _unscale_by_block_(values: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """values (n,) times their block's absmax, in place."""
    n = values.numel()
    full = n - n % block
    values[:full].view(-1, block).mul_(absmax[: full // block, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


def quantize_blockwise_8bit(x: torch.Tensor, block: int = ABSMAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of the dynamic map, fp32 absmax per block), rounded as bitsandbytes' CPU kernel rounds:
    a value's index in a 65,536-point grid of [-1, 1], then that grid point's nearest code."""
    flat = x.float().reshape(-1)
    absmax = _block_absmax(flat, block)
    scaled = _scale_by_block(flat, absmax, block, divide_last=False)
    table = on_device("grid_codes_8bit", x.device)  # nearest code per grid point
    index = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncated, as the C++ cast does
    codes = table[index].to(torch.uint8)
    in_zero_block = (absmax == 0).repeat_interleave(block)[: flat.numel()]
    codes[in_zero_block] = 0  # the kernel writes code 0 for a block of zeros
    return codes, absmax


@dataclass
class NF4Tensor:
    """A weight in NF4: `dequantize(dtype)` gives it back. Double quantization stores `absmax` as 8-bit
    codes with `absmax_scale` (fp32, one per 256 blocks) and `absmax_offset` (their mean, fp32)."""

    packed: torch.Tensor  # uint8 (ceil(n / 2),): two 4-bit codes per byte, first element high
    absmax: torch.Tensor  # fp32 (blocks,), or uint8 (blocks,) with double quantization
    shape: tuple[int, ...]
    block_size: int = 64
    absmax_scale: torch.Tensor | None = None  # fp32 (ceil(blocks / 256),)
    absmax_offset: torch.Tensor | None = None  # fp32 ()

    def block_absmax(self) -> torch.Tensor:
        if self.absmax_scale is None:
            return self.absmax
        code = on_device("dynamic_map_8bit", self.absmax.device)
        return _unscale_by_block_(code[self.absmax.long()], self.absmax_scale, ABSMAX_BLOCK) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(self.shape)
        pairs = on_device("nf4_pairs", self.packed.device)
        values = torch.index_select(pairs, 0, self.packed.int()).view(-1)[:n]  # (n,) in [-1, 1], fp32, fresh
        return _unscale_by_block_(values, self.block_absmax(), self.block_size).view(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a weight of any shape to NF4 (see the module docstring for every rounding rule)."""
    flat = weight.detach().float().reshape(-1)
    absmax = _block_absmax(flat, block_size)
    scaled = _scale_by_block(flat, absmax, block_size, divide_last=True)
    if flat.numel() % block_size:
        absmax[-1] = absmax[-1].clamp(min=1e-38)  # bitsandbytes stores a shorter last block's absmax clamped
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    codes = nf4_codes(scaled)  # ties (x == a midpoint) take the lower code, as nf4_codes_by_search
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, tuple(weight.shape), block_size)
    offset = absmax.mean()
    qabsmax, scale = quantize_blockwise_8bit(absmax - offset)
    return NF4Tensor(packed, qabsmax, tuple(weight.shape), block_size, scale, offset)


# ----------------------------------------------------------------------------------- the layer
class NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly, in the forward and again in the backward, so no
    full-precision copy of W outlives the call (plain autograd would keep the dequantized W of every
    layer for the backward pass, as much memory as an unquantized model). Only x gets a gradient:
    the 4-bit weight is frozen."""

    @staticmethod
    def forward(ctx, x, weight: "NF4Weight"):
        ctx.weight = weight
        return x @ weight.dequantize(x.dtype).T  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight.dequantize(grad.dtype), None  # (..., out) @ (out, in) -> (..., in)


class NF4Weight(nn.Module):
    """A frozen (out, in) weight stored as NF4 buffers, at the place and name of the parameter it
    replaces: `q_proj.weight` becomes the module whose buffers are `q_proj.weight.packed`, ... So a
    LoRA layer wraps it like a plain weight, and a merged export writes it back as `q_proj.weight`."""

    def __init__(self, out_features: int, in_features: int, block_size: int = 64, double_quant: bool = True,
                 device=None):
        super().__init__()
        self.shape, self.block_size, self.double_quant = (out_features, in_features), block_size, double_quant
        n = out_features * in_features
        blocks = -(-n // block_size)
        self.register_buffer("packed", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, device=device,
                                                   dtype=torch.uint8 if double_quant else torch.float32))
        if double_quant:
            self.register_buffer("absmax_scale", torch.zeros(-(-blocks // ABSMAX_BLOCK), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @torch.no_grad()
    def set(self, weight: torch.Tensor) -> "NF4Weight":
        """Quantize `weight` (any float dtype, any device) into these buffers."""
        q = quantize_nf4(weight.to(self.device), self.block_size, self.double_quant)
        self.packed.copy_(q.packed)
        self.absmax.copy_(q.absmax)
        if self.double_quant:
            self.absmax_scale.copy_(q.absmax_scale)
            self.absmax_offset.copy_(q.absmax_offset)
        return self

    def nf4(self) -> NF4Tensor:
        dq = self.double_quant
        return NF4Tensor(self.packed, self.absmax, self.shape, self.block_size,
                         self.absmax_scale if dq else None, self.absmax_offset if dq else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.nf4().dequantize(dtype)  # (out, in)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias), the weight dequantized to x's dtype."""
        y = NF4Matmul.apply(x, self)
        return y + bias.to(y.dtype) if bias is not None else y

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nf4 in blocks of {self.block_size}, double_quant={self.double_quant}"


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight. The bias, if any, stays a frozen parameter in the load
    dtype, as do the embeddings and norms of a quantized model: they are a small part of its size."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int = 64,
                 double_quant: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = NF4Weight(out_features, in_features, block_size, double_quant, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, double_quant,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.weight.device.type != "meta":
            layer.weight.set(linear.weight)
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.data)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x, self.bias)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_projections(model, block_size: int = 64, double_quant: bool = True) -> None:
    """Replace the seven projections of every block by NF4Linear (embeddings, norms and lm_head stay).
    On a model built on the meta device this only lays out the buffers, for the loader to fill."""
    for block in model.model.layers:
        for name in PROJECTIONS:
            parent = block.self_attn if hasattr(block.self_attn, name) else block.mlp
            setattr(parent, name, NF4Linear.from_linear(getattr(parent, name), block_size, double_quant))
