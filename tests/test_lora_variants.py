"""DoRA, LoRA+, PiSSA/OLoRA and rsLoRA, each against PEFT (the test-only oracle)."""

import copy
import json
import shutil

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file

import lora
from common.cli import UserError
from model import load_model
from training.optim import AdamW
from tests.hf_twins import twin

IDS = torch.randint(0, 79, (2, 13), generator=torch.Generator().manual_seed(2))
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # q and v have biases in Qwen2, o and down none


def peft_model(hf, **cfg):
    """PEFT on a copy of `hf`, B random (init_lora_weights=False) unless an init is given."""
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": "CAUSAL_LM", "init_lora_weights": False, **cfg}
    return peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kw))


def perturb_magnitudes(model, seed=1):
    """m away from ‖W + sBA‖, so the DoRA scale is not 1 (which would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def randomize_B(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.lora_parameters(model).items():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def grads(model, ids, key=lambda n: n):
    """Logits and the gradients of a loss that touches every logit, by our parameter names."""
    model.zero_grad()
    logits = model(ids)
    logits = logits if torch.is_tensor(logits) else logits.logits
    (logits.sin().sum()).backward()
    named = {key(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), named


def peft_name(n):
    """PEFT's parameter name as ours: no wrapper prefix, no adapter name, the magnitude without `.weight`."""
    n = n.removeprefix("base_model.model.").replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector")
    return n.replace(".default.weight", ".weight")


def dora_pair(tmp_path, dropout=0.0):
    """PEFT's DoRA model (random B, perturbed m) and ours loaded from PEFT's saved adapter."""
    hf, _, path = twin(tmp_path)
    pm = peft_model(hf, use_dora=True, lora_dropout=dropout)
    perturb_magnitudes(pm)
    pm.save_pretrained(tmp_path / "peft-dora")
    ours = load_model(path)
    lora.load_adapter(ours, tmp_path / "peft-dora")
    return pm, ours


# ------------------------------------------------------------------------------------------- DoRA
def test_dora_forward_and_gradients_equal_peft_in_float64(tmp_path):
    pm, ours = dora_pair(tmp_path)
    assert isinstance(ours.model.layers[0].self_attn.q_proj, lora.DoRALinear)
    pm, ours = pm.double().train(), ours.double().train()
    theirs_logits, theirs = grads(pm, IDS, peft_name)
    our_logits, our_grads = grads(ours, IDS)
    assert set(our_grads) == set(theirs) and any("lora_magnitude_vector" in n for n in our_grads)
    torch.testing.assert_close(our_logits, theirs_logits, atol=1e-10, rtol=1e-10)
    for n in theirs:
        torch.testing.assert_close(our_grads[n], theirs[n], atol=1e-10, rtol=1e-10, msg=n)


def test_dora_with_dropout_equals_peft(tmp_path):
    """In training with dropout the adapter terms see dropout(x) and the base term is recomputed on it."""
    pm, ours = dora_pair(tmp_path, dropout=0.3)
    assert ours.lora_config["lora_dropout"] == 0.3
    pm, ours = pm.double().train(), ours.double().train()
    torch.manual_seed(7)
    theirs_logits, theirs = grads(pm, IDS, peft_name)
    torch.manual_seed(7)  # the same masks: one dropout call per adapted layer, in the same order
    our_logits, our_grads = grads(ours, IDS)
    torch.testing.assert_close(our_logits, theirs_logits, atol=1e-10, rtol=1e-10)
    for n in theirs:
        torch.testing.assert_close(our_grads[n], theirs[n], atol=1e-10, rtol=1e-10, msg=n)


def test_dora_magnitude_starts_at_the_row_norm_and_changes_nothing(tmp_path):
    hf, ours, _ = twin(tmp_path)
    base = copy.deepcopy(ours)
    lora.apply_lora(ours, rank=4, targets=TARGETS, dora=True, verbose=False)
    q = ours.model.layers[0].self_attn.q_proj
    assert torch.equal(q.lora_magnitude_vector, torch.linalg.vector_norm(q.weight, dim=1))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), base(IDS), atol=1e-5, rtol=1e-5)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                                                                 use_dora=True, task_type="CAUSAL_LM"))
    assert lora.apply_lora(load_model(tmp_path / "qwen2-ckpt"), rank=4, targets=TARGETS, dora=True, verbose=False) \
        == pm.get_nb_trainable_parameters()[0]


