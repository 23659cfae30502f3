"""A run folder that survives any interruption: numbered checkpoints, each switched in by one rename.

    runs/lv/
      config.json                 every setting of the run (written atomically)
      metrics.jsonl               one JSON line per step and per evaluation
      checkpoint-000120/          the newest complete checkpoint: adapter_config.json,
                                  adapter_model.safetensors, trainer_state.pt
      .checkpoint-000140.partial/ only while the next one is being written (or after a kill did it)
      best/                       with --keep-best: the state of the lowest validation loss (write_best)
      .lock                       names the process running in the folder (training/lock.py)

Why numbered folders. A checkpoint is several files. Replacing a folder in place takes two renames
(old away, new in), and a kill between them leaves none. Here a new checkpoint is written under a
temporary name beside the last one, every file and the folder are fsynced, and one rename gives it its
final name: that rename is the instant it exists, and a rename within a folder is atomic on POSIX file
systems. Only then is the older one removed. So from the first save on, the run folder holds a
complete checkpoint at every instant, across Ctrl-C, SIGKILL or a power cut, and the newest
`checkpoint-NNNNNN/` is where a run resumes. A folder with a final name is complete by construction;
anything named `.partial` is debris and is removed by the next save or resume.

The run folder itself is the easy handle on the newest adapter: `lora.load_adapter(model, "runs/lv")`,
`eval.py --adapter runs/lv`, `sample.py --adapter runs/lv` all resolve it with `latest_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from common.files import atomic_path, fsync

PREFIX, PARTIAL, REPLACED = "checkpoint-", ".partial", ".replaced"


def checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / f"{PREFIX}{step:06d}"


def complete_checkpoints(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in a run folder, oldest first."""
    found = {}
    for path in Path(run).glob(PREFIX + "*"):
        digits = path.name[len(PREFIX):]
        if digits.isdigit() and path.is_dir():
            found[int(digits)] = path
    for path in Path(run).glob(f".{PREFIX}*{REPLACED}"):  # a replacement cut between its two renames
        digits = path.name[len(PREFIX) + 1 : -len(REPLACED)]
        if digits.isdigit() and path.is_dir():
            found.setdefault(int(digits), path)
    return sorted(found.items())


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run)
    return found[-1][1] if found else None


def remove_partial(run: str | os.PathLike) -> None:
    """Delete what an interrupted save or removal left behind."""
    for path in Path(run).glob(f".{PREFIX}*{PARTIAL}"):
        shutil.rmtree(path, ignore_errors=True)


def _filled_durably(tmp: Path, fill) -> Path:
    """`fill` a fresh temporary folder (`.checkpoint-NNNNNN.partial/`, `.best.partial/`), every file and
    the folder fsynced: whole on disk before any rename makes it count."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    for file in tmp.iterdir():
        fsync(file)
    fsync(tmp)
    return tmp


def _retire(path: Path) -> None:
    """Remove a checkpoint folder so that no half-deleted folder ever carries a final name."""
    doomed = path.with_name(f".{path.name}{PARTIAL}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_checkpoint(run: str | os.PathLike, step: int, fill: Callable[[Path], None], keep: int = 1,
                     replace: bool = False) -> Path:
    """Write checkpoint `step` with `fill(folder)`, make it durable, switch to it, then retire older ones
    beyond the newest `keep` (train.py --keep).

    A checkpoint that already exists for this step is kept as it is (a save on Ctrl-C right after a
    scheduled one, say), unless `replace`: the run's state moved on without a step (the answers to
    --eval-prompts after the last step are booked after its scheduled save). Replacing takes two
    renames, the old folder aside to `.checkpoint-NNNNNN.replaced` and the new one in; a kill between
    them leaves the aside folder, complete, and `complete_checkpoints` counts it.
    """
    run, final = Path(run), checkpoint_dir(run, step)
    aside = run / f".{final.name}{REPLACED}"
    if replace and final.is_dir():
        tmp = _filled_durably(run / f".{final.name}{PARTIAL}", fill)
        shutil.rmtree(aside, ignore_errors=True)  # stale: its final folder exists
        os.rename(final, aside)
        os.rename(tmp, final)
        fsync(run)
    elif not final.is_dir():
        tmp = _filled_durably(run / f".{final.name}{PARTIAL}", fill)
        os.rename(tmp, final)  # the switch: from here on this checkpoint exists, whole
        fsync(run)
    older = [path for s, path in complete_checkpoints(run) if s < step]
    for path in older[: max(0, len(older) - (keep - 1))]:
        _retire(path)
    shutil.rmtree(aside, ignore_errors=True)
    remove_partial(run)
    return final


def rewind_log(path: str | os.PathLike, n_lines: int) -> int:
    """Keep the first `n_lines` complete JSON lines of a log, rewritten through a temporary file.

    A resumed run writes again every line logged after its checkpoint, so those are dropped; a line
    half-written by a kill is dropped with them. The file is never truncated in place, so a kill
    during the rewrite leaves the old log. Returns the number of lines kept.
    """
    path, kept = Path(path), []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if len(kept) == n_lines:
            break
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break  # a torn line: everything after it was written later
        kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
    return len(kept)


BEST, OLD = "best", ".best.old"


def write_best(run: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace `run/best/` (train.py --keep-best) with a new folder filled by `fill`, made durable first.

    A folder cannot be replaced by one rename, so this takes two: the old one aside to `.best.old`, the
    new one in. A kill between them leaves `.best.old`, complete, which `best_checkpoint` then returns;
    the next write clears it. No instant is without a complete best folder.
    """
    run = Path(run)
    final, old = run / BEST, run / OLD
    tmp = _filled_durably(run / f".{BEST}{PARTIAL}", fill)
    if final.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync(run)
    shutil.rmtree(old, ignore_errors=True)
    return final


def best_checkpoint(run: str | os.PathLike) -> Path | None:
    """`run/best/`, or the complete older one a kill between write_best's two renames left."""
    for path in (Path(run) / BEST, Path(run) / OLD):
        if path.is_dir():
            return path
    return None
