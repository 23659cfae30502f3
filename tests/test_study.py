"""study.py: the whole budgeted study on the tiny model, its FLOP ledger, its plan, and resuming it."""

import json
import subprocess
import sys
import time

import pytest

import flops
import study
from common.cli import UserError
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
    assert list(report["test"]["results"]) == ["final", "untrained", "naive_last", "naive_linear", "seasonal_naive",
                                               "autoregression", "lv_fit"]
    for r in report["test"]["results"].values():
        assert r["ci"]["mae"][0] <= r["mae"] <= r["ci"]["mae"][1] and "mase" in r
    assert {(c["model"], c["role"]) for c in report["test"]["comparisons"]} == {
        (m, role) for m in ("final", "untrained") for role in ("best baseline", "physics reference")}
    assert list(report["val_baselines"]) == list(report["test"]["results"])[2:]
    assert all("val_mase" in r and r["val_ci"]["mae"] for r in report["runs"])
    results_md = (out / "results.md").read_text()
    assert "| seasonal_naive |" in results_md and "## Validation: every run and every baseline" in results_md
    assert (out / "results.md").read_text().count("| lr 1e-3 |") == 1
    assert {p.name for p in (out / "plots").iterdir()} >= {"val_loss.png", "grid_heatmap.png", "context_lengths.png",
                                                           "test_forecasts.png", "test_error_by_horizon.png",
                                                           "error_vs_flops.png"}
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


def test_validation_can_be_forecast_greedily_while_the_test_takes_samples(tmp_path):
    sampled = [*STUDY[: STUDY.index("--")], "--samples", "3", "--temperature", "1.0", *STUDY[STUDY.index("--"):]]
    greedy_val = [*sampled[: sampled.index("--")], "--val-samples", "1", *sampled[sampled.index("--"):]]
    args = study.parse_args(greedy_val)
    assert study.sampling(args, "val") == (1, 0.0) and study.sampling(args, "test") == (3, 1.0)
    assert study.sampling(study.parse_args(sampled), "val") == (3, 1.0)  # by default validation samples as the test does
    both = study.main(["--out", str(tmp_path / "a"), "--dry-run", *sampled])["plan"]
    cheap = study.main(["--out", str(tmp_path / "b"), "--dry-run", *greedy_val])["plan"]
    assert all(c["forecast"] < b["forecast"] for b, c in zip(both[:-1], cheap[:-1]))  # validation forecasts
    assert cheap[-1] == both[-1]  # the test forecasts are the same
    with pytest.raises(UserError, match="--val-samples"):
        study.parse_args([*STUDY[: STUDY.index("--")], "--val-samples", "0"])


