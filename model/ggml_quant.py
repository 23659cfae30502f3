"""How a weight is stored in a GGUF file: F32, F16, BF16 or Q8_0 bytes, written out in numpy.

F16 and BF16 are the float rounded to 16 bits (nearest, ties to even); F16 keeps 10 mantissa bits and
a narrow range (largest 65504), BF16 keeps fp32's range and 7 mantissa bits.

Q8_0 is ggml's simplest quantization. A row is cut into blocks of 32 consecutive weights; each block
stores one fp16 scale d = max|x| / 127 and 32 signed bytes q = round(x / d), rounded half away from
zero, so x is read back as q * d. That is 2 + 32 = 34 bytes per 32 weights (8.5 bits per weight), and
the error of a weight is at most d / 2 = max|x in its block| / 254. The bytes of a block are the scale
(little-endian fp16), then the 32 codes. Bit for bit as ggml's `quantize_row_q8_0_ref` does it:
the scale and its reciprocal are computed in fp32 (the fp16 scale is only what is stored), and the
codes come from x * (1 / d), not x / d. tests/test_gguf.py checks the bytes against the `gguf`
package's own quantizer.

A row whose length is not a multiple of 32 cannot be stored as Q8_0; llama.cpp's converter writes such
a tensor in F16 instead, and so does `encode`.
"""

from __future__ import annotations

import numpy as np
import torch

Q8_0_BLOCK = 32  # weights per block
Q8_0_BYTES = 2 + Q8_0_BLOCK  # one fp16 scale + 32 int8 codes
TYPES = ("f32", "f16", "bf16", "q8_0")


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: 2.5 -> 3, -2.5 -> -3 (numpy's rint would give 2 and -2). Exact in fp32: the
    fractional part x - trunc(x) has no rounding error, so no value just below .5 is pushed over it
    (as floor(|x| + 0.5) would do with 0.49999997)."""
    whole = np.trunc(x)
    return whole + np.sign(x) * (np.abs(x - whole) >= 0.5)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """(rows, cols) floats, cols a multiple of 32 -> (rows, cols / 32 * 34) uint8: each row's blocks."""
    rows, cols = x.shape
    if cols % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows of a multiple of {Q8_0_BLOCK} weights, got {cols}")
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, Q8_0_BLOCK)  # (n_blocks, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (n_blocks, 1), fp32
    inverse = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inverse, where=d != 0)  # an all-zero block stores d = 0, codes 0
    codes = round_half_away(blocks * inverse).astype(np.int8)  # (n_blocks, 32), within [-127, 127]
    scales = d.astype(np.float16).view(np.uint8)  # (n_blocks, 2): the fp16 bytes, little-endian
    packed = np.concatenate([scales, codes.view(np.uint8)], axis=1)  # (n_blocks, 34)
    return packed.reshape(rows, cols // Q8_0_BLOCK * Q8_0_BYTES)


def dequantize_q8_0(packed: np.ndarray) -> np.ndarray:
    """The inverse read: (rows, n * 34) uint8 -> (rows, n * 32) float32, each code times its block's scale."""
    rows = packed.shape[0]
    blocks = packed.reshape(-1, Q8_0_BYTES)  # (n_blocks, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    codes = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (n_blocks, 32)
    return (codes * d).reshape(rows, -1)


def encode(t: torch.Tensor, kind: str) -> tuple[np.ndarray, str]:
    """A tensor as the numpy array a GGUF file stores, and the ggml type it is stored as.

    1-D tensors (norm weights, biases) stay F32 whatever `kind` asks, as llama.cpp's converter keeps
    them: they are a negligible share of the bytes and the most sensitive to rounding. F16 and BF16
    come back as uint16 bit patterns (numpy has no bfloat16), Q8_0 as packed bytes.
    """
    if kind not in TYPES:
        raise ValueError(f"unknown GGUF tensor type {kind!r}; one of {', '.join(TYPES)}")
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if t.dim() == 1 or kind == "f32":
        return t.numpy(), "F32"
    if kind == "q8_0" and t.shape[-1] % Q8_0_BLOCK == 0:
        return quantize_q8_0(t.reshape(-1, t.shape[-1]).numpy()), "Q8_0"
    half = torch.bfloat16 if kind == "bf16" else torch.float16
    return t.to(half).view(torch.int16).numpy().view(np.uint16), half_name(half)


def half_name(dtype: torch.dtype) -> str:
    return "BF16" if dtype == torch.bfloat16 else "F16"


def decode(data: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """What a reader computes with: the stored array back as float32 of the tensor's shape."""
    if ggml_type == "F32":
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    if ggml_type == "Q8_0":
        return torch.from_numpy(dequantize_q8_0(np.asarray(data))).reshape(shape)
    half = torch.bfloat16 if ggml_type == "BF16" else torch.float16
    bits = torch.from_numpy(np.array(data, dtype=np.uint16).view(np.int16))
    return bits.view(half).float().reshape(shape)
