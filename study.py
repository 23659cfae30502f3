"""The coursework's whole experiment in one command, inside a FLOP budget.

    python study.py --dry-run                                   # the plan and its FLOPs; nothing runs
    python study.py --out runs/study                            # grid, context lengths, final run, test
    python study.py --grid lr=1e-4,3e-4 --grid rank=4,8 --grid-steps 60 -- --batch-size 2 --decimals 3
    torchrun --standalone --nproc_per_node 2 study.py --out runs/study   # the same study, 2 processes

Phases, each skipped when its step count is 0:
1. grid: the cartesian product of the --grid flags (any train.py flag), --grid-steps each;
2. context lengths: the best grid setting at each of --context-lengths, --context-length-steps each;
3. final: the best setting of all, --final-steps;
4. test: the final adapter, the untrained model and every baseline (forecast/baselines.py), on the
   test split, each with a 95% bootstrap interval, and the paired difference against the best baseline.
Every training run is a normal train.py run folder under OUT/runs/ (resumable, evaluable with eval.py)
and is judged on the validation split: its validation loss (train.py's own pass at its last step) and
forecast errors (eval.py's forecasting on --eval-systems systems, by default the whole split, 50 steps
in and 20 out: the coursework setting); --select picks the best (val_mae, val_mase or val_loss).

The FLOP ledger, OUT/ledger.jsonl, books everything in both accountings: each run's training steps and
validation passes (from the run's own counters) and each forecast (prefill and decode, flops.generation).
Before anything runs the plan is printed with every run's projected FLOPs; a plan over --budget is
refused. The same command after an interruption goes on: finished runs are not redone, the interrupted
one resumes exactly (train.py's guarantee), and nothing is booked twice. Another command in the same
--out is refused (OUT/study_settings.json); a run whose loss diverges is recorded as failed and never
selected (docs/study.md).
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: Ctrl-C during start-up is one line (common/startup.py)
    from common.startup import quiet_ctrl_c
    quiet_ctrl_c()

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import flops
import train
from common.cli import UserError, run_cli
from common.files import atomic_path, fsync, read_json, write_json
from forecast.metrics import add_intervals, comparisons
from model.precision import weights_dtype
from training import distributed

KINDS = ("train", "validation", "forecast")


# ------------------------------------------------------------------------------------------- flags
def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False, epilog="Flags after -- go to every training run, as train.py "
                                "flags (python train.py --help): e.g. -- --batch-size 2 --decimals 3.")
    a = p.add_argument
    a("--model", default=train.DEFAULTS["model"],
      help=f"hub id, checkpoint folder or 'tiny' (default: {train.DEFAULTS['model']})")
    a("--data", default=None, help="HDF5 file in the coursework layout (default: the built-in simulator)")
    a("--out", default="runs/study", help="the study's folder: ledger, results, one train.py run folder per run "
                                          "(default: runs/study)")
    a("--grid", action="append", default=None, metavar="FLAG=V1,V2",
      help="a train.py flag and its values (repeatable; default: lr=1e-5,5e-5,1e-4 and rank=2,4,8)")
    a("--grid-steps", type=int, default=500, help="training steps of each grid run; 0 skips the grid (default: 500)")
    a("--context-lengths", default="128,512,768",
      help="context lengths tried with the best grid setting (default: 128,512,768)")
    a("--context-length-steps", type=int, default=500,
      help="training steps of each context-length run; 0 skips them (default: 500)")
    a("--final-steps", type=int, default=2000, help="training steps of the final run; 0 skips it (default: 2000)")
    a("--select", default="val_mae", choices=["val_mae", "val_mase", "val_loss"],
      help="what picks the best run: validation forecast MAE, scaled error (MASE) or loss (default: val_mae)")
    a("--eval-systems", type=int, default=None,
      help="validation (and test) systems forecast per evaluation (default: the whole split)")
    a("--eval-context-steps", type=int, default=50, help="timesteps in each forecast prompt (default: 50)")
    a("--horizon", type=int, default=20, help="timesteps forecast (default: 20)")
    a("--samples", type=int, default=1, help="samples per forecast, combined by their median (default: 1)")
    a("--temperature", type=float, default=0.0, help="sampling temperature of the forecasts; 0 is greedy (default: 0.0)")
    a("--val-samples", type=int, default=None,
      help="samples per validation forecast (default: --samples); 1 forecasts the validation split greedily, "
           "a cheaper way to choose runs when the test forecasts take the median of many samples")
    a("--eval-batch-size", type=int, default=128, help="forecast rows decoded together (systems x samples) (default: 128)")
    a("--budget", type=float, default=1e17, help="FLOPs (coursework accounting) for the whole study (default: 1e17)")
    a("--dry-run", action="store_true", help="print the plan and stop")
    a("--bootstrap", type=int, default=1000, help="resamples of the systems for the 95%% intervals (default: 1000)")
    a("--bootstrap-seed", type=int, default=0, help="seed of the resamples (default: 0)")
    p.usage = p.format_usage().removeprefix("usage: ").rstrip() + " [-- TRAIN.PY FLAGS ...]"
    args = p.parse_args(argv)
    check_passthrough(passthrough)
    args.passthrough = passthrough
    args.grid = [parse_grid_flag(g) for g in (args.grid or ["lr=1e-5,5e-5,1e-4", "rank=2,4,8"])]
    args.context_lengths = parse_context_lengths(args.context_lengths)
    if min(args.grid_steps, args.context_length_steps, args.final_steps) < 0 or (args.eval_systems or 1) < 1:
        raise UserError("step counts must be >= 0 and --eval-systems at least 1")
    check_study_args(args)
    if args.bootstrap < 10:
        raise UserError("--bootstrap needs at least 10 resamples for a 95% interval (1000 is the default)")
    if args.val_samples is not None and args.val_samples < 1:
        raise UserError("--val-samples must be at least 1")
    if max(args.samples, args.val_samples or 1) > 1 and args.temperature == 0:
        raise UserError("--samples > 1 needs --temperature > 0 (greedy samples would all be the same)")
    if args.data and str(args.data).endswith(".jsonl"):
        raise UserError("study.py is the forecasting study (its test phase scores forecasts); train on chat data "
                        "with python train.py --data FILE.jsonl")
    return args


def check_passthrough(flags: list[str]) -> None:
    """The flags after `--` are train.py's: checked by its parser now, in one line, rather than when
    the first run starts (under study.py's name, with train.py's usage); a study.py flag put there by
    mistake is named as one."""
    parser = train.build_parser()

    def refuse(message):
        raise UserError(f"after --: {message} (the flags after -- are train.py's: python train.py --help)")

    parser.error = refuse
    _, unknown = parser.parse_known_args(flags)
    own = [f for f in unknown if f.split("=")[0] in STUDY_FLAGS]
    if own:
        refuse(f"{' '.join(own)} {'is a study.py flag' if len(own) == 1 else 'are study.py flags'}: put "
               f"{'it' if len(own) == 1 else 'them'} before --")
    if unknown:
        refuse(f"unrecognized arguments: {' '.join(unknown)}")


STUDY_FLAGS = ("--grid", "--grid-steps", "--context-lengths", "--context-length-steps", "--final-steps", "--select",
               "--eval-systems", "--eval-context-steps", "--horizon", "--samples", "--temperature", "--eval-batch-size",
               "--budget", "--dry-run")


def parse_grid_flag(text: str) -> tuple[str, list[str]]:
    name, _, values = text.partition("=")
    dest = name.strip().lstrip("-").replace("-", "_")
    if dest not in train.DEFAULTS or dest in ("out", "steps", "model", "data"):
        raise UserError(f"--grid {text}: {name!r} is not a train.py flag a grid can vary")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not values:
        raise UserError(f"--grid {text}: give the values as FLAG=V1,V2,...")
    if dest in ON_OFF_FLAGS and any(v.lower() not in BOOLEAN for v in values):
        raise UserError(f"--grid {text}: {name!r} is on or off; give its values as 0,1 (or false,true)")
    return dest, values


ON_OFF_FLAGS = {flag[2:].replace("-", "_") for flag, _, _, kw in train.FLAGS if kw is train.ON_OFF}
BOOLEAN = {"0": False, "false": False, "no": False, "off": False, "1": True, "true": True, "yes": True, "on": True}


def flag_args(key: str, value) -> list[str]:
    """One train.py flag on the command line: --dora / --no-dora for an on/off flag, else --key value."""
    flag = key.replace("_", "-")
    if key in ON_OFF_FLAGS:
        return [f"--{flag}" if BOOLEAN[str(value).lower()] else f"--no-{flag}"]
    return [f"--{flag}", str(value)]


def parse_context_lengths(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--context-lengths {text}: give whole numbers of tokens, e.g. 128,512,768") from None


def check_study_args(args) -> None:
    """The study's own numbers, and a --grid flag given twice (its runs would be named after both and
    only the later value would take effect)."""
    dests = [dest for dest, _ in args.grid]
    twice = sorted({d for d in dests if dests.count(d) > 1})
    rules = [
        (not twice, f"--grid {', '.join(twice)} is given more than once; give all its values in one flag "
                    f"(--grid {twice[0] if twice else ''}=V1,V2,...)"),
        (args.budget > 0, "--budget must be positive"), (args.samples >= 1, "--samples must be at least 1"),
        (args.temperature >= 0, "--temperature must be >= 0"), (args.horizon >= 1, "--horizon must be at least 1"),
        (args.eval_context_steps >= 1, "--eval-context-steps must be at least 1"),
        (args.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
        (args.grid_steps or args.context_length_steps or args.final_steps,
         "nothing to train: --grid-steps, --context-length-steps and --final-steps are all 0"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


# ---------------------------------------------------------------------------------------- settings
SETTINGS = "study_settings.json"
# Flags that shape no run, evaluation or plan: where the study is, whether it only plans, how much it
# may spend (raise --budget to go on after "stopping before"), and how often runs checkpoint.
FREE = ("out", "dry_run", "budget", "passthrough")
FREE_TRAIN_FLAGS = ("save_every",)


def study_settings(args) -> dict:
    """Everything that shapes a run, an evaluation or the plan, as JSON: the study's own flags and the
    train.py flags after `--`, parsed (so `--lr 1e-3` and `--lr 0.001` are the same)."""
    given = train.parse_run_argv(args.passthrough)[1] if args.passthrough else {}
    settings = {k: v for k, v in vars(args).items() if k not in FREE}
    settings["train_flags"] = {k: v for k, v in given.items() if k not in FREE_TRAIN_FLAGS}
    return json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file


def check_settings(args, group: distributed.Group) -> None:
    """The first start of a study records its settings in OUT/study_settings.json; every later start
    compares its own with them: the same command goes on, any other is refused (its runs would be
    reused as if they had been trained with it). Rank 0 decides; every process raises the same error."""
    out, now, problem = Path(args.out), study_settings(args), None
    if group.is_main:
        if (out / SETTINGS).exists():
            changed = settings_differences(read_json(out / SETTINGS, what="study settings"), now)
            if changed:
                problem = (f"{out} holds a study started with other settings ({'; '.join(changed)}): rerun it with "
                           f"its own settings ({out / SETTINGS}) to go on, or give a new --out")
        elif (out / "ledger.jsonl").exists() or (out / "runs").exists():
            problem = (f"{out} holds a study whose settings were not recorded (begun by an older study.py), so this "
                       f"command cannot be checked against it; give a new --out")
        else:
            write_json(out / SETTINGS, now)
    problem = group.broadcast(problem)
    if problem:
        raise UserError(problem)


def settings_differences(then: dict, now: dict) -> list[str]:
    """'--flag THEN then, NOW now' for each setting that differs ('-- --flag' for the train.py flags)."""
    def show(key, value):
        if value is None:
            return "(not given)"
        if key == "grid":
            return " ".join(f"{dest}={','.join(values)}" for dest, values in value)
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    pairs = [(f"--{k}", k, then.get(k), now.get(k)) for k in {**then, **now} if k != "train_flags"]
    t, n = then.get("train_flags", {}), now.get("train_flags", {})
    pairs += [(f"-- --{k}", k, t.get(k), n.get(k)) for k in {**t, **n}]
    return [f"{flag.replace('_', '-')} {show(key, a)} then, {show(key, b)} now" for flag, key, a, b in pairs if a != b]


def selection_notes(args, plan) -> list[str]:
    """What the output must say about how runs were compared: per-token validation losses of windows
    of different lengths are not comparable (a longer window gives each token more context)."""
    lengths = sorted({checked_run_args(args, run).context_length for run, _ in plan if run["steps"]})
    if args.select != "val_loss" or len(lengths) < 2:
        return []
    return [f"--select val_loss compares the per-token validation losses of windows of {', '.join(map(str, lengths))} "
            f"tokens, which are not comparable: a longer window gives each token more context, so the choice favours "
            f"longer windows; --select val_mae compares forecasts of the same systems from the same context"]


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
    argv = [x for k, v in flags.items() for x in flag_args(k, v)]
    return args.passthrough + argv + ["--steps", str(run["steps"]), "--out", str(folder)]  # the run's flags win


class Pricing:
    """What the plan prices runs with, read once per plan rather than once per run: the model's config
    and tokenizer (no weights are loaded) and the windows of each data setting (runs that differ only in
    learning rate or rank share them)."""

    def __init__(self, model_name: str):
        from model import load_config, load_tokenizer

        self.config, self.tok = load_config(model_name), load_tokenizer(model_name)
        self._windows = {}

    def data(self, run_args) -> tuple[dict, dict]:
        """({"train", "val": windows}, info) of train.prepare_data for a run's settings."""
        key = tuple(getattr(run_args, k) for k in ("model", "data", "systems", "data_seed", "context_length",
                                                    "stride", "decimals"))
        if key not in self._windows:
            data = train.prepare_data(run_args, self.tok)
            self._windows[key] = ({"train": data.train, "val": data.val}, data.info)
        return self._windows[key]


