"""The --device and --dtype flags: what a user may ask for, and what is refused in one line."""

from __future__ import annotations

import torch

from common.cli import UserError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    """`None`/"auto" picks CUDA, then Apple's MPS, then the CPU; asking for a device torch cannot see is
    a user error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device.type == "mps" and not mps_available():
        raise UserError("--device mps was asked for but this torch has no MPS (Apple silicon) backend; use --device cpu")
    return device


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
