"""How A and B start, and what that means for the saved adapter.

- `kaiming` (the default, PEFT's `init_lora_weights=True`): A like nn.Linear's default, B = 0.
- `gaussian` (PEFT's "gaussian"): A ~ N(0, 1/r²), B = 0.
  Both start at BA = 0, so the model starts as the base model and W stays untouched.
- `pissa` (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation"): W = U S V^T;
  B = U_r √(S_r/s), A = √(S_r/s) V_r^T hold W's r largest singular directions and W is replaced by
  the residual W - s·BA. The model is unchanged at step 0, but the adapter trains the directions
  that matter most instead of starting from noise, which the paper finds converges faster.
  `pissa_niter_K` takes the top r from K iterations of torch.svd_lowrank (randomised, so it
  draws from torch's global RNG, which train.py seeds with --seed): much cheaper for big W.
- `olora` (Büyükakyüz 2024): the same with W = QR: B = Q[:, :r], A = R[:r], W -= s·BA.

PiSSA and OLoRA change the base weights, so their A and B only mean something on the residual model.
To share the result, `convert_for_original_base` does what PEFT's `save_pretrained(...,
path_initial_model_for_weight_conversion=...)` does: since W_res + s·BA = W + s·(BA - B0A0), the
rank-2r adapter A' = [A; A0], B' = [B, -B0] at the same scaling (alpha doubled, √2 under rsLoRA)
applies to the *original* base. The initial A0, B0 are kept on each layer (`initial_A`, `initial_B`)
for that; and since A', B' hold A and B verbatim, a run resumes from its own saved adapter
(`unconvert`), the residual being recomputed, deterministically, by the same initialisation.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from common.cli import UserError

from .layer import lora_modules

INITS = "kaiming, gaussian, pissa, pissa_niter_K (K a whole number) or olora"
CONVERTED = ("pissa", "olora")  # inits that move W, whose adapters are saved converted


def check_init(init: str) -> str:
    if init in ("kaiming", "gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", init):
        return init
    raise UserError(f"unknown LoRA initialisation {init!r}; choose {INITS}")


def moves_base(init: str) -> bool:
    """PiSSA and OLoRA: the base weights become a residual, so saved adapters need converting."""
    return init.startswith(CONVERTED)


@torch.no_grad()
def initialise(layer, init: str) -> None:
    """Set A and B (and, for PiSSA/OLoRA, W) of one freshly built LoRALinear as `init` says."""
    if init == "kaiming":
        return  # LoRALinear's own
    if init == "gaussian":
        nn.init.normal_(layer.lora_A.weight, std=1 / layer.rank)
        return
    if layer.quantized:
        raise UserError(f"--init {init} rewrites the base weights into a residual, which a 4-bit NF4 base cannot "
                        f"hold exactly; initialise on a float base (no --quantize) or use --init kaiming")
    W = layer.weight.float()  # (out, in)
    A, B = olora_factors(W, layer.rank) if init == "olora" else pissa_factors(W, layer.rank, layer.scaling, init)
    layer.lora_A.weight.copy_(A)
    layer.lora_B.weight.copy_(B)
    layer.weight.copy_((W - (layer.scaling * B) @ A).to(layer.weight.dtype))  # the residual, (out, r) @ (r, in)
    layer.register_buffer("initial_A", A.clone(), persistent=False)  # (r, in)
    layer.register_buffer("initial_B", B.clone(), persistent=False)  # (out, r)


def pissa_factors(W: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·BA = W's best rank-r approximation: the top r singular values, divided by s, split
    as their square roots between the two sides."""
    if init == "pissa":
        left, sigma, right_t = torch.linalg.svd(W, full_matrices=False)  # W = left diag(sigma) right_t: (out, k), (k,), (k, in)
        left, sigma, right_t = left[:, :r], sigma[:r], right_t[:r]
    else:  # a randomized SVD of the top r only
        left, sigma, right = torch.svd_lowrank(W, r, niter=int(init.split("_niter_")[1]))  # (out, r), (r,), (in, r)
        right_t = right.t()
    root = torch.diag(torch.sqrt(sigma / scaling))  # (r, r)
    A = root @ right_t  # (r, r) @ (r, in)
    B = left @ root  # (out, r) @ (r, r)
    return A, B


def olora_factors(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of W = QR: an orthonormal B, and no scaling folded in (as in PEFT)."""
    Q, R = torch.linalg.qr(W)  # (out, k), (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """alpha at rank 2r that keeps the scaling: 2·alpha/(2r) = alpha/r, or √2·alpha/√(2r) = alpha/√r."""
    return alpha * 2**0.5 if use_rslora else alpha * 2


def convert_for_original_base(model, tensors: dict[str, torch.Tensor], cfg: dict) -> tuple[dict, dict]:
    """(tensors, config) of the rank-2r adapter that applies to the original base: A' = [A; A0], B' = [B, -B0]."""
    out = dict(tensors)
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = torch.cat([tensors[f"{name}.lora_A.weight"], m.initial_A.cpu()], dim=0)  # (2r, in)
        out[f"{name}.lora_B.weight"] = torch.cat([tensors[f"{name}.lora_B.weight"], -m.initial_B.cpu()], dim=1)  # (out, 2r)
    cfg = {**cfg, "r": 2 * cfg["r"], "lora_alpha": converted_alpha(cfg["lora_alpha"], cfg["use_rslora"]),
           "init_lora_weights": True}
    return out, cfg


def is_converted_for(model, cfg: dict) -> bool:
    """Is `cfg` the converted adapter of this PiSSA/OLoRA model's setup (rank and alpha doubled)?"""
    have = model.lora_config
    return (moves_base(have.get("init_lora_weights", "kaiming")) and int(cfg["r"]) == 2 * have["r"]
            and math.isclose(float(cfg["lora_alpha"]), converted_alpha(have["lora_alpha"], have["use_rslora"]))
            and bool(cfg.get("use_rslora", False)) == have["use_rslora"])


def unconvert(model, tensors: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """A and B back from a converted adapter; its A0, B0 halves must be this model's own initial ones,
    or the residual W computed now is not the one the adapter was trained on."""
    out, r = dict(tensors), model.lora_config["r"]
    for name, m in lora_modules(model).items():
        A2, B2 = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]  # (2r, in), (out, 2r)
        if not (torch.equal(A2[r:], m.initial_A.cpu()) and torch.equal(-B2[:, r:], m.initial_B.cpu())):
            raise UserError(f"the {model.lora_config['init_lora_weights']} initialisation computed now differs from the "
                            f"one the adapter at {path} was trained from ({name}): resume on the same device type "
                            f"and torch version, or load the adapter into a fresh base model")
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = A2[:r].contiguous(), B2[:, :r].contiguous()
    return out