def projected_flops(args, run: dict, pricing: Pricing) -> dict:
    """Training, validation and forecast FLOPs a run is expected to cost (coursework accounting)."""
    run_args = checked_run_args(args, run)
    config, tok = pricing.config, pricing.tok
    windows, info = pricing.data(run_args)
    if args.eval_context_steps + args.horizon > info["timesteps"]:
        raise UserError(f"--eval-context-steps {args.eval_context_steps} + --horizon {args.horizon} must fit in the "
                        f"{info['timesteps']} timesteps of each system ({run['name']}'s data)")
    cfg = {"r": int(run_args.rank), "target_modules": run_args.targets, "use_dora": bool(run_args.dora),
           "lora_dropout": run_args.dropout}
    costs = train.step_costs(config, run_args, windows["val"], lora=cfg)
    evals = sum(train.eval_due(step, run_args) for step in range(1, run["steps"] + 1))
    return {"train": run["steps"] * costs["train_step"], "validation": evals * costs["eval"],
            "forecast": forecast_estimate(args, config, inference_lora(run_args), info["tokens_per_step"], tok,
                                          info["split_sizes"]["val"])}


def inference_lora(run_args) -> dict:
    """The adapter the forecasts run with: a PiSSA/OLoRA one is loaded converted, at rank 2r (lora/init.py)."""
    from lora.init import moves_base

    return {"r": int(run_args.rank) * (2 if moves_base(run_args.init) else 1), "target_modules": run_args.targets,
            "use_dora": bool(run_args.dora)}