# ----------------------------------------------------------------------- settings, failures, kills
def copy_of(finished, tmp_path):
    """A private copy of the finished study (tests that rerun it must not change the shared one)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished[0], out)
    return out


def ledger_lines(out):
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def bookings(out):
    """{(run, kind): (coursework, hardware)}: the ledger, whatever the order its lines were written in."""
    lines = ledger_lines(out)
    assert len({(b["run"], b["kind"]) for b in lines}) == len(lines)  # nothing booked twice
    return {(b["run"], b["kind"]): (b["coursework"], b["hardware"]) for b in lines}


def nothing_may_run(monkeypatch):
    """A rerun that should only read what is there: training or forecasting anything fails the test."""
    import eval as ev
    import train

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run or forecast was done again")

    monkeypatch.setattr(train, "train", refuse)
    monkeypatch.setattr(ev, "generate_forecasts", refuse)


def test_a_changed_command_is_refused_in_one_line_naming_what_changed(finished):
    out = finished[0]
    before, runs = (out / "ledger.jsonl").read_bytes(), sorted((out / "runs").iterdir())
    changed = [*STUDY[:STUDY.index("--grid-steps") + 1], "8", *STUDY[STUDY.index("--grid-steps") + 2:]]
    changed[changed.index("--batch-size") + 1] = "4"
    with pytest.raises(UserError, match=r"other settings \(--grid-steps 4 then, 8 now; -- --batch-size 2 then, 4 now\)"
                                        r".*or give a new --out$"):
        study.main(["--out", str(out), *changed])
    with pytest.raises(UserError, match=r"--select val_mae then, val_loss now"):
        study.main(["--out", str(out), *STUDY[:-7], "--select", "val_loss", *STUDY[-7:]])
    assert (out / "ledger.jsonl").read_bytes() == before and sorted((out / "runs").iterdir()) == runs


def test_a_study_without_recorded_settings_is_not_continued(tmp_path):
    (tmp_path / "old" / "runs").mkdir(parents=True)
    with pytest.raises(UserError, match="settings were not recorded"):
        study.main(["--out", str(tmp_path / "old"), *STUDY])
    assert list((tmp_path / "old").iterdir()) == [tmp_path / "old" / "runs"]


def test_rerun_of_a_finished_study_trains_forecasts_and_books_nothing(finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)
    before = bookings(out)
    nothing_may_run(monkeypatch)
    study.main(["--out", str(out), "--budget", "1e16", *STUDY])  # --budget may change: it shapes no run
    assert bookings(out) == before
    again, once = comparable(out / "study.json"), comparable(finished[0] / "study.json")
    for report in (again, once):
        report["settings"].pop("budget"), report["flops"].pop("budget")
    assert again == once


def test_a_kill_between_a_runs_two_bookings_is_made_good_by_the_rerun(finished, tmp_path, monkeypatch):
    """Training and validation are booked in one write now, but a ledger that a kill left with the first
    line alone (as the older two appends could) is completed by the rerun, without training again."""
    out = copy_of(finished, tmp_path)
    before = bookings(out)
    lines = (out / "ledger.jsonl").read_text().splitlines()
    lines.remove(next(line for line in lines if '"grid-lr3e-3-rank4", "kind": "validation"' in line))
    (out / "ledger.jsonl").write_text("".join(line + "\n" for line in lines))
    nothing_may_run(monkeypatch)
    study.main(["--out", str(out), *STUDY])
    assert bookings(out) == before


DIVERGING = ["--model", "tiny", "--grid", "lr=1e-3,1e37", "--grid", "rank=2", "--grid-steps", "4",
             "--context-lengths", "48", "--context-length-steps", "2", "--final-steps", "2", "--eval-systems", "3",
             "--eval-context-steps", "5", "--horizon", "3", "--", "--systems", "30", "--batch-size", "2",
             "--context-length", "64"]


def test_a_diverging_run_is_recorded_as_failed_never_selected_and_the_study_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "s"
    report = study.main(["--out", str(out), *DIVERGING])  # lr 1e37: the loss is NaN at step 2
    failed = next(r for r in report["runs"] if r["name"] == "grid-lr1e37-rank2")
    assert failed["failed"]["step"] == 2 and "non-finite at step 2" in failed["failed"]["reason"]
    assert failed["val_loss"] is failed["val_mae"] is None
    assert report["best_grid"] == "grid-lr1e-3-rank2" and report["best"] != failed["name"]
    assert json.loads((out / "runs" / "final" / "config.json").read_text())["args"]["lr"] == 1e-3
    results = (out / "results.md").read_text()
    assert "| lr 1e37 | failed at step 2 |" in results and "- grid-lr1e37-rank2: failed at step 2: the loss" in results
    assert (out / "plots" / "grid_heatmap.png").exists()
    # its FLOPs: step 1 and its validation pass (train.py's counters), and the forward and backward of step 2
    booked = bookings(out)
    assert ("grid-lr1e37-rank2", "forecast") not in booked
    run = json.loads((out / "runs" / "grid-lr1e37-rank2" / "config.json").read_text())
    rep = flops.count(tiny_config(), 2, 64, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]}, trainable="lora")
    assert booked[("grid-lr1e37-rank2", "train")] == (
        2 * run["flops"]["train_step"] - rep.optimizer_coursework, 2 * run["flops"]["train_step_hardware"])
    assert booked[("grid-lr1e37-rank2", "validation")] == (run["flops"]["eval"], run["flops"]["eval_hardware"])
    nothing_may_run(monkeypatch)  # the rerun does not train the failed run again
    assert study.main(["--out", str(out), *DIVERGING]) == report and bookings(out) == booked


def test_a_phase_whose_every_run_failed_stops_the_study_in_one_line(tmp_path):
    argv = ["--out", str(tmp_path / "s"), *DIVERGING]
    argv[argv.index("lr=1e-3,1e37")] = "lr=1e37"
    with pytest.raises(UserError, match=r"^every grid run failed, nothing to choose from: grid-lr1e37-rank2 at step 2 "
                                        r"\(the loss or gradient became non-finite"):
        study.main(argv)


NO_GRID = STUDY[:2] + STUDY[6:]  # STUDY without its two --grid flags


@pytest.mark.parametrize("change, message", [
    (["--grid", "lr=1e-3", "--grid", "rank=2,0"], r"^grid-lr1e-3-rank0: --rank must be at least 1$"),
    (["--grid", "lr=1e-3", "--eval-context-steps", "50", "--horizon", "90"],
     r"--eval-context-steps 50 \+ --horizon 90 must fit in the 100 "),
    (["--grid", "lr=abc"], r"^grid-lrabc: argument --lr: invalid float value: 'abc'$"),
    (["--grid", "lr=1e-3", "--budget", "0"], r"^--budget must be positive$"),
    (["--grid", "lr=1e-3", "--samples", "0"], r"^--samples must be at least 1$"),
    (["--grid", "lr=1e-3", "--context-lengths", "64,abc"], r"^--context-lengths 64,abc: give whole numbers"),
    (["--grid", "lr=1e-3", "--grid", "lr=2e-3"], r"^--grid lr is given more than once"),
])
def test_bad_settings_are_refused_in_one_line_before_anything_trains(tmp_path, capsys, change, message):
    split = NO_GRID.index("--")
    with pytest.raises(UserError, match=message):
        study.main(["--out", str(tmp_path / "s"), *NO_GRID[:split], *change, *NO_GRID[split:]])
    assert not (tmp_path / "s").exists() and "usage:" not in capsys.readouterr().err


def test_a_bad_grid_value_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "study.py", "--out", str(tmp_path / "s"), "--model", "tiny", "--grid", "lr=abc",
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: grid-lrabc: argument --lr: invalid float value: 'abc'"]


SELECTING = ["--model", "tiny", "--grid", "lr=1e-3,3e-2", "--grid", "rank=2", "--grid-steps", "4", "--context-lengths",
             "48", "--context-length-steps", "2", "--final-steps", "3", "--select", "val_loss", "--eval-systems", "3",
             "--eval-context-steps", "5", "--horizon", "3", "--", "--systems", "30", "--batch-size", "2",
             "--context-length", "64", "--targets", "all"]


def regenerate(out, adapter, split="test"):
    """The forecast texts of the study's --eval-systems systems of a split, made here from the tiny model
    with `adapter` (a run name) or without one."""
    import copy

    import eval as ev
    import lora
    from data import Scaler, forecast_task
    from model import load_pretrained

    base, tok = load_pretrained("tiny")
    cfg = json.loads((out / "runs" / "final" / "config.json").read_text())
    dataset, indices, _ = ev.trained_data([cfg])
    values = ev.split_systems(dataset, indices, split, 3)
    task = forecast_task(values, Scaler.from_dict(cfg["scaler"]), 2, 5, 3)
    model = copy.deepcopy(base)
    if adapter:
        lora.load_adapter(model, out / "runs" / adapter)
    return ev.generate_forecasts(model.eval(), tok, task.prompts, 3, 2)


def test_selection_picks_the_best_run_and_the_test_forecasts_use_its_adapter(tmp_path):
    """Runs that differ: --select val_loss picks the lowest (here not the first run, nor the first name),
    the final run trains its setting, and the test forecasts are the final adapter's own (the tiny model's
    forecasts are all malformed, so their texts, not their errors, tell the models apart)."""
    out = tmp_path / "s"
    report = study.main(["--out", str(out), *SELECTING])
    grid, context = report["runs"][:2], report["runs"][2:3]
    assert grid[0]["val_loss"] != grid[1]["val_loss"]
    assert report["best_grid"] == min(grid, key=lambda r: r["val_loss"])["name"] == "grid-lr3e-2-rank2"
    assert report["best"] == min(grid + context, key=lambda r: r["val_loss"])["name"]
    best = next(r for r in grid + context if r["name"] == report["best"])
    final = json.loads((out / "runs" / "final" / "config.json").read_text())["args"]
    assert (final["lr"], final["context_length"]) == (3e-2, int(best["flags"].get("context_length", 64)))
    kept = {p.stem: json.loads(p.read_text())["texts"] for p in (out / "forecasts").iterdir()}
    assert kept["grid-lr1e-3-rank2"] != kept["grid-lr3e-2-rank2"]  # each run judged with its own adapter
    assert kept["test-final"] == regenerate(out, "final") != regenerate(out, None) == kept["test-untrained"]
    assert kept["test-final"] != regenerate(out, "grid-lr1e-3-rank2")
    notes = report["notes"]  # the choice compared losses of 48- and 64-token windows: the outputs say so
    assert len(notes) == 1 and "windows of 48, 64 tokens, which are not comparable" in notes[0]
    assert f"Note: {notes[0]}" in (out / "results.md").read_text()


def test_select_val_loss_over_windows_of_different_lengths_is_flagged_in_the_plan(tmp_path, capsys):
    study.main(["--out", str(tmp_path / "s"), "--dry-run", *SELECTING])
    assert "note: --select val_loss compares the per-token validation losses of windows of 48, 64" in capsys.readouterr().err
    study.main(["--out", str(tmp_path / "s"), "--dry-run", *[x if x != "val_loss" else "val_mae" for x in SELECTING]])
    assert "note:" not in capsys.readouterr().err


KILLED = ["--model", "tiny", "--grid", "lr=1e-2", "--grid-steps", "30", "--context-length-steps", "0", "--final-steps", "0",
          "--eval-systems", "3", "--eval-context-steps", "20", "--horizon", "5", "--eval-batch-size", "1", "--",
          "--systems", "100", "--batch-size", "2", "--context-length", "64", "--save-every", "5", "--targets", "all"]
RUN = "grid-lr1e-2"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "whole"
    study.main(["--out", str(out), *KILLED])
    return out


def kill_when(out, ready, seconds=120):
    """Start the study in a process of its own and SIGKILL it as soon as `ready()` holds."""
    proc = subprocess.Popen([sys.executable, "study.py", "--out", str(out), *KILLED], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()


def text(path):
    return path.read_text() if path.exists() else ""


def test_a_study_killed_inside_a_runs_training_resumes_it_to_the_uninterrupted_result(uninterrupted, tmp_path):
    out = tmp_path / "s"
    metrics = out / "runs" / RUN / "metrics.jsonl"
    kill_when(out, lambda: text(metrics).count('"loss"') >= 8)  # past its checkpoint at step 5, before step 30
    steps = text(metrics).count('"loss"')
    assert 8 <= steps < 30 and text(out / "ledger.jsonl") == ""  # killed inside the training, nothing booked yet
    study.main(["--out", str(out), *KILLED])
    assert bookings(out) == bookings(uninterrupted)
    assert comparable(out / "study.json") == comparable(uninterrupted / "study.json")
    assert (out / "runs" / RUN / "metrics.jsonl").read_text().count('"loss"') == 30  # the resumed run logs each step once


def test_a_study_killed_inside_a_runs_forecasts_forecasts_once_and_books_once(uninterrupted, tmp_path):
    out = tmp_path / "s"
    ledger = out / "ledger.jsonl"
    kill_when(out, lambda: '"validation"' in text(ledger))  # training booked: its validation forecasts are under way
    assert '"validation"' in text(ledger) and '"forecast"' not in text(ledger)
    assert not (out / "forecasts" / f"{RUN}.json").exists()  # killed inside the forecasts, not after them
    study.main(["--out", str(out), *KILLED])
    assert bookings(out) == bookings(uninterrupted)
    assert comparable(out / "study.json") == comparable(uninterrupted / "study.json")


def test_a_nonfinite_validation_loss_is_a_failure(tmp_path):
    lines = [{"step": 1, "loss": 2.0}, {"step": 1, "val_loss": 1.5}, {"step": 2, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert study.nonfinite_validation(tmp_path) is None
    for bad in (float("nan"), float("inf")):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines + [{"step": 2, "val_loss": bad}]))
        assert study.nonfinite_validation(tmp_path) == {"step": 2, "reason": f"the validation loss became {bad} at step 2"}
