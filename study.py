"""The coursework's whole experiment in one command, inside a FLOP budget.

    python study.py --dry-run                                   # the plan and its FLOPs; nothing runs
    python study.py --out runs/study                            # grid, context lengths, final run, test
    python study.py --grid lr=1e-4,3e-4 --grid rank=4,8 --grid-steps 60 -- --batch-size 2 --decimals 3
    torchrun --standalone --nproc_per_node 2 study.py --out runs/study   # the same study, 2 processes

Phases, each skipped when its step count is 0:
1. grid: the cartesian product of the --grid flags (any train.py flag), --grid-steps each;
2. context lengths: the best grid setting at each of --context-lengths, --context-length-steps each;
3. final: the best setting of all, --final-steps;
4. test: the final adapter, the untrained model and the two naive baselines, on the test split.
Every training run is a normal train.py run folder under OUT/runs/ (resumable, evaluable with eval.py)
and is judged on the validation split: its validation loss (train.py's own pass at its last step) and
forecast errors (eval.py's forecasting on --eval-systems systems); --select picks the best.

The FLOP ledger, OUT/ledger.jsonl, books everything in both accountings: each run's training steps and
validation passes (from the run's own counters) and each forecast (prefill and decode, flops.generation).
Before anything runs the plan is printed with every run's projected FLOPs; a plan over --budget is
refused. The same command after an interruption goes on: finished runs are not redone, the interrupted
one resumes exactly (train.py's guarantee), and nothing is booked twice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import distributed
import flops
import train
from common import UserError, atomic_path, fsync, read_json, run_cli, weights_dtype, write_json

KINDS = ("train", "validation", "forecast")


# ------------------------------------------------------------------------------------------- flags
def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=train.DEFAULTS["model"], help="hub id, checkpoint folder or 'tiny'")
    a("--data", default=None, help="HDF5 file in the coursework layout (default: the built-in simulator)")
    a("--out", default="runs/study")
    a("--grid", action="append", default=None, metavar="FLAG=V1,V2",
      help="a train.py flag and its values (repeatable; default: lr=1e-5,5e-5,1e-4 and rank=2,4,8)")
    a("--grid-steps", type=int, default=500)
    a("--context-lengths", default="128,512,768")
    a("--context-length-steps", type=int, default=500)
    a("--final-steps", type=int, default=2000)
    a("--select", default="val_mae", choices=["val_mae", "val_loss"])
    a("--eval-systems", type=int, default=50, help="validation (and test) systems forecast per evaluation")
    a("--eval-context-steps", type=int, default=50)
    a("--horizon", type=int, default=20)
    a("--samples", type=int, default=1)
    a("--temperature", type=float, default=0.0)
    a("--eval-batch-size", type=int, default=128, help="forecast rows decoded together (systems x samples)")
    a("--budget", type=float, default=1e17, help="FLOPs (coursework accounting) for the whole study")
    a("--dry-run", action="store_true", help="print the plan and stop")
    args = p.parse_args(argv)
    args.passthrough = passthrough
    args.grid = [parse_grid_flag(g) for g in (args.grid or ["lr=1e-5,5e-5,1e-4", "rank=2,4,8"])]
    args.context_lengths = [int(x) for x in args.context_lengths.split(",") if x.strip()]
    if min(args.grid_steps, args.context_length_steps, args.final_steps) < 0 or args.eval_systems < 1:
        raise UserError("step counts must be >= 0 and --eval-systems at least 1")
    if args.samples > 1 and args.temperature == 0:
        raise UserError("--samples > 1 needs --temperature > 0 (greedy samples would all be the same)")
    if args.data and str(args.data).endswith(".jsonl"):
        raise UserError("study.py is the forecasting study (its test phase scores forecasts); train on chat data "
                        "with python train.py --data FILE.jsonl")
    return args


def parse_grid_flag(text: str) -> tuple[str, list[str]]:
    name, _, values = text.partition("=")
    dest = name.strip().lstrip("-").replace("-", "_")
    if dest not in train.DEFAULTS or dest in ("out", "steps", "model", "data"):
        raise UserError(f"--grid {text}: {name!r} is not a train.py flag a grid can vary")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not values:
        raise UserError(f"--grid {text}: give the values as FLAG=V1,V2,...")
    return dest, values


# -------------------------------------------------------------------------------------------- plan
def grid_runs(args) -> list[dict]:
    names = [dest for dest, _ in args.grid]
    return [{"name": "grid-" + "-".join(f"{n}{v}" for n, v in zip(names, combo)), "phase": "grid",
             "flags": dict(zip(names, combo)), "steps": args.grid_steps}
            for combo in itertools.product(*(values for _, values in args.grid))] if args.grid_steps else []


def train_argv(args, run: dict, folder: Path) -> list[str]:
    """train.py's command line for a run: the flags after `--` first, then the study's model and data,
    then the run's own flags (later flags win, so a grid or context value is never overridden). Grid
    values are split at commas, so a flag whose value holds commas (--targets q_proj,v_proj) cannot be
    varied this way; set it after `--` instead."""
    given = {x.lstrip("-").replace("-", "_") for x in args.passthrough if x.startswith("--")}
    flags = {"model": args.model, **({"data": args.data} if args.data else {}),
             **({} if "eval_every" in given else {"eval_every": max(1, run["steps"] // 4)}), **run["flags"]}
    argv = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return args.passthrough + argv + ["--steps", str(run["steps"]), "--out", str(folder)]  # the run's flags win


def projected_flops(args, run: dict) -> dict:
    """Training, validation and forecast FLOPs a run is expected to cost (coursework accounting)."""
    targs, _ = train.resolve_args(train_argv(args, run, Path("-")))
    model, tok = projection_model(args.model)
    windows, info = prepared_data(targs, tok)
    cfg = {"r": int(targs.rank), "target_modules": targs.targets}
    costs = train.step_costs(model, targs, windows["val"], lora=cfg)
    evals = sum(train.eval_due(step, targs) for step in range(1, run["steps"] + 1))
    return {"train": run["steps"] * costs["train_step"], "validation": evals * costs["eval"],
            "forecast": forecast_estimate(args, model, cfg, info["tokens_per_step"], tok)}


def forecast_estimate(args, config, lora_cfg, step_tokens: int, tok) -> int:
    """Prompts of --eval-context-steps timesteps, --horizon timesteps generated, --samples each, in the
    calls eval.generate_forecasts makes (each prompt prefilled once; lm_head on the allowed tokens)."""
    from eval import allowed_token_ids

    per_call, head_vocab = max(1, args.eval_batch_size // args.samples), len(allowed_token_ids(tok))
    calls = [min(per_call, args.eval_systems - s) for s in range(0, args.eval_systems, per_call)]
    return sum(flops.generation(config, b, args.eval_context_steps * step_tokens, args.horizon * step_tokens - 1,
                                lora_cfg, samples=args.samples, head_vocab=head_vocab)["coursework"] for b in calls)


_PROJECTION, _DATA = {}, {}


def prepared_data(targs, tok):
    """train.prepare_data, once per data setting (runs that differ only in lr or rank share it)."""
    key = tuple(getattr(targs, k) for k in ("model", "data", "systems", "data_seed", "context_length", "stride", "decimals"))
    if key not in _DATA:
        data = train.prepare_data(targs, tok)
        _DATA[key] = ({"train": data.train, "val": data.val}, data.info)
    return _DATA[key]


def projection_model(name: str):
    """(config, tokenizer) for the plan: no weights are loaded."""
    if name not in _PROJECTION:
        from model import load_config, load_tokenizer

        _PROJECTION[name] = (load_config(name), load_tokenizer(name))
    return _PROJECTION[name]


def print_plan(args, plan: list[tuple[dict, dict]], later: str) -> int:
    print(f"study plan, budget {args.budget:.3g} FLOPs (coursework accounting)")
    print(f"{'run':<34}{'steps':>7}{'train':>12}{'validation':>12}{'forecast':>12}{'total':>12}")
    total = 0
    for run, cost in plan:
        t = sum(cost.values())
        total += t
        print(f"{run['name']:<34}{run['steps']:>7}{cost['train']:>12.3e}{cost['validation']:>12.3e}"
              f"{cost['forecast']:>12.3e}{t:>12.3e}")
    print(f"{'total' + later:<34}{'':>7}{'':>12}{'':>12}{'':>12}{total:>12.3e}   "
          f"({100 * total / args.budget:.1f}% of the budget)")
    return total


def make_plan(args) -> list[tuple[dict, dict]]:
    """Every run with its projected FLOPs. The context and final runs take their setting from results
    not known yet, so each is projected at the most expensive setting it could take."""
    plan = [(run, projected_flops(args, run)) for run in grid_runs(args)]
    candidates = [run["flags"] for run, _ in plan] or [{}]
    for length in args.context_lengths if args.context_length_steps else []:
        runs = [{"name": f"context-{length}", "phase": "context", "flags": {**flags, "context_length": str(length)},
                 "steps": args.context_length_steps} for flags in candidates]
        plan.append(max(((r, projected_flops(args, r)) for r in runs), key=lambda rc: sum(rc[1].values())))
    if args.final_steps:
        finals = [{"name": "final", "phase": "final", "flags": run["flags"], "steps": args.final_steps}
                  for run, _ in plan] or [{"name": "final", "phase": "final", "flags": {}, "steps": args.final_steps}]
        plan.append(max(((r, projected_flops(args, r)) for r in finals), key=lambda rc: sum(rc[1].values())))
    model, tok = projection_model(args.model)
    step_tokens = prepared_data(train.resolve_args(train_argv(args, plan[-1][0], Path("-")))[0], tok)[1]["tokens_per_step"] \
        if plan else 10
    test = {"name": "test forecasts", "phase": "test", "flags": {}, "steps": 0}  # final adapter, untrained model
    lora_cfg = {"r": max(int(r["flags"].get("rank", train.DEFAULTS["rank"])) for r, _ in plan) if plan else 8,
                "target_modules": train.DEFAULTS["targets"]}
    plan.append((test, {"train": 0, "validation": 0,
                        "forecast": 2 * forecast_estimate(args, model, lora_cfg, step_tokens, tok)}))
    return plan


# ------------------------------------------------------------------------------------------ ledger
class Ledger:
    """OUT/ledger.jsonl: one line per booking {run, kind, coursework, hardware, ...}, at most one per
    (run, kind), appended and fsynced as each is earned. A line torn by a kill is dropped on reading.
    Under torchrun rank 0 reads and writes the file; every process books the same lines in memory."""

    def __init__(self, path: Path, group: distributed.Group = distributed.Group()):
        self.path, self.lines, self.writes = path, [], group.is_main
        if group.is_main:
            from checkpoints import rewind_log

            for line in path.read_text().splitlines() if path.exists() else []:
                try:
                    self.lines.append(json.loads(line))
                except json.JSONDecodeError:
                    break
            rewind_log(path, len(self.lines))
        self.lines = group.broadcast(self.lines)

    def booked(self, run: str, kind: str) -> bool:
        return any(b["run"] == run and b["kind"] == kind for b in self.lines)

    def book(self, run: str, kind: str, coursework: int, hardware: int, **detail) -> None:
        if self.booked(run, kind):
            return
        entry = {"run": run, "kind": kind, "coursework": int(coursework), "hardware": int(hardware), **detail}
        if self.writes:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
            fsync(self.path)
        self.lines.append(entry)

    def total(self, key: str = "coursework") -> int:
        return sum(b[key] for b in self.lines)


# ------------------------------------------------------------------------------------ running runs
def run_folder(args, run: dict) -> Path:
    return Path(args.out) / "runs" / run["name"]


def train_run(args, run: dict, projected: int, ledger: Ledger, group: distributed.Group) -> Path:
    """Train (or resume, or find finished) one run and book its training and validation FLOPs. Under
    torchrun every process trains (train.py's own torchrun path); rank 0 reads the folder."""
    folder = run_folder(args, run)
    if not ledger.booked(run["name"], "train"):
        if ledger.total() + projected > args.budget:
            raise UserError(f"stopping before {run['name']}: {ledger.total():.4g} FLOPs used and it needs about "
                            f"{projected:.4g}, over the budget of {args.budget:.4g}")
        started = group.broadcast((folder / "config.json").exists() if group.is_main else None)
        train.train(["--resume", str(folder), "--steps", str(run["steps"])] if started else train_argv(args, run, folder))
        split = group.broadcast(flops_by_kind(folder) if group.is_main else None)
        for kind in ("train", "validation"):
            ledger.book(run["name"], kind, **split[kind])
    return folder


def flops_by_kind(folder: Path) -> dict:
    """A run's FLOPs from its metrics.jsonl, split into training steps and validation passes."""
    split = {kind: {"coursework": 0, "hardware": 0} for kind in ("train", "validation")}
    previous = {"flops": 0, "flops_hardware": 0}
    for rec in read_metrics(folder):
        kind = "validation" if "val_loss" in rec else "train"
        split[kind]["coursework"] += rec["flops"] - previous["flops"]
        split[kind]["hardware"] += rec["flops_hardware"] - previous["flops_hardware"]
        previous = rec
    return split


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def forecast(args, name: str, model, tok, run_cfg: dict, split: str, ledger: Ledger,
             group: distributed.Group) -> tuple[dict, object]:
    """Forecast --eval-systems systems of a split with one model; book the FLOPs. (metrics, task).
    Under torchrun each process forecasts a contiguous share of the systems (every sample draws from
    its own seeded stream, so the forecasts do not depend on the split) and all gather the texts."""
    import eval as ev
    from data import Scaler, forecast_task

    ns = SimpleNamespace(data=None, data_seed=0, systems=args.eval_systems, split=split)
    values, _, _, _ = ev.evaluation_values(ns, {name: (None, run_cfg)})
    scaler, decimals = Scaler.from_dict(run_cfg["scaler"]), int(run_cfg["args"]["decimals"])
    task = forecast_task(values, scaler, decimals, args.eval_context_steps, args.horizon)
    start, end = group.span(len(task.prompts))
    used = {}
    texts = ev.generate_forecasts(model, tok, task.prompts[start:end], args.horizon, decimals, args.samples,
                                  args.temperature, args.eval_batch_size, seed=0, flops_used=used, first=start)
    shares = group.all_gather((texts, used))
    texts = [t for share, _ in shares for t in share]
    metrics = ev.evaluate_forecasts(texts, task, scaler, decimals, args.horizon)
    ledger.book(name, "forecast", *(sum(u.get(k, 0) for _, u in shares) for k in ("coursework", "hardware")),
                passes=[p for _, u in shares for p in u.get("passes", [])])
    return metrics, task


def judge(args, run: dict, folder: Path, base, tok, ledger: Ledger, group: distributed.Group) -> dict:
    """A run's record: settings, FLOPs, validation loss and forecast errors (cached in its folder)."""
    cached = folder / "study_eval.json"
    record = group.broadcast(read_json(cached, what="study evaluation") if group.is_main and cached.exists() else None)
    if record is not None:
        return record
    import copy

    import lora

    cfg = read_json(folder / "config.json", what="run config")
    model = copy.deepcopy(base)
    lora.load_adapter(model, folder)
    model.eval()
    metrics, _ = forecast(args, run["name"], model, tok, cfg, "val", ledger, group)
    if group.is_main:
        vals = [r for r in read_metrics(folder) if "val_loss" in r]
        spent = {k: sum(b[k] for b in ledger.lines if b["run"] == run["name"]) for k in ("coursework", "hardware")}
        record = {**run, "val_loss": vals[-1]["val_loss"], "val_mae": metrics["mae"], "val_mse": metrics["mse"],
                  "val_invalid": metrics["invalid"], "flops": spent,
                  "curve": [{"step": r["step"], "val_loss": r["val_loss"], "flops": r["flops"]} for r in vals]}
        write_json(cached, record)
    return group.broadcast(record)


# ------------------------------------------------------------------------------------------ phases
def run_phase(args, runs_and_costs, base, tok, ledger: Ledger, group: distributed.Group) -> list[dict]:
    records = []
    for run, cost in runs_and_costs:
        folder = train_run(args, run, cost["train"] + cost["validation"], ledger, group)
        records.append(judge(args, run, folder, base, tok, ledger, group))
        r = records[-1]
        if group.is_main:
            print(f"{run['name']}: val loss {r['val_loss']:.4f}, val MAE {r['val_mae']:.4f}, MSE {r['val_mse']:.4f}; "
                  f"{r['flops']['coursework']:.3e} FLOPs; study {ledger.total():.3e} / {args.budget:.3g}", file=sys.stderr)
    return records


def best_of(args, records: list[dict]) -> dict:
    return min(records, key=lambda r: (r[args.select], r["name"]))


def test_phase(args, final: dict, base, tok, ledger: Ledger, group: distributed.Group) -> dict:
    """The final adapter, the untrained model and both naive baselines on the same test systems."""
    import copy

    import eval as ev
    import lora

    cfg = read_json(run_folder(args, final) / "config.json", what="run config")
    model = copy.deepcopy(base)
    lora.load_adapter(model, run_folder(args, final))
    model.eval()
    tuned, task = forecast(args, "test-" + final["name"], model, tok, cfg, "test", ledger, group)
    untrained, _ = forecast(args, "test-untrained", base, tok, cfg, "test", ledger, group)
    keep = ("mae", "mse", "rmse", "prey", "predator", "per_step", "invalid", "short")
    results = {final["name"]: {k: tuned[k] for k in keep}, "untrained": {k: untrained[k] for k in keep},
               "naive_last": ev.error_metrics(ev.naive_last(task.context, args.horizon), task.target),
               "naive_linear": ev.error_metrics(ev.naive_linear(task.context, args.horizon), task.target)}
    forecasts = {final["name"]: tuned["forecast_values"], "untrained": untrained["forecast_values"]}
    return {"systems": len(task.target), "results": results, "forecasts": forecasts, "task": task}


def main(argv=None) -> dict:
    """The study; under torchrun every process joins once, trains each run together with the others
    (train.py's torchrun path), forecasts its share of the systems, and rank 0 writes the ledger and
    the outputs."""
    from common import parse_device

    args = parse_args(argv)
    plan = make_plan(args)
    targs = train.resolve_args(train_argv(args, plan[0][0], Path(args.out)))[0]  # forecasts run as the runs do
    group, device = (distributed.Group(), None) if args.dry_run else distributed.init(parse_device(targs.device))
    try:
        return run_study(args, plan, targs, group, device)
    finally:
        distributed.shutdown()


def run_study(args, plan, targs, group: distributed.Group, device) -> dict:
    total = sum(sum(cost.values()) for _, cost in plan)
    if group.is_main:
        print_plan(args, plan, " (context and final runs at their most expensive setting)")
    if total > args.budget:
        per_step = sum(c["train"] for r, c in plan if r["steps"]) / max(1, sum(r["steps"] for r, _ in plan))
        fit = int(max(0, args.budget - sum(c["validation"] + c["forecast"] for _, c in plan)) // per_step)
        raise UserError(f"the plan needs {total:.4g} FLOPs, over the budget of {args.budget:.4g}: about {fit:,} "
                        f"training steps in all would fit (now {sum(r['steps'] for r, _ in plan):,}); lower the step counts")
    if args.dry_run:
        return {"plan": [{"run": r["name"], **c} for r, c in plan], "total": total}
    from model import load_pretrained

    out = Path(args.out)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
    group.barrier()
    ledger = Ledger(out / "ledger.jsonl", group)
    base, tok = load_pretrained(args.model, dtype=weights_dtype(targs.dtype, device, args.model), device=device,
                                quantize=targs.quantize)
    grid = run_phase(args, [(r, c) for r, c in plan if r["phase"] == "grid"], base, tok, ledger, group)
    best = best_of(args, grid) if grid else {"flags": {}, "name": "defaults"}
    context_plan = [({**r, "flags": {**best["flags"], "context_length": r["flags"]["context_length"]}}, c)
                    for r, c in plan if r["phase"] == "context"]
    context = run_phase(args, context_plan, base, tok, ledger, group)
    best_all = best_of(args, grid + context) if grid + context else best
    final_plan = [({**r, "flags": best_all["flags"]}, c) for r, c in plan if r["phase"] == "final"]
    final = run_phase(args, final_plan, base, tok, ledger, group)
    chosen = final[0] if final else best_all
    if chosen.get("name") == "defaults":
        raise UserError("nothing to test: every training phase has 0 steps")
    test = test_phase(args, chosen, base, tok, ledger, group)
    return write_outputs(args, plan, grid, context, final, best, best_all, test, ledger, group)


# ----------------------------------------------------------------------------------------- outputs
def write_outputs(args, plan, grid, context, final, best, best_all, test, ledger: Ledger,
                  group: distributed.Group) -> dict:
    strip = lambda r: {k: v for k, v in r.items() if k != "curve"}  # noqa: E731
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "dry_run"},
        "plan": [{"run": r["name"], "steps": r["steps"], "projected": c} for r, c in plan],
        "runs": [strip(r) for r in grid + context + final], "best_grid": best.get("name"), "best": best_all.get("name"),
        "final": (final[0] if final else best_all)["name"], "test": {"systems": test["systems"], "results": test["results"]},
        "flops": {"coursework": ledger.total(), "hardware": ledger.total("hardware"), "budget": args.budget,
                  "by_run": flop_table(ledger)},
    }
    out = Path(args.out)
    if not group.is_main:
        return report
    write_json(out / "study.json", report)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(args, grid, context, report))
    plots = make_plots(out / "plots", args, grid, context, final, test)
    print(f"study done: {ledger.total():.4g} of {args.budget:.4g} FLOPs; {out / 'study.json'}, {out / 'results.md'}"
          + (f", {len(plots)} plots in {out / 'plots'}" if plots else ""), file=sys.stderr)
    return report


