"""`train.py --eval-prompts FILE`: the untrained model's answers beside the adapter's, in OUT/samples.md.

The first thing people check after a fine-tune is not a loss but a few answers: did the model pick up
the style, did it break? So the run answers the same prompts (one per line of FILE) greedily before
the first step and after the last, and writes both side by side. Chat data wraps each prompt as a user
turn in the checkpoint's chat format; forecasting data continues the prompt text as it is.

The answers live in OUT/samples.json (so a resumed run still has the "before" column) and are
rendered to samples.md; both are written atomically. Their generation FLOPs are counted
(flops.generation) and booked in the run's budget like validation.
"""

from __future__ import annotations

import html
from pathlib import Path

import flops
from common.cli import UserError
from common.files import atomic_path, read_json, write_json
from model import generate


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line; a literal \\n in a line stands for a newline."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such --eval-prompts file: {path} (one prompt per line)")
    prompts = [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts


def encode_prompts(tok, prompts: list[str], chat: bool) -> list[list[int]]:
    return [tok.encode(tok.chat_prompt([{"role": "user", "content": p}]) if chat else p) for p in prompts]


def answer(model, tok, encoded: list[list[int]], max_new_tokens: int, autocast) -> tuple[list[str], dict]:
    """Greedy answers (end tokens stop them) and the FLOPs it took, {"coursework", "hardware"}."""
    stats: dict = {}
    was_training = model.training
    model.eval()
    with autocast():
        new = generate(model, encoded, max_new_tokens, eos_ids=tok.eos_ids, vocab_limit=tok.vocab_size,
                       pad_id=tok.pad_id, stats=stats)
    model.train(was_training)
    cost = flops.generation(model.config, lora=getattr(model, "lora_config", None), **stats)
    return [tok.decode(ids, skip_special_tokens=True) for ids in new], cost


def cost_bound(model, encoded: list[list[int]], max_new_tokens: int) -> dict:
    """FLOPs of `answer` if no answer stops early: what the budget must keep free for the final pass."""
    return flops.generation(model.config, len(encoded), max(map(len, encoded)), max_new_tokens - 1,
                            getattr(model, "lora_config", None))


def record(out: Path, column: str, step: int, prompts: list[str], answers: list[str]) -> None:
    """Store one column ("before" or "after") in samples.json and rewrite samples.md from it."""
    path = out / "samples.json"
    saved = read_json(path, what="samples file") if path.exists() else {}
    if saved.get("prompts") != prompts:
        saved = {"prompts": prompts}  # other prompts: the old columns no longer belong to them
    saved[column] = {"step": step, "answers": answers}
    write_json(path, saved)
    with atomic_path(out / "samples.md") as tmp:
        tmp.write_text(render(saved), encoding="utf-8")


def has_after(out: Path, step: int) -> bool:
    path = out / "samples.json"
    return path.exists() and read_json(path, what="samples file").get("after", {}).get("step") == step


def render(saved: dict) -> str:
    """A Markdown table: prompt | before | after, newlines kept as <br>."""
    def cell(text: str) -> str:
        return html.escape(text, quote=False).replace("|", "&#124;").replace("\n", "<br>") or "*(nothing)*"

    before, after = saved.get("before"), saved.get("after")
    left = f"before training (step {before['step']})" if before else "before training"
    right = f"after step {after['step']}" if after else "after training (still running)"
    head = f"| prompt | {left} | {right} |"
    rows = [f"| {cell(p)} | {cell(before['answers'][i]) if before else ''} | {cell(after['answers'][i]) if after else ''} |"
            for i, p in enumerate(saved["prompts"])]
    return "# Greedy answers to --eval-prompts\n\n" + "\n".join([head, "|---|---|---|", *rows]) + "\n"
