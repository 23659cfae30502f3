"""Runs left alone for hours: signals during the final save, --resume auto, the folder lock, --keep and
--keep-best, and the settings that used to end in a traceback instead of one line."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import lora
import train
from common.checkpoints import complete_checkpoints, latest_checkpoint
from common.cli import UserError
from model.tiny import tiny_model
from tests.conftest import ROOT
from tests.test_crash_safety import cli
from tests.test_train import TINY, assert_same_run, interrupt_at, run, trainer_state

HANG_GUARD = 900  # seconds: a subprocess that takes longer is stuck, not slow

# train.py's command line; with SIGNAL_AT_FSYNC=k it sends itself SIGNAL (a name) at the k-th fsync of a
# checkpoint write (each checkpoint makes 5: its 3 files, its folder, the run folder).
DRIVER = r"""
import os, signal, sys
sys.path.insert(0, os.getcwd())
import train
from common import checkpoints
from common.cli import run_cli

at, calls, sig = int(os.environ.get("SIGNAL_AT_FSYNC", "0")), [0], getattr(signal, os.environ.get("SIGNAL", "SIGTERM"))
real_fsync = checkpoints.fsync

def fsync(path):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), sig)
    real_fsync(path)

checkpoints.fsync = fsync
run_cli(lambda: train.main(sys.argv[1:]))
"""


def drive(argv, at=0, sig="SIGTERM", wait=True):
    env = {**os.environ, "SIGNAL_AT_FSYNC": str(at), "SIGNAL": sig, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.err = proc.communicate(timeout=HANG_GUARD)[1]
    return proc


# ------------------------------------------------------------------------- signals at the very end
FINAL = ["--steps", "6", "--save-every", "100", "--eval-every", "3", "--dropout", "0.1"]  # the final save is the only one


def test_ctrl_c_during_the_final_save_saves_the_final_state(tmp_path, monkeypatch):
    run(tmp_path, *FINAL, out="once")
    with monkeypatch.context() as m:
        interrupt_at(m, "save", 1)  # inside the first (the final) checkpoint write
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, *FINAL, out="twice")
    assert trainer_state(tmp_path / "twice")["step"] == 6  # not lost: saved again, whole
    assert not list((tmp_path / "twice").glob(".checkpoint-*"))
    assert train.train(["--resume", str(tmp_path / "twice")])["step"] == 6
    assert_same_run(tmp_path / "once", tmp_path / "twice")


@pytest.mark.parametrize("where, call, step", [("final save", 1, 6), ("scheduled save", 1, 2)])
def test_sigterm_during_a_save_saves_and_resumes_exactly(tmp_path, where, call, step):
    flags = FINAL if where == "final save" else FINAL[:2] + ["--save-every", "2"] + FINAL[4:]
    reference = drive(TINY + flags + ["--out", tmp_path / "once"])
    assert reference.returncode == 0, reference.err
    proc = drive(TINY + flags + ["--out", tmp_path / "twice"], at=call)
    assert proc.returncode == 130, proc.err  # saved and stopped, as on Ctrl-C
    assert f"interrupted after step {step}: checkpoint saved" in proc.err
    assert trainer_state(tmp_path / "twice")["step"] == step
    again = drive(["--resume", tmp_path / "twice"])
    assert again.returncode == 0, again.err
    assert_same_run(tmp_path / "once", tmp_path / "twice")


def test_ctrl_c_during_the_answers_after_training_saves_and_resumes(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1,2;3,4;\n5,6;\n")
    flags = FINAL + ["--eval-prompts", prompts, "--eval-max-tokens", "4"]
    run(tmp_path, *flags, out="once")
    real, calls = train.eval_prompts.answer, []

    def answer(*a, **kw):  # the 2nd call is "after": Ctrl-C arrives while it generates
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(train.eval_prompts, "answer", answer)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, *flags, out="twice")
    assert trainer_state(tmp_path / "twice")["step"] == 6
    assert "after" not in json.loads((tmp_path / "twice" / "samples.json").read_text())
    train.train(["--resume", str(tmp_path / "twice")])
    assert_same_run(tmp_path / "once", tmp_path / "twice")
    assert (tmp_path / "once" / "samples.json").read_text() == (tmp_path / "twice" / "samples.json").read_text()


# --------------------------------------------------------------------------------- --resume auto
AUTO = ["--steps", "8", "--save-every", "2", "--eval-every", "3", "--dropout", "0.1", "--resume", "auto"]


def test_resume_auto_continues_the_same_command(tmp_path, monkeypatch):
    run(tmp_path, *AUTO[:-2], out="once")
    argv = TINY + AUTO + ["--out", str(tmp_path / "twice")]
    with monkeypatch.context() as m:
        interrupt_at(m, "forward", 6)  # requeued by a scheduler after step 5
        with pytest.raises(KeyboardInterrupt):
            train.train(argv)
    assert trainer_state(tmp_path / "twice")["step"] == 5
    assert train.train(argv)["step"] == 8  # the very same command continues
    assert_same_run(tmp_path / "once", tmp_path / "twice")
    assert train.train(argv) == {"step": 8, "stopped": "done", "flops": trainer_state(tmp_path / "twice")["flops"]}


def test_resume_auto_starts_fresh_in_an_empty_folder_and_refuses_anything_else(tmp_path):
    (tmp_path / "empty").mkdir()
    assert train.train(TINY + ["--steps", "2", "--resume", "auto", "--out", str(tmp_path / "empty")])["step"] == 2
    assert train.train(TINY + ["--steps", "2", "--resume", "auto", "--out", str(tmp_path / "new")])["step"] == 2
    with pytest.raises(UserError, match="--rank 4 differs from the run's 8"):
        train.train(TINY + ["--steps", "2", "--rank", "4", "--resume", "auto", "--out", str(tmp_path / "new")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files but no train.py run"):
        train.train(TINY + ["--steps", "2", "--resume", "auto", "--out", str(tmp_path / "other")])
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------- the lock
def test_a_second_run_in_a_busy_folder_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = drive(TINY + ["--steps", "100000", "--save-every", "2", "--eval-every", "1000", "--out", out], wait=False)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while latest_checkpoint(out) is None:
            assert holder.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        metrics = (out / "metrics.jsonl").stat().st_size
        code, err = cli(capsys, ["--resume", str(out), "--steps", "3"])
        assert code == 2 and err == [f"error: {out} is in use by another run (process {holder.pid} on "
                                     f"{os.uname().nodename}); wait for it to end, or choose another --out"]
        assert holder.poll() is None and (out / "metrics.jsonl").stat().st_size >= metrics  # untouched by the refusal
    finally:
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait(timeout=HANG_GUARD)
    step = trainer_state(out)["step"]
    train.train(["--resume", str(out), "--steps", str(step + 1)])
    assert f"locked by process {holder.pid} on {os.uname().nodename}, which ended without releasing it" in capsys.readouterr().err
    assert trainer_state(out)["step"] == step + 1
    assert (out / ".lock").read_text() == ""  # released (and emptied) on a clean exit
    with open(out / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free


def test_the_lock_is_released_when_a_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "accumulated_step", lambda *a, **kw: (float("nan"), 1))
    with pytest.raises(UserError, match="non-finite"):
        run(tmp_path, "--steps", "3")
    monkeypatch.undo()
    train.train(["--resume", str(tmp_path / "run"), "--steps", "2"])
    assert trainer_state(tmp_path / "run")["step"] == 2


# ------------------------------------------------------------------------------ --keep, --keep-best
def test_keep_holds_the_newest_n_checkpoints(tmp_path):
    run(tmp_path, "--steps", "10", "--save-every", "2", "--keep", "3")
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [6, 8, 10]
    train.train(["--resume", str(tmp_path / "run"), "--steps", "12", "--keep", "1"])  # may change on resume
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [12]


def test_keep_best_holds_the_state_of_the_lowest_validation_loss(tmp_path, monkeypatch):
    losses = iter([5.0, 3.0, 4.0, 2.5, 2.5, 2.7, 9.0, 8.0])  # validations after steps 1..8: the best is step 4
    monkeypatch.setattr(train, "evaluate", lambda *a, **kw: next(losses))
    run(tmp_path, "--steps", "8", "--eval-every", "1", "--save-every", "1", "--keep", "100", "--keep-best")
    out = tmp_path / "run"
    assert json.loads((out / "best" / "best.json").read_text()) == {"step": 4, "val_loss": 2.5}
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "best" / name).read_bytes() == (out / "checkpoint-000004" / name).read_bytes()
    assert torch.load(out / "best" / "trainer_state.pt", weights_only=True)["step"] == 4
    model = tiny_model()
    lora.load_adapter(model, out / "best")  # an adapter folder like any other
    assert latest_checkpoint(out).name == "checkpoint-000008" and not list(out.glob(".best*"))


# ------------------------------------------------------------------------------ one-line errors
def test_out_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = cli(capsys, TINY + ["--steps", "1", "--out", str(tmp_path / "file")])
    assert code == 2 and err == [f"error: --out {tmp_path / 'file'} is a file, not a folder; choose another --out"]
    code, err = cli(capsys, TINY + ["--steps", "1", "--out", str(tmp_path / "file" / "run")])
    assert code == 2 and len(err) == 1 and "cannot create or write the run folder" in err[0]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        code, err = cli(capsys, TINY + ["--steps", "1", "--out", str(tmp_path / "ro" / "run")])
        assert code == 2 and len(err) == 1 and "Permission denied" in err[0]


@pytest.mark.parametrize("key, value, message", [
    ("rank", None, '"rank" is null, not an integer'),
    ("betas", 0.9, '"betas" is 0.9, not a list of 2 numbers'),
    ("lr", "fast", '"lr" is "fast", not a number'),
    ("pack", 1, '"pack" is 1, not true or false'),
    ("schedule", "step", "\"schedule\" is \"step\", not one of ['constant', 'cosine', 'linear']"),
])
def test_ill_typed_run_config_is_one_line(tmp_path, capsys, key, value, message):
    run(tmp_path, "--steps", "1")
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    config["args"][key] = value
    path.write_text(json.dumps(config))
    code, err = cli(capsys, ["--resume", str(tmp_path / "run"), "--steps", "2"])
    assert code == 2 and len(err) == 1 and message in err[0] and "correct it, or start a new run" in err[0]


@pytest.mark.parametrize("change, message", [
    ({"lora_alpha": None}, 'has no "lora_alpha"'),
    ({"r": "eight"}, '"r" is "eight", not a positive integer'),
    ({"r": 0}, '"r" is 0, not a positive integer'),
    ({"target_modules": None}, 'has no "target_modules"'),
])
def test_ill_typed_adapter_config_is_one_line(tmp_path, capsys, change, message):
    model = tiny_model()
    lora.apply_lora(model, rank=4, verbose=False)
    lora.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in change.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        lora.load_adapter(tiny_model(), tmp_path / "adapter")
    proc = subprocess.run([sys.executable, "sample.py", "--model", "tiny", "--adapter", str(tmp_path / "adapter"),
                           "--prompt", "1,2;", "--max-new-tokens", "2", "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD)
    lines = proc.stderr.strip().splitlines()  # what came before the error may be said (e.g. the dtype chosen)
    assert proc.returncode == 2 and lines[-1].startswith("error:") and "Traceback" not in proc.stderr
    assert [line for line in lines if line.startswith("error")] == lines[-1:]


@pytest.mark.parametrize("flags, message", [
    (["--context-length", "4097"], "--context-length 4097 is beyond the 4096 positions of tiny; use at most 4096"),
    (["--lr", "1e38"], "--lr 1e+38 is too large for float32 arithmetic in AdamW"),
    (["--keep", "0"], "--keep must be at least 1"),
    (["--quantize", "nf4", "--compile"], "--quantize nf4 and --compile do not work together"),
])
def test_settings_that_ended_in_a_traceback_are_one_line(tmp_path, capsys, flags, message):
    code, err = cli(capsys, TINY + ["--steps", "2", "--out", str(tmp_path / "run"), *flags])
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_more_systems_than_the_file_holds_is_said(tmp_path, capsys):
    from data.lotka_volterra import save_h5, simulate

    save_h5(simulate(n=6, seed=0), tmp_path / "six.h5")
    capsys.readouterr()
    out = train.train(TINY + ["--data", str(tmp_path / "six.h5"), "--systems", "20", "--steps", "1", "--out",
                              str(tmp_path / "run")])
    assert out["step"] == 1
    assert f"note: --systems 20 is more than the 6 systems of {tmp_path / 'six.h5'}; using all 6" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["systems"] == 6


@pytest.mark.parametrize("kind", ["checkpoint", "best"])
def test_a_kill_between_the_two_renames_of_a_replacement_leaves_a_complete_folder(tmp_path, monkeypatch, kind):
    """Replacing a folder takes two renames (old aside, new in): cut between them, the old one is still found."""
    from common import checkpoints

    def fill(text):
        return lambda folder: (folder / "content").write_text(text)

    def write(text):
        if kind == "checkpoint":
            return checkpoints.write_checkpoint(tmp_path, 4, fill(text), replace=True)
        return checkpoints.write_best(tmp_path, fill(text))

    def found():
        return latest_checkpoint(tmp_path) if kind == "checkpoint" else checkpoints.best_checkpoint(tmp_path)

    write("old")
    real, calls = os.rename, []

    def rename(src, dst):  # the process dies right after the first rename
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoints.os, "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            write("new")
    assert (found() / "content").read_text() == "old" and found().name.startswith(".")  # the aside folder, whole
    final = write("new")
    assert found() == final and (final / "content").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # nothing aside or partial is left