def test_dora_saved_adapter_equals_peft_state_dict_and_loads_in_peft(tmp_path):
    pm, ours = dora_pair(tmp_path)
    lora.save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    saved, expected = load_file(tmp_path / "ours" / "adapter_model.safetensors"), peft.get_peft_model_state_dict(pm)
    assert set(saved) == set(expected) and any(k.endswith(".lora_magnitude_vector") for k in saved)
    for k in saved:
        assert torch.equal(saved[k], expected[k]), k
    hf, _, _ = twin(tmp_path / "again")
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), loaded(IDS).logits, atol=1e-5, rtol=1e-5)


def test_dora_merge_equals_peft_merge_and_unload(tmp_path):
    pm, ours = dora_pair(tmp_path)
    with torch.no_grad():
        before = ours.eval()(IDS)
    merged_peft = pm.merge_and_unload()
    lora.merge(ours)
    theirs = dict(merged_peft.named_parameters())
    for name, m in lora.lora_modules(ours).items():
        torch.testing.assert_close(m.weight, theirs[f"{name}.weight"], atol=1e-6, rtol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), before, atol=1e-5, rtol=1e-5)
    lora.unmerge(ours)
    lora.merge_and_export(ours, tmp_path / "merged")  # W' = m/‖W + ΔW‖ (W + ΔW) written as plain weights
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(IDS), before, atol=1e-5, rtol=1e-5)


def test_qdora_on_nf4_uses_the_dequantized_norm(tmp_path):
    """DoRA on an NF4 base equals DoRA on a float base holding the dequantized weights."""
    from model.nf4 import NF4Weight, quantize_projections

    _, quantized, path = twin(tmp_path)
    quantize_projections(quantized)
    plain = load_model(path)
    with torch.no_grad():  # the float twin gets exactly the weights the NF4 model computes with
        for name, m in quantized.named_modules():
            if isinstance(m, NF4Weight):
                plain.get_submodule(name.removesuffix(".weight")).weight.copy_(m.dequantize(torch.float32))
    for model in (quantized, plain):
        lora.apply_lora(model, rank=4, targets=TARGETS, dora=True, verbose=False)
    plain_params = lora.lora_parameters(plain)
    for n, p in lora.lora_parameters(quantized).items():
        assert "lora_magnitude_vector" not in n or torch.equal(p, plain_params[n]), n  # m = ‖W‖ of the dequantized W
    perturb_magnitudes(plain)
    randomize_B(plain)
    with torch.no_grad():
        for n, p in lora.lora_parameters(quantized).items():
            p.copy_(plain_params[n])
    with torch.no_grad():
        torch.testing.assert_close(quantized(IDS), plain(IDS), atol=1e-5, rtol=1e-5)
        with pytest.raises(UserError, match="4-bit"):
            lora.merge(quantized)


# ------------------------------------------------------------------------------------------- LoRA+
@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_groups_equal_peft_and_steps_equal_torch(tmp_path, dora):
    if dora:
        pm, ours = dora_pair(tmp_path)
    else:
        hf, _, path = twin(tmp_path)
        pm = peft_model(hf)
        pm.save_pretrained(tmp_path / "plain")
        ours = load_model(path)
        lora.load_adapter(ours, tmp_path / "plain")
    params = lora.lora_parameters(ours)
    scales = lora.loraplus_lr_scales(params, 16.0)
    peft_opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                         loraplus_weight_decay=0.05, weight_decay=0.05)
    names = {id(p): peft_name(n) for n, p in pm.named_parameters()}
    groups = {}
    for g in peft_opt.param_groups:
        for p in g["params"]:
            groups[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert set(groups) == set(params)
    assert {n: (1e-3 * scales[n], 0.05) for n in params} == groups
    assert any(s == 16.0 for n, s in scales.items() if "magnitude" in n) == dora
    # our AdamW with these factors takes torch's steps with PEFT's groups
    ours_opt = AdamW(params, lr=1e-3, weight_decay=0.05, lr_scale=scales)
    torch_params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    torch_opt = torch.optim.AdamW([{"params": [torch_params[n] for n in params if scales[n] == s], "lr": 1e-3 * s}
                                   for s in sorted(set(scales.values()))], weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for n, p in params.items():
            p.grad = torch.randn(p.shape, generator=g)
            torch_params[n].grad = p.grad.clone()
        ours_opt.step()
        torch_opt.step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), torch_params[n].detach(), atol=1e-7, rtol=1e-6, msg=n)


