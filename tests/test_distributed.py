"""train.py under torchrun (gloo on CPU, tiny model): results independent of the process count."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from common.checkpoints import latest_checkpoint
from tests.conftest import ROOT
from tests.test_chat import small_chat_file
from tests.test_train import assert_same_run, records, trainer_state

# Why --eps 1e-4. One process sums a batch's gradient in another order than two processes do, so the
# gradients differ by float32 rounding, here at most ~3e-7 (they are at most ~0.3). AdamW moves an
# element by lr * m_hat / (sqrt(v_hat) + eps), which changes by at most about 2 * lr * dg / eps when
# its gradient changes by dg: rounding is amplified by 1 / eps. With the default eps = 1e-8 an element
# whose gradient is pure rounding can differ by up to 2 * lr per step (one of 512 elements was 3.1e-6
# off on a one-thread AMD EPYC); with eps = 1e-4, 5 steps differ by at most 5 * 2 * 3e-3 * 3e-7 / 1e-4
# = 9e-8, inside atol = 1e-6 on any CPU and thread count. A bug in the sharding or the token mean
# moves gradients by far more than rounding and still fails.
LV = ["--model", "tiny", "--systems", "12", "--context-length", "64", "--batch-size", "4", "--eval-batches", "2",
      "--lr", "3e-3", "--targets", "all", "--eps", "1e-4"]


def chat_args(tmp_path):
    return ["--model", "tiny", "--data", str(small_chat_file(tmp_path)), "--context-length", "48", "--batch-size", "4",
            "--eval-batches", "2", "--lr", "3e-3", "--targets", "all", "--pack", "--eps", "1e-4"]


def torchrun(n: int, argv, timeout=900, script="train.py", **kw):
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


def launcher_report(stderr: str) -> tuple[list[str], dict[int, int]]:
    """(what the processes printed, {rank: exit code}) of a failed torchrun. torchrun itself logs in
    glog's format ("E1203 13:29:50.43 ... failed (exitcode: 2)", "W... Sending process N closing signal
    SIGTERM"), then prints its own traceback ending in ChildFailedError and a table of the processes
    that failed; every other line is ours."""
    lines = stderr.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    ours = [line for line in lines[:end] if not re.match(r"[IWE]\d{4} \d\d:\d\d:\d\d", line)]
    report = "\n".join(lines[end:])
    assert "ChildFailedError" in report and "File" not in "\n".join(ours)  # no traceback of ours
    codes = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+)", report)
    return ours, {int(rank): int(code) for rank, code in codes}


def assert_each_process_said(stderr: str, message: str, world: int = 2) -> None:
    """Each process says its line (rank 0 `error: ...`, the others `error (rank N): ...`) and exits 2,
    unless torchrun, which stops the others as soon as the first has failed, stopped it first
    (SIGTERM: -15 in its table, its line said or not). Nothing else is ours: no traceback."""
    ours, codes = launcher_report(stderr)
    assert sorted(codes) == list(range(world)) and set(codes.values()) <= {2, -signal.SIGTERM} and 2 in codes.values(), codes
    for rank in range(world):
        said = ours.count(f"error: {message}" if rank == 0 else f"error (rank {rank}): {message}")
        assert said == 1 if codes[rank] == 2 else said <= 1, (rank, codes, ours)
    assert all(line.startswith("error") for line in ours), ours


def test_indivisible_batch_is_one_line_from_each_process(tmp_path):
    proc = torchrun(2, LV + ["--batch-size", "3", "--steps", "2", "--out", tmp_path / "r"])
    assert proc.returncode == 1  # torchrun's own code for "a worker failed"
    assert_each_process_said(proc.stderr, "--batch-size 3 is the global batch and does not split over 2 processes; "
                                          "use a multiple of 2")


def test_an_error_of_rank_0_alone_reaches_every_process(tmp_path):
    """The folder lock is rank 0's: when it is refused, the others hear it instead of failing at a barrier."""
    import fcntl

    out = tmp_path / "r"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        held.write("4242 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = torchrun(2, LV + ["--steps", "2", "--out", out])
    assert_each_process_said(proc.stderr, f"{out} is in use by another run (process 4242 on elsewhere); wait for it "
                                          f"to end, or choose another --out")
    assert not (out / "config.json").exists()


def test_dropout_under_torchrun_resumes_exactly(tmp_path):
    """Each process's dropout masks: rank 0's generator is in the checkpoint, the others' are seeded
    by (seed, rank, step), so a resume with the same process count is the uninterrupted run, bit for bit."""
    common = LV + ["--dropout", "0.1", "--eval-every", "3", "--save-every", "3"]
    for argv in (common + ["--steps", "6", "--out", tmp_path / "straight"], common + ["--steps", "3", "--out", tmp_path / "split"],
                 ["--resume", tmp_path / "split", "--steps", "6"]):
        proc = torchrun(2, argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_dropout_resumed_with_another_process_count_is_reproducible(tmp_path):
    """With dropout, the masks depend on how the batch is split, so a run resumed with another process
    count is not the uninterrupted run; what holds is the data order, the counters and the log's
    structure, and the same resume made twice gives the same bits."""
    common = LV + ["--dropout", "0.1", "--eval-every", "3", "--save-every", "3"]
    proc = torchrun(2, common + ["--steps", "3", "--out", tmp_path / "a"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("a", "b"):
        train.train(["--resume", str(tmp_path / name), "--steps", "6"])
    assert_same_run(tmp_path / "a", tmp_path / "b")
    train.train([str(a) for a in common + ["--steps", "6", "--out", tmp_path / "one"]])
    sa, sb = trainer_state(tmp_path / "one"), trainer_state(tmp_path / "a")
    for key in ("step", "flops", "tokens", "data", "metrics_lines"):
        assert sa[key] == sb[key], key
    assert [sorted(r) for r in records(tmp_path / "one")] == [sorted(r) for r in records(tmp_path / "a")]


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
        deadline = time.time() + 900  # a hang guard, not a speed check
        while not ((out / "metrics.jsonl").exists() and len(records(out)) >= 3):
            assert time.time() < deadline and launcher.poll() is None, "the run did not start"
            time.sleep(0.2)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        victim = next(p for p in workers if p.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        launcher.wait(timeout=900)
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
    proc = torchrun(2, ["--out", tmp_path / "two", *argv], script="study.py")
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
