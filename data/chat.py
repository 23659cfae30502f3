"""Conversations from JSONL, written in the checkpoint's chat format, with the loss on the answers.

One JSON object per line, in any of three shapes:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "...", "completion": "..."}                        -> user: prompt, assistant: completion
    {"instruction": "...", "input": "...", "output": "..."}       -> user: instruction + "\\n\\n" + input
                                                                     (just instruction when input is empty)

Each conversation is rendered by `Tokenizer.render_chat` (ChatML, the default system message of the
checkpoint's template when it has none) and tokenized once, whole. The loss mask is decided on the
text, then carried to the tokens by their character offsets: a token is supervised when it overlaps
a supervised span. `--train-on assistant` supervises every assistant turn's content and its
`<|im_end|>` (the model must learn to stop); `last` only the final assistant turn (earlier answers are
context); `all` every token, as plain language modelling would.

Windows hold one conversation each, padded to the context length, or with `pack=True` as many whole
conversations as fit, each in its own segment: the model restarts positions at 0 and attends only
within a segment (model/transformer.py), and no target crosses a boundary (model/loss.py), so a
packed conversation gets exactly the logits it would get alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from common.cli import UserError

from .windows import TokenWindows, TrainingData

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "last", "all")


# ------------------------------------------------------------------------------------------ reading
def read_conversations(path: str | Path) -> list[list[dict]]:
    """Every conversation of a JSONL file as a list of {"role", "content"} messages. A bad line ends
    in one error naming the file and the line number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such chat data file: {path}")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:  # without its newline: an error at the end of the line is not at "line 2, column 1"
                conversations.append(row_messages(json.loads(line.rstrip("\r\n"))))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise UserError(f"{path}:{number}: {e}") from None
    if not conversations:
        raise UserError(f"{path} holds no conversations (one JSON object per line)")
    return conversations