def checked_run_args(args, run: dict):
    """The train.py settings of a planned run, checked as train.py checks them when it starts (so a bad
    --grid value is refused while planning, not after the runs before it have trained)."""
    try:
        return train.parse_run_argv(train_argv(args, run, Path("-")))[0]
    except UserError as e:
        raise UserError(f"{run['name']}: {e}") from None


def forecast_estimate(args, config, lora_cfg, step_tokens: int, tok, split_size: int, split: str = "val") -> int:
    """Prompts of --eval-context-steps timesteps, --horizon timesteps generated, --samples each, in the
    calls eval.generate_forecasts makes (each prompt prefilled once; lm_head on the allowed tokens), for
    --eval-systems systems or the whole split of `split_size`, whichever is fewer."""
    from eval import allowed_token_ids

    samples = sampling(args, split)[0]
    per_call, head_vocab = max(1, args.eval_batch_size // samples), len(allowed_token_ids(tok))
    n = min(args.eval_systems or split_size, split_size)
    calls = [min(per_call, n - s) for s in range(0, n, per_call)]
    return sum(flops.generation(config, b, args.eval_context_steps * step_tokens, args.horizon * step_tokens - 1,
                                lora_cfg, samples=samples, head_vocab=head_vocab)["coursework"] for b in calls)


def sampling(args, split: str) -> tuple[int, float]:
    """(samples, temperature) of the forecasts of a split: --samples and --temperature, except that
    validation takes --val-samples when given (greedy when it is 1)."""
    if split == "val" and args.val_samples is not None:
        return args.val_samples, args.temperature if args.val_samples > 1 else 0.0
    return args.samples, args.temperature


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
    pricing = Pricing(args.model)
    plan = [(run, projected_flops(args, run, pricing)) for run in grid_runs(args)]
    candidates = [run["flags"] for run, _ in plan] or [{}]
    for length in args.context_lengths if args.context_length_steps else []:
        runs = [{"name": f"context-{length}", "phase": "context", "flags": {**flags, "context_length": str(length)},
                 "steps": args.context_length_steps} for flags in candidates]
        plan.append(max(((r, projected_flops(args, r, pricing)) for r in runs), key=lambda rc: sum(rc[1].values())))
    if args.final_steps:
        finals = [{"name": "final", "phase": "final", "flags": run["flags"], "steps": args.final_steps}
                  for run, _ in plan] or [{"name": "final", "phase": "final", "flags": {}, "steps": args.final_steps}]
        plan.append(max(((r, projected_flops(args, r, pricing)) for r in finals), key=lambda rc: sum(rc[1].values())))
    config, tok = pricing.config, pricing.tok
    info = pricing.data(train.resolve_args(train_argv(args, plan[-1][0], Path("-")))[0])[1] \
        if plan else {"tokens_per_step": 10, "split_sizes": {"test": args.eval_systems or 1}}
    step_tokens = info["tokens_per_step"]
    test = {"name": "test forecasts", "phase": "test", "flags": {}, "steps": 0}  # final adapter, untrained model
    adapters = [inference_lora(train.resolve_args(train_argv(args, r, Path("-")))[0]) for r, _ in plan]
    lora_cfg = {"r": max(a["r"] for a in adapters) if plan else 8, "target_modules": train.DEFAULTS["targets"],
                "use_dora": any(a["use_dora"] for a in adapters)}
    plan.append((test, {"train": 0, "validation": 0,
                        "forecast": 2 * forecast_estimate(args, config, lora_cfg, step_tokens, tok,
                                                          info["split_sizes"]["test"], "test")}))
    return plan


# ------------------------------------------------------------------------------------------ ledger
class Ledger:
    """OUT/ledger.jsonl: one line per booking {run, kind, coursework, hardware, ...}, at most one per
    (run, kind), appended and fsynced as each is earned. A line torn by a kill is dropped on reading.
    Under torchrun rank 0 reads and writes the file; every process books the same lines in memory."""

    def __init__(self, path: Path, group: distributed.Group = distributed.Group()):
        self.path, self.lines, self.writes = path, [], group.is_main
        if group.is_main:
            from common.checkpoints import rewind_log

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
        self.book_all(run, {kind: {"coursework": coursework, "hardware": hardware, **detail}})

    def book_all(self, run: str, kinds: dict[str, dict]) -> None:
        """Book each kind of `run` not booked yet ({kind: {coursework, hardware, ...}}), all in one write:
        a run's training and validation land together. Booking is idempotent per kind, so whatever a
        kill left unbooked is booked by the rerun, and nothing twice."""
        entries = [{"run": run, "kind": kind, **cost, "coursework": int(cost["coursework"]),
                    "hardware": int(cost["hardware"])} for kind, cost in kinds.items() if not self.booked(run, kind)]
        if self.writes and entries:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in entries))
                f.flush()
            fsync(self.path)
        self.lines += entries

    def total(self, key: str = "coursework") -> int:
        return sum(b[key] for b in self.lines)


