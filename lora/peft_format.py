"""Adapters on disk in PEFT's format, so they travel both ways between this codebase and PEFT.

A PEFT LoRA adapter is a folder with two files:

- `adapter_config.json`: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout,
  target_modules, use_rslora, base_model_name_or_path (plus defaults for PEFT's other options);
- `adapter_model.safetensors`: the A and B matrices under the wrapped model's names, e.g.
  `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (PEFT wraps the causal LM as
  `base_model.model`, and drops the adapter name "default" from the keys when saving).

Our parameter names are exactly those without the `base_model.model.` prefix. DoRA adds
`...q_proj.lora_magnitude_vector` (no `.weight` suffix: PEFT's name once "default.weight" is dropped)
and `use_dora: true`. A PiSSA/OLoRA adapter is saved converted for the original base model (rank 2r;
lora/init.py says why), as PEFT's `path_initial_model_for_weight_conversion` saves it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.checkpoints import latest_checkpoint
from common.cli import UserError
from common.files import read_json, write_json
from model.loading import save_safetensors

from .init import check_init, convert_for_original_base, is_converted_for, moves_base, unconvert
from .inject import apply_lora, lora_parameters, parse_targets
from .layer import lora_modules

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def adapter_config(model) -> dict:
    cfg = model.lora_config
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "source", None),
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "target_modules": cfg["target_modules"], "use_rslora": cfg["use_rslora"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": "gaussian" if cfg.get("init_lora_weights") == "gaussian" else True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": bool(cfg.get("use_dora", False)), "revision": None,
    }


def save_adapter(model, path: str | os.PathLike) -> None:
    """Only the adapter: a few MB instead of the model's GB. Written atomically, file by file."""
    if not lora_modules(model):
        raise UserError("the model has no LoRA adapters to save (apply_lora or load_adapter first)")
    path = Path(path)
    tensors = {n: p.detach().contiguous().cpu() for n, p in lora_parameters(model).items()}
    config = adapter_config(model)
    if moves_base(model.lora_config.get("init_lora_weights", "kaiming")):
        tensors, config = convert_for_original_base(model, tensors, config)
    save_safetensors({PREFIX + n: t for n, t in tensors.items()}, path / WEIGHTS_NAME)
    write_json(path / CONFIG_NAME, config)


def adapter_folder(path: str | os.PathLike) -> Path:
    """An adapter folder as is; a training run's folder resolves to its newest complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"adapter folder not found: {path}")
    if not (path / CONFIG_NAME).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserError(f"{path} has no {CONFIG_NAME} and no checkpoint-NNNNNN/ folder: neither a PEFT adapter "
                            f"nor a training run with a saved checkpoint")
        path = latest
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors without the PEFT prefix), with every unsupported PEFT option refused by name."""
    path = adapter_folder(path)
    if not (path / WEIGHTS_NAME).is_file():
        other = " (adapter_model.bin is not read: re-save it with safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise UserError(f"{path} has no {WEIGHTS_NAME}{other}")
    cfg = read_json(path / CONFIG_NAME, what=CONFIG_NAME)
    if isinstance(cfg, dict) and cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path} holds a {cfg.get('peft_type')} adapter; only LORA is supported")
    check_adapter_config(cfg, path)
    for key, default in (("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None),
                         ("layers_to_transform", None), ("rank_pattern", {}), ("alpha_pattern", {})):
        value = cfg.get(key)
        if value and value != default:
            raise UserError(f"{path}: {key}={value!r} is not supported by this loader")
    if isinstance(cfg.get("target_modules"), str) and cfg["target_modules"] != "all-linear":
        raise UserError(f"{path}: target_modules as a regex ({cfg['target_modules']!r}) is not supported; use a list")
    init_name(cfg, path)  # an initialisation we cannot reproduce is refused here
    try:
        raw = load_file(path / WEIGHTS_NAME)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS_NAME} could not be read ({e}); re-save the adapter") from None
    tensors = {}
    for key, t in raw.items():
        name = key.removeprefix(PREFIX).replace(".default.weight", ".weight")
        tensors[name] = t
    return cfg, tensors


