"""GGUF export (llama.cpp, Ollama): read back by independent readers, logits, metadata, tokenizer, adapter.

The oracles are test-only: transformers' GGUF loader (it dequantizes GGUF in pure Python and undoes
llama.cpp's rotary permutation for `llama`), its GGUF metadata reader and tokenizer converter, and the
`gguf` package's own quantizers and SpecialVocab (the logic of llama.cpp's converter).

Most files here use Qwen2.5's real tokenizer cut to its first 2,000 tokens (every byte, the merges
among them, the 22 chat/special tokens renumbered after them): the same byte-level BPE with the same
pre-tokenizer regex, small enough that a GGUF reader parses it in milliseconds instead of the ~10 s
the 151,936-token vocabulary takes. One file is written with the full tokenizer, for the tokenizer tests.
"""

import json
import math
import shutil
import sys
from hashlib import sha256

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import lora  # noqa: E402
import train  # noqa: E402
from common.cli import UserError  # noqa: E402
from lora import export as export_cli  # noqa: E402
from lora.gguf_export import export_adapter_gguf, export_gguf, merged_tensors  # noqa: E402
from model import load_model, load_tokenizer  # noqa: E402
from model import gguf_tokenizer  # noqa: E402
from model.ggml_quant import decode, encode, quantize_q8_0, round_half_away  # noqa: E402
from model.gguf_export import gguf_tensors, rope_interleave, tensor_name  # noqa: E402
from tests.conftest import QWEN_DIR, needs_qwen_files  # noqa: E402
from tests.hf_twins import hf_config, hf_model  # noqa: E402

pytestmark = needs_qwen_files
CUT, VOCAB = 2000, 2048  # tokens kept from Qwen's vocabulary; embedding rows (the last 26 are padding)
THETA = {"qwen2": 1_000_000.0, "llama": 100_000.0}  # neither is llama.cpp's default of 10,000
CHAT = [{"role": "user", "content": "Forecast: 0.25,1.50;0.27,1.47;"}, {"role": "assistant", "content": "0.31,1.42;"}]


def read_metadata(path):
    from transformers.integrations.gguf import read_gguf_metadata

    in_full = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")  # not just their length
    return read_gguf_metadata(str(path), in_full)[0]