# ------------------------------------------------------------------------------------ running runs
FAILED = "study_failed.json"  # in a run's folder: {step, reason} of a run whose loss diverged


def run_folder(args, run: dict) -> Path:
    return Path(args.out) / "runs" / run["name"]


def train_run(args, run: dict, projected: int, ledger: Ledger, group: distributed.Group) -> tuple[Path, dict | None]:
    """Train (or resume, or find finished) one run and book its training and validation FLOPs; returns
    its folder and, if its loss diverged, {step, reason} (recorded in the folder, so a rerun does not
    train it again). Under torchrun every process trains (train.py's own torchrun path); rank 0 reads
    the folder."""
    folder = run_folder(args, run)
    failed = group.broadcast(read_json(folder / FAILED, what="run failure") if group.is_main and (folder / FAILED).exists()
                             else None)
    if failed is None and not ledger.booked(run["name"], "train"):
        if ledger.total() + projected > args.budget:
            raise UserError(f"stopping before {run['name']}: {ledger.total():.4g} FLOPs used and it needs about "
                            f"{projected:.4g}, over the budget of {args.budget:.4g}")
        started = group.broadcast((folder / "config.json").exists() if group.is_main else None)
        try:
            train.train(["--resume", str(folder), "--steps", str(run["steps"])] if started else train_argv(args, run, folder))
        except UserError as e:
            failed = diverged(e)
            if failed is None:
                raise
            if group.is_main:
                write_json(folder / FAILED, failed)
    if not all(ledger.booked(run["name"], kind) for kind in ("train", "validation")):
        split = group.broadcast(flops_by_kind(folder, args.model if failed else None) if group.is_main else None)
        ledger.book_all(run["name"], split)
    return folder, failed


def diverged(error: UserError) -> dict | None:
    """{step, reason} when train.py stopped a run for a non-finite loss or gradient (finish's error), else None."""
    import re

    found = re.search(r"non-finite at step (\d+)", str(error))
    return {"step": int(found.group(1)), "reason": str(error).split(";")[0]} if found else None


