"""Forecasting quality: does fine-tuning move the number? The base model and any adapters side by side.

    python eval.py --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/lv --systems 100
    python eval.py --model tiny --adapter runs/tiny --horizon 10 --json results.json --plots plots/

For each system of the chosen split, the first `--context-steps` timesteps are written as LLMTIME text
(scaled with the run's stored alpha for an adapter, and with alpha fitted on the data's training split
for the base model), the model continues the text, and the continuation is decoded, scaled back and
compared with the true next `--horizon` steps in the original units.

Decoding is constrained to what the format can contain (digits, '.', ',', ';' and the end tokens) and
stops after `horizon` timesteps; lm_head computes only those tokens' logits. Several samples
(`--samples N --temperature T`) are combined by their median per timestep and variable: each prompt is
prefilled once and its samples decode from copies of its KV cache, `--batch-size` rows (prompts x
samples) at a time, each sample drawing from its own seeded stream (the same forecasts whatever the
batch size). A forecast that cannot be read in full is never dropped:

- invalid: the continuation had malformed timesteps; only the well-formed timesteps before the first
  malformed one are kept (after it, the time alignment is unknown);
- short:   fewer than `horizon` usable timesteps; the rest is filled by repeating the last usable
  forecast value (or the last context value if there is none), i.e. the naive forecast from there on.

Both are counted and reported. Baselines on the same systems (forecast/baselines.py, each reading the
context alone): naive_last, naive_linear, seasonal_naive, autoregression (fitted on the training split)
and lv_fit (the Lotka-Volterra equations fitted to each context, the physics reference). Every entry
has MAE, MSE and the scaled error MASE with a 95% bootstrap interval over systems (`--bootstrap N`,
`--bootstrap-seed`), and each model is compared with the best baseline and with lv_fit by a paired
bootstrap difference (forecast/metrics.py). With `--samples N` the point forecast is the median of the
samples, and the samples are scored by CRPS and the coverage of their 10-90% interval.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: Ctrl-C during start-up is one line (common/startup.py)
    from common.startup import quiet_ctrl_c
    quiet_ctrl_c()

import argparse
import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import flops
import lora
from common.cli import UserError, format_perplexity, run_cli
from common.devices import parse_device
from common.files import read_json, write_json
from data import Scaler, decode, forecast_task, load_trajectories, make_windows, split_indices, trajectory_texts
from forecast.baselines import all_baselines
from forecast.metrics import add_intervals, comparisons, crps_from_samples, interval_coverage, scaled_errors
from model import DEFAULT_MODEL, generate, load_pretrained
from model.loss import mean_loss
from model.precision import weights_dtype
from training.runs import base_for

FORMAT_CHARS = "0123456789.,;"


# ------------------------------------------------------------------------------------------ metrics
def error_metrics(forecast: np.ndarray, target: np.ndarray, context: np.ndarray | None = None) -> dict:
    """MAE / MSE / RMSE of (N, H, 2) forecasts, overall, per variable, per horizon step and per system;
    with the (N, K, 2) context also the scaled error MASE (scaled_errors)."""
    err = np.asarray(forecast, dtype=np.float64) - np.asarray(target, dtype=np.float64)

    def summary(e):
        mse = float(np.mean(e**2))
        return {"mae": float(np.mean(np.abs(e))), "mse": mse, "rmse": math.sqrt(mse)}

    out = {**summary(err), "prey": summary(err[..., 0]), "predator": summary(err[..., 1]),
           "per_step": [{"step": k + 1, **summary(err[:, k])} for k in range(err.shape[1])],
           "per_system_mae": np.mean(np.abs(err), axis=(1, 2)).tolist(),
           "per_system_mse": np.mean(err**2, axis=(1, 2)).tolist(),
           "per_system_step_mae": np.mean(np.abs(err), axis=2).tolist()}  # (N, H): for the intervals by step
    if context is not None:
        scaled = scaled_errors(forecast, target, context)
        for step, mase in zip(out["per_step"], scaled.pop("per_step_mase")):
            step["mase"] = mase
        out.update(scaled)
    return out


def complete_forecast(text: str, horizon: int, decimals: int, fallback: np.ndarray) -> tuple[np.ndarray, bool, bool]:
    """Decode one continuation into exactly `horizon` scaled timesteps; returns (values, invalid, short).

    Keeps the well-formed steps before the first malformed one; pads a short forecast by repeating its
    last value (or `fallback`, the last context value, when nothing could be read)."""
    decoded = decode(text, n_vars=2, decimals=decimals)
    steps = decoded.aligned[:horizon]
    invalid = decoded.malformed > 0 and decoded.first_bad is not None and decoded.first_bad < horizon
    short = len(steps) < horizon
    if short:
        last = steps[-1] if len(steps) else fallback
        steps = np.concatenate([steps.reshape(-1, 2), np.repeat(last[None], horizon - len(steps), axis=0)])
    return steps, bool(invalid), bool(short)


def median_of_samples(samples: np.ndarray) -> np.ndarray:
    """(S, N, H, 2) -> (N, H, 2): the median per system, timestep and variable."""
    return np.median(samples, axis=0)


# -------------------------------------------------------------------------------------- generation
def allowed_token_ids(tok) -> list[int]:
    ids = []
    for c in FORMAT_CHARS:
        i = tok.token_to_id(c)
        if i is None:
            raise UserError(f"the tokenizer has no single token for {c!r}; LLMTIME needs one per digit and separator")
        ids.append(i)
    return ids + list(tok.eos_ids)


def stop_after(horizon: int, separator_id: int):
    return lambda tokens: tokens.count(separator_id) >= horizon


def generate_forecasts(model, tok, prompts: list[str], horizon: int, decimals: int, samples: int = 1,
                       temperature: float = 0.0, batch_size: int = 128, seed: int = 0, progress: bool = False,
                       flops_used: dict | None = None, first: int = 0) -> list[list[str]]:
    """`samples` continuations per prompt, decoded `batch_size` rows (prompts x their samples) at a time:
    each prompt is prefilled once, its samples continue copies of its KV cache.

    Sample j of prompt i (i counted from `first`: a slice of a larger task) draws from its own random
    stream, seeded by (seed, i, j): what it says does not depend on the batch size or on how the prompts
    were split, e.g. over processes. `flops_used` ({"coursework", "hardware"}), if given, has the
    generation's FLOPs added to it, and under "passes" each generate call's stats (flops.generation's
    arguments)."""
    device = next(model.parameters()).device
    allowed = allowed_token_ids(tok)
    sep = tok.token_to_id(";")
    # a step is at most "ddd.dd,ddd.dd;" at 3 integer digits: generous room, stopped early by `stop`
    max_new = horizon * (2 * (4 + decimals) + 2)
    per_call = max(1, batch_size // samples)  # prompts per generate call
    encoded = tok.encode_batch(prompts)
    texts: list[list[str]] = []
    bar = tqdm(total=len(prompts) * samples, desc="forecast", disable=not progress, file=sys.stderr)
    for s in range(0, len(prompts), per_call):
        chunk = encoded[s : s + per_call]
        streams = [torch.Generator(device=device).manual_seed(row_seed(seed, first + i, j))
                   for i in range(s, s + len(chunk)) for j in range(samples)] if temperature > 0 else None
        stats = {}
        new = generate(model, chunk, max_new, samples=samples, temperature=temperature, eos_ids=tok.eos_ids,
                       vocab_limit=tok.vocab_size, allowed_ids=allowed, stop=stop_after(horizon, sep),
                       generator=streams, pad_id=tok.pad_id, stats=stats)
        if flops_used is not None:
            cost = flops.generation(model.config, lora=getattr(model, "lora_config", None), **stats)
            for key in ("coursework", "hardware"):
                flops_used[key] = flops_used.get(key, 0) + cost[key]
            flops_used.setdefault("passes", []).append(stats)
        decoded = [tok.decode(ids, skip_special_tokens=True) for ids in new]
        texts += [decoded[k : k + samples] for k in range(0, len(decoded), samples)]
        bar.update(len(new))
    bar.close()
    return texts


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """A distinct 63-bit seed per (seed, prompt, sample)."""
    return (seed * 1_000_003 + prompt) * 65_537 + sample & (2**63 - 1)


def evaluate_forecasts(texts: list[list[str]], task, scaler: Scaler, decimals: int, horizon: int) -> dict:
    """Decode, complete, aggregate (median), unscale; then the metrics and the invalid/short counts."""
    n, samples = len(texts), len(texts[0])
    out = np.zeros((samples, n, horizon, 2))
    invalid = short = 0
    for i, system_texts in enumerate(texts):
        fallback = scaler.scale(task.context[i, -1])
        for j, text in enumerate(system_texts):
            values, bad, cut = complete_forecast(text, horizon, decimals, fallback)
            out[j, i] = values
            invalid, short = invalid + bad, short + cut
    forecast = scaler.unscale(median_of_samples(out))
    r = {**error_metrics(forecast, task.target, task.context), "invalid": invalid, "short": short,
         "forecasts": int(n * samples), "forecast_values": forecast}
    if samples > 1:
        r.update(sample_scores(scaler.unscale(out), task.target))
    return r


def sample_scores(samples: np.ndarray, target: np.ndarray) -> dict:
    """CRPS (from the samples) and the coverage of their 10-90% interval, in original units."""
    crps = crps_from_samples(samples, target)
    coverage = interval_coverage(samples, target)
    return {"crps": float(crps.mean()), "per_system_crps": crps.tolist(), "coverage_10_90": float(coverage.mean())}


def text_loss(model, tok, values: np.ndarray, scaler: Scaler, decimals: int, context_length: int, batch_size: int) -> dict:
    """Teacher-forced loss per token (and perplexity) on the systems' full LLMTIME text."""
    texts = trajectory_texts(values, scaler, decimals)
    windows = make_windows(tok.encode_batch(texts), context_length, max(1, context_length // 2), tok.pad_id)
    loss = mean_loss(model, windows, batch_size)
    return {"loss": loss, "ppl": math.exp(min(loss, 700))}


# -------------------------------------------------------------------------------------------- runs
def run_settings(adapter: str) -> tuple[Path, dict | None]:
    """(adapter folder, the training run's config or None) for a run folder or an adapter folder."""
    path = Path(adapter)
    if not path.exists():
        raise UserError(f"adapter or run folder not found: {adapter}")
    for candidate in (path / "config.json", path.parent / "config.json"):
        if candidate.is_file():
            cfg = read_json(candidate, what="run config")
            if isinstance(cfg, dict) and "chat" in cfg:
                raise UserError(f"{adapter} was trained on chat data ({cfg.get('args', {}).get('data')}), not on "
                                f"forecasting text: talk to it with sample.py --chat --adapter {adapter}")
            if isinstance(cfg, dict) and "scaler" in cfg:
                return path, cfg
    return path, None


def with_interval(r: dict, metric: str) -> str:
    """"0.1234 [0.1100, 0.1400]": the value and its 95% bootstrap interval, when there is one."""
    ci = r.get("ci", {}).get(metric)
    return f"{r[metric]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def display_name(name: str, width: int = 40) -> str:
    """A table label: the name when it fits `width`, else its last path components that fit, after
    ".../" (never cut inside one: ".../smollm2-135m-instruct", not "...he/smollm2-135m-instruct")."""
    if len(name) <= width:
        return name
    parts = name.rstrip("/").split("/")
    label = parts[-1]
    for part in reversed(parts[:-1]):
        if len(".../" + part + "/" + label) > width:
            break
        label = part + "/" + label
    return ".../" + label


def print_table(results: dict, header: str, compared: list[dict] | None = None) -> None:
    print(header)
    labels = {name: display_name(name) for name in results}
    w = max(28, max(len(label) for label in labels.values()) + 1)
    cols = (f"{'':<{w}}{'MAE [95% CI]':>26}{'MSE [95% CI]':>26}{'MASE [95% CI]':>26}{'prey MAE':>10}{'pred MAE':>10}"
            f"{'invalid':>9}{'short':>7}")
    print(cols)
    for name, r in results.items():
        label = labels[name]
        extra = f"{r['invalid']:>9}{r['short']:>7}" if "invalid" in r else f"{'—':>9}{'—':>7}"
        mase = with_interval(r, "mase") if "mase" in r else "—"
        print(f"{label:<{w}}{with_interval(r, 'mae'):>26}{with_interval(r, 'mse'):>26}{mase:>26}"
              f"{r['prey']['mae']:>10.4f}{r['predator']['mae']:>10.4f}{extra}")
    print_notes(results, compared or [])
    if any("loss" in r for r in results.values()):
        print(f"\n{'':<{w}}{'text loss':>10}{'ppl':>11}")
        for name, r in results.items():
            if "loss" in r:
                print(f"{labels[name]:<{w}}{r['loss']:>10.4f}{format_perplexity(r['ppl']):>11}")


def print_notes(results: dict, compared: list[dict]) -> None:
    """Sample scores, what the baselines report, and the paired differences."""
    for name, r in results.items():
        if "crps" in r:
            print(f"{name}: CRPS {with_interval(r, 'crps')}, "
                  f"10-90% interval covers {r['coverage_10_90']:.1%} of the truth")
    notes = {"seasonal_naive": lambda r: f"no period found in {r['no_period']} contexts (persistence there)",
             "autoregression": lambda r: f"p = {r['p']} lags, chosen on the validation split",
             "lv_fit": lambda r: f"{r['failed']} fits not finite (persistence there)"}
    for name, note in notes.items():
        if name in results:
            print(f"{name}: {note(results[name])}")
    for c in compared:
        print(f"{c['model']} - {c['baseline']} ({c['role']}), {c['metric'].upper()}: {c['diff']:+.4f} "
              f"[{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]: {c['verdict']} it")


def plot_with_band(ax, per_step: list[dict], label: str) -> None:
    """MAE against the horizon step, shaded by its 95% interval where there is one."""
    steps = [s["step"] for s in per_step]
    line, = ax.plot(steps, [s["mae"] for s in per_step], marker=".", label=label)
    if all("mae_ci" in s for s in per_step):
        ax.fill_between(steps, [s["mae_ci"][0] for s in per_step], [s["mae_ci"][1] for s in per_step],
                        color=line.get_color(), alpha=0.15, lw=0)


def make_plots(folder: Path, task, forecasts: dict[str, np.ndarray], results: dict, n_systems: int = 4) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install matplotlib") from None
    folder.mkdir(parents=True, exist_ok=True)
    K, H = task.context.shape[1], task.target.shape[1]
    written = []
    fig, axes = plt.subplots(min(n_systems, len(task.target)), 2, figsize=(11, 2.6 * min(n_systems, len(task.target))), squeeze=False)
    for i, row in enumerate(axes):
        for v, (ax, label) in enumerate(zip(row, ("prey", "predator"))):
            ax.plot(range(K), task.context[i, :, v], color="black", lw=1, label="context")
            last = task.context[i, -1:, v]  # start each continuation at the last observed point
            ax.plot(range(K - 1, K + H), np.concatenate([last, task.target[i, :, v]]), color="black", ls="--", lw=1, label="truth")
            for name, f in forecasts.items():
                ax.plot(range(K - 1, K + H), np.concatenate([last, f[i, :, v]]), lw=1.2, label=name)
            ax.set_title(f"system {i}: {label}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(folder / "forecasts.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        plot_with_band(ax, r["per_step"], name)
    ax.set_xlabel("horizon step")
    ax.set_ylabel("MAE (original units)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(folder / "error_vs_horizon.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.hist(r["per_system_mae"], bins=20, alpha=0.5, label=name)
    ax.set_xlabel("per-system MAE")
    ax.set_ylabel("systems")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(folder / "error_histogram.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--model", default=None, help="base model: hub id, checkpoint folder or 'tiny' (default: the model the "
                                    f"--adapter runs were trained on, else {DEFAULT_MODEL})")
    a("--adapter", action="append", default=[], help="a training run folder or adapter folder (repeatable)")
    a("--no-base", action="store_true", help="skip the base model (evaluate adapters and baselines only)")
    a("--data", default=None, help="HDF5 file (default: the built-in simulated dataset)")
    a("--data-seed", type=int, default=0, help="seed of the simulated data and the split (as in train.py)")
    a("--split", default="test", choices=["train", "val", "test"], help="systems to forecast (default: test)")
    a("--context-steps", type=int, default=50, help="timesteps in each prompt (default: 50)")
    a("--horizon", type=int, default=20, help="timesteps forecast (default: 20)")
    a("--samples", type=int, default=1, help="samples per system, combined by their median (default: 1)")
    a("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0.0)")
    a("--systems", type=int, default=None, help="evaluate the first N systems of the split")
    a("--batch-size", type=int, default=128,
      help="rows decoded together (prompts x samples); the text loss takes 16 windows at a time (default: 128)")
    a("--decimals", type=int, default=None, help="for the base model (default: the first --adapter run's, else 2; "
                                                 "a run uses its own)")
    a("--loss", action="store_true", help="also report the teacher-forced loss and perplexity of the text")
    a("--context-length", type=int, default=512, help="window length for --loss (default: 512)")
    a("--json", default=None, help="write the results to this file")
    a("--plots", default=None, help="write plots to this folder (needs matplotlib)")
    a("--seed", type=int, default=0, help="seed of the sampled forecasts (default: 0)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="auto (the default): what the --adapter runs trained on; without one, bfloat16 on CUDA, float32 on MPS, "
           "on CPU the faster of float32 and bfloat16 as measured here (model/precision.py)")
    a("--device", default="auto", help="auto (CUDA, then MPS, then CPU: the default), cpu, cuda, cuda:N or mps")
    a("--quantize", default=None, choices=["nf4"], help="store the base model's projections in 4-bit NF4 (QLoRA runs; "
                                                        "default: as the --adapter runs were trained)")
    a("--bootstrap", type=int, default=1000, help="resamples of the systems for the 95%% intervals (default: 1000)")
    a("--bootstrap-seed", type=int, default=0, help="seed of the resamples, the same draws for every entry (default: 0)")
    args = p.parse_args(argv)
    if args.bootstrap < 10:
        raise UserError("--bootstrap needs at least 10 resamples for a 95% interval (1000 is the default)")
    if args.samples < 1 or args.horizon < 1 or args.context_steps < 1 or args.batch_size < 1:
        raise UserError("--samples, --horizon, --context-steps and --batch-size must be at least 1")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0")
    if args.samples > 1 and args.temperature == 0:
        raise UserError("--samples > 1 needs --temperature > 0 (greedy samples would all be the same)")
    if args.no_base and not args.adapter:
        raise UserError("--no-base leaves nothing to evaluate; pass --adapter")
    if args.systems is not None and args.systems < 1:
        raise UserError("--systems must be at least 1")
    return args


def trained_data(run_configs: list[dict], data: str | None = None, data_seed: int = 0) -> tuple[np.ndarray, dict, str]:
    """(the whole dataset (systems, timesteps, 2), its split {train, val, test: indices}, its source): the
    dataset and split the runs (their config.json) were trained on, so "test" means systems they never
    saw; `data` and `data_seed` where no run says, or where `data` is given."""
    source = {"data": data, "data_seed": data_seed, "systems": None}
    trained_on = [cfg["args"] for cfg in run_configs]
    if trained_on and data is None:
        source = {k: trained_on[0].get(k) for k in source}
        if any({k: a.get(k) for k in source} != source for a in trained_on[1:]):
            print("note: the runs were trained on different data; using the first run's", file=sys.stderr)
    traj = load_trajectories(source["data"], n=1000, seed=source["data_seed"])
    dataset = traj.values[: source["systems"]] if source["systems"] else traj.values
    return dataset, split_indices(len(dataset), seed=source["data_seed"]), traj.source


def split_systems(dataset: np.ndarray, split: dict, name: str, systems: int | None) -> np.ndarray:
    """The first `systems` systems of split `name` (all of them for None), with a note when fewer exist."""
    chosen = split[name]
    if systems is not None and systems > len(chosen):
        sizes = " / ".join(f"{len(split[k])} {k}" for k in ("train", "val", "test"))
        print(f"note: the {name} split has {len(chosen)} systems, not the {systems} asked for "
              f"({len(dataset)} systems split {sizes}); evaluating {len(chosen)}", file=sys.stderr)
    return dataset[chosen][:systems]


def load_variants(args, runs: dict, base_model, fitted: Scaler) -> list[tuple]:
    """(name, model, scaler, decimals) for the base model and each adapter (a copy of the base each)."""
    variants = [] if args.no_base else [(str(args.model), base_model, fitted, args.decimals)]
    for adapter, (path, run_cfg) in runs.items():
        model = copy.deepcopy(base_model)
        lora.load_adapter(model, path)
        model.eval()
        if run_cfg is None:
            print(f"note: {adapter} has no training-run config.json; scaling as for the base model", file=sys.stderr)
            scaler, decimals = fitted, args.decimals
        else:
            scaler, decimals = Scaler.from_dict(run_cfg["scaler"]), int(run_cfg["args"]["decimals"])
            if run_cfg["args"].get("quantize") != args.quantize:
                print(f"note: {adapter} was trained on a base with quantize={run_cfg['args'].get('quantize')}, "
                      f"evaluated here with --quantize {args.quantize}", file=sys.stderr)
        variants.append((adapter, model, scaler, decimals))
    return variants


def evaluate_variant(args, tok, values, name, model, scaler, decimals, trained_len: int | None):
    """Forecast every system with one model: (task, metrics, forecasts in original units)."""
    task = forecast_task(values, scaler, decimals, args.context_steps, args.horizon)
    longest = max(len(ids) for ids in tok.encode_batch(task.prompts)) + args.horizon * (2 * (2 + decimals) + 2)
    if trained_len and longest > trained_len:
        print(f"note: {name}: prompts + forecasts reach ~{longest} tokens, beyond the {trained_len}-token windows "
              f"it was trained on; fewer --context-steps keep it in familiar territory", file=sys.stderr)
    texts = generate_forecasts(model, tok, task.prompts, args.horizon, decimals, args.samples, args.temperature,
                               args.batch_size, args.seed, progress=True)
    r = evaluate_forecasts(texts, task, scaler, decimals, args.horizon)
    forecast = r.pop("forecast_values")
    if args.loss:
        r.update(text_loss(model, tok, values, scaler, decimals, args.context_length, batch_size=16))
    r["alpha"], r["decimals"] = scaler.alpha, decimals
    return task, r, forecast


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = parse_device(args.device)
    runs = {adapter: run_settings(adapter) for adapter in args.adapter}
    args.model, args.quantize = base_for(args.adapter, args.model, args.quantize)  # the runs' own by default
    run_configs = [cfg for _, cfg in runs.values() if cfg is not None]  # training runs' config.json
    if args.decimals is None:
        args.decimals = next((int(cfg["args"]["decimals"]) for cfg in run_configs), 2)
    dataset, split, source = trained_data(run_configs, args.data, args.data_seed)
    values = split_systems(dataset, split, args.split, args.systems)
    dtype = weights_dtype(args.dtype, device, args.model, run_configs)
    base_model, tok = load_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
    variants = load_variants(args, runs, base_model, Scaler.fit(dataset[split["train"]]))

    results, forecasts, task = {}, {}, None
    for name, model, scaler, decimals in variants:
        run_cfg = runs.get(name, (None, None))[1]
        trained_len = run_cfg["args"]["context_length"] if run_cfg else None
        variant_task, results[name], forecasts[name] = evaluate_variant(args, tok, values, name, model, scaler,
                                                                        decimals, trained_len)
        task = task or variant_task
    models = list(results)
    baselines = baseline_results(task, dataset[split["train"]], dataset[split["val"]], args.seed)
    for name, (forecast, r) in baselines.items():
        results[name], forecasts[name] = r, forecast
    for r in results.values():
        add_intervals(r, args.bootstrap, args.bootstrap_seed)
    compared = comparisons(results, models, [b for b in baselines if b != "lv_fit"], "lv_fit",
                           args.bootstrap, args.bootstrap_seed)

    report = {"systems": len(values), "context_steps": args.context_steps, "horizon": args.horizon,
              "split": args.split, "samples": args.samples, "temperature": args.temperature,
              "data": source, "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed},
              "results": results, "comparisons": compared}
    print_table(results, f"{len(values)} {args.split} systems, {args.context_steps} context steps, horizon "
                         f"{args.horizon}, {args.samples} sample(s) at temperature {args.temperature} (errors in "
                         f"original units; 95% bootstrap intervals over systems, {args.bootstrap} resamples)", compared)
    if args.json:
        write_json(args.json, report)
    if args.plots:
        for path in make_plots(Path(args.plots), task, forecasts, results):
            print(f"wrote {path}", file=sys.stderr)
    return report


def baseline_results(task, train: np.ndarray, val: np.ndarray, seed: int = 0) -> dict[str, tuple[np.ndarray, dict]]:
    """{name: (forecast, metrics and what the baseline reports)} for every baseline on the task's context;
    `train` and `val` are the dataset's training and validation systems (the autoregression's data)."""
    out = {}
    for name, (forecast, info) in all_baselines(task.context, task.target.shape[1], train, val, seed).items():
        out[name] = (forecast, {**error_metrics(forecast, task.target, task.context), **info})
    return out


if __name__ == "__main__":
    run_cli(main)
