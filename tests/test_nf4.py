"""NF4 against bitsandbytes (the oracle), and QLoRA end to end: loading, training, adapters, export."""

import json

import pytest
import torch

import lora
import train
from common.cli import UserError
from model import load_model, save_pretrained
from model import nf4
from model.nf4 import (NF4_CODE, NF4_MIDPOINTS, NF4Linear, NF4Weight, dynamic_map_8bit, nf4_codes, nf4_codes_by_search,
                       quantize_nf4, quantize_projections)
from model.tiny import tiny_model, tiny_tokenizer
from tests.conftest import QWEN_DIR, needs_qwen_files
from tests.test_train import TINY, records

IDS = torch.randint(0, 79, (2, 17), generator=torch.Generator().manual_seed(1))



@pytest.fixture
def bnb():
    """bitsandbytes' functions, the oracle; only the tests that compare with it skip without it.
    (conftest.py imports it with TORCHDYNAMO_DISABLE=1, so its CPU kernels run eagerly.)"""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (a test-only oracle) is not installed")


def bnb_quantize(bnb, x, double_quant):
    packed, state = bnb.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return packed, state, bnb.dequantize_4bit(packed, state)


def random_cases():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(256, 64, generator=g)  # a multiple of 64
    yield torch.randn(33, 37, generator=g) * 0.02  # 1,221 values: a short last block and an odd count
    yield torch.randn(1, 1, generator=g)
    yield (torch.randn(96, 200, generator=g) * 3).to(torch.bfloat16)  # bf16 weights, as checkpoints hold them
    yield torch.randn(700, 64, generator=g)  # 700 blocks: 3 absmax blocks of 256, the last one short
    yield (torch.randn(301, 509, generator=g) * 0.02).to(torch.bfloat16)  # 3 chunks of nf4_codes, the last short


def adversarial_cases():
    mid = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2)  # exactly on the midpoints: ties
    one = torch.tensor([1.0])  # absmax 1: the scaled values are the midpoints themselves
    yield torch.cat([one, mid, -mid, mid * (1 - 1e-6), torch.zeros(18),
                     one, mid * (1 + 1e-6), -mid * (1 + 1e-6), torch.zeros(33)]).reshape(2, 64)
    yield torch.cat([torch.zeros(64), torch.randn(64)]).reshape(2, 64)  # a block of zeros
    huge = torch.randn(128) * 0.01
    huge[5] = 1e30
    yield huge.reshape(2, 64)  # one huge value flattens its block, not the next
    yield torch.zeros(3, 5)  # nothing but zeros, and a size that is not a multiple of 64
    yield torch.full((1, 100), -2.5)


CASES = list(random_cases()) + list(adversarial_cases())


def test_code_books_are_bitsandbytes(bnb):
    assert torch.equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map_8bit(), bnb.create_dynamic_map(signed=True).cpu())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_single_quantization_is_bit_identical_to_bitsandbytes(bnb, case):
    x = CASES[case]
    packed, state, deq = bnb_quantize(bnb, x, double_quant=False)
    ours = quantize_nf4(x, double_quant=False)
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(x.dtype), deq)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_double_quantization_matches_bitsandbytes(bnb, case):
    x = CASES[case]
    packed, state, deq = bnb_quantize(bnb, x, double_quant=True)
    ours = quantize_nf4(x, double_quant=True)
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax, state.absmax)  # the 8-bit codes of the block scales
    assert torch.equal(ours.absmax_offset, state.offset) and torch.equal(ours.absmax_scale, state.state2.absmax)
    restored = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    torch.testing.assert_close(ours.block_absmax(), restored, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.dequantize(x.dtype), deq, rtol=1e-6, atol=1e-30)


def test_error_on_standard_normal_data_is_bitsandbytes_figure(bnb):
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    ours = (quantize_nf4(x, double_quant=False).dequantize() - x).abs().mean().item()
    theirs = (bnb_quantize(bnb, x, double_quant=False)[2] - x).abs().mean().item()
    assert ours == theirs and abs(ours - 0.0728) < 5e-4


def test_double_quantization_saves_what_the_docstring_says():
    q1, q2 = quantize_nf4(torch.randn(4096, 1024), double_quant=False), quantize_nf4(torch.randn(4096, 1024))
    n = 4096 * 1024
    assert 8 * q1.nbytes / n == pytest.approx(4.5, abs=1e-6)
    assert 8 * q2.nbytes / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)  # 4.127


