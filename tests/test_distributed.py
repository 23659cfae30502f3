"""train.py under torchrun (gloo on CPU, tiny model): results independent of the process count."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from checkpoints import latest_checkpoint
from tests.conftest import ROOT
from tests.test_chat import small_chat_file
from tests.test_train import records, trainer_state

LV = ["--model", "tiny", "--systems", "12", "--context-length", "64", "--batch-size", "4", "--eval-batches", "2",
      "--lr", "3e-3", "--targets", "all"]


def chat_args(tmp_path):
    return ["--model", "tiny", "--data", str(small_chat_file(tmp_path)), "--context-length", "48", "--batch-size", "4",
            "--eval-batches", "2", "--lr", "3e-3", "--targets", "all", "--pack"]


def torchrun(n: int, argv, timeout=180, script="train.py", **kw):
    """`script` under `torchrun --standalone --nproc_per_node n`, one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), script, *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def adapter(run_dir):
    return load_file(latest_checkpoint(run_dir) / "adapter_model.safetensors")


def assert_close_runs(a, b, tol=1e-6):
    """Same LoRA weights (fp32, to `tol`), same loss curve, same counters: a run is a run, whatever ran it."""
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0)
    ra, rb = records(a), records(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), (key, x, y)
        for key in ("step", "tokens", "tokens_seen", "flops", "flops_hardware"):
            if key in x:
                assert x[key] == y[key], key
    sa, sb = trainer_state(a), trainer_state(b)
    for key in ("step", "flops", "tokens", "data", "metrics_lines"):
        assert sa[key] == sb[key], key


@pytest.mark.parametrize("kind", ["lotka-volterra", "chat"])
def test_two_processes_train_as_one(tmp_path, kind):
    base = LV if kind == "lotka-volterra" else chat_args(tmp_path)
    common = base + ["--steps", "5", "--eval-every", "2", "--save-every", "5"]
    train.train(common + ["--out", str(tmp_path / "one")])
    proc = torchrun(2, common + ["--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done: 5 steps") == 1  # rank 0 alone reports
    assert json.loads((tmp_path / "two" / "config.json").read_text())["processes"] == 2
    assert_close_runs(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_with_another_process_count(tmp_path, first, second):
    common = LV + ["--eval-every", "3", "--save-every", "3"]
    train.train(common + ["--steps", "6", "--out", str(tmp_path / "straight")])

    def launch(n, argv):
        if n == 1:
            return train.train([str(a) for a in argv])
        proc = torchrun(n, argv)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(first, common + ["--steps", "3", "--out", tmp_path / "split"])
    launch(second, ["--resume", tmp_path / "split", "--steps", "6"])
    assert_close_runs(tmp_path / "straight", tmp_path / "split")


def test_indivisible_batch_is_one_line(tmp_path):
    proc = torchrun(2, LV + ["--batch-size", "3", "--steps", "2", "--out", tmp_path / "r"])
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert ours == ["error: --batch-size 3 is the global batch and does not split over 2 processes; use a multiple of 2"]


def test_a_crash_in_one_process_ends_the_others(tmp_path):
    """SIGKILL one worker mid-run: the launcher stops the other and exits within a bounded wait,
    instead of the survivor blocking forever in its next all-reduce."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *LV, "--steps", "100000", "--eval-every", "1000", "--out", str(out)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and len(records(out)) >= 3):
            assert time.time() < deadline and launcher.poll() is None, "the run did not start"
            time.sleep(0.2)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        victim = next(p for p in workers if p.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        launcher.wait(timeout=60)
        assert launcher.returncode != 0
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_study_under_torchrun_equals_one_process(tmp_path):
    """The whole study with 2 processes: the same runs, losses, choices and forecasts as with one (the
    forecast systems split 3 + 2 between the processes, sampled), one ledger, outputs written once."""
    import study

    argv = ["--model", "tiny", "--grid", "lr=1e-3,3e-3", "--grid-steps", "3", "--context-lengths", "48",
            "--context-length-steps", "2", "--final-steps", "3", "--eval-systems", "5", "--eval-context-steps", "5",
            "--horizon", "3", "--samples", "2", "--temperature", "1", "--",
            "--systems", "30", "--batch-size", "2", "--context-length", "64"]
    one = study.main(["--out", str(tmp_path / "one"), *argv])
    proc = torchrun(2, ["--out", tmp_path / "two", *argv], script="study.py", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("study done") == 1 and proc.stdout.count("study plan") == 1
    two = json.loads((tmp_path / "two" / "study.json").read_text())
    assert [r["name"] for r in two["runs"]] == [r["name"] for r in one["runs"]]
    for a, b in zip(one["runs"], two["runs"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6)
        assert b["val_mae"] == pytest.approx(a["val_mae"], abs=1e-6)
    assert (two["best"], two["final"]) == (one["best"], one["final"])
    for name, r in one["test"]["results"].items():
        assert two["test"]["results"][name]["mae"] == pytest.approx(r["mae"], abs=1e-6)
    ledger = [json.loads(line) for line in (tmp_path / "two" / "ledger.jsonl").read_text().splitlines()]
    assert len({(b["run"], b["kind"]) for b in ledger}) == len(ledger)  # nothing booked twice
    ones = {(b["run"], b["kind"]): b for b in study.Ledger(tmp_path / "one" / "ledger.jsonl").lines}
    assert ones.keys() == {(b["run"], b["kind"]) for b in ledger}
    for b in ledger:
        if b["kind"] != "forecast":  # forecasts: the same systems, padded in other batches
            assert b["coursework"] == ones[(b["run"], b["kind"])]["coursework"]
    for r in two["runs"]:
        assert json.loads((tmp_path / "two" / "runs" / r["name"] / "config.json").read_text())["processes"] == 2