def flop_table(ledger: Ledger) -> list[dict]:
    rows = {}
    for b in ledger.lines:
        row = rows.setdefault(b["run"], {"run": b["run"], **{k: 0 for k in KINDS}, "hardware": 0})
        row[b["kind"]] += b["coursework"]
        row["hardware"] += b["hardware"]
    return [{**r, "total": sum(r[k] for k in KINDS)} for r in rows.values()]


def results_markdown(args, grid, context, report) -> str:
    lines = ["# Study results", ""]
    if grid:
        lines += [f"## Grid ({args.grid_steps} steps each; validation, {args.eval_systems} systems)", ""]
        lines += grid_table(args, grid) + [""]
    if context:
        lines += [f"## Context length ({args.context_length_steps} steps each, best grid setting: {report['best_grid']})", "",
                  "| context length | val loss | val MAE | val MSE | FLOPs |", "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['flags']['context_length']} | {r['val_loss']:.4f} | {r['val_mae']:.4f} | {r['val_mse']:.4f} | "
                  f"{r['flops']['coursework']:.3e} |" for r in context] + [""]
    t = report["test"]
    lines += [f"## Test ({t['systems']} systems, {args.eval_context_steps} context steps, horizon {args.horizon}; "
              f"final run: {report['final']})", "",
              "| model | MAE | MSE | RMSE | prey MAE | predator MAE | MAE step 1 | MAE step " + f"{args.horizon} | invalid |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in t["results"].items():
        lines.append(f"| {name} | {r['mae']:.4f} | {r['mse']:.4f} | {r['rmse']:.4f} | {r['prey']['mae']:.4f} | "
                     f"{r['predator']['mae']:.4f} | {r['per_step'][0]['mae']:.4f} | {r['per_step'][-1]['mae']:.4f} | "
                     f"{r.get('invalid', '—')} |")
    f = report["flops"]
    lines += ["", "## FLOPs (coursework accounting; hardware count beside it)", "",
              "| run | train | validation | forecast | total | hardware |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['run']} | {r['train']:.3e} | {r['validation']:.3e} | {r['forecast']:.3e} | {r['total']:.3e} | "
              f"{r['hardware']:.3e} |" for r in f["by_run"]]
    lines += [f"| **total** | | | | **{f['coursework']:.4e}** | {f['hardware']:.4e} |", "",
              f"Budget {f['budget']:.3g}: {100 * f['coursework'] / f['budget']:.2f}% used.", ""]
    return "\n".join(lines)


def grid_table(args, grid) -> list[str]:
    """An lr x rank (first flag x second flag) table when the grid has two flags; else one row per run."""
    metric = args.select
    if len(args.grid) == 2:
        (rows_flag, row_values), (cols_flag, col_values) = args.grid
        cell = {(r["flags"][rows_flag], r["flags"][cols_flag]): r for r in grid}
        lines = [f"{metric} (val loss) | " + " | ".join(f"{cols_flag} {c}" for c in col_values) + " |",
                 "| --- |" + " ---: |" * len(col_values)]
        lines[0] = f"| {rows_flag} \\ {lines[0]}"
        for v in row_values:
            lines.append(f"| {rows_flag} {v} | " + " | ".join(
                f"{cell[(v, c)][metric]:.4f} ({cell[(v, c)]['val_loss']:.3f})" for c in col_values) + " |")
        return lines
    lines = ["| run | val loss | val MAE | val MSE |", "| --- | ---: | ---: | ---: |"]
    return lines + [f"| {r['name']} | {r['val_loss']:.4f} | {r['val_mae']:.4f} | {r['val_mse']:.4f} |" for r in grid]


def make_plots(folder: Path, args, grid, context, final, test) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        written.append(folder / name)
        fig.tight_layout()
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in grid + context + final:
        for ax, x in zip(axes, ("step", "flops")):
            ax.plot([c[x] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker=".", label=r["name"])
    for ax, x in zip(axes, ("step", "FLOPs (coursework, the run's own)")):
        ax.set(xlabel=x, ylabel="validation loss (nats per token)")
    axes[1].legend(fontsize=6)
    save(fig, "val_loss.png")
    if len(args.grid) == 2 and grid:
        (rf, rv), (cf, cv) = args.grid
        cell = {(r["flags"][rf], r["flags"][cf]): r[args.select] for r in grid}
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow([[cell[(a, b)] for b in cv] for a in rv], cmap="viridis_r")
        ax.set(xticks=range(len(cv)), xticklabels=cv, yticks=range(len(rv)), yticklabels=rv, xlabel=cf, ylabel=rf,
               title=f"validation {args.select.removeprefix('val_').upper()}")
        fig.colorbar(im)
        save(fig, "grid_heatmap.png")
    if context:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar([r["flags"]["context_length"] for r in context], [r[args.select] for r in context])
        ax.set(xlabel="context length (tokens)", ylabel=f"validation {args.select.removeprefix('val_').upper()}")
        save(fig, "context_lengths.png")
    written += test_plots(save, plt, args, test)
    return written


def test_plots(save, plt, args, test) -> list:
    task, forecasts = test["task"], test["forecasts"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
    K, H = task.context.shape[1], task.target.shape[1]
    for j in range(min(3, len(task.target))):
        for v, name in enumerate(("prey", "predator")):
            ax = axes[v, j]
            ax.plot(range(K), task.context[j, :, v], color="black", label="context")
            ax.plot(range(K, K + H), task.target[j, :, v], color="black", linestyle="--", label="truth")
            for label, f in forecasts.items():
                ax.plot(range(K, K + H), f[j, :, v], label=label)
            ax.set(title=f"test system {j + 1}: {name}", xlabel="timestep")
    axes[0, 0].legend(fontsize=7)
    save(fig, "test_forecasts.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in test["results"].items():
        ax.plot([s["step"] for s in r["per_step"]], [s["mae"] for s in r["per_step"]], marker=".", label=name)
    ax.set(xlabel="forecast horizon (timesteps)", ylabel="MAE (original units)", title="test error by horizon")
    ax.legend()
    save(fig, "test_error_by_horizon.png")
    return []


if __name__ == "__main__":
    run_cli(main)