def flops_by_kind(folder: Path, failed_model: str | None = None) -> dict:
    """A run's FLOPs from its metrics.jsonl, split into training steps and validation passes. A run that
    diverged (on the model `failed_model`) also spent the forward and backward passes of the step that failed,
    which train.py's counters leave out (that step was never committed); its optimizer update never ran."""
    split = {kind: {"coursework": 0, "hardware": 0} for kind in ("train", "validation")}
    previous = {"flops": 0, "flops_hardware": 0}
    for rec in read_metrics(folder):
        kind = "validation" if "val_loss" in rec else "train"
        split[kind]["coursework"] += rec["flops"] - previous["flops"]
        split[kind]["hardware"] += rec["flops_hardware"] - previous["flops_hardware"]
        previous = rec
    if failed_model is not None:
        from model import load_config

        cfg = read_json(folder / "config.json", what="run config")
        lora_cfg = {"r": cfg["lora"]["r"], "target_modules": cfg["lora"]["target_modules"]}
        optimizer = flops.count(load_config(failed_model), 1, 1, lora=lora_cfg, trainable="lora").optimizer_coursework
        split["train"]["coursework"] += cfg["flops"]["train_step"] - optimizer
        split["train"]["hardware"] += cfg["flops"]["train_step_hardware"]
    return split


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def forecast(args, name: str, model, tok, run_cfg: dict, split: str, ledger: Ledger,
             group: distributed.Group) -> tuple[dict, object]:
    """Forecast --eval-systems systems of a split with one model; book the FLOPs. (metrics, task).
    Under torchrun each process forecasts a contiguous share of the systems (every sample draws from
    its own seeded stream, so the forecasts do not depend on the split) and all gather the texts.
    The texts and their FLOPs are kept in OUT/forecasts/NAME.json before they are booked: a rerun
    (after a kill, or of a finished study) reads them back and books what is not booked yet, and never
    forecasts the same thing twice."""
    import eval as ev
    from data import Scaler, forecast_task

    values = split_values(args, run_cfg, split)
    scaler, decimals = Scaler.from_dict(run_cfg["scaler"]), int(run_cfg["args"]["decimals"])
    task = forecast_task(values, scaler, decimals, args.eval_context_steps, args.horizon)
    kept = Path(args.out) / "forecasts" / f"{name}.json"
    done = group.broadcast(read_json(kept, what="forecasts") if group.is_main and kept.exists() else None)
    if done is None:
        start, end = group.span(len(task.prompts))
        used = {}
        texts = ev.generate_forecasts(model, tok, task.prompts[start:end], args.horizon, decimals,
                                      *sampling(args, split), args.eval_batch_size, seed=0, flops_used=used, first=start)
        shares = group.all_gather((texts, used))
        done = {"texts": [t for share, _ in shares for t in share],
                **{k: sum(u.get(k, 0) for _, u in shares) for k in ("coursework", "hardware")},
                "passes": [p for _, u in shares for p in u.get("passes", [])]}
        if group.is_main:
            write_json(kept, done)
    metrics = ev.evaluate_forecasts(done["texts"], task, scaler, decimals, args.horizon)
    ledger.book(name, "forecast", done["coursework"], done["hardware"], passes=done["passes"])
    return metrics, task


def judge(args, run: dict, folder: Path, failed: dict | None, base, tok, ledger: Ledger, group: distributed.Group) -> dict:
    """A run's record: settings, FLOPs, validation loss and forecast errors (cached in its folder). A run
    that failed (its loss diverged, or its validation loss is not finite) is recorded as failed, with the
    step and the reason, and is not forecast."""
    cached = folder / "study_eval.json"
    record = group.broadcast(read_json(cached, what="study evaluation") if group.is_main and cached.exists() else None)
    if record is not None:
        return record
    import copy

    import lora

    failed = failed or group.broadcast(nonfinite_validation(folder) if group.is_main else None)
    metrics = None
    if failed is None:
        cfg = read_json(folder / "config.json", what="run config")
        model = copy.deepcopy(base)
        lora.load_adapter(model, folder)
        model.eval()
        metrics, _ = forecast(args, run["name"], model, tok, cfg, "val", ledger, group)
    if group.is_main:
        vals = [r for r in read_metrics(folder) if "val_loss" in r]
        spent = {k: sum(b[k] for b in ledger.lines if b["run"] == run["name"]) for k in ("coursework", "hardware")}
        ci = None if failed else add_intervals(dict(metrics), args.bootstrap, args.bootstrap_seed)["ci"]
        scores = ({"failed": failed, "val_loss": None, "val_mae": None, "val_mse": None, "val_mase": None,
                   "val_ci": {}, "val_invalid": None} if failed else
                  {"val_loss": vals[-1]["val_loss"], "val_mae": metrics["mae"], "val_mse": metrics["mse"],
                   "val_mase": metrics["mase"], "val_ci": ci, "val_invalid": metrics["invalid"]})
        record = {**run, **scores, "flops": spent,
                  "curve": [{"step": r["step"], "val_loss": r["val_loss"], "flops": r["flops"]} for r in vals]}
        write_json(cached, record)
    return group.broadcast(record)


def nonfinite_validation(folder: Path) -> dict | None:
    """{step, reason} when the run's last validation loss is NaN or infinite (its training stayed finite)."""
    import math

    vals = [r for r in read_metrics(folder) if "val_loss" in r]
    last = vals[-1] if vals else None
    return None if last is None or math.isfinite(last["val_loss"]) else \
        {"step": last["step"], "reason": f"the validation loss became {last['val_loss']} at step {last['step']}"}


