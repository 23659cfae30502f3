"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): LoRA that learns each output
row's length apart from its direction.

Plain LoRA moves W to W + s·BA. DoRA writes the adapted weight as a magnitude times a direction,

    W' = m / ‖W + s·BA‖ · (W + s·BA)          ‖·‖: the L2 norm of each output row, m: (out,)

with m trainable and initialised to ‖W + s·BA‖ (so W' = W at the start, as with plain LoRA). The
paper found that full fine-tuning changes magnitudes and directions in ways LoRA's BA alone struggles
to imitate; giving the magnitude its own r-independent parameters closes much of that gap for out
extra parameters per layer. In the forward pass, with scale = m / ‖W + s·BA‖ (one number per output):

    y = base(x) + (scale - 1)·(base(x) - bias) + scale·s·B(A(x))       = x W'^T + bias

so W' is never formed: the frozen layer's output is reused and only the norm needs the weight.

The norm is a constant in the backward pass (DoRA §4.3, and PEFT): differentiating through
‖W + s·BA‖ would need (out x in) gradient work per layer for a small change in the result; treated
as a constant, the gradients of A and B are LoRA's times `scale`, and m's is elementwise.

Dropout (as PEFT does it): with dropout active (training, p > 0), the adapter terms see dropout(x),
so `base(x) - bias` is replaced by x W^T computed again on dropout(x): one more (N x in)(in x out)
product per layer, which flops.py counts. Without dropout the frozen output is reused for free.

QDoRA: on an NF4 base (model/nf4.py) the norm is taken of the dequantized weight, as PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRALinear


class DoRALinear(LoRALinear):
    """LoRALinear plus `lora_magnitude_vector` (out,), PEFT's name for m (saved without `.weight`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (out,), = ‖W‖ while B = 0

    def base_weight(self) -> torch.Tensor:
        """The frozen W (out, in) in the adapter's dtype (fp32), dequantized for an NF4 base."""
        dtype = self.lora_A.weight.dtype
        return self.weight.dequantize(dtype) if self.quantized else self.weight.to(dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + s·BA‖ per output row, (out,), in the adapter's dtype and outside autograd (§4.3)."""
        delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, r) @ (r, in) -> (out, in)
        return torch.linalg.vector_norm(self.base_weight() + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight(x, self.bias) if self.quantized else F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return y
        x = x.to(self.lora_A.weight.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = y.to(x.dtype) if self.bias is None else y.to(x.dtype) - self.bias  # x W^T, reused
        else:
            x = self.dropout(x)
            base = F.linear(x, self.base_weight())  # dropout(x) W^T: (..., out)
        scale = (self.lora_magnitude_vector / self.weight_norm()).view(1, -1)  # (1, out)
        lora = self.lora_B(self.lora_A(x))  # (..., out)
        return (y + ((scale - 1) * base + scale * lora * self.scaling)).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """m / ‖W + ΔW‖ · (W + ΔW) in fp32, rounded once to W's dtype (bf16 for an NF4 base)."""
        adapted = self.base_weight().float() + self.delta_weight()  # (out, in)
        merged = (self.lora_magnitude_vector.float() / torch.linalg.vector_norm(adapted, dim=1)).view(-1, 1) * adapted
        return merged.to(torch.bfloat16 if self.quantized else self.weight.dtype)

    def extra_repr(self) -> str:
        return "DoRA, " + super().extra_repr()
