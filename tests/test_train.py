"""The optimizer, the loss, and the training loop: learning, exact resume, budget, errors."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lora
import train
from common.checkpoints import latest_checkpoint
from common.cli import UserError
from model.loss import lm_loss_sum, lm_loss_sum_reference
from model.tiny import tiny_model
from training.optim import AdamW, clip_grad_norm, lr_at
from tests.conftest import ROOT

TINY = ["--model", "tiny", "--systems", "12", "--context-length", "64", "--batch-size", "2", "--eval-every", "5",
        "--eval-batches", "2", "--lr", "3e-3"]


def run(tmp_path, *extra, out="run"):
    return train.train(TINY + ["--out", str(tmp_path / out), *map(str, extra)])


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def trainer_state(run_dir):
    return torch.load(latest_checkpoint(run_dir) / "trainer_state.pt", weights_only=True)


def assert_same_run(a, b):
    """Two run folders ended in the same place: adapter bytes, optimizer moments, counters, data
    position, RNG, and every metrics line except its wall-clock time."""
    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    assert ca.name == cb.name
    assert (ca / "adapter_model.safetensors").read_bytes() == (cb / "adapter_model.safetensors").read_bytes()
    sa, sb = trainer_state(a), trainer_state(b)
    for key in ("step", "flops", "flops_hardware", "tokens", "data", "metrics_lines", "evaluated"):
        assert sa[key] == sb[key], key
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    assert sa["optimizer"]["step"] == sb["optimizer"]["step"]
    for key in ("m", "v"):
        for name in sa["optimizer"][key]:
            assert torch.equal(sa["optimizer"][key][name], sb["optimizer"][key][name]), (key, name)
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in records(d)] for d in (a, b)]
    assert untimed[0] == untimed[1]


# ---------------------------------------------------------------------------------------- optimizer
def test_adamw_matches_torch():
    torch.manual_seed(0)
    ours_p = {f"p{i}": torch.nn.Parameter(torch.randn(5, 3)) for i in range(3)}
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p.values()]
    ours = AdamW(ours_p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(20):
        grads = [torch.randn(5, 3) * (step + 1) for _ in ref_p]
        for p, q, g in zip(ours_p.values(), ref_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for (name, p), q in zip(ours_p.items(), ref_p):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.m[name], ref.state[q]["exp_avg"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.v[name], ref.state[q]["exp_avg_sq"], atol=1e-6, rtol=1e-6)
    assert ours.step_count == 20


def test_adamw_eps_outside_sqrt_and_decay_times_lr():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = AdamW({"p": p}, lr=0.1, betas=(0.9, 0.999), eps=0.5, weight_decay=0.2)
    p.grad = torch.tensor([0.01])
    opt.step()
    # decay: 1 - 0.1*0.2; m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps)
    assert p.item() == pytest.approx((1 - 0.02) - 0.1 * 0.01 / (0.01 + 0.5), rel=1e-6)


def test_clip_reports_the_pre_clip_norm():
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    ps[0].grad, ps[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_grad_norm(ps, 1.0) == pytest.approx(5.0)
    assert math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps)) == pytest.approx(1.0, rel=1e-5)


def test_lr_schedules():
    assert [lr_at(s, 1.0, 10, warmup=4) for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_at(4, 1.0, 10, warmup=4, schedule="cosine") == 1.0
    assert lr_at(10, 1.0, 10, warmup=4, schedule="cosine") == pytest.approx(0.0)
    assert lr_at(7, 1.0, 10, warmup=4, schedule="cosine") == pytest.approx(0.5)
    assert lr_at(7, 1.0, 10, warmup=4, schedule="linear") == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_chunked_loss_equals_full_logits_cross_entropy(chunk):
    model = tiny_model()
    lora.apply_lora(model, rank=4, verbose=False)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.05)
    ids = torch.randint(0, 79, (3, 12), generator=torch.Generator().manual_seed(0))
    real = torch.ones(3, 12, dtype=torch.bool)
    real[1, 7:] = False
    s, n = lm_loss_sum(model, ids, real, chunk)
    (s / n).backward()
    ours = {k: p.grad.clone() for k, p in lora.lora_parameters(model).items()}
    model.zero_grad()
    ref_sum, ref_n = lm_loss_sum_reference(model, ids, real)
    (ref_sum / ref_n).backward()
    assert n == ref_n == int(real[:, 1:].sum())
    torch.testing.assert_close(s / n, ref_sum / ref_n, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ref_sum / ref_n, F.cross_entropy(model(ids)[:, :-1][real[:, 1:]], ids[:, 1:][real[:, 1:]]))
    for k, p in lora.lora_parameters(model).items():
        torch.testing.assert_close(ours[k], p.grad, atol=1e-5, rtol=1e-5)


def test_chunked_loss_gives_lm_head_its_gradient_when_it_trains():
    """Full fine-tuning: every parameter trains, the tied lm_head/embedding too."""
    ids = torch.randint(0, 79, (2, 10), generator=torch.Generator().manual_seed(2))
    real = torch.ones(2, 10, dtype=torch.bool)
    grads = []
    for loss_fn in (lambda m: lm_loss_sum(m, ids, real, 7), lambda m: lm_loss_sum_reference(m, ids, real)):
        model = tiny_model()
        s, n = loss_fn(model)
        (s / n).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]["model.embed_tokens.weight"].abs().sum() > 0  # = lm_head (tied)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_averages_over_tokens():
    """4 micro-batches with different padding = one batch of all of them."""
    from data.windows import TokenWindows

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 79, (8, 16), generator=g)
    real = torch.ones(8, 16, dtype=torch.bool)
    for i, n in enumerate([16, 3, 9, 16, 12, 2, 16, 7]):
        real[i, n:] = False
    windows = TokenWindows(ids, real)
    grads = []
    for micro in ([torch.arange(8)], [torch.arange(2 * i, 2 * i + 2) for i in range(4)]):
        model = tiny_model()
        torch.manual_seed(0)
        lora.apply_lora(model, rank=4, verbose=False)
        with torch.no_grad():
            for p in lora.lora_parameters(model).values():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        loss, _ = train.accumulated_step(model, windows, micro, lambda: torch.autocast("cpu", enabled=False), 512)
        grads.append((loss, {k: p.grad.clone() for k, p in lora.lora_parameters(model).items()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for k in grads[0][1]:
        torch.testing.assert_close(grads[0][1][k], grads[1][1][k], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- loop
def test_tiny_model_learns(tmp_path):
    out = run(tmp_path, "--steps", "40")
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert out["stopped"] == "done" and len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    vals = [r["val_loss"] for r in records(tmp_path / "run") if "val_loss" in r]
    assert vals[-1] < vals[0]


def test_outputs_config_metrics_and_adapter_only(tmp_path):
    run(tmp_path, "--steps", "6")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["scaler"]["alpha"] > 0 and cfg["args"]["rank"] == 8 and cfg["lora"]["target_modules"] == ["q_proj", "v_proj"]
    recs = records(tmp_path / "run")
    step_rec = next(r for r in recs if "loss" in r)
    assert set(step_rec) >= {"step", "loss", "lr", "grad_norm", "tokens", "flops", "time"}
    assert {"step", "val_loss", "val_ppl"} <= set(next(r for r in recs if "val_loss" in r))
    keys = load_file(latest_checkpoint(tmp_path / "run") / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_base_weights_are_bit_identical_after_training(tmp_path, monkeypatch):
    captured = {}
    real_apply = lora.apply_lora

    def spy(model, **kw):
        captured["model"] = model
        captured["base"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_apply(model, **kw)

    monkeypatch.setattr(train.lora, "apply_lora", spy)
    run(tmp_path, "--steps", "5", "--weight-decay", "0.1")
    model = captured["model"]
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(p, captured["base"][name]), name
            assert p.grad is None


def test_resume_is_exact(tmp_path):
    common = ["--dropout", "0.1", "--weight-decay", "0.01", "--save-every", "5"]
    run(tmp_path, "--steps", "10", *common, out="once")
    run(tmp_path, "--steps", "5", *common, out="twice")
    train.train(["--resume", str(tmp_path / "twice"), "--steps", "10"])
    assert trainer_state(tmp_path / "once")["step"] == 10
    assert [r["step"] for r in records(tmp_path / "twice") if "loss" in r] == list(range(1, 11))
    assert_same_run(tmp_path / "once", tmp_path / "twice")


def test_flop_budget_stops_at_the_right_step(tmp_path, capsys):
    probe = run(tmp_path, "--steps", "1", "--eval-every", "1000", out="probe")
    step, evalc = probe["step_flops"], probe["eval_flops"]
    # room for 3 steps plus the eval at step 5 would not fit: the run must stop after step 3
    budget = 3 * step + step // 2
    out = run(tmp_path, "--steps", "20", "--max-flops", str(budget), out="budget")
    assert out["stopped"] == "budget" and out["step"] == 3 and out["flops"] == 3 * step <= budget
    assert "FLOP budget reached: stopped after step 3" in capsys.readouterr().err
    assert trainer_state(tmp_path / "budget")["step"] == 3
    # an evaluation counts too: with the eval due at step 5, 5 steps + eval must fit
    out = run(tmp_path, "--steps", "20", "--max-flops", str(5 * step + evalc - 1), out="budget-eval")
    assert out["step"] == 4


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = train.accumulated_step
    calls = {"n": 0}

    def nan_on_fifth(*a, **kw):  # a loss that diverges at step 5, after checkpoints at steps 2 and 4
        calls["n"] += 1
        loss, n = real_step(*a, **kw)
        return (float("nan") if calls["n"] == 5 else loss), n

    monkeypatch.setattr(train, "accumulated_step", nan_on_fifth)
    with pytest.raises(UserError, match=r"non-finite at step 5 .*last good checkpoint \(step 4\) is kept"):
        run(tmp_path, "--steps", "20", "--save-every", "2")
    assert trainer_state(tmp_path / "run")["step"] == 4
    assert max(r["step"] for r in records(tmp_path / "run")) == 4


def test_non_finite_loss_before_any_checkpoint_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "accumulated_step", lambda *a, **kw: (float("nan"), 1))
    with pytest.raises(UserError, match=r"non-finite at step 1 .*no checkpoint had been saved yet"):
        run(tmp_path, "--steps", "5")
    assert latest_checkpoint(tmp_path / "run") is None and records(tmp_path / "run") == []


INTERRUPT_COMMON = ["--steps", "12", "--save-every", "4", "--eval-every", "3", "--dropout", "0.1", "--grad-accum", "2"]


def interrupt_at(monkeypatch, where: str, call: int):
    """Deliver Ctrl-C at the `call`-th entry of one phase of the loop, as a real signal would arrive."""
    import signal

    from common import checkpoints

    targets = {"forward": (train, "accumulated_step"), "update": (train.AdamW, "step"),
               "validation": (train, "evaluate"), "save": (checkpoints, "fsync")}
    owner, name = targets[where]
    real, calls = getattr(owner, name), {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signal.SIGINT)  # inside the update it is held back until the step is booked
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("where, call", [("forward", 4), ("update", 5), ("validation", 2), ("save", 2)])
def test_ctrl_c_anywhere_in_a_step_resumes_exactly(tmp_path, monkeypatch, where, call):
    run(tmp_path, *INTERRUPT_COMMON, out="once")
    with monkeypatch.context() as m:
        interrupt_at(m, where, call)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, *INTERRUPT_COMMON, out="twice")
    saved = trainer_state(tmp_path / "twice")
    # during step 4's forward and backward: steps 1-3 done; during the update of step 5: held back
    # until step 5 is booked; during the validation after step 6 (it reruns on resume); while the
    # checkpoint of step 4 is written (the interrupted write is discarded, then written whole)
    assert saved["step"] == {"forward": 3, "update": 5, "validation": 6, "save": 4}[where]
    assert len(records(tmp_path / "twice")) >= saved["metrics_lines"]
    train.train(["--resume", str(tmp_path / "twice")])
    assert_same_run(tmp_path / "once", tmp_path / "twice")


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--data", "/nonexistent/lv.h5"], "data file not found"),
    (["--context-length", "6"], "shorter than one timestep"),
    (["--targets", "lm_head"], "lm_head"),
])
def test_bad_flags_and_data_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        run(tmp_path, "--steps", "2", *flags)


def test_cli_exit_code_and_existing_run(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--rank", "0"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --rank must be at least 1"
    run(tmp_path, "--steps", "2")
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        run(tmp_path, "--steps", "2")
    with pytest.raises(UserError, match="no run to resume: .*nothing-here does not exist"):
        train.train(["--resume", str(tmp_path / "nothing-here")])


def lora_loss_and_grads(setup):
    """Loss and LoRA gradients of a tiny model with non-zero adapters, after `setup(model)`."""
    ids = torch.randint(0, 79, (2, 16), generator=torch.Generator().manual_seed(4))
    model = tiny_model()
    torch.manual_seed(0)
    lora.apply_lora(model, rank=4, targets="all", verbose=False)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    setup(model)
    model.train()
    s, n = lm_loss_sum(model, ids, torch.ones_like(ids, dtype=torch.bool))
    (s / n).backward()
    return (s / n).detach(), {k: p.grad for k, p in lora.lora_parameters(model).items()}


def test_activation_checkpointing_computes_the_same_gradients():
    loss, grads = lora_loss_and_grads(lambda m: None)
    loss_ckpt, grads_ckpt = lora_loss_and_grads(lambda m: setattr(m, "grad_checkpoint", True))
    assert torch.equal(loss, loss_ckpt)
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], atol=1e-6, rtol=1e-5)


def test_compiled_blocks_compute_the_same_loss_and_gradients():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, grads = lora_loss_and_grads(lambda m: None)
    loss_c, grads_c = lora_loss_and_grads(lambda m: m.compile_blocks())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], atol=1e-5, rtol=1e-4)


def test_compile_without_a_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, clang++ or c++ to be found
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="--compile on CPU needs a C\\+\\+ compiler"):
        run(tmp_path, "--steps", "1", "--compile", "--device", "cpu")


RSS_PROBE = r"""
import ctypes, os, sys
from training.memory import reuse_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
took_effect = reuse_freed_memory()
blocks = []
for size in map(int, sys.argv[1:]):
    blocks.append(libc.malloc(size))
    ctypes.memset(blocks[-1], 1, size)