# ---------------------------------------------------------------------------------- PiSSA, OLoRA
def reseeded_svd_lowrank(monkeypatch, modules):
    """svd_lowrank draws from the global RNG, which PEFT and we reach in different states (PEFT's layer
    construction draws differently): seed it the same just before each call in both."""
    real, calls = torch.svd_lowrank, {"n": 0}

    def seeded(*a, **kw):
        calls["n"] += 1
        torch.manual_seed(1000 + calls["n"])
        return real(*a, **kw)

    for module in modules:
        monkeypatch.setattr(module, "svd_lowrank", seeded)
    return calls


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_and_olora_initial_factors_and_residual_equal_peft(tmp_path, monkeypatch, init):
    import peft.tuners.lora.layer as peft_layer

    hf, ours, _ = twin(tmp_path)
    calls = reseeded_svd_lowrank(monkeypatch, [peft_layer, torch])
    pm = peft_model(hf, init_lora_weights=init)
    calls["n"] = 0
    lora.apply_lora(ours, rank=4, alpha=8, targets=TARGETS, init=init, verbose=False)
    theirs = {peft_name(n): p for n, p in pm.named_parameters()}
    theirs.update({n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in pm.named_parameters()
                   if ".base_layer." in n})
    for name, p in ours.named_parameters():
        assert torch.equal(p, theirs[name]), name  # A, B and the residual W alike
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)  # W_res + sBA = W
    theirs_logits, theirs_grads = grads(pm.train(), IDS, peft_name)
    our_logits, our_grads = grads(ours.train(), IDS)
    torch.testing.assert_close(our_logits, theirs_logits, atol=1e-5, rtol=1e-5)
    assert set(our_grads) == set(theirs_grads)
    for n in our_grads:
        torch.testing.assert_close(our_grads[n], theirs_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_converted_adapter_equals_peft_and_applies_to_the_original_base(tmp_path, init, rslora):
    hf, ours, path = twin(tmp_path)
    pm = peft_model(hf, init_lora_weights=init, use_rslora=rslora)
    pm.save_pretrained(tmp_path / "initial")  # PEFT's recipe: the initial adapter, saved before training
    lora.apply_lora(ours, rank=4, alpha=8, targets=TARGETS, init=init, use_rslora=rslora, verbose=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": move A and B, in both
        for (n, p) in lora.lora_parameters(ours).items():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        theirs = {peft_name(n): p for n, p in pm.named_parameters()}
        for n, p in lora.lora_parameters(ours).items():
            theirs[n].copy_(p)
        trained = ours(IDS)
    lora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours_sd, peft_sd = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(ours_sd) == set(peft_sd)
    for k in ours_sd:
        assert ours_sd[k].shape[0 if "lora_A" in k else 1] == 8 and torch.equal(ours_sd[k], peft_sd[k]), k
    ours_cfg, peft_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("r", "lora_alpha", "use_rslora", "init_lora_weights"):
        assert ours_cfg[key] == peft_cfg[key], key
    fresh = load_model(path)  # the original base, here and in PEFT
    lora.load_adapter(fresh, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(twin(tmp_path / "hf")[0], tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), trained, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(IDS).logits, trained, atol=1e-5, rtol=1e-5)


def test_unconverted_peft_pissa_adapter_loads_here_and_merges_as_peft(tmp_path):
    """Saved without conversion, a PiSSA adapter says init_lora_weights="pissa": loading it redoes the SVD."""
    hf, _, path = twin(tmp_path)
    pm = peft_model(hf, init_lora_weights="pissa")
    randomize_B(pm)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_model(path)
    lora.load_adapter(ours, tmp_path / "peft")
    assert ours.lora_config["init_lora_weights"] == "pissa"
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), pm.eval()(IDS).logits, atol=1e-5, rtol=1e-5)
    lora.merge(ours)
    theirs = dict(pm.merge_and_unload().named_parameters())
    for name, m in lora.lora_modules(ours).items():
        torch.testing.assert_close(m.weight, theirs[f"{name}.weight"], atol=1e-6, rtol=1e-6, msg=name)


def test_pissa_model_reloads_its_own_converted_adapter_bit_for_bit(tmp_path):
    _, ours, path = twin(tmp_path)
    lora.apply_lora(ours, rank=4, targets=TARGETS, init="pissa", verbose=False)
    with torch.no_grad():
        for p in lora.lora_parameters(ours).values():
            p.mul_(1.1)
    lora.save_adapter(ours, tmp_path / "ad")
    again = load_model(path)
    lora.apply_lora(again, rank=4, targets=TARGETS, init="pissa", verbose=False)
    lora.load_adapter(again, tmp_path / "ad")
    for (n, a), b in zip(ours.named_parameters(), again.parameters()):
        assert torch.equal(a, b), n
    first = lora.lora_modules(again)["model.layers.0.self_attn.q_proj"]
    first.initial_A.add_(1e-3)  # another residual than the one trained on: refused, not silently wrong
    with pytest.raises(UserError, match="initialisation computed now differs"):
        lora.load_adapter(again, tmp_path / "ad")


