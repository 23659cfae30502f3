"""A LoRA adapter around a frozen linear layer.

    y = x W^T + b + scaling * B(A(dropout(x))),   scaling = alpha / r   (or alpha / sqrt(r), rsLoRA)

A (r x in) starts like nn.Linear's default (kaiming-uniform, a = sqrt(5)) and B (out x r) at zero,
so a fresh adapter changes nothing and only B moves on the first step. The frozen weight keeps its
storage dtype (bf16 halves memory); A and B are fp32 and see x cast to fp32, as in PEFT.

The base parameters stay *this* module's `weight` and `bias`, so their state-dict names do not change
when LoRA is applied: `...q_proj.weight` is still `...q_proj.weight`, and the adapter's names are
`...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`, which are PEFT's once prefixed.

QLoRA: the base may be an NF4Linear (model/nf4.py). Its `weight` is then an NF4Weight module, which
computes x W^T with W dequantized on the fly; LoRA on top is unchanged. Merging into the 4-bit weight
is refused: the merged W + BA would have to be quantized again, and since the update BA is mostly far
smaller than a 4-bit step it would round away. Export merges into the dequantized weight instead
(`merged_weight`, written in bf16).

The variants change one thing each: dora.py subclasses this layer (a magnitude per output row),
init.py changes how A and B (and for PiSSA/OLoRA, W) start, loraplus.py gives B its own learning rate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError
from model.nf4 import NF4Weight


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen, shared with the checkpoint's name (a tensor, or NF4Weight)
        self.bias = base.bias
        self.quantized = isinstance(self.weight, NF4Weight)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight(x, self.bias) if self.quantized else F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return y
        xa = self.dropout(x.to(self.lora_A.weight.dtype))
        return (y + self.lora_B(self.lora_A(xa)) * self.scaling).to(y.dtype)  # (..., out)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32: (out, r) @ (r, in) -> (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A, added in fp32 and rounded once (adding in bf16 would lose small updates);
        for an NF4 base, the dequantized W, and the result in bf16."""
        if self.quantized:
            return (self.weight.dequantize(torch.float32) + self.delta_weight()).to(torch.bfloat16)
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W for adapter-free inference speed. The original W is kept aside, so
        `unmerge` restores it bit for bit (subtracting again would not, after rounding to bf16)."""
        if self.quantized:
            raise UserError("cannot merge LoRA into 4-bit NF4 weights: re-quantizing W + BA would round the update "
                            "away; export instead (python -m lora.export), which merges into the dequantized weights")
        if not self.merged:
            self._original_weight = self.weight.detach().clone()
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self._original_weight)
            del self._original_weight
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}, " \
               f"scaling={self.scaling:.4g}, merged={self.merged}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapted projections by name (DoRA's layers are LoRALinear too)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
