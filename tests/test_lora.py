"""LoRA: exactness, merging, and adapters that PEFT reads and writes."""

import json

import peft
import pytest
import torch

import lora
from common.cli import UserError
from model import load_model
from model.tiny import tiny_model
from tests.hf_twins import twin

IDS = torch.randint(0, 79, (2, 13), generator=torch.Generator().manual_seed(2))


def randomize_adapters(model, seed=0, scale=0.1):
    """Non-zero B (a fresh adapter is the identity, which would hide almost any bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.lora_parameters(model).items():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_fresh_adapter_changes_nothing():
    base, model = tiny_model(), tiny_model()
    lora.apply_lora(model, rank=4, targets="all", verbose=False)
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))
    assert all(m.lora_B.weight.abs().sum() == 0 and m.lora_A.weight.abs().sum() > 0
               for m in lora.lora_modules(model).values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge(tmp_path, dtype):
    _, _, path = twin(tmp_path)  # logits of order 1 (the tiny preset's reach 30, so 1e-5 would be 3e-7 relative)
    model = load_model(path, dtype=dtype)
    base = {n: p.clone() for n, p in model.named_parameters()}
    lora.apply_lora(model, rank=4, targets="all", verbose=False)
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(IDS).float()
        lora.merge(model)
        merged = model(IDS).float()
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=tol)
    lora.unmerge(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    with torch.no_grad():
        assert torch.equal(model(IDS).float(), unmerged)


def test_merge_happens_in_fp32():
    model = tiny_model(dtype=torch.bfloat16)
    lora.apply_lora(model, rank=2, targets=["q_proj"], verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.float().clone()
    randomize_adapters(model)
    expected = (before + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.weight, expected)


def test_trainable_count_matches_peft(tmp_path):
    hf, ours, _ = twin(tmp_path)
    for targets in (["q_proj", "v_proj"], "all"):
        model = load_model(tmp_path / "qwen2-ckpt")
        n = lora.apply_lora(model, rank=4, targets=targets, verbose=False)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear" if targets == "all" else targets,
                              task_type="CAUSAL_LM")
        peft_model = peft.get_peft_model(hf_copy(hf), cfg)
        assert n == peft_model.get_nb_trainable_parameters()[0]


def hf_copy(hf):
    import copy

    return copy.deepcopy(hf)


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft(tmp_path, rslora):
    hf, ours, _ = twin(tmp_path)
    lora.apply_lora(ours, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_rslora=rslora, verbose=False)
    randomize_adapters(ours)
    lora.save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), peft_model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_here(tmp_path):
    hf, ours, _ = twin(tmp_path)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    lora.load_adapter(ours, tmp_path / "peft-adapter")
    assert ours.lora_config["target_modules"] == ["k_proj", "o_proj", "up_proj"]
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), peft_model.eval()(IDS).logits, atol=1e-5, rtol=1e-5)


def test_merge_and_export_loads_everywhere(tmp_path):
    import transformers

    _, ours, _ = twin(tmp_path)
    lora.apply_lora(ours, rank=4, targets="all", verbose=False)
    randomize_adapters(ours)
    with torch.no_grad():
        expected = ours(IDS)
    lora.merge_and_export(ours, tmp_path / "merged")
    assert not any(m.merged for m in lora.lora_modules(ours).values())  # the model itself is unchanged
    with torch.no_grad():
        assert torch.equal(ours(IDS), expected)
    plain = load_model(tmp_path / "merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_optimizer_step_changes_only_lora():
    model = tiny_model()
    base = {n: p.clone() for n, p in model.named_parameters()}
    lora.apply_lora(model, rank=4, verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora.lora_parameters(model).values()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
            assert p.grad is None, f"frozen {name} got a gradient"
    assert any(p.abs().sum() > 0 for n, p in lora.lora_parameters(model).items() if "lora_B" in n)


def test_mismatched_adapters_are_clear_errors(tmp_path):
    model = tiny_model()
    lora.apply_lora(model, rank=4, verbose=False)
    lora.save_adapter(model, tmp_path / "r4")
    other_rank = tiny_model()
    lora.apply_lora(other_rank, rank=2, verbose=False)
    with pytest.raises(UserError, match="rank 4.*rank 2"):
        lora.load_adapter(other_rank, tmp_path / "r4")
    # the same names with another hidden size: made for another model
    cfg = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / "r4" / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in t.items()},
              tmp_path / "r4" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="made for another model or rank.*lora_A"):
        lora.load_adapter(tiny_model(), tmp_path / "r4")
    with pytest.raises(UserError, match="has no adapter_config.json"):
        (tmp_path / "r4" / "adapter_config.json").unlink()
        lora.load_adapter(tiny_model(), tmp_path / "r4")
    with pytest.raises(UserError, match="adapter folder not found"):
        lora.load_adapter(tiny_model(), tmp_path / "nope")
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match="does not fit this model"):
        lora.load_adapter(tiny_model(), tmp_path / "r4")
    (tmp_path / "r4" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        lora.load_adapter(tiny_model(), tmp_path / "r4")


def test_bad_lora_options_are_refused():
    with pytest.raises(UserError, match="lm_head.*tied"):
        lora.apply_lora(tiny_model(), targets=["lm_head"])
    with pytest.raises(UserError, match="unknown LoRA target"):
        lora.apply_lora(tiny_model(), targets=["qproj"])
    with pytest.raises(UserError, match="rank must be at least 1"):
        lora.apply_lora(tiny_model(), rank=0)
    model = tiny_model()
    lora.apply_lora(model, verbose=False)
    with pytest.raises(UserError, match="already has LoRA"):
        lora.apply_lora(model)


def test_sample_applies_an_adapter(tmp_path, capsys):
    import sample

    model = tiny_model()
    lora.apply_lora(model, rank=4, verbose=False)
    randomize_adapters(model, seed=3, scale=1.0)
    lora.save_adapter(model, tmp_path / "ad")
    sample.main(["--model", "tiny", "--prompt", "1.2", "--max-new-tokens", "8", "--device", "cpu"])
    plain = capsys.readouterr().out
    sample.main(["--model", "tiny", "--prompt", "1.2", "--max-new-tokens", "8", "--device", "cpu", "--adapter", str(tmp_path / "ad")])
    adapted = capsys.readouterr().out
    from model import generate, load_tokenizer

    tok = load_tokenizer("tiny")
    expected = tok.decode(generate(model, [tok.encode("1.2")], 8, eos_ids=tok.eos_ids, vocab_limit=tok.vocab_size)[0])
    assert adapted.strip() == ("1.2" + expected).strip() and adapted != plain
