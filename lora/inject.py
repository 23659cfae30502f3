"""Putting adapters into a model, taking them out again (merge), and exporting a merged checkpoint."""

from __future__ import annotations

import os

import torch
from torch import nn

from common.cli import UserError
from model.nf4 import NF4Weight
from model.transformer import Transformer

from .dora import DoRALinear
from .init import check_init, initialise, moves_base
from .layer import LoRALinear, lora_modules

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def parse_targets(targets) -> tuple[str, ...]:
    """'q_proj,v_proj', ['q_proj', 'v_proj'], 'all' or 'all-linear' -> a tuple of projection names."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if any(t in ("all", "all-linear") for t in targets):
        return ALL_TARGETS
    if "lm_head" in targets:
        raise UserError("LoRA on lm_head is not supported: in Qwen2.5 it is the same matrix as the input "
                        "embedding (tied), so an adapter there would change the embeddings too; "
                        "adapt the projections instead (q_proj, ..., down_proj or 'all')")
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise UserError(f"unknown LoRA target(s) {unknown or targets}; choose from {', '.join(ALL_TARGETS)} or 'all'")
    return tuple(t for t in ALL_TARGETS if t in targets)  # canonical order


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}  # A, B (and DoRA's magnitude)


def check_variants(dora: bool, init: str) -> str:
    """The --init name, checked, and checked against --dora: a DoRA adapter started from PiSSA/OLoRA
    could not be converted back to the original base model on save (lora/init.py)."""
    init = check_init(init)
    if dora and moves_base(init):
        raise UserError(f"DoRA with --init {init} is not supported: its adapter could not be converted back to the "
                        f"original base model; use one of the two")
    return init


def apply_lora(model: Transformer, rank: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
               dropout: float = 0.0, use_rslora: bool = False, verbose: bool = True, dora: bool = False,
               init: str = "kaiming") -> int:
    """Wrap the target projections of every layer, freeze everything else; return the trainable count.
    `dora`: DoRALinear instead of LoRALinear (lora/dora.py); `init`: how A, B start (lora/init.py)."""
    init = check_variants(dora, init)
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if lora_modules(model):
        raise UserError("this model already has LoRA adapters; load a fresh base model first")
    targets = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for name in targets:
            parent = block.self_attn if name in ATTENTION_TARGETS else block.mlp
            layer = (DoRALinear if dora else LoRALinear)(getattr(parent, name), rank, alpha, dropout, use_rslora)
            initialise(layer, init)
            setattr(parent, name, layer)
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
                         "use_rslora": use_rslora, "use_dora": dora, "init_lora_weights": init}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = parameter_count(model)
    if verbose:
        print(f"{'DoRA' if dora else 'LoRA'} r={rank} alpha={alpha} on {','.join(targets)}: {trainable:,} trainable parameters "
              f"of {total:,} ({100 * trainable / total:.3f}%)")
    return trainable


def parameter_count(model: nn.Module) -> int:
    """Every weight of the model, trainable or not: the parameters, plus the weights NF4 stores as
    packed buffers (one number each, out x in), so a quantized model counts as many as the original."""
    nf4 = sum(m.shape[0] * m.shape[1] for m in model.modules() if isinstance(m, NF4Weight))
    return sum(p.numel() for p in model.parameters()) + nf4


def merge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_export(model: Transformer, path: str | os.PathLike, tokenizer=None) -> None:
    """Write a plain HF checkpoint with the adapters folded into the weights, without touching the
    model itself. transformers and `model.load_model` both load it without any LoRA code. A QLoRA
    model (NF4 base) is merged into its dequantized weights and written in bf16: merging into the
    4-bit weights would quantize W + BA again and round most of the update away."""
    from model import load_tokenizer, save_pretrained

    if tokenizer is None:
        source = getattr(model, "source", None)
        if source is None:  # a model built in code: which tokenizer goes with it is not ours to guess
            raise UserError("merge_and_export: this model was not loaded from a checkpoint, so its tokenizer is "
                            "unknown; pass tokenizer=... (a model.Tokenizer) to write one beside the weights")
        tokenizer = load_tokenizer(source)
    overrides = {f"{name}.weight": m.merged_weight() for name, m in lora_modules(model).items() if not m.merged}
    quantized = any(isinstance(m, NF4Weight) for m in model.modules())  # LoRA-wrapped ones included
    save_pretrained(model, path, tokenizer, overrides=overrides, dtype=torch.bfloat16 if quantized else None)
