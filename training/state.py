"""What a checkpoint holds besides the adapter, and how a run continues from it exactly.

A run resumed from a checkpoint must end bit for bit where the uninterrupted run would have. So a
checkpoint holds every piece of state the next step reads: the optimizer's moments, the step and FLOP
counters, the position in the shuffled data (`BatchOrder`), the random generators' states and the
number of metrics lines written (`RunState`). train.py replaces the state whole, at step boundaries,
with signals held back, so whenever a run stops the weights and this state belong together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import lora
from common.checkpoints import latest_checkpoint
from common.cli import UserError
from training.optim import AdamW


STATE_FILE = "trainer_state.pt"


class BatchOrder:
    """Shuffled passes over the training windows. Each epoch's order is a pure function of (seed,
    epoch), so the position (epoch, index) is all a checkpoint needs to continue exactly."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._order = self._perm(epoch)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next(self, k: int) -> torch.Tensor:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = min(k - len(out), self.n - self.index)
            out += self._order[self.index : self.index + take].tolist()
            self.index += take
        return torch.tensor(out)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


@dataclass(frozen=True)
class RunState:
    """Everything a checkpoint holds besides the adapter and the optimizer's moments.

    It is replaced whole, only at a step boundary and in the same interrupt-free moment as the
    update it describes, so whenever a signal arrives the weights and this state belong together.
    """

    step: int = 0
    flops: int = 0  # coursework accounting, training and validation
    flops_hardware: int = 0
    tokens: int = 0  # window tokens trained on, padding included (throughput; the loss's own count is per step)
    time: float = 0.0  # seconds of training, over all sessions
    data: dict = field(default_factory=lambda: {"epoch": 0, "index": 0})  # BatchOrder position
    rng: dict = field(default_factory=dict)  # torch (and CUDA) generator states after this step
    metrics_lines: int = 0  # lines of metrics.jsonl that describe the run up to here
    evaluated: bool = True  # False while the validation pass due after this step is still to run


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(out: Path, model, opt: AdamW) -> RunState | None:
    """Restore the newest complete checkpoint of a run into model and optimizer; None if it has none."""
    path = latest_checkpoint(out)
    if path is None:
        return None
    damaged = f"the run cannot continue from it; start a new run, or restore {path} from a backup"
    try:
        raw = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} has no {STATE_FILE}: {damaged}") from None
    except Exception as e:  # truncated zip, bad pickle, ...: torch raises many kinds
        raise UserError(f"{path / STATE_FILE} is corrupt ({type(e).__name__}): {damaged}") from None
    try:
        state = RunState(**{f.name: raw[f.name] for f in fields(RunState)})
        opt.load_state_dict(raw["optimizer"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path / STATE_FILE} does not fit this run or this version of train.py "
                        f"({type(e).__name__}: {e}): {damaged}") from None
    lora.load_adapter(model, path)
    return state


def save_state(folder: Path, model, opt: AdamW, state: RunState) -> None:
    """Write a checkpoint's contents into `folder`: the adapter (PEFT format) and trainer_state.pt (the
    RunState and the optimizer's moments). common/checkpoints.py makes the folder appear whole."""
    lora.save_adapter(model, folder)
    torch.save({**asdict(state), "optimizer": opt.state_dict()}, folder / STATE_FILE)
