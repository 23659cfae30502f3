"""LoRA+ (Hayou et al. 2024): B learns faster than A.

With B = 0 at the start, A's gradient is zero until B moves, and the paper shows that for wide layers
one learning rate for both is inefficient: B's should be larger by a ratio R (they suggest 2^4 = 16).
So B, and, as PEFT's `create_loraplus_optimizer` does it, every 1-D trainable tensor (DoRA's
magnitude) get lr·R in their own group; A keeps lr. Returned as a factor per parameter name, which
optim.AdamW multiplies into the scheduled lr (the schedule scales both groups alike, as torch's
LambdaLR does with groups).

One deliberate difference: PEFT sets every group's weight decay to its own `loraplus_weight_decay`
(0 unless passed), silently replacing the optimizer's weight_decay. Here --weight-decay applies to
both groups as given; pass `loraplus_weight_decay=wd` to PEFT to get the same groups.
"""

from __future__ import annotations

import torch


def loraplus_lr_scales(params: dict[str, torch.nn.Parameter], ratio: float) -> dict[str, float]:
    """{name: lr factor}: `ratio` for lora_B and 1-D tensors, 1 for the rest."""
    return {name: ratio if ("lora_B" in name or p.ndim == 1) else 1.0 for name, p in params.items()}