def test_codes_by_table_equal_codes_by_search_in_every_interval_of_the_table():
    top = torch.arange(65536, dtype=torch.int64) << 16  # every float32's top 16 bits, with low bits:
    lows = [0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF] + torch.randint(0, 0x10000, (4,), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.cat([(top | low).to(torch.int32).view(torch.float32) for low in lows]).clamp(-1, 1)  # NaN stays NaN
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    near = torch.cat([NF4_MIDPOINTS, NF4_MIDPOINTS.nextafter(up), NF4_MIDPOINTS.nextafter(down), NF4_CODE,
                      torch.tensor([0.0, -0.0, float("nan"), 1e-40, -1e-40])])
    for values in (x, near, torch.rand(100_003, generator=torch.Generator().manual_seed(1)) * 2 - 1):
        assert torch.equal(nf4_codes(values), nf4_codes_by_search(values))
    assert nf4_codes(NF4_MIDPOINTS).tolist() == list(range(15))  # a tie takes the lower code


def test_loading_quantizes_exactly_as_the_search_did(tmp_path, monkeypatch):
    save_pretrained(tiny_model(), tmp_path / "ckpt", tiny_tokenizer())
    fast = dict(load_model(tmp_path / "ckpt", quantize="nf4").named_buffers())
    monkeypatch.setattr(nf4, "nf4_codes", nf4_codes_by_search)  # the implementation before the table
    plain = dict(load_model(tmp_path / "ckpt", quantize="nf4").named_buffers())
    assert fast.keys() == plain.keys() and all(torch.equal(fast[k], plain[k]) for k in fast)


def test_tables_are_built_once_per_device(monkeypatch):
    built = []
    monkeypatch.setattr(nf4, "_ON_DEVICE", {})
    monkeypatch.setattr(nf4, "_BUILDERS", {k: (lambda k=k, f=f: built.append(k) or f()) for k, f in nf4._BUILDERS.items()})
    for _ in range(3):
        quantize_nf4(torch.randn(64, 64)).dequantize()
    assert sorted(built) == sorted(set(nf4._BUILDERS) - {"nf4_midpoints"})  # each once (the search's is unused)
    assert nf4.on_device("nf4_pairs", torch.device("cpu")) is nf4.on_device("nf4_pairs", "cpu")


# ----------------------------------------------------------------------------------------- layer
def test_nf4_layer_equals_a_linear_with_the_dequantized_weight_and_gives_input_gradients_only():
    linear = torch.nn.Linear(64, 48)
    layer = NF4Linear.from_linear(linear)
    plain = torch.nn.Linear(64, 48)
    with torch.no_grad():
        plain.weight.copy_(layer.weight.dequantize())
        plain.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, plain(x), atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    (gx_plain,) = torch.autograd.grad(plain(x), x, grad)
    torch.testing.assert_close(gx, gx_plain, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


def test_quantized_model_equals_the_model_with_dequantized_weights():
    quantized, plain = tiny_model(), tiny_model()
    quantize_projections(quantized)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, NF4Weight):
                plain.get_parameter(name).copy_(m.dequantize())
        torch.testing.assert_close(quantized(IDS), plain(IDS), atol=1e-5, rtol=1e-5)


@needs_qwen_files
def test_qwen_linear_weights_take_at_most_190_mb():
    from model import Transformer, load_config

    with torch.device("meta"):
        model = Transformer(load_config(QWEN_DIR)).to(torch.bfloat16)
        linear_bf16 = sum(p.numel() * 2 for n, p in model.named_parameters() if n.split(".")[-2] in
                          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") and "weight" in n)
        quantize_projections(model)
    nf4 = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Weight) for b in m.buffers())
    assert round(linear_bf16 / 1e6, 1) == 715.7
    assert nf4 <= 190e6, nf4


def test_load_model_quantizes_tensor_by_tensor_the_same_way(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "ckpt", tiny_tokenizer(), max_shard_bytes=30_000)
    loaded = load_model(tmp_path / "ckpt", quantize="nf4")
    quantize_projections(model)
    want, got = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))
    with pytest.raises(UserError, match="unknown quantization"):
        load_model(tmp_path / "ckpt", quantize="int3")


# ---------------------------------------------------------------------------------------- QLoRA
def test_qlora_run_learns_and_its_adapter_round_trips(tmp_path):
    out = train.train(TINY + ["--steps", "30", "--quantize", "nf4", "--out", str(tmp_path / "run")])
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert out["stopped"] == "done" and sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["quantize"] == "nf4"
    # the adapter (PEFT format, as usual) into a fresh quantized model gives the trained model's logits
    a, b = load_model("tiny", quantize="nf4"), load_model("tiny", quantize="nf4")
    lora.load_adapter(a, tmp_path / "run")
    lora.save_adapter(a, tmp_path / "again")
    lora.load_adapter(b, tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS)) and not torch.equal(a(IDS), load_model("tiny", quantize="nf4")(IDS))


def test_qlora_export_merges_into_dequantized_weights_in_bf16(tmp_path):
    import transformers

    model = load_model("tiny", quantize="nf4")
    lora.apply_lora(model, rank=4, targets="all", verbose=False)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        expected = model(IDS)
    with pytest.raises(UserError, match="cannot merge LoRA into 4-bit NF4 weights"):
        lora.merge(model)
    lora.merge_and_export(model, tmp_path / "merged", tiny_tokenizer())
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    plain = load_model(tmp_path / "merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():  # bf16 weights: within bf16 rounding of the quantized model with its adapter
        torch.testing.assert_close(plain(IDS), expected, atol=0.15, rtol=0.02)
        torch.testing.assert_close(ref(IDS).logits, plain(IDS), atol=1e-4, rtol=1e-4)


def test_without_bitsandbytes_only_the_oracle_comparisons_skip():
    """bitsandbytes hidden: the tests that compare with it skip, the others still run."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    hide = ("import sys, pytest; sys.modules['bitsandbytes'] = sys.modules['bitsandbytes.functional'] = None; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_nf4.py', '-k', "
            "'nf4_layer_equals or code_books']))")
    proc = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "1 passed, 1 skipped" in proc.stdout, proc.stdout[-2000:]