touched = rss()
for p in blocks:
    libc.free(ctypes.c_void_p(p))
print(int(took_effect), touched - rss())
"""


def test_reuse_freed_memory_takes_effect_on_glibc_and_respects_user_tunables(monkeypatch):
    """In a fresh process: a freed 64 MB block stays resident for reuse; glibc's default (or the user's
    own malloc tunables, which are left alone) hands it back to the OS. With room for it, also two
    1.1 GB blocks: each is over 1 GiB and together they free 2.2 GB at the top of the heap, the sizes
    of a 4 x 512 plain-loss step's logits, which an earlier setting (mmap above 1 GiB, trim above
    2 GB) handed back every step."""
    import platform

    from training.memory import reuse_freed_memory

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4194304")
    assert reuse_freed_memory() is False  # the user's allocator settings win
    if not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"):
        monkeypatch.delenv("GLIBC_TUNABLES")
        assert reuse_freed_memory() is False  # not glibc: nothing to do
        return
    released = {}
    for tunables in (None, "glibc.malloc.mmap_threshold=4194304"):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | ({"GLIBC_TUNABLES": tunables} if tunables else {})
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(64 << 20)], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=True)
        took_effect, released[tunables] = map(int, out.stdout.split())
        assert took_effect == (tunables is None)
    assert released[None] < 8 << 20  # kept: at most a few pages went back
    assert released["glibc.malloc.mmap_threshold=4194304"] > 56 << 20  # unmapped at once
    if os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >= 12 << 30:  # 2.2 GB touched: only with room
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        big = str(1100 << 20)
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, big, big], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=True)
        assert int(out.stdout.split()[1]) < 8 << 20  # both kept for the next step

def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from common import devices
    from model import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.parse_device("auto") == torch.device("cpu")
    assert precision.weights_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(UserError, match="no MPS"):
        devices.parse_device("mps")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.parse_device("auto") == torch.device("mps")
    assert precision.weights_dtype("auto", torch.device("mps")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.parse_device(None) == torch.device("cuda")
    assert precision.weights_dtype("auto", torch.device("cuda")) == torch.bfloat16
