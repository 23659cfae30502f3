"""Nothing lost: training killed at random moments (SIGINT, SIGKILL, also inside checkpoint writes) and
resumed until done ends bit for bit where an uninterrupted run ends; bad inputs are one line."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import lora
import train
from common import checkpoints
from common.checkpoints import latest_checkpoint
from common.cli import UserError, run_cli
from model import load_model, save_pretrained
from model.tiny import tiny_model, tiny_tokenizer
from tests.conftest import ROOT
from tests.test_train import TINY, assert_same_run, records, run, trainer_state

# Runs train.py's CLI; with DIE_AT_FSYNC=k it SIGKILLs itself at the k-th fsync of a checkpoint write.
# Each checkpoint makes 5 such calls: its 3 files, its folder (then the rename), the run folder.
DRIVER = r"""
import os, signal, sys
sys.path.insert(0, os.getcwd())
import train
from common import checkpoints
from common.cli import run_cli

die_at, calls = int(os.environ.get("DIE_AT_FSYNC", "0")), [0]
real_fsync = checkpoints.fsync

def fsync(path):
    calls[0] += 1
    if calls[0] == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(path)

checkpoints.fsync = fsync
run_cli(lambda: train.main(sys.argv[1:]))
"""
HANG_GUARD = 900  # seconds: a process that takes longer is stuck, not slow (tests assert correctness, never speed)
FAULT_RUN = TINY + ["--steps", "120", "--save-every", "5", "--eval-every", "7"]
CONFIGS = {"plain": [], "grad-accum-3": ["--grad-accum", "3"], "dropout": ["--dropout", "0.1"]}


def launch(out, flags, die_at=0):
    # resume when the run has written its config, as a user would; start afresh otherwise
    argv = ["--resume", str(out)] if (out / "config.json").exists() else FAULT_RUN + flags + ["--out", str(out)]
    env = {**os.environ, "DIE_AT_FSYNC": str(die_at), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def line_count(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def interrupt_randomly(out, flags, rng: random.Random) -> str:
    """Start (or resume) the run, wait until it makes progress, then SIGINT or SIGKILL it at a random
    moment; returns how it ended."""
    before = line_count(out)
    proc = launch(out, flags)
    deadline = time.monotonic() + HANG_GUARD
    while line_count(out) <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.15))
    if proc.poll() is not None:
        return "finished"
    sig = rng.choice([signal.SIGINT, signal.SIGKILL])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD)
    if sig == signal.SIGINT:  # 130: saved and stopped; 0 or -SIGINT: it finished as the signal landed
        assert proc.returncode in (130, 0, -signal.SIGINT), err
    return sig.name


def finish(out, flags):
    proc = launch(out, flags)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("config", list(CONFIGS))
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, config):
    flags = CONFIGS[config]
    finish(tmp_path / "reference", flags)
    kills = []
    for seed in (0, 1):
        out, rng = tmp_path / f"seed{seed}", random.Random(f"{config}-{seed}")
        # SIGKILL inside a checkpoint write: a file of the first, just before the second's rename,
        # between the third's rename and the retiring of the older one
        for die_at in (2, 9, 15):
            proc = launch(out, flags, die_at=die_at)
            proc.communicate(timeout=HANG_GUARD)
            kills.append(proc.returncode)
            assert proc.returncode == -signal.SIGKILL
        for _ in range(4):
            kills.append(interrupt_randomly(out, flags, rng))
        finish(out, flags)
        assert not list(out.glob(".checkpoint-*")), "a partial checkpoint was left behind"
        assert [c.name for _, c in checkpoints.complete_checkpoints(out)] == ["checkpoint-000120"]
        assert_same_run(tmp_path / "reference", out)
    assert sum(k in ("SIGINT", "SIGKILL", -signal.SIGKILL) for k in kills) >= 10, kills
    assert {"SIGINT", "SIGKILL"} <= set(kills), kills  # both kinds landed mid-training at random moments


def test_a_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    run(tmp_path, "--steps", "4", "--save-every", "2")
    out = tmp_path / "run"
    partial = out / ".checkpoint-000006.partial"
    shutil.copytree(latest_checkpoint(out), partial)
    (partial / "trainer_state.pt").write_bytes(b"torn")
    assert latest_checkpoint(out).name == "checkpoint-000004"
    train.train(["--resume", str(out), "--steps", "6"])
    assert not partial.exists() and latest_checkpoint(out).name == "checkpoint-000006"


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    run(tmp_path, "--steps", "6", "--save-every", "3", "--eval-every", "3", out="once")
    run(tmp_path, "--steps", "3", "--save-every", "3", "--eval-every", "3", out="twice")
    out = tmp_path / "twice"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2\n{"step": 4, "lo')  # an extra line and a torn one, as a kill leaves
    train.train(["--resume", str(out), "--steps", "6"])
    assert_same_run(tmp_path / "once", out)


def test_fresh_run_without_checkpoint_starts_a_new_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "lo')
    run(tmp_path, "--steps", "2", "--eval-every", "100")
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and steps[0]["loss"] != 99.0


def test_resume_can_switch_grad_checkpoint_and_compile_off(tmp_path):
    run(tmp_path, "--steps", "2", "--grad-checkpoint")
    out = tmp_path / "run"
    on = json.loads((out / "config.json").read_text())
    train.train(["--resume", str(out), "--steps", "4", "--no-grad-checkpoint", "--no-compile"])
    off = json.loads((out / "config.json").read_text())
    assert on["args"]["grad_checkpoint"] is True and off["args"]["grad_checkpoint"] is False
    assert off["args"]["compile"] is False
    # the recomputed forward is hardware work: counted with checkpointing, not without
    assert on["flops"]["train_step_hardware"] > off["flops"]["train_step_hardware"]
    assert on["flops"]["train_step"] == off["flops"]["train_step"]
    assert trainer_state(out)["step"] == 4


# ------------------------------------------------------------------------------ one-line errors
def cli(capsys, argv):
    """train.py's command line in-process: (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train.main(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return exit_info.value.code, err