def row_messages(row) -> list[dict]:
    """One JSONL row, in any of the three shapes, as messages; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        messages = [_message(m, i) for i, m in enumerate(messages)]
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": _text(row, "prompt")},
                    {"role": "assistant", "content": _text(row, "completion")}]
    elif "instruction" in row and "output" in row:
        extra = _text(row, "input") if row.get("input") is not None else ""
        user = _text(row, "instruction") + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    else:
        raise ValueError(f"a row needs 'messages', or 'prompt' and 'completion', or 'instruction' and 'output' "
                         f"(Alpaca); this one has {sorted(row) or 'no keys'}")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"message {i} (assistant) has empty content: there is nothing to learn from it")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: there is nothing to learn from this row")
    return messages


def _message(m, i: int) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"message {i} must be an object with 'role' and 'content'")
    if m["role"] not in ROLES:
        raise ValueError(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
    if not isinstance(m["content"], str):
        raise ValueError(f"message {i} ({m['role']}) content must be a string")
    return {"role": m["role"], "content": m["content"]}


def _text(row: dict, key: str) -> str:
    if not isinstance(row[key], str):
        raise ValueError(f"'{key}' must be a string, got {type(row[key]).__name__}")
    return row[key]


# ----------------------------------------------------------------------------------- tokens and mask
def tokenize_conversation(tok, messages: list[dict], train_on: str) -> tuple[list[int], list[bool]]:
    """(token ids, supervised flag per token) of one rendered conversation."""
    text, rendered, spans = tok.render_chat(messages)
    if train_on == "all":
        keep = [(0, len(text))]
    else:
        answers = [span for m, span in zip(rendered, spans) if m["role"] == "assistant"]
        keep = answers[-1:] if train_on == "last" else answers
    ids, offsets = tok.encode_with_offsets(text)
    starts, ends = np.array(offsets, dtype=np.int64).reshape(-1, 2).T
    supervised = np.zeros(len(ids), dtype=bool)
    for s, e in keep:
        supervised |= (starts < e) & (ends > s)  # the token overlaps the span
    return ids, supervised.tolist()


def learnable(supervised: list[bool]) -> bool:
    """Is any token after the first supervised (the first one is never a target)?"""
    return any(supervised[1:])


# ------------------------------------------------------------------------------------------ windows
def pad_windows(samples: list[tuple[list[int], list[bool]]], context_length: int, pad_id: int) -> TokenWindows:
    """One conversation per window, right-padded."""
    n = len(samples)
    ids = torch.full((n, context_length), pad_id, dtype=torch.long)
    real = torch.zeros(n, context_length, dtype=torch.bool)
    supervised = torch.zeros(n, context_length, dtype=torch.bool)
    for i, (t, s) in enumerate(samples):
        ids[i, : len(t)], real[i, : len(t)], supervised[i, : len(t)] = torch.tensor(t), True, torch.tensor(s)
    return TokenWindows(ids, real, supervised)


def pack_windows(samples: list[tuple[list[int], list[bool]]], context_length: int, pad_id: int) -> TokenWindows:
    """Whole conversations, in order, into as few windows as the order allows (a new window starts when
    the next one does not fit); segment k of a window is its k-th conversation, 0 is padding."""
    groups: list[list[tuple[list[int], list[bool]]]] = []
    used = context_length  # forces a first window
    for sample in samples:
        if used + len(sample[0]) > context_length:
            groups.append([])
            used = 0
        groups[-1].append(sample)
        used += len(sample[0])
    windows = pad_windows([(sum((t for t, _ in g), []), sum((s for _, s in g), [])) for g in groups], context_length, pad_id)
    windows.segments = torch.zeros(len(groups), context_length, dtype=torch.long)
    for i, g in enumerate(groups):
        lengths = torch.tensor([len(t) for t, _ in g])
        windows.segments[i, : int(lengths.sum())] = torch.repeat_interleave(torch.arange(1, len(g) + 1), lengths)
    return windows


# ------------------------------------------------------------------------------------- training data
def chat_data(tok, path: str, val_path: str | None, val_fraction: float, seed: int, context_length: int,
              train_on: str, pack: bool) -> TrainingData:
    """Train and validation windows from JSONL; validation is `val_path`, or a seeded `val_fraction`
    of the conversations. Conversations longer than the context are cut to it; one with no supervised
    token left is dropped and counted."""
    conversations = read_conversations(path)
    if val_path:
        splits = {"train": conversations, "val": read_conversations(val_path)}
    else:
        if len(conversations) < 2:
            raise UserError(f"{path} has one conversation: at least two are needed to hold some out for "
                            f"validation (or pass --val-data FILE.jsonl)")
        order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = min(max(1, round(val_fraction * len(conversations))), len(conversations) - 1)
        splits = {"val": [conversations[i] for i in order[:n_val]], "train": [conversations[i] for i in order[n_val:]]}
    windows, counts = {}, {}
    for name in ("train", "val"):
        samples = [tokenize_conversation(tok, m, train_on) for m in splits[name]]
        cut = [(t[:context_length], s[:context_length]) for t, s in samples]
        kept = [c for c in cut if learnable(c[1])]
        counts[name] = {"conversations": len(samples), "truncated": sum(len(t) > context_length for t, _ in samples),
                        "dropped": len(samples) - len(kept), "supervised_tokens": sum(sum(s[1:]) for _, s in kept),
                        "tokens": sum(len(t) for t, _ in kept)}
        if not kept:
            raise UserError(f"nothing to learn in the {name} conversations ({val_path if name == 'val' and val_path else path}): "
                            f"all {len(samples)} lose every supervised token when cut to --context-length {context_length}; "
                            f"raise --context-length")
        windows[name] = (pack_windows if pack else pad_windows)(kept, context_length, tok.pad_id)
    return TrainingData(windows["train"], windows["val"], {"chat": {"windows_sha256": windows_digest(windows)}},
                        chat_info(path, val_path, counts, windows, pack), chat_summary(path, counts, windows, train_on, pack))


def windows_digest(windows: dict) -> str:
    """A fingerprint of exactly what training sees (ids, loss mask, segments): --resume compares it."""
    h = hashlib.sha256()
    for name in ("train", "val"):
        w = windows[name]
        for t in (w.input_ids, w.supervised, w.segments):
            if t is not None:
                h.update(t.numpy().tobytes())
    return h.hexdigest()


def chat_info(path, val_path, counts: dict, windows: dict, pack: bool) -> dict:
    return {"source": str(path), "val_source": str(val_path) if val_path else "split", "packed": pack, **counts,
            "train_windows": len(windows["train"]), "val_windows": len(windows["val"]),
            "padding_fraction": float(1 - windows["train"].real.float().mean())}


def chat_summary(path, counts: dict, windows: dict, train_on: str, pack: bool) -> str:
    tr, va, w = counts["train"], counts["val"], windows["train"]
    lost = sum(c["dropped"] for c in counts.values())
    return (f"data: {path}, {tr['conversations'] - tr['dropped']} train / {va['conversations'] - va['dropped']} val "
            f"conversations in {len(w)} {'packed ' if pack else ''}windows of {w.input_ids.shape[1]} tokens "
            f"({1 - w.real.float().mean():.0%} padding{'' if pack else '; --pack fills it'}); loss on {train_on} tokens: "
            f"{tr['supervised_tokens']:,} of {tr['tokens']:,}; {tr['truncated'] + va['truncated']} cut to the context length, "
            f"{lost} dropped with nothing left to learn")
