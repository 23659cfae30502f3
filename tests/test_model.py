"""The model against transformers, the cache against a full forward, and the loader's errors."""

import json
import struct

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from common.cli import UserError
from model import KVCache, generate, load_model, load_tokenizer, save_pretrained
from model.tiny import tiny_model
from tests.conftest import QWEN_DIR, needs_qwen_files
from tests.hf_twins import twin

IDS = torch.randint(0, 79, (2, 17), generator=torch.Generator().manual_seed(1))

PARITY_CASES = {
    "qwen2-tied-gqa2": dict(kind="qwen2"),
    "qwen2-gqa1": dict(kind="qwen2", heads=4, kv=4),
    "qwen2-gqa7-theta": dict(kind="qwen2", hidden=56, heads=7, kv=1, theta=5e5),
    "qwen2-headdim": dict(kind="qwen2", heads=4, kv=2, head_dim=32),
    "llama-untied": dict(kind="llama", heads=4, kv=2, head_dim=8),
    "llama-bias": dict(kind="llama", bias=True),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_match_transformers(tmp_path, case):
    hf, ours, _ = twin(tmp_path, **PARITY_CASES[case])
    with torch.no_grad():
        ref = hf(IDS).logits
        for impl in ("sdpa", "matmul"):
            ours.set_attention(impl)
            torch.testing.assert_close(ours(IDS), ref, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_and_bf16_storage(tmp_path):
    hf, ours, path = twin(tmp_path, dtype=torch.bfloat16, shard="40KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    ref = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-5, rtol=1e-5)
        ours_bf16 = load_model(path, dtype=torch.bfloat16)
        assert ours_bf16.model.embed_tokens.weight.dtype == torch.bfloat16
        ref_bf16 = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        torch.testing.assert_close(ours_bf16(IDS).float(), ref_bf16(IDS).logits.float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("case", ["qwen2-tied-gqa2", "llama-untied"])
def test_greedy_generation_matches_transformers(tmp_path, case):
    hf, ours, _ = twin(tmp_path, seed=1, **PARITY_CASES[case])  # seed 1: a varied continuation
    prompt = IDS[:1, :9]
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                      eos_token_id=None, pad_token_id=0, min_new_tokens=30)[0, 9:].tolist()
    assert generate(ours, [prompt[0].tolist()], 30)[0] == ref
    assert len(set(ref)) > 3, "a degenerate continuation would prove little"


def test_tied_embeddings_are_one_parameter(tmp_path):
    _, ours, path = twin(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    _, untied, _ = twin(tmp_path, kind="llama")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_o_proj_has_no_bias_and_qkv_do():
    attn = tiny_model().model.layers[0].self_attn
    assert attn.o_proj.bias is None and all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_cached_decoding_equals_full_forward():
    model = tiny_model()
    ids = IDS[:, :16]
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 32, torch.float32, "cpu")
        pieces = [model(ids[:, :6], cache=cache)]  # prefill
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]  # one token at a time
        pieces.append(model(ids[:, 10:13], cache=cache))  # a chunk after a filled cache (is_causal would be wrong)
        pieces.append(model(ids[:, 13:16], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_rows_alone():
    model = tiny_model()
    prompts = [IDS[0, :5].tolist(), IDS[1, :12].tolist(), IDS[0, 3:11].tolist()]
    batched = generate(model, prompts, 20, vocab_limit=79)
    assert batched == [generate(model, [p], 20, vocab_limit=79)[0] for p in prompts]
    # and a padded full forward equals each row's own forward at the real positions; the padding id is
    # a real token id (0 occurs in text too), so only the mask may tell padding apart
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0, 7:], ids[1] = torch.tensor(prompts[0]), torch.tensor(prompts[1])
    ids[1, 3] = 0
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0, :7] = False
    with torch.no_grad():
        out = model(ids, pad_mask=pad)
        torch.testing.assert_close(out[0, 7:], model(torch.tensor([prompts[0]]))[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], model(ids[1:])[0], atol=1e-5, rtol=1e-5)


def test_sdpa_equals_matmul_with_cache_and_padding():
    model = tiny_model()
    outs = []
    for impl in ("sdpa", "matmul"):
        model.set_attention(impl)
        cache = KVCache(model.config, 2, 24, torch.float32, "cpu")
        pad = torch.ones(2, 10, dtype=torch.bool)
        pad[0, :4] = False
        with torch.no_grad():
            outs.append(torch.cat([model(IDS[:, :10], pad_mask=pad, cache=cache),
                                   model(IDS[:, 10:13], cache=cache), model(IDS[:, 13:14], cache=cache)], 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_padded_vocab_rows_are_never_sampled():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[79:] = 100.0  # make the padding rows the most likely by far
    for temperature in (0.0, 1.0):
        out = generate(model, [[1, 2, 3]], 10, temperature=temperature, vocab_limit=79,
                       generator=torch.Generator().manual_seed(0))[0]
        assert out and max(out) < 79


def test_generation_stops_on_every_end_token():
    model, tok = tiny_model(), load_tokenizer("tiny")
    assert set(tok.eos_ids) == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    for eos in tok.eos_ids:
        model = tiny_model()
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.weight[eos] = 1.0  # every position now prefers this end token
        assert generate(model, [[1, 2, 3]], 10, eos_ids=tok.eos_ids) == [[]]
        assert len(generate(model, [[1, 2, 3]], 10, eos_ids=[])[0]) == 10  # not an end token: runs to the limit


def test_tiny_preset_is_deterministic():
    a, b = tiny_model(), tiny_model()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_save_pretrained_roundtrip_loads_in_transformers(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "ck", load_tokenizer("tiny"), max_shard_bytes=20_000)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    again = load_model(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, model(IDS), atol=1e-5, rtol=1e-5)
        assert torch.equal(again(IDS), model(IDS))
    assert load_tokenizer(tmp_path / "ck").eos_ids == load_tokenizer("tiny").eos_ids


# ----------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def ckpt(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "ck", load_tokenizer("tiny"))
    return tmp_path / "ck"


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match="missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(UserError, match=r"k_proj.weight has shape \(16, 64\).*\(32, 64\)"):
        load_model(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(UserError, match="does not use: model.layers.0.self_attn.o_proj.bias"):
        load_model(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "empty"])
def test_corrupt_safetensors(ckpt, damage):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage-header":
        f.write_bytes(struct.pack("<Q", 40) + b"{not json" + b" " * 31 + data[48:])
    else:
        f.write_bytes(b"")
    with pytest.raises(UserError, match="corrupt|not a safetensors"):
        load_model(ckpt)


def test_missing_config_and_folder(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    with pytest.raises(UserError, match="config.json not found"):
        load_model(ckpt)
    with pytest.raises(UserError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling"),
    ({"use_sliding_window": True}, "sliding_window"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"num_key_value_heads": 3}, "multiple of"),
])
def test_unsupported_configs_are_refused(ckpt, change, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UserError, match=message):
        load_model(ckpt)


def test_unreachable_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not fetch 'no-such-org/no-such-model'.*local checkpoint folder") as e:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------- the real tokenizer
@needs_qwen_files
def test_real_qwen_tokenizer():
    tok = load_tokenizer(QWEN_DIR)
    assert tok.encode("0.123,1.45;") == [tok.token_to_id(c) for c in "0.123,1.45;"]
    assert len(tok.encode("0.123,1.45;")) == 11
    assert tok.encode("1.23") == [16, 13, 17, 18]
    assert tok.token_to_id("<|im_start|>") == 151644 and tok.token_to_id("<|im_end|>") == 151645
    assert tok.eos_ids == [151645, 151643]
    assert tok.vocab_size == 151665
    prompt = tok.chat_prompt([{"role": "user", "content": "hi"}])
    assert prompt == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                      "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(prompt)[0] == 151644


@needs_qwen_files
def test_real_qwen_config():
    from model import load_config

    cfg = load_config(QWEN_DIR)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (896, 24, 14, 2)
    assert cfg.head_dim == 64 and cfg.rope_theta == 1e6 and cfg.tie_word_embeddings and cfg.vocab_size == 151936


def test_memory_saving_swiglu_equals_the_plain_definition():
    from model.transformer import SwiGLUWithoutStoredSilu

    g = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUWithoutStoredSilu.apply, (gate, up))
    # against the plain definition in fp32: the same value to the bit, the same gradients
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    lean = SwiGLUWithoutStoredSilu.apply(g32, u32)
    plain = torch.nn.functional.silu(g32) * u32
    assert torch.equal(lean, plain)
    grad_out = torch.randn(3, 5, 7, generator=g)
    for a, b in zip(torch.autograd.grad(lean, (g32, u32), grad_out), torch.autograd.grad(plain, (g32, u32), grad_out)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_parity_with_transformers_far_from_the_start(tmp_path):
    """1,100 positions with Qwen2.5's rope_theta = 1e6: RoPE angles, the cache and GQA far from position 0."""
    hf, ours, _ = twin(tmp_path, theta=1e6, max_positions=4096, head_dim=32)
    ids = torch.randint(0, 79, (1, 1100), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits
        for impl in ("sdpa", "matmul"):
            ours.set_attention(impl)
            torch.testing.assert_close(ours(ids)[:, -100:], ref[:, -100:], atol=1e-4, rtol=1e-4)
        ours.set_attention("sdpa")
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, 1100:].tolist()
    assert generate(ours, [ids[0].tolist()], 8) == [expected]


def test_top_k_and_top_p_sample_the_hand_computed_distribution():
    from model.generate import process_logits, sample_next

    p = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    cases = [  # (temperature, top_k, top_p) -> the distribution worked out by hand
        ((1.0, None, None), [0.1, 0.4, 0.2, 0.3]),
        ((1.0, 2, None), [0, 4 / 7, 0, 3 / 7]),  # the two largest, renormalised
        ((1.0, None, 0.6), [0, 4 / 7, 0, 3 / 7]),  # 0.4 < 0.6, so 0.3 joins; the nucleus ends there
        ((1.0, None, 0.75), [0, 4 / 9, 2 / 9, 3 / 9]),  # 0.4 + 0.3 < 0.75, so 0.2 joins too
        ((1.0, None, 0.3), [0, 1, 0, 0]),  # the top token alone already covers 0.3
        ((2.0, 3, None), [0, 0.4**0.5, 0.2**0.5, 0.3**0.5]),  # temperature 2: p^(1/2), then the top 3
    ]
    g = torch.Generator().manual_seed(0)
    for (temperature, top_k, top_p), want in cases:
        want = torch.tensor([want]) / sum(want)
        logits = process_logits(p.log(), temperature, top_k, top_p)
        torch.testing.assert_close(logits.softmax(-1), want, atol=1e-6, rtol=1e-6)
        draws = torch.stack([sample_next(logits.expand(2000, 4), temperature, g) for _ in range(5)]).flatten()
        freq = torch.bincount(draws, minlength=4).float() / len(draws)
        torch.testing.assert_close(freq, want[0], atol=0.015, rtol=0)  # 10,000 draws: ~0.005 standard error