# ------------------------------------------------------------------------------------------ phases
def run_phase(args, runs_and_costs, base, tok, ledger: Ledger, group: distributed.Group) -> list[dict]:
    """Train and judge each run of a phase. A failed run is recorded and the phase goes on; a phase
    whose every run failed stops the study (there is nothing to choose from)."""
    records = []
    for run, cost in runs_and_costs:
        folder, failed = train_run(args, run, cost["train"] + cost["validation"], ledger, group)
        records.append(judge(args, run, folder, failed, base, tok, ledger, group))
        r = records[-1]
        scores = (f"FAILED at step {r['failed']['step']} ({r['failed']['reason']})" if r.get("failed") else
                  f"val loss {r['val_loss']:.4f}, val MAE {r['val_mae']:.4f}, MSE {r['val_mse']:.4f}, "
                  f"MASE {r.get('val_mase', float('nan')):.4f}")
        if group.is_main:
            print(f"{run['name']}: {scores}; {r['flops']['coursework']:.3e} FLOPs; study {ledger.total():.3e} / "
                  f"{args.budget:.3g}", file=sys.stderr)
    if records and all(r.get("failed") for r in records):
        raise UserError(f"every {records[0]['phase']} run failed, nothing to choose from: "
                        + "; ".join(f"{r['name']} at step {r['failed']['step']}" for r in records)
                        + f" ({records[0]['failed']['reason']}); lower the learning rate or --clip, with a new --out")
    return records


def best_of(args, records: list[dict]) -> dict:
    """The best run that did not fail (run_phase has made sure there is one)."""
    return min((r for r in records if not r.get("failed")), key=lambda r: (r[args.select], r["name"]))


def test_phase(args, final: dict, base, tok, ledger: Ledger, group: distributed.Group) -> dict:
    """The final adapter, the untrained model and every baseline on the same test systems, with
    intervals and paired differences; and the baselines on the validation systems the runs were judged on."""
    import copy

    import lora
    from data import Scaler, forecast_task

    cfg = read_json(run_folder(args, final) / "config.json", what="run config")
    model = copy.deepcopy(base)
    lora.load_adapter(model, run_folder(args, final))
    model.eval()
    tuned, task = forecast(args, "test-" + final["name"], model, tok, cfg, "test", ledger, group)
    untrained, _ = forecast(args, "test-untrained", base, tok, cfg, "test", ledger, group)
    drop = ("forecast_values", "forecasts")
    results = {final["name"]: {k: v for k, v in tuned.items() if k not in drop},
               "untrained": {k: v for k, v in untrained.items() if k not in drop}}
    forecasts = {final["name"]: tuned["forecast_values"], "untrained": untrained["forecast_values"]}
    baselines = baselines_on(args, cfg, "test", task)
    results.update({name: r for name, (_, r) in baselines.items()})
    forecasts.update({name: f for name, (f, _) in baselines.items()})
    for r in results.values():
        add_intervals(r, args.bootstrap, args.bootstrap_seed)
    compared = comparisons(results, [final["name"], "untrained"], [b for b in baselines if b != "lv_fit"], "lv_fit",
                           args.bootstrap, args.bootstrap_seed)
    val_task = forecast_task(split_values(args, cfg, "val"), Scaler(1.0), 2, args.eval_context_steps, args.horizon)
    val_baselines = {name: add_intervals(r, args.bootstrap, args.bootstrap_seed)
                     for name, (_, r) in baselines_on(args, cfg, "val", val_task).items()}
    return {"systems": len(task.target), "results": results, "forecasts": forecasts, "task": task,
            "comparisons": compared, "val_baselines": val_baselines}


def split_values(args, run_cfg: dict, split: str):
    """The --eval-systems systems of a split of the data the run was trained on (as forecast() reads them)."""
    import eval as ev

    dataset, indices, _ = ev.trained_data([run_cfg])
    return ev.split_systems(dataset, indices, split, args.eval_systems)


def baselines_on(args, run_cfg: dict, split: str, task) -> dict:
    """eval.baseline_results on a task of `split`: the autoregression learns from the run's training split
    and picks its lags on the validation split (all of it)."""
    import eval as ev

    dataset, indices, _ = ev.trained_data([run_cfg])
    return ev.baseline_results(task, dataset[indices["train"]], dataset[indices["val"]])


def main(argv=None) -> dict:
    """The study; under torchrun every process joins once, trains each run together with the others
    (train.py's torchrun path), forecasts its share of the systems, and rank 0 writes the ledger and
    the outputs."""
    from common.devices import parse_device
    from training.memory import reuse_freed_memory

    args = parse_args(argv)
    plan = make_plan(args)
    if not args.dry_run:
        reuse_freed_memory()  # as train.py's main: freed activation memory kept for the next step
    first_run = train.resolve_args(train_argv(args, plan[0][0], Path(args.out)))[0]  # forecasts run as the runs do
    group, device = (distributed.Group(), None) if args.dry_run else distributed.init(parse_device(first_run.device))
    try:
        return run_study(args, plan, first_run, group, device)
    finally:
        distributed.shutdown()


def run_study(args, plan, first_run, group: distributed.Group, device) -> dict:
    total = sum(sum(cost.values()) for _, cost in plan)
    if group.is_main:
        print_plan(args, plan, " (context and final runs at their most expensive setting)")
        for note in selection_notes(args, plan):
            print(f"note: {note}", file=sys.stderr)
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
    check_settings(args, group)
    group.barrier()
    ledger = Ledger(out / "ledger.jsonl", group)
    base, tok = load_pretrained(args.model, dtype=weights_dtype(first_run.dtype, device, args.model), device=device,
                                quantize=first_run.quantize)
    grid = run_phase(args, [(r, c) for r, c in plan if r["phase"] == "grid"], base, tok, ledger, group)
    best_grid = best_of(args, grid) if grid else {"flags": {}, "name": "defaults"}
    context_plan = [({**r, "flags": {**best_grid["flags"], "context_length": r["flags"]["context_length"]}}, c)
                    for r, c in plan if r["phase"] == "context"]
    context = run_phase(args, context_plan, base, tok, ledger, group)
    best = best_of(args, grid + context) if grid + context else best_grid
    final_plan = [({**r, "flags": best["flags"]}, c) for r, c in plan if r["phase"] == "final"]
    final = run_phase(args, final_plan, base, tok, ledger, group)
    chosen = final[0] if final else best
    if chosen.get("name") == "defaults":
        raise UserError("nothing to test: every training phase has 0 steps")
    test = test_phase(args, chosen, base, tok, ledger, group)
    outcome = Outcome(grid=grid, context=context, final=final, best_grid=best_grid, best=best, test=test)
    return write_outputs(args, plan, outcome, ledger, group)


