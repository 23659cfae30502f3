"""Checkpoints in, checkpoints out: Hugging Face's folder layout, read tensor by tensor.

A checkpoint folder holds `config.json`, the weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) and the tokenizer files. A name that is not a folder is a hub id,
fetched with `huggingface_hub.snapshot_download` (only the files listed in HUB_FILES).

Loading never holds two copies of the weights: the model is built on the meta device (no memory),
given uninitialised storage, and each tensor is read from the file straight into its parameter
(through a one-tensor buffer only when the stored dtype or device differs from the requested one).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.cli import UserError
from common.files import atomic_path, read_json, write_json

from .config import ModelConfig
from .nf4 import NF4Weight, quantize_projections
from .tokenizer import Tokenizer
from .transformer import Transformer

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors", "tokenizer.json", "tokenizer_config.json"]
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


# ------------------------------------------------------------------------------------ finding files
def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder as is; anything else is a hub id, downloaded (or found in the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"checkpoint folder not found: {name} (pass a folder with config.json, or a hub id like {DEFAULT_MODEL})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown id, gated repo...: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {reason[:160]}); "
            f"check the id and your network, or pass a local checkpoint folder instead"
        ) from None


def load_config(path: str | os.PathLike) -> ModelConfig:
    if str(path) == "tiny":
        from .tiny import tiny_config

        return tiny_config()
    path = resolve(path)
    return ModelConfig.from_hf(read_json(path / "config.json", what="config.json"))


# ---------------------------------------------------------------------------------- safetensors I/O
def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and the byte offset where tensor data starts.

    The format is an 8-byte little-endian header length, the header, then raw tensor bytes. Parsing it
    here (rather than calling safetensors' loader) lets us read each tensor into its final storage.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{file} is not a safetensors file (too short); re-download or re-export it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise UserError(f"{file} is corrupt (header length {n} exceeds the file); re-download or re-export it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file} is corrupt (unreadable header); re-download or re-export it") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        expected = math.prod(info["shape"]) * dtype.itemsize
        if end - begin != expected or data_start + end > size:
            raise UserError(f"{file} is corrupt or truncated (tensor {name}); re-download or re-export it")
    return header, data_start


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, what="safetensors index")["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{path} lists shards that are not there: {', '.join(missing)}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise UserError(f"no model.safetensors (or model.safetensors.index.json) in {path}")


def _read_into(f, param: torch.Tensor, info: dict, data_start: int) -> None:
    """Read one tensor's bytes into `param`, casting/moving through a temporary only when needed."""
    stored = SAFETENSORS_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    f.seek(data_start + begin)
    direct = stored == param.dtype and param.device.type == "cpu" and param.is_contiguous()
    target = param if direct else torch.empty(param.shape, dtype=stored)
    buf = target.view(-1).view(torch.uint8).numpy() if target.numel() else None
    if buf is not None and f.readinto(memoryview(buf)) != end - begin:
        raise UserError(f"{f.name} ended early while reading; re-download or re-export it")
    if not direct:
        param.copy_(target)


# ------------------------------------------------------------------------------------------ loading
def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantize: str | None = None) -> Transformer:
    """Build the model from a checkpoint folder or hub id; strict about every tensor's name and shape.

    `quantize="nf4"` stores the seven projections of every block in 4-bit NF4 (model/nf4.py), each
    quantized as it is read, so the full-precision weights never exist in memory all at once;
    embeddings, norms and biases stay in `dtype`.
    """
    if quantize not in (None, "nf4"):
        raise UserError(f"unknown quantization {quantize!r}; the one supported is nf4")
    if str(name_or_path) == "tiny":
        from .tiny import tiny_model

        model = tiny_model(dtype=dtype, device=device)
        if quantize:
            quantize_projections(model)
        return model
    path = resolve(name_or_path)
    config = load_config(path)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)  # cast first: NF4's fp32 statistics must stay fp32
        if quantize:
            quantize_projections(model)
    model = model.to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())  # shared Parameters appear once: no lm_head when tied
    params.update((name, m) for name, m in model.named_modules() if isinstance(m, NF4Weight))
    seen, unexpected = set(), []
    with torch.no_grad():
        for file in weight_files(path):
            header, data_start = read_safetensors_header(file)
            with open(file, "rb") as f:
                for name, info in header.items():
                    if name not in params:
                        if not (name == "lm_head.weight" and config.tie_word_embeddings) and "rotary_emb" not in name:
                            unexpected.append(name)
                        continue
                    if tuple(info["shape"]) != tuple(params[name].shape):
                        raise UserError(f"{file.name}: tensor {name} has shape {tuple(info['shape'])}, "
                                        f"but config.json implies {tuple(params[name].shape)}")
                    if isinstance(params[name], NF4Weight):  # read one full-precision tensor, keep 4 bits
                        full = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
                        _read_into(f, full, info, data_start)
                        params[name].set(full)
                    else:
                        _read_into(f, params[name], info, data_start)
                    seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing:
        raise UserError(f"checkpoint {path} is missing {len(missing)} tensor(s): {', '.join(missing[:4])}"
                        + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        raise UserError(f"checkpoint {path} has {len(unexpected)} tensor(s) this model does not use: "
                        f"{', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else ""))
    model.source = str(path)
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Tokenizer:
    if str(name_or_path) == "tiny":
        from .tiny import tiny_tokenizer

        return tiny_tokenizer()
    return Tokenizer.from_dir(resolve(name_or_path))


def load_pretrained(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", quantize: str | None = None) -> tuple[Transformer, Tokenizer]:
    return load_model(name_or_path, dtype, device, quantize), load_tokenizer(name_or_path)


# ------------------------------------------------------------------------------------------- saving
def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def save_pretrained(model: Transformer, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
                    max_shard_bytes: int | None = None, overrides: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Write an HF-layout checkpoint (config.json, safetensors, tokenizer) that transformers reads too.

    `overrides` replaces named tensors on the way out (LoRA export writes merged weights this way).
    Saving into a folder that already holds a checkpoint replaces it: weight files of the earlier
    save (a single file or shards, and their index) are removed once the new ones are written.
    NF4 weights are written dequantized, in `dtype` (every tensor is cast to it when given, else bf16).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # tied lm_head appears once; LoRA matrices are not part of a base checkpoint (merge them first)
    overrides = overrides or {}
    tensors = {n: overrides.get(n, p).detach() for n, p in model.named_parameters() if ".lora_" not in n}
    for name, m in model.named_modules():
        if isinstance(m, NF4Weight):
            tensors[name] = overrides.get(name, m.dequantize(dtype or torch.bfloat16))
    tensors = {n: (t.to(dtype) if dtype else t).contiguous().cpu() for n, t in tensors.items()}
    write_json(path / "config.json", {**model.config.to_hf(), "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")})
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    index = path / "model.safetensors.index.json"
    if len(shards) == 1:
        index.unlink(missing_ok=True)  # loaders prefer an index: an old one would shadow the new file
        written = ["model.safetensors"]
        save_safetensors(shards[0], path / written[0])
    else:
        weight_map, written = {}, []
        for i, shard in enumerate(shards):
            written.append(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            save_safetensors(shard, path / written[-1])
            weight_map.update(dict.fromkeys(shard, written[-1]))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for old in [path / "model.safetensors", *path.glob("model-*-of-*.safetensors")]:
        if old.name not in written:  # weights of an earlier save into the same folder
            old.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(path)
