"""Write dialogues of the chitchat dataset (BYU PCC lab, MIT) as train.py chat JSONL.

    pip install chitchat-dataset           # a development dependency (requirements-dev.txt), not a runtime one
    python examples/chitchat_to_jsonl.py --dialogues 400 --out runs/chitchat.jsonl

Each dialogue is two people taking turns, a turn being one or more short messages. The first speaker
becomes the user and the other the assistant, alternating; the messages of a turn are joined by
newlines. A dialogue is cut after its last assistant turn (a trailing user turn teaches nothing), and
dialogues are taken in a seeded random order.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UserError, run_cli  # noqa: E402
from common.files import atomic_path  # noqa: E402


def dialogue_messages(dialogue: dict) -> list[dict]:
    turns = ["\n".join(m["text"].strip() for m in turn if m["text"].strip()) for turn in dialogue["messages"]]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if any(not m["content"] for m in messages):
        return []
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--dialogues", type=int, default=400, help="how many dialogues to write")
    p.add_argument("--max-turns", type=int, default=12, help="keep the first N turns of each dialogue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/chitchat.jsonl")
    args = p.parse_args(argv)
    try:
        import chitchat_dataset
    except ImportError:
        raise UserError("chitchat-dataset is not installed: pip install chitchat-dataset") from None
    data = json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text())
    keys = sorted(data)
    random.Random(args.seed).shuffle(keys)
    rows = []
    for key in keys:
        messages = dialogue_messages({"messages": data[key]["messages"][: args.max_turns]})
        if messages:
            rows.append({"messages": messages})
        if len(rows) == args.dialogues:
            break
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    turns = sum(len(r["messages"]) for r in rows)
    print(f"wrote {args.out}: {len(rows)} dialogues, {turns} turns ({turns / len(rows):.1f} per dialogue)")


if __name__ == "__main__":
    run_cli(main)