def write_cut_tokenizer(folder):
    """Qwen2.5's tokenizer.json and tokenizer_config.json with the vocabulary cut to ids below CUT."""
    spec = json.loads((QWEN_DIR / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < CUT}
    merges = [m for m in spec["model"]["merges"] if all(p in vocab for p in (*m.split(" "), m.replace(" ", "")))]
    spec["model"].update(vocab=vocab, merges=merges)
    for k, added in enumerate(spec["added_tokens"]):
        added["id"] = CUT + k  # <|endoftext|> CUT, <|im_start|> CUT + 1, <|im_end|> CUT + 2, ...
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    shutil.copy(QWEN_DIR / "tokenizer_config.json", folder / "tokenizer_config.json")


@pytest.fixture
def cut_is_qwen2(monkeypatch):
    """The cut tokenizer has its own fingerprint; its pre-tokenizer is Qwen2's, so name it so."""
    from tokenizers import Tokenizer

    def register(folder):
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        fingerprint = sha256(str(tok.encode(gguf_tokenizer.CHECK_TEXT).ids).encode()).hexdigest()
        monkeypatch.setitem(gguf_tokenizer.PRE_TOKENIZERS, fingerprint, "qwen2")
    return register


def checkpoint(tmp_path, kind, cut_is_qwen2, seed=0, **cfg):
    """A tiny random HF checkpoint (qwen2: biases, tied; llama: untied) with the cut Qwen tokenizer."""
    config = hf_config(kind, vocab=VOCAB, theta=THETA[kind], **cfg)
    config.bos_token_id, config.eos_token_id = CUT, CUT + 2
    hf = hf_model(config, seed)
    path = tmp_path / f"{kind}-ckpt"
    hf.save_pretrained(path)
    write_cut_tokenizer(path)
    cut_is_qwen2(path)
    return path


def gguf_alone(tmp_path, name="model.gguf"):
    """A folder holding nothing but the GGUF file, so a reader cannot lean on the HF files beside it."""
    folder = tmp_path / f"gguf-{name.split('.')[0]}"
    folder.mkdir(exist_ok=True)
    return folder / name


def read_back(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


IDS = torch.randint(0, CUT + 22, (2, 17), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------- tensor bytes
def test_q8_0_bytes_equal_gguf_quantizer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 256, generator=g) * torch.logspace(-3, 2, 24).unsqueeze(1)  # (rows, cols), scales 1e-3..1e2
    x[3, :32] = 0  # an all-zero block: scale 0, codes 0
    x[5, :32] = torch.arange(32) - 15.5  # with 127 in the block, d = 1: codes of exactly n.5, rounded away from 0
    x[5, 0] = 127
    ours = quantize_q8_0(x.numpy())
    assert ours.shape == (24, 256 // 32 * 34) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0))
    back = decode(ours, "Q8_0", (24, 256))
    np.testing.assert_array_equal(back.numpy(), gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q8_0))
    block_max = x.abs().reshape(24, 8, 32).amax(-1, keepdim=True)  # (rows, blocks, 1)
    assert back[5, 1:5].tolist() == [-15, -14, -13, -12]  # -14.5 -> -15, ..., -11.5 -> -12
    # error: half a step (d / 2 = max / 254), plus up to 127 codes times the fp16 rounding of d (2^-11 of d,
    # or half fp16's subnormal spacing 2^-24 for a scale below 2^-14: row 0's blocks)
    d = block_max / 127
    bound = d / 2 + 127 * torch.maximum(d * 2**-11, torch.tensor(2.0**-25))
    assert ((back - x).abs().reshape(24, 8, 32) <= bound * 1.0001).all()


def test_round_half_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(round_half_away(x), [1, 2, 3, -1, -3, 0, 0, 127, 0])


@pytest.mark.parametrize("kind, ggml_type", [("f16", "F16"), ("bf16", "BF16")])
def test_half_precision_bits_equal_gguf(kind, ggml_type):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 300
    data, stored = encode(x, kind)
    assert stored == ggml_type
    reference = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[ggml_type])
    np.testing.assert_array_equal(data.view(np.uint8).reshape(8, -1), reference.view(np.uint8).reshape(8, -1))


def test_norms_and_biases_stay_f32_and_odd_rows_fall_back_to_f16():
    assert encode(torch.ones(64), "q8_0")[1] == "F32" and encode(torch.ones(64), "bf16")[1] == "F32"
    assert encode(torch.ones(4, 64), "q8_0")[1] == "Q8_0"
    assert encode(torch.ones(4, 80), "q8_0")[1] == "F16"  # 80 is no multiple of 32: as llama.cpp's converter


# ---------------------------------------------------------------------------------- names, rotary
def test_tensor_names_are_llama_cpps():
    for arch, kind in ((gguf.MODEL_ARCH.QWEN2, "qwen2"), (gguf.MODEL_ARCH.LLAMA, "llama")):
        names = gguf.TensorNameMap(arch, 2)
        hf = hf_model(hf_config(kind, bias=True, tie=False))
        for name, _ in hf.named_parameters():
            base, suffix = name.rsplit(".", 1)
            assert tensor_name(name) == f"{names.get_name(base)}.{suffix}", name


def test_rope_interleave_pairs_each_heads_halves():
    rows = torch.arange(2 * 8).float()  # 2 heads of head_dim 8: rows 0-3 / 4-7 are head 0's halves
    assert rope_interleave(rows, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    w = torch.randn(16, 3)
    assert torch.equal(rope_interleave(w, 2), w[rope_interleave(rows, 2).long()])


def test_llama_q_k_rows_are_permuted_qwen2_written_as_they_are(tmp_path, cut_is_qwen2):
    for kind in ("qwen2", "llama"):
        ckpt = checkpoint(tmp_path, kind, cut_is_qwen2)
        model = load_model(ckpt)
        path = gguf_alone(tmp_path, f"{kind}.gguf")
        export_gguf(model, path, "f32")
        stored = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(path).tensors}
        q, k = model.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.k_proj.weight
        if kind == "qwen2":
            assert torch.equal(stored["blk.1.attn_q.weight"], q) and torch.equal(stored["blk.1.attn_k.weight"], k)
            assert torch.equal(stored["blk.1.attn_q.bias"], model.model.layers[1].self_attn.q_proj.bias)
            assert "output.weight" not in stored  # tied: llama.cpp multiplies by token_embd
        else:
            assert torch.equal(stored["blk.1.attn_q.weight"], rope_interleave(q, 4))
            assert torch.equal(stored["blk.1.attn_k.weight"], rope_interleave(k, 2))
            assert not torch.equal(stored["blk.1.attn_q.weight"], q)
            assert torch.equal(stored["output.weight"], model.lm_head.weight)
        assert torch.equal(stored["blk.1.attn_v.weight"], model.model.layers[1].self_attn.v_proj.weight)


# -------------------------------------------------------------------------------- logits read back
def rounded_like(model, kind):
    """Our model computing with each 2-D weight as the file stores it (rounded to f16/bf16/q8_0)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                data, stored = encode(p, kind)
                p.copy_(decode(data, stored, tuple(p.shape)))
    return model


# (type, bound on |logit difference| / max |logit| against the unrounded model: the weights' own rounding)
PRECISIONS = [("f32", 0.0), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 5e-2)]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("gguf_type, bound", PRECISIONS)
def test_logits_read_back_by_transformers(tmp_path, cut_is_qwen2, kind, gguf_type, bound):
    """f32: equal to 1e-6 (in fact bit-equal). f16/bf16/q8_0: equal to 1e-5 to our model with the same
    rounded weights (so every tensor is where it should be and rounded as stated), and within `bound` of
    the unrounded model (relative to the largest logit; f16 keeps 11 significant bits, bf16 8, q8_0 a
    step of 1/127 of each block's largest weight)."""
    ckpt = checkpoint(tmp_path, kind, cut_is_qwen2)
    path = gguf_alone(tmp_path)
    export_gguf(load_model(ckpt), path, gguf_type)
    back = read_back(path)
    assert back.config.model_type == kind and back.config.num_key_value_heads == 2
    with torch.no_grad():
        theirs = back(IDS).logits
        exact = load_model(ckpt)(IDS)
        same_rounding = rounded_like(load_model(ckpt), gguf_type)(IDS)
    torch.testing.assert_close(theirs, same_rounding, atol=1e-6 if gguf_type == "f32" else 1e-5, rtol=0)
    assert (theirs - exact).abs().max() <= bound * exact.abs().max()
    if gguf_type != "f32":
        assert (theirs - exact).abs().max() > 0  # the rounding did happen


# --------------------------------------------------------------------------------------- metadata
def test_metadata_keys_one_by_one(tmp_path, cut_is_qwen2):
    for kind in ("qwen2", "llama"):
        ckpt = checkpoint(tmp_path, kind, cut_is_qwen2, hidden=64, heads=4, kv=2, layers=2, inter=96, max_positions=512)
        path = gguf_alone(tmp_path, f"{kind}.gguf")
        export_gguf(load_model(ckpt), path, "q8_0")
        meta = read_metadata(path)
        expected = {
            "general.architecture": kind, "general.type": "model", "general.name": kind, "general.file_type": 7,
            "general.quantization_version": 2,
            f"{kind}.vocab_size": VOCAB, f"{kind}.context_length": 512, f"{kind}.embedding_length": 64,
            f"{kind}.feed_forward_length": 96, f"{kind}.block_count": 2, f"{kind}.attention.head_count": 4,
            f"{kind}.attention.head_count_kv": 2, f"{kind}.attention.key_length": 16,
            f"{kind}.attention.value_length": 16, f"{kind}.rope.dimension_count": 16,
            f"{kind}.rope.freq_base": THETA[kind], f"{kind}.attention.layer_norm_rms_epsilon": np.float32(1e-6),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.bos_token_id": CUT, "tokenizer.ggml.eos_token_id": CUT + 2,
            "tokenizer.ggml.padding_token_id": CUT, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": False,
            "tokenizer.chat_template": json.loads((QWEN_DIR / "tokenizer_config.json").read_text())["chat_template"],
        }
        for key, value in expected.items():
            assert meta[key] == value, key
        tokens = meta["tokenizer.ggml.tokens"]
        assert len(tokens) == VOCAB and tokens[CUT + 2] == "<|im_end|>" and tokens[VOCAB - 1] == f"[PAD{VOCAB - 1}]"


@pytest.fixture(scope="module")
def full_tokenizer_gguf(tmp_path_factory):
    """A one-layer qwen2 model with Qwen2.5's real vocabulary size and tokenizer, written once."""
    tmp = tmp_path_factory.mktemp("full")
    config = hf_config("qwen2", vocab=151936, theta=1e6, layers=1, hidden=32, heads=2, kv=1, inter=32)
    config.bos_token_id, config.eos_token_id = 151643, 151645
    hf_model(config).save_pretrained(tmp / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(QWEN_DIR / name, tmp / "ckpt" / name)
    path = gguf_alone(tmp)
    export_gguf(load_model(tmp / "ckpt"), path, "f16")
    return path


def test_full_tokenizer_metadata(full_tokenizer_gguf):
    """The real Qwen2.5 vocabulary: every id where the tokenizer has it, types as llama.cpp's converter
    gives them, the padding rows, the merges, and the special ids exactly as gguf's SpecialVocab finds them."""
    meta = read_metadata(full_tokenizer_gguf)
    spec = json.loads((QWEN_DIR / "tokenizer.json").read_text())
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 151936 and meta["tokenizer.ggml.pre"] == "qwen2"
    assert all(tokens[i] == t for t, i in spec["model"]["vocab"].items())
    assert tokens[151643] == "<|endoftext|>" and types[151643] == 3  # CONTROL
    assert tokens[151657] == "<tool_call>" and types[151657] == 4  # USER_DEFINED: an added, not special token
    assert tokens[151659] == "<|fim_prefix|>" and types[151659] == 3  # looks special: CONTROL, as llama.cpp
    assert tokens[151665] == "[PAD151665]" and types[151665] == 5 and types[100] == 1
    special = gguf.SpecialVocab(QWEN_DIR, load_merges=True, n_vocab=151936)
    assert meta["tokenizer.ggml.merges"] == special.merges
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    assert {k: meta[f"tokenizer.ggml.{names[k]}"] for k in names if f"tokenizer.ggml.{names[k]}" in meta} \
        == special.special_token_ids == {"bos": 151643, "eos": 151645, "pad": 151643}
    assert meta["tokenizer.ggml.add_bos_token"] is special.add_special_token["bos"] is False
    assert meta["tokenizer.chat_template"] == special.chat_template


def test_full_tokenizer_read_back_encodes_and_decodes_a_chat_like_ours(full_tokenizer_gguf):
    """transformers rebuilds the tokenizer from the GGUF alone (the steps of AutoTokenizer's GGUF path,
    without its config parse, which takes ~10 s per read of a 151,936-token file)."""
    from jinja2 import Template
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(full_tokenizer_gguf))
    theirs, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    ours = load_tokenizer(QWEN_DIR)
    text = ours.chat_prompt(CHAT) + "12345 67.890;-1e-3 naïve 你好 🦙\n\n  spaces"
    assert theirs.encode(text, add_special_tokens=True).ids == ours.encode(text)
    assert theirs.decode(ours.encode(text), skip_special_tokens=False) == text
    template = Template(tokenizer_config["chat_template"])
    assert template.render(messages=CHAT, add_generation_prompt=True) == ours.chat_prompt(CHAT)
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["pad_token"]) \
        == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")


def test_pre_tokenizer_fingerprint(tmp_path):
    from tokenizers import Tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    assert gguf_tokenizer.pre_tokenizer_name(Tokenizer.from_file(str(QWEN_DIR / "tokenizer.json")), folder) == "qwen2"
    spec = json.loads((QWEN_DIR / "tokenizer.json").read_text())  # the same vocabulary under GPT-2's regex
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    with pytest.raises(UserError, match="pre-tokenizers"):
        gguf_tokenizer.pre_tokenizer_name(Tokenizer.from_str(json.dumps(spec)), folder)


SMOLLM2 = QWEN_DIR.parents[1] / "cache" / "smollm2"  # /work/cache/smollm2 on the developers' machine only


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer not present")
def test_smollm2_tokenizer_is_smollm_and_matches_special_vocab():
    meta = gguf_tokenizer.tokenizer_metadata(SMOLLM2, 49152)
    special = gguf.SpecialVocab(SMOLLM2, load_merges=True, n_vocab=49152)
    assert meta["pre"] == "smollm" and meta["merges"] == special.merges
    assert meta["special_ids"] == special.special_token_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert meta["add_special"] == {"bos": False, "eos": False}


# ------------------------------------------------------------------------------ adapters and a run
def randomize_adapters(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind, rslora", [("qwen2", False), ("llama", False), ("llama", True)])
def test_adapter_gguf_over_the_base_gguf_is_the_merged_gguf(tmp_path, cut_is_qwen2, kind, rslora):
    """What llama.cpp computes with `--lora`: W + (alpha / r) * B A, from the adapter file's tensors and
    alpha, over the base file's W; it equals the merged file's weights (llama's q/k permuted too)."""
    ckpt = checkpoint(tmp_path, kind, cut_is_qwen2)
    model = load_model(ckpt)
    lora.apply_lora(model, rank=4, alpha=8, targets="all", use_rslora=rslora, verbose=False)
    randomize_adapters(model)
    lora.save_adapter(model, tmp_path / "adapter")
    export_gguf(load_model(ckpt), tmp_path / "base.gguf", "f32")
    export_gguf(model, tmp_path / "merged.gguf", "f32")
    export_adapter_gguf(tmp_path / "adapter", model.config, tmp_path / "adapter.gguf")
    read = {f: gguf.GGUFReader(tmp_path / f) for f in ("base.gguf", "merged.gguf", "adapter.gguf")}
    tensors = {f: {t.name: torch.from_numpy(np.array(t.data)) for t in r.tensors} for f, r in read.items()}
    meta = read_metadata(tmp_path / "adapter.gguf")
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", kind)
    alpha = meta["adapter.lora.alpha"]
    assert alpha == pytest.approx(8 * (2 if rslora else 1))  # rsLoRA: alpha / sqrt(4) == (8 * 2) / 4
    adapted = [n for n in tensors["base.gguf"] if n + ".lora_a" in tensors["adapter.gguf"]]
    assert len(adapted) == 7 * 2 and len(tensors["adapter.gguf"]) == 2 * len(adapted)
    for name in adapted:
        a, b = tensors["adapter.gguf"][name + ".lora_a"], tensors["adapter.gguf"][name + ".lora_b"]  # (r, in), (out, r)
        assert a.shape[0] == b.shape[1] == 4
        rebuilt = tensors["base.gguf"][name] + alpha / b.shape[1] * (b @ a)  # (out, in)
        torch.testing.assert_close(rebuilt, tensors["merged.gguf"][name], atol=1e-6, rtol=1e-6)
    untouched = [n for n in tensors["base.gguf"] if n not in adapted]
    assert all(torch.equal(tensors["base.gguf"][n], tensors["merged.gguf"][n]) for n in untouched)


def test_merged_tensors_leave_the_model_alone_and_match_merge(tmp_path, cut_is_qwen2):
    model = load_model(checkpoint(tmp_path, "qwen2", cut_is_qwen2))
    lora.apply_lora(model, rank=4, targets="all", verbose=False)
    randomize_adapters(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    state = merged_tensors(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    lora.merge(model)
    assert set(state) == {n for n in before if ".lora_" not in n}
    assert all(torch.equal(state[n], p) for n, p in model.named_parameters() if ".lora_" not in n)
    assert set(gguf_tensors(state, model.config)) == {t for t in map(tensor_name, state)}


def test_qlora_merges_into_the_dequantized_weights(tmp_path, cut_is_qwen2):
    model = load_model(checkpoint(tmp_path, "llama", cut_is_qwen2), quantize="nf4")
    lora.apply_lora(model, rank=4, targets=["q_proj", "down_proj"], verbose=False)
    randomize_adapters(model)
    state = merged_tensors(model)
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj
    merged_q = q.weight.dequantize(torch.float32) + q.delta_weight()  # (out, in), added in fp32
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], merged_q)
    assert torch.equal(state["model.layers.0.self_attn.k_proj.weight"], k.weight.dequantize(torch.float32))
    assert all(t.dtype == torch.float32 for t in state.values())


def test_adapter_for_another_model_is_refused(tmp_path, cut_is_qwen2):
    model = load_model(checkpoint(tmp_path, "qwen2", cut_is_qwen2))
    lora.apply_lora(model, rank=4, targets="all", verbose=False)
    lora.save_adapter(model, tmp_path / "adapter")
    other = load_model(checkpoint(tmp_path, "llama", cut_is_qwen2, hidden=32, heads=2, kv=1)).config
    with pytest.raises(UserError, match="does not fit the base model"):
        export_adapter_gguf(tmp_path / "adapter", other, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


def test_trained_run_merged_gguf_matches_the_merged_hf_folder(tmp_path, cut_is_qwen2):
    """A real (short) LoRA run, exported by the CLI both ways: the GGUF, read by transformers, gives the
    merged Hugging Face folder's logits (f32: to 1e-6); the adapter GGUF has every trained matrix."""
    ckpt = checkpoint(tmp_path, "qwen2", cut_is_qwen2)
    run = tmp_path / "run"
    train.train(["--model", str(ckpt), "--systems", "6", "--context-length", "48", "--batch-size", "2", "--steps", "3",
                 "--save-every", "3", "--eval-every", "3", "--eval-batches", "1", "--targets", "all", "--lr", "1e-2",
                 "--out", str(run)])
    path = gguf_alone(tmp_path)
    export_cli.main(["--model", str(ckpt), "--adapter", str(run), "--out", str(tmp_path / "merged"),
                     "--gguf", str(path), "--gguf-type", "f32", "--gguf-adapter", str(tmp_path / "adapter.gguf")])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = merged(IDS).logits
        assert (expected - base(IDS).logits).abs().max() > 1e-3  # the run did change the model
        torch.testing.assert_close(read_back(path)(IDS).logits, expected, atol=1e-6, rtol=0)
    assert len(gguf.GGUFReader(tmp_path / "adapter.gguf").tensors) == 2 * 7 * 2


# -------------------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path, cut_is_qwen2, monkeypatch, capsys):
    with pytest.raises(UserError, match="tokenizer"):
        export_gguf(load_model("tiny"), tmp_path / "x.gguf")
    ckpt = checkpoint(tmp_path, "qwen2", cut_is_qwen2)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(UserError, match=r"^GGUF export needs the gguf package: pip install gguf$"):
        export_gguf(load_model(ckpt), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(SystemExit) as e:
        export_cli.main(["--model", str(ckpt), "--adapter", str(tmp_path)])
    assert e.value.code == 2 and "nothing to write" in capsys.readouterr().err

