"""study.py: the whole budgeted study on the tiny model, its FLOP ledger, its plan, and resuming it."""

import json
import subprocess
import sys
import time

import pytest

import flops
import study
from common import UserError
from model.tiny import tiny_config
from tests.conftest import ROOT

STUDY = ["--model", "tiny", "--grid", "lr=1e-3,3e-3", "--grid", "rank=2,4", "--grid-steps", "4",
         "--context-lengths", "64,96", "--context-length-steps", "3", "--final-steps", "5", "--eval-systems", "4",
         "--eval-context-steps", "5", "--horizon", "3", "--", "--systems", "30", "--batch-size", "2",
         "--context-length", "64"]


def comparable(path):
    """study.json without what differs between two folders (their paths)."""
    report = json.loads(path.read_text())
    report["settings"].pop("out")
    return report


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "once"
    t = time.perf_counter()
    report = study.main(["--out", str(out), *STUDY])
    return out, report, time.perf_counter() - t


def test_whole_study_runs_offline_and_writes_its_outputs(finished):
    out, report, seconds = finished
    assert [r["name"] for r in report["runs"]] == ["grid-lr1e-3-rank2", "grid-lr1e-3-rank4", "grid-lr3e-3-rank2",
                                                   "grid-lr3e-3-rank4", "context-64", "context-96", "final"]
    best = min(report["runs"][:4], key=lambda r: (r["val_mae"], r["name"]))
    assert report["best_grid"] == best["name"]
    assert [r["flags"]["context_length"] for r in report["runs"][4:6]] == ["64", "96"]
    assert set(report["test"]["results"]) == {"final", "untrained", "naive_last", "naive_linear"}
    assert (out / "results.md").read_text().count("| lr 1e-3 |") == 1
    assert {p.name for p in (out / "plots").iterdir()} >= {"val_loss.png", "grid_heatmap.png", "context_lengths.png",
                                                           "test_forecasts.png", "test_error_by_horizon.png"}
    for run in report["runs"]:  # each a normal train.py run folder
        assert (out / "runs" / run["name"] / "config.json").exists()


def test_ledger_total_is_its_lines_and_what_flops_py_recomputes(finished):
    out, report, _ = finished
    lines = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert report["flops"]["coursework"] == sum(b["coursework"] for b in lines)
    assert report["flops"]["hardware"] == sum(b["hardware"] for b in lines)
    assert len({(b["run"], b["kind"]) for b in lines}) == len(lines)  # nothing booked twice
    cfg = tiny_config()
    for b in lines:
        if b["kind"] == "forecast":
            lora = None if b["run"] == "test-untrained" else run_lora(out, b["run"].removeprefix("test-"))
            for kind in ("coursework", "hardware"):
                assert b[kind] == sum(flops.generation(cfg, lora=lora, **p)[kind] for p in b["passes"])
            continue
        run = json.loads((out / "runs" / b["run"] / "config.json").read_text())["args"]
        rep = flops.count(cfg, run["batch_size"], run["context_length"], lora=run_lora(out, b["run"]), trainable="lora")
        if b["kind"] == "train":
            per_step = run["grad_accum"] * (rep.forward_coursework + rep.loss_coursework + rep.backward_coursework) \
                + rep.optimizer_coursework
            assert b["coursework"] == run["steps"] * per_step
            assert b["hardware"] == run["steps"] * run["grad_accum"] * rep.train_step_hardware
        else:
            passes = sum(1 for s in range(1, run["steps"] + 1) if s % run["eval_every"] == 0 or s == run["steps"])
            windows = json.loads((out / "runs" / b["run"] / "config.json").read_text())["data"]["val_windows"]
            n_batches = -(-min(windows, run["eval_batches"] * run["batch_size"]) // run["batch_size"])
            assert b["coursework"] == passes * n_batches * rep.eval_coursework


def run_lora(out, name):
    cfg = json.loads((out / "runs" / name / "config.json").read_text())["lora"]
    return {"r": cfg["r"], "target_modules": cfg["target_modules"]}


def test_plan_over_budget_is_refused_and_dry_run_runs_nothing(tmp_path, capsys):
    with pytest.raises(UserError, match=r"over the budget of 1e\+09: about [\d,]+ training steps in all would fit"):
        study.main(["--out", str(tmp_path / "s"), "--budget", "1e9", *STUDY])
    plan = study.main(["--out", str(tmp_path / "s"), "--dry-run", *STUDY])
    assert not (tmp_path / "s").exists() and len(plan["plan"]) == 8
    assert "study plan, budget" in capsys.readouterr().out


def test_killed_study_resumes_to_the_same_result_without_retraining(finished, tmp_path):
    out = tmp_path / "twice"
    proc = subprocess.Popen([sys.executable, "study.py", "--out", str(out), *STUDY], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = out / "ledger.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # kill it once two runs are fully booked
        if ledger.exists() and ledger.read_text().count('"forecast"') >= 2:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (out / "study.json").exists()  # it really was stopped half-way
    first = out / "runs" / "grid-lr1e-3-rank2" / "metrics.jsonl"
    before = first.read_bytes()
    study.main(["--out", str(out), *STUDY])
    assert first.read_bytes() == before  # a finished run is not trained again
    assert comparable(out / "study.json") == comparable(finished[0] / "study.json")