def test_bad_variant_combinations_are_clear_errors():
    from model.tiny import tiny_model

    with pytest.raises(UserError, match="unknown LoRA initialisation 'svd'"):
        lora.apply_lora(tiny_model(), init="svd")
    with pytest.raises(UserError, match="DoRA with --init pissa"):
        lora.apply_lora(tiny_model(), init="pissa", dora=True)


# ------------------------------------------------------------------------------------ train.py
VARIANTS = {"dora": ["--dora", "--dropout", "0.1"], "loraplus": ["--loraplus-ratio", "16", "--dora"],
            "pissa": ["--init", "pissa_niter_2"], "olora-rslora": ["--init", "olora", "--rslora"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_after_a_kill_is_bit_exact_with_each_variant(tmp_path, variant):
    import train
    from tests.test_train import TINY, assert_same_run

    common = TINY + ["--save-every", "4", "--weight-decay", "0.01", *VARIANTS[variant]]
    train.train(common + ["--steps", "8", "--out", str(tmp_path / "once")])
    train.train(common + ["--steps", "6", "--out", str(tmp_path / "twice")])
    shutil.rmtree(tmp_path / "twice" / "checkpoint-000006")  # as if killed after step 6: steps 5-6 and their log are lost
    train.train(["--resume", str(tmp_path / "twice"), "--steps", "8"])
    assert_same_run(tmp_path / "once", tmp_path / "twice")


@pytest.mark.parametrize("flag", [["--dora"], ["--loraplus-ratio", "4"], ["--init", "olora"], ["--rslora"]])
def test_resume_refuses_a_changed_variant_flag(tmp_path, flag):
    import train
    from tests.test_train import TINY

    train.train(TINY + ["--steps", "2", "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match=f"{flag[0]} .* differs from the run's"):
        train.train(["--resume", str(tmp_path / "r"), *flag])


def test_bad_variant_flags_are_clear_errors(tmp_path):
    import train
    from tests.test_train import TINY

    with pytest.raises(UserError, match="unknown LoRA initialisation 'pissa_niter_x'"):
        train.train(TINY + ["--init", "pissa_niter_x", "--out", str(tmp_path / "a")])
    with pytest.raises(UserError, match="--loraplus-ratio must be positive"):
        train.train(TINY + ["--loraplus-ratio", "0", "--out", str(tmp_path / "b")])


# ---------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all"])
@pytest.mark.parametrize("recompute", [False, True])
def test_dora_hardware_count_equals_flop_counter(targets, recompute):
    import flops
    from model.tiny import tiny_model

    model = tiny_model()
    lora.apply_lora(model, rank=4, targets=targets, dora=True, verbose=False)
    rows = flops.check(model, 2, 9, recompute=recompute)
    for row in rows:
        assert row["ours"] == row["flop_counter"], row
        assert row["profiler"] is None or row["ours"] == row["profiler"], row
    plain = tiny_model()
    lora.apply_lora(plain, rank=4, targets=targets, verbose=False)
    extra = flops.count(model, 2, 9).forward_hardware - flops.count(plain, 2, 9).forward_hardware
    assert extra == sum(2 * m.out_features * 4 * m.in_features for m in lora.lora_modules(model).values()) > 0


def test_dora_with_dropout_counts_the_recomputed_base_in_training():
    """In training with dropout the forward + backward has one more product per layer; evaluation does not."""
    import flops
    from torch.utils.flop_counter import FlopCounterMode

    from model.tiny import tiny_model

    model = tiny_model()
    lora.apply_lora(model, rank=4, targets="q_proj,down_proj", dora=True, dropout=0.2, verbose=False)
    model.set_attention("matmul")
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    rep = flops.count(model, 2, 9)
    assert rep.train_only_hardware > 0 and rep.train_only_backward_hardware > 0  # layer 1's input requires grad
    assert counter.get_total_flops() == rep.train_step_hardware
    train_cw = rep.train_step_coursework - rep.optimizer_coursework
    assert train_cw == 3 * (rep.forward_coursework + rep.train_only_coursework + rep.loss_coursework)
    assert rep.eval_coursework == rep.forward_coursework + rep.loss_coursework


def test_dora_coursework_worked_example():
    """One layer, q_proj (4 -> 4, with bias) adapted at r = 1, batch 1 x 3 tokens: DoRA's row over plain LoRA."""
    import flops
    from model import ModelConfig

    cfg = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    lora_cfg = {"r": 1, "target_modules": ["q_proj"]}
    plain, dora = (flops.count(cfg, 1, 3, lora=dict(lora_cfg, use_dora=d)) for d in (False, True))
    norm = 4 * 4 * (2 * 1 - 1) + 2 * 16 + 16 + 4 * 3 + 10 * 4  # B A, scale and add W, square, sums, sqrt
    per_token = 2 * 4 + 3 * 3 * 4 + 3 * 4  # m / norm and -1; 3 more per output element; bias subtraction
    assert dora.ops["dora"].coursework == norm + per_token
    assert dora.forward_coursework - plain.forward_coursework == norm + per_token
    assert dora.trainable_params - plain.trainable_params == 4  # m, one per output row
    assert dora.optimizer_coursework - plain.optimizer_coursework == 28 * 4


def test_converted_pissa_adapter_counts_at_rank_2r(tmp_path):
    import flops
    from model.tiny import tiny_model

    model = tiny_model()
    lora.apply_lora(model, rank=4, targets="all", init="pissa", verbose=False)
    lora.save_adapter(model, tmp_path / "ad")
    loaded = tiny_model()
    lora.load_adapter(loaded, tmp_path / "ad")
    assert loaded.lora_config["r"] == 8
    for row in flops.check(loaded, 2, 5):
        assert row["ours"] == row["flop_counter"], row
    assert flops.count(loaded, 2, 5).ops["lora_A"].hardware == 2 * flops.count(model, 2, 5).ops["lora_A"].hardware


# ---------------------------------------------------------------------------------------- study.py
def test_study_grid_varies_on_off_flags_and_variants(tmp_path):
    from pathlib import Path

    import study
    import train

    args = study.parse_args(["--model", "tiny", "--grid", "dora=0,true", "--grid", "init=kaiming,pissa",
                             "--grid-steps", "2", "--", "--systems", "12", "--context-length", "64"])
    runs = study.grid_runs(args)
    assert [r["name"] for r in runs] == ["grid-dora0-initkaiming", "grid-dora0-initpissa", "grid-doratrue-initkaiming",
                                         "grid-doratrue-initpissa"]
    resolved = [train.resolve_args(study.train_argv(args, r, Path("-")))[0] for r in runs]
    assert [(a.dora, a.init) for a in resolved] == [(False, "kaiming"), (False, "pissa"), (True, "kaiming"),
                                                    (True, "pissa")]
    assert "--no-dora" in study.train_argv(args, runs[0], Path("-"))
    pricing = study.Pricing(args.model)
    plain, pissa, dora = (study.projected_flops(args, r, pricing) for r in runs[:3])
    with pytest.raises(UserError, match="grid-doratrue-initpissa: DoRA with --init pissa is not supported"):
        study.projected_flops(args, runs[3], pricing)  # refused while planning, before any run trains
    assert dora["train"] > plain["train"] == pissa["train"]  # DoRA's norms cost; PiSSA's start does not
    assert pissa["forecast"] > plain["forecast"]  # its converted adapter runs at rank 2r
    with pytest.raises(UserError, match="'dora' is on or off; give its values as 0,1"):
        study.parse_args(["--grid", "dora=0,maybe"])


def test_bench_variants_runs_end_to_end_on_the_tiny_model(tmp_path, capsys):
    import importlib
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        variants = importlib.import_module("variants")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    argv = ["--model", "tiny", "--steps", "2", "--eval-every", "2", "--batch-size", "2", "--context-length", "64",
            "--eval-systems", "2", "--eval-context-steps", "5", "--horizon", "2", "--out", str(tmp_path),
            "--device", "cpu", "--variants", "dora,pissa", "--", "--systems", "12", "--eval-batches", "1"]
    rows = variants.main(argv)
    assert [(r["variant"], r["steps"]) for r in rows] == [("dora", 2), ("pissa", 2)]
    assert rows[0]["flops"] > rows[1]["flops"]  # DoRA's steps cost more
    assert "| dora | --dora | 2 |" in capsys.readouterr().out
    assert variants.main(argv) == json.loads((tmp_path / "variants.json").read_text())["results"]  # kept, not retrained


def test_dora_with_a_base_moving_init_is_refused_while_planning():
    """study.py checks every planned run with train.parse_run_argv: a grid crossing dora=1 with
    init=pissa is refused before anything trains, not when that run starts."""
    import train

    with pytest.raises(UserError, match="DoRA with --init pissa is not supported"):
        train.parse_run_argv(["--model", "tiny", "--dora", "--init", "pissa"])
    train.parse_run_argv(["--model", "tiny", "--dora", "--init", "gaussian"])  # a plain start is fine