def check_adapter_config(cfg, path) -> None:
    """The fields this loader uses, with the types PEFT writes: a hand-edited or foreign file fails here
    in one line instead of as a KeyError or ValueError deep in apply_lora."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(cfg, dict):
        raise UserError(f"{path / CONFIG_NAME} is not a PEFT adapter config (a JSON object)")
    fields = {"r": (lambda v: number(v) and v >= 1 and float(v).is_integer(), "a positive integer"),
              "lora_alpha": (lambda v: number(v) and v > 0, "a positive number"),
              "target_modules": (lambda v: isinstance(v, str) or isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                                 "a list of module names")}
    for key, (ok, want) in fields.items():
        if key not in cfg:
            raise UserError(f"{path / CONFIG_NAME} has no \"{key}\" ({want}); it is not a complete PEFT LoRA config")
        if not ok(cfg[key]):
            raise UserError(f"{path / CONFIG_NAME}: \"{key}\" is {json.dumps(cfg[key])}, not {want}")
    if not number(cfg.get("lora_dropout", 0.0)):
        raise UserError(f"{path / CONFIG_NAME}: \"lora_dropout\" is {json.dumps(cfg['lora_dropout'])}, not a number")


def load_adapter(model, path: str | os.PathLike, verbose: bool = False) -> None:
    """Apply the adapter at `path` (an adapter folder or a training run's folder) to `model`.

    A base model gets the adapter's own LoRA settings. A model that already has LoRA must have been
    set up the same way: rank, alpha and rsLoRA fix the scale the matrices are multiplied by, so
    loading B and A under another scale would run a different model without a word. Dropout is not
    compared: it does nothing at inference and a run may set its own.
    """
    cfg, tensors = read_adapter(path)
    if not lora_modules(model):
        apply_lora(model, rank=int(cfg["r"]), alpha=cfg["lora_alpha"], targets=cfg["target_modules"],
                   dropout=float(cfg.get("lora_dropout", 0.0)), use_rslora=bool(cfg.get("use_rslora", False)),
                   verbose=verbose, dora=bool(cfg.get("use_dora", False)), init=init_name(cfg, path))
    elif is_converted_for(model, cfg):  # a PiSSA/OLoRA run's own checkpoint: its A, B are the first halves
        tensors = unconvert(model, tensors, path)
    else:
        check_same_setup(model.lora_config, cfg, path)
    params = lora_parameters(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        raise UserError(f"the adapter at {path} does not fit this model: it has {len(unexpected)} tensor(s) the "
                        f"model lacks, e.g. {unexpected[0]} (made for another model or other target modules?)")
    if missing:
        raise UserError(f"the adapter at {path} does not fit this model: it lacks {len(missing)} tensor(s) the model "
                        f"has, e.g. {missing[0]} (made for another model or other targets{layer_note(tensors, params)}, "
                        f"or incomplete)")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise UserError(f"the adapter at {path} was made for another model or rank: {name} has shape "
                            f"{tuple(tensors[name].shape)}, this model with r={model.lora_config['r']} needs {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def init_name(cfg: dict, path) -> str:
    """PEFT's init_lora_weights as our --init name: True/False (the weights are loaded anyway) -> kaiming."""
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, bool):
        return "kaiming"
    if not isinstance(init, str) or init not in ("gaussian", "olora") and not init.startswith("pissa"):
        raise UserError(f"{path}: init_lora_weights={init!r} is not supported by this loader")
    return check_init(init)


def base_change(init: str) -> str:
    return init if moves_base(init) else "none"


def layer_note(tensors: dict, params: dict) -> str:
    """': it covers 2 layer(s), this model has 24' when the layer counts differ, else ''."""
    def layers(names):
        return len({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n})

    have, need = layers(tensors), layers(params)
    return f": it covers {have} layer(s), this model has {need}" if have != need else ""


def check_same_setup(have: dict, cfg: dict, path) -> None:
    wanted = {"rank": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]), "rsLoRA": bool(cfg.get("use_rslora", False)),
              "targets": ",".join(parse_targets(cfg["target_modules"])), "DoRA": bool(cfg.get("use_dora", False)),
              "base residual": base_change(init_name(cfg, path))}
    current = {"rank": int(have["r"]), "alpha": float(have["lora_alpha"]), "rsLoRA": bool(have["use_rslora"]),
               "targets": ",".join(have["target_modules"]), "DoRA": bool(have.get("use_dora", False)),
               "base residual": base_change(have.get("init_lora_weights", "kaiming"))}
    differ = [f"{k} {wanted[k]} (the model's adapters: {k} {current[k]})" for k in wanted if wanted[k] != current[k]]
    if differ:
        raise UserError(f"the adapter at {path} was trained with {', '.join(differ)}; load it into a fresh base "
                        f"model (load_adapter then applies the adapter's own settings)")
