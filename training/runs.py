"""What a training run remembers, for the commands that take its adapter.

train.py writes every setting of a run to `OUT/config.json`, the model it was trained on among them.
eval.py, sample.py and `python -m lora.export` read it, so `--adapter runs/x` is enough: the base is
the run's model (and its `--quantize`), not the default hub model, which the adapter would not fit.
A `--model` that is not the run's is refused in one line rather than loaded and then failing on
tensor shapes, or worse, fitting them (two checkpoints of the same shape, other weights).
"""

from __future__ import annotations

from pathlib import Path

from common.cli import UserError
from common.files import read_json
from model import DEFAULT_MODEL


def training_config(adapter: str) -> dict | None:
    """The train.py config.json of the run an adapter comes from: the run folder's own, or the run's
    above a checkpoint-NNNNNN/ folder; None for an adapter folder of its own (e.g. from PEFT)."""
    path = Path(adapter)
    for candidate in (path / "config.json", path.parent / "config.json"):
        if candidate.is_file():
            cfg = read_json(candidate, what="run config")
            if isinstance(cfg, dict) and isinstance(cfg.get("args"), dict) and "model" in cfg["args"]:
                return cfg
    return None


def _is_hub_id(name: str) -> bool:
    """The rule model/loading.resolve applies: 'org/name', not a path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and not Path(name).exists()


def run_model(cfg: dict) -> str:
    """The --model that loads a run's base from here: as given to train.py when that still names it (a
    hub id, 'tiny', a folder that exists), else the folder it was loaded from, if that exists."""
    name = str(cfg["args"]["model"])
    if name == "tiny" or _is_hub_id(name) or Path(name).expanduser().is_dir():
        return name
    source = cfg.get("model_source")
    return str(source) if source and Path(source).expanduser().is_dir() else name


def same_model(given: str, cfg: dict) -> bool:
    """Is --model `given` the model the run was trained on (by name, or the same folder)?"""
    names = [str(n) for n in (cfg["args"]["model"], cfg.get("model_source")) if n]
    if given in names:
        return True
    path = Path(given).expanduser()
    return path.is_dir() and any(Path(n).expanduser().is_dir() and Path(n).expanduser().resolve() == path.resolve()
                                 for n in names)


def base_for(adapters: list[str], model: str | None, quantize: str | None) -> tuple[str, str | None]:
    """(--model, --quantize) for a command that applies `adapters`. Not given, they are the runs' own
    (runs that disagree need --model); a given --model must be the one every run was trained on."""
    runs = {a: cfg for a in adapters if (cfg := training_config(a)) is not None}
    if model is None:
        models = {a: run_model(cfg) for a, cfg in runs.items()}
        if len(set(models.values())) > 1:
            raise UserError(f"the adapters were trained on different models ({', '.join(f'{a}: {m}' for a, m in models.items())}); "
                            f"evaluate them one model at a time")
        model = next(iter(models.values()), DEFAULT_MODEL)
    for adapter, cfg in runs.items():
        if not same_model(model, cfg):
            raise UserError(f"{adapter} was trained on {cfg['args']['model']}, not on --model {model}; "
                            f"leave out --model to use the run's own")
    if quantize is None:
        quantized = {cfg["args"].get("quantize") for cfg in runs.values()}
        quantize = quantized.pop() if len(quantized) == 1 else None
    return model, quantize