def test_corrupt_trainer_state_is_one_line_and_the_folder_stays_usable(tmp_path, capsys):
    run(tmp_path, "--steps", "3", "--save-every", "3")
    out = tmp_path / "run"
    state_file = latest_checkpoint(out) / "trainer_state.pt"
    good, metrics = state_file.read_bytes(), (out / "metrics.jsonl").read_bytes()
    for damage in (good[: len(good) // 2], b"", b"not a checkpoint at all"):
        state_file.write_bytes(damage)
        code, err = cli(capsys, ["--resume", str(out), "--steps", "5"])
        assert code == 2 and len(err) == 1 and "trainer_state.pt is corrupt" in err[0]
        assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing rewritten on the way to the error
    state_file.unlink()
    code, err = cli(capsys, ["--resume", str(out), "--steps", "5"])
    assert code == 2 and "has no trainer_state.pt" in err[0]
    state_file.write_bytes(good)
    train.train(["--resume", str(out), "--steps", "5"])
    assert trainer_state(out)["step"] == 5


@pytest.mark.parametrize("config, message", [
    ({"scaler": {"alpha": 1.0}}, "not a train.py run config"),
    ({"args": {}}, "not a train.py run config"),
    ([1, 2], "not a train.py run config"),
    ("{not json", "is not valid JSON"),
])
def test_bad_run_config_is_one_line(tmp_path, capsys, config, message):
    run(tmp_path, "--steps", "2")
    out = tmp_path / "run"
    (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    code, err = cli(capsys, ["--resume", str(out)])
    assert code == 2 and len(err) == 1 and message in err[0]
    assert latest_checkpoint(out).name == "checkpoint-000002"


@pytest.mark.parametrize("argv, message", [
    (["--stride", "65"], "--stride must be between 1 and --context-length"),
    (["--stride", "0"], "--stride must be between 1 and --context-length"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    code, err = cli(capsys, TINY + ["--out", str(tmp_path / "run"), *argv])
    assert code == 2 and len(err) == 1 and message in err[0]


def test_resume_refuses_changed_settings_and_other_folders(tmp_path, capsys):
    run(tmp_path, "--steps", "2")
    out = tmp_path / "run"
    code, err = cli(capsys, ["--resume", str(out), "--rank", "4"])
    assert code == 2 and len(err) == 1 and "--rank 4 differs from the run's 8" in err[0]
    code, err = cli(capsys, ["--resume", str(out), "--out", str(tmp_path / "elsewhere")])
    assert code == 2 and "a resumed run stays in its own folder" in err[0]
    train.train(["--resume", str(out), "--rank", "8", "--steps", "3"])  # the same value is fine
    assert trainer_state(out)["step"] == 3


def test_non_finite_loss_is_one_line_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "accumulated_step", lambda *a, **kw: (float("inf"), 1))
    code, err = cli(capsys, TINY + ["--out", str(tmp_path / "run"), "--steps", "3"])
    assert code == 2 and len(err) == 1 and "no checkpoint had been saved yet" in err[0]


# ----------------------------------------------------------------------- wrong things written
def test_merge_and_export_needs_a_known_tokenizer(tmp_path):
    from model import Transformer

    model = Transformer(tiny_model().config)  # built in code: no checkpoint, no tokenizer
    lora.apply_lora(model, rank=2, verbose=False)
    with pytest.raises(UserError, match="tokenizer is unknown; pass tokenizer="):
        lora.merge_and_export(model, tmp_path / "merged")
    lora.merge_and_export(model, tmp_path / "merged", tiny_tokenizer())
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


@pytest.mark.parametrize("change, message", [
    ({"alpha": 32}, "alpha 16.0 .*alpha 32.0"),
    ({"use_rslora": True}, "rsLoRA False .*rsLoRA True"),
    ({"targets": "q_proj,k_proj,v_proj"}, "targets q_proj,v_proj .*targets q_proj,k_proj,v_proj"),
])
def test_load_adapter_into_a_differently_set_up_model_is_refused(tmp_path, change, message):
    model = tiny_model()
    lora.apply_lora(model, rank=4, alpha=16, verbose=False)
    lora.save_adapter(model, tmp_path / "adapter")
    other = tiny_model()
    lora.apply_lora(other, **{"rank": 4, "alpha": 16, "verbose": False, **change})
    with pytest.raises(UserError, match=message):
        lora.load_adapter(other, tmp_path / "adapter")


def test_run_folder_is_an_adapter_handle(tmp_path):
    run(tmp_path, "--steps", "4", "--save-every", "2")
    out = tmp_path / "run"
    model = tiny_model()
    lora.load_adapter(model, out)
    want = lora.read_adapter(latest_checkpoint(out))[1]
    got = {k: p.detach() for k, p in lora.lora_parameters(model).items()}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a PEFT adapter nor a training run"):
        lora.load_adapter(tiny_model(), tmp_path / "empty")


@pytest.mark.parametrize("first, second", [(None, 40_000), (40_000, None), (40_000, 80_000)])
def test_save_pretrained_over_an_older_save_leaves_no_stale_weights(tmp_path, first, second):
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    folder = tmp_path / "ckpt"
    save_pretrained(old, folder, tiny_tokenizer(), max_shard_bytes=first)
    save_pretrained(new, folder, tiny_tokenizer(), max_shard_bytes=second)
    loaded = load_model(folder)
    for (name, p), q in zip(new.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    has_index = (folder / "model.safetensors.index.json").exists()
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    if second is None:
        assert not has_index and not shards and (folder / "model.safetensors").exists()
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert has_index and not (folder / "model.safetensors").exists()
        assert shards == sorted(set(index["weight_map"].values()))