# ----------------------------------------------------------------------------------------- outputs
@dataclass
class Outcome:
    """What the phases produced: each phase's run records, the settings chosen, the test results."""

    grid: list[dict]
    context: list[dict]
    final: list[dict]
    best_grid: dict  # the grid's best run (or {"name": "defaults", "flags": {}} without a grid)
    best: dict  # the best of the grid and context runs: the final run's setting
    test: dict  # test_phase's results

    @property
    def runs(self) -> list[dict]:
        return self.grid + self.context + self.final


def write_outputs(args, plan, outcome: Outcome, ledger: Ledger, group: distributed.Group) -> dict:
    grid, context, final, test = outcome.grid, outcome.context, outcome.final, outcome.test
    strip = lambda r: {k: v for k, v in r.items() if k != "curve"}  # noqa: E731
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "dry_run"},
        "plan": [{"run": r["name"], "steps": r["steps"], "projected": c} for r, c in plan],
        "notes": selection_notes(args, plan),
        "runs": [strip(r) for r in outcome.runs], "best_grid": outcome.best_grid.get("name"),
        "best": outcome.best.get("name"), "final": (final[0] if final else outcome.best)["name"],
        "test": {"systems": test["systems"], "results": test["results"], "comparisons": test["comparisons"]},
        "val_baselines": test["val_baselines"],
        "flops": {"coursework": ledger.total(), "hardware": ledger.total("hardware"), "budget": args.budget,
                  "by_run": flop_table(ledger)},
    }
    out = Path(args.out)
    if not group.is_main:
        return report
    write_json(out / "study.json", report)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(args, grid, context, report))
    plots = make_plots(out / "plots", args, outcome)
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
    val_systems = len(next(iter(report["val_baselines"].values()))["per_system_mae"])
    if grid:
        lines += [f"## Grid ({args.grid_steps} steps each; validation, {val_systems} systems)", ""]
        lines += grid_table(args, grid) + [""]
    lines += validation_table(report["runs"], report["val_baselines"])
    if context:
        lines += [f"## Context length ({args.context_length_steps} steps each, best grid setting: {report['best_grid']})", "",
                  "| context length | val loss | val MAE | val MSE | FLOPs |", "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['flags']['context_length']} | {score(r, 'val_loss')} | {score(r, 'val_mae')} | {score(r, 'val_mse')} | "
                  f"{r['flops']['coursework']:.3e} |" for r in context] + [""]
    t = report["test"]
    lines += [f"## Test ({t['systems']} systems, {args.eval_context_steps} context steps, horizon {args.horizon}; "
              f"final run: {report['final']}; 95% bootstrap intervals over systems)", "",
              f"| model | MAE | MSE | MASE | prey MAE | predator MAE | MAE step 1 | MAE step {args.horizon} | invalid |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in t["results"].items():
        lines.append(f"| {name} | {interval(r, 'mae')} | {interval(r, 'mse')} | {interval(r, 'mase')} | "
                     f"{r['prey']['mae']:.4f} | {r['predator']['mae']:.4f} | {step_interval(r['per_step'][0])} | "
                     f"{step_interval(r['per_step'][-1])} | {r.get('invalid', '—')} |")
    lines += [""] + [f"- {name}: CRPS {interval(r, 'crps')}, the 10-90% interval of the samples covers "
                     f"{r['coverage_10_90']:.1%} of the truth" for name, r in t["results"].items() if "crps" in r]
    lines += [f"- {c['model']} minus {c['baseline']} ({c['role']}), {c['metric'].upper()}: {c['diff']:+.4f} "
              f"[{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]: {c['verdict']} it" for c in t["comparisons"]]
    f = report["flops"]
    lines += ["", "## FLOPs (coursework accounting; hardware count beside it)", "",
              "| run | train | validation | forecast | total | hardware |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['run']} | {r['train']:.3e} | {r['validation']:.3e} | {r['forecast']:.3e} | {r['total']:.3e} | "
              f"{r['hardware']:.3e} |" for r in f["by_run"]]
    lines += [f"| **total** | | | | **{f['coursework']:.4e}** | {f['hardware']:.4e} |", "",
              f"Budget {f['budget']:.3g}: {100 * f['coursework'] / f['budget']:.2f}% used.", ""]
    lines += failures_markdown(grid + context) + [f"Note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def interval(r: dict, metric: str) -> str:
    """"0.1234 [0.1100, 0.1400]" (the 95% bootstrap interval over systems) or "—" when there is no such metric."""
    if metric not in r:
        return "—"
    ci = r.get("ci", {}).get(metric)
    return f"{r[metric]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def step_interval(step: dict) -> str:
    """One horizon step's MAE and its interval, as `interval` writes them."""
    return interval({"mae": step["mae"], "ci": {"mae": step["mae_ci"]} if "mae_ci" in step else {}}, "mae")


def validation_table(runs: list[dict], baselines: dict) -> list[str]:
    """Every run and every baseline on the same validation systems, with intervals."""
    lines = ["## Validation: every run and every baseline (the same systems; 95% bootstrap intervals)", "",
             "| run | val loss | val MAE | val MSE | val MASE | FLOPs (coursework) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        if r.get("failed"):
            lines.append(f"| {r['name']} | {score(r, 'val_loss')} | — | — | — | {r['flops']['coursework']:.3e} |")
            continue
        m = {"mae": r["val_mae"], "mse": r["val_mse"], "mase": r.get("val_mase", float("nan")), "ci": r.get("val_ci", {})}
        lines.append(f"| {r['name']} | {r['val_loss']:.4f} | {interval(m, 'mae')} | {interval(m, 'mse')} | "
                     f"{interval(m, 'mase')} | {r['flops']['coursework']:.3e} |")
    lines += [f"| {name} | — | {interval(b, 'mae')} | {interval(b, 'mse')} | {interval(b, 'mase')} | 0 |"
              for name, b in baselines.items()]
    return lines + [""]


def failures_markdown(records) -> list[str]:
    failed = [r for r in records if r.get("failed")]
    return ["## Failed runs (never selected)", ""] + [f"- {r['name']}: failed at step {r['failed']['step']}: "
                                                      f"{r['failed']['reason']}" for r in failed] + [""] if failed else []


def score(r: dict, key: str, digits: int = 4) -> str:
    """A run's metric for a table, or where it failed."""
    return f"failed at step {r['failed']['step']}" if r.get("failed") else f"{r[key]:.{digits}f}"


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
                f"{score(cell[(v, c)], metric)} ({score(cell[(v, c)], 'val_loss', 3)})" if not cell[(v, c)].get("failed")
                else score(cell[(v, c)], metric) for c in col_values) + " |")
        return lines
    lines = ["| run | val loss | val MAE | val MSE |", "| --- | ---: | ---: | ---: |"]
    return lines + [f"| {r['name']} | {score(r, 'val_loss')} | {score(r, 'val_mae')} | {score(r, 'val_mse')} |" for r in grid]


def make_plots(folder: Path, args, outcome: Outcome) -> list[Path]:
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

    grid, context, test = outcome.grid, outcome.context, outcome.test
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in outcome.runs:
        for ax, x in zip(axes, ("step", "flops")):
            ax.plot([c[x] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker=".", label=r["name"]
                    + (f" (failed at step {r['failed']['step']})" if r.get("failed") else ""))
    for ax, x in zip(axes, ("step", "FLOPs (coursework, the run's own)")):
        ax.set(xlabel=x, ylabel="validation loss (nats per token)")
    axes[1].legend(fontsize=6)
    save(fig, "val_loss.png")
    if len(args.grid) == 2 and grid:
        (rf, rv), (cf, cv) = args.grid
        cell = {(r["flags"][rf], r["flags"][cf]): plotted(r, args.select) for r in grid}
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow([[cell[(a, b)] for b in cv] for a in rv], cmap="viridis_r")
        for r in (r for r in grid if r.get("failed")):  # a failed run's cell is blank, and says so
            ax.text(cv.index(r["flags"][cf]), rv.index(r["flags"][rf]), "failed", ha="center", va="center")
        ax.set(xticks=range(len(cv)), xticklabels=cv, yticks=range(len(rv)), yticklabels=rv, xlabel=cf, ylabel=rf,
               title=f"validation {args.select.removeprefix('val_').upper()}")
        fig.colorbar(im)
        save(fig, "grid_heatmap.png")
    if context:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar([r["flags"]["context_length"] for r in context], [plotted(r, args.select) for r in context])
        for r in (r for r in context if r.get("failed")):
            ax.text(r["flags"]["context_length"], 0, "failed", ha="center", va="bottom")
        ax.set(xlabel="context length (tokens)", ylabel=f"validation {args.select.removeprefix('val_').upper()}")
        save(fig, "context_lengths.png")
    written += test_plots(save, plt, args, test)
    error_vs_flops(save, plt, outcome.runs, test)
    return written


def error_vs_flops(save, plt, runs: list[dict], test: dict) -> None:
    """Validation MAE of every run against the FLOPs it used (and the final run's test MAE), each with its
    95% interval, and the baselines on the same systems as horizontal lines: what more compute buys."""
    runs = [r for r in runs if not r.get("failed")]  # a failed run has no forecast error to show
    final_name = runs[-1]["name"] if runs else None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    panels = ((axes[0], "validation", runs, test["val_baselines"]),
              (axes[1], "test", [r for r in runs if r["name"] == final_name], test["results"]))
    for ax, split, points, baselines in panels:
        for r in points:
            mae, ci = (r["val_mae"], r.get("val_ci", {}).get("mae")) if split == "validation" else \
                (test["results"][r["name"]]["mae"], test["results"][r["name"]]["ci"]["mae"])
            err = [[mae - ci[0]], [ci[1] - mae]] if ci else None
            ax.errorbar([r["flops"]["coursework"]], [mae], yerr=err, fmt="o", capsize=3, label=r["name"])
        for k, name in enumerate(b for b in baselines if b not in ("untrained", final_name)):
            ax.axhline(baselines[name]["mae"], color=f"C{(k + len(points)) % 10}", ls="--", lw=1, label=name)
        ax.set(xscale="log", xlabel="FLOPs the run used (coursework accounting)",
               ylabel=f"{split} MAE (original units)", title=f"{split} error against compute")
        ax.legend(fontsize=6)
    save(fig, "error_vs_flops.png")


def plotted(r: dict, key: str) -> float:
    """A run's metric for a plot: NaN (nothing drawn) for a failed run."""
    return float("nan") if r.get("failed") else r[key]


def test_plots(save, plt, args, test) -> list:
    import eval as ev

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
        ev.plot_with_band(ax, r["per_step"], name)
    ax.set(xlabel="forecast horizon (timesteps)", ylabel="MAE (original units)", title="test error by horizon")
    ax.legend()
    save(fig, "test_error_by_horizon.png")
    return []


if __name__ == "__main__":
    run_cli(main)
