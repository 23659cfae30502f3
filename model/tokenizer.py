"""The tokenizer: `tokenizers.Tokenizer` plus what a checkpoint says about chat format and end tokens.

Two facts worth knowing about Qwen2.5: every digit is its own token (which is why LLMTIME works with
it), and the embedding has 151,936 rows while the tokenizer has 151,665 tokens, so the last rows are
padding that must never be sampled (`vocab_size` below is the tokenizer's, not the embedding's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from common.cli import UserError
from common.files import write_json


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_ids: list[int], chat_template: str | None = None,
                 pad_id: int | None = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_ids = list(dict.fromkeys(eos_ids))  # every end token, in order, without repeats
        self.chat_template = chat_template
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[-1] if self.eos_ids else 0)
        self.default_system = default_system_prompt(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"no tokenizer.json in {path}: a checkpoint folder needs its tokenizer files")
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises bare Exceptions on bad files
            raise UserError(f"{path / 'tokenizer.json'} could not be read ({e})") from None
        cfg = _read_optional_json(path / "tokenizer_config.json")
        gen = _read_optional_json(path / "generation_config.json")
        model_cfg = _read_optional_json(path / "config.json")
        eos: list[int] = []
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos += source if isinstance(source, list) else [source] if source is not None else []
        for name in (cfg.get("eos_token"),):
            name = name.get("content") if isinstance(name, dict) else name
            if name and tok.token_to_id(name) is not None:
                eos.append(tok.token_to_id(name))
        pad = cfg.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = gen.get("pad_token_id", tok.token_to_id(pad) if pad else None)
        return cls(tok, eos, cfg.get("chat_template"), pad_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def has_chat_format(self) -> bool:
        return self.token_to_id("<|im_start|>") is not None and self.token_to_id("<|im_end|>") is not None

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the checkpoint's chat template writes it (see `render_chat`)."""
        return self.render_chat(messages, add_generation_prompt)[0]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[dict], list[tuple[int, int]]]:
        """ChatML, as the chat templates of Qwen2.5 and SmolLM2 write plain (tool-free) conversations:

            <|im_start|>system\nYou are ...<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n

        Both templates start a conversation that has no system message with their own default one
        (`default_system`), so the model is trained and prompted the way it was tuned. Returns the
        text, the messages as rendered (the default system message included) and, per message, the
        character span of its content and its `<|im_end|>` (what a loss on that turn covers; the role
        header and the newline after the end token are the template's, never the model's to write).
        """
        if not self.has_chat_format:
            raise UserError("this tokenizer has no ChatML markers (<|im_start|>, <|im_end|>): chat data and --chat "
                            "need a chat checkpoint (Qwen2.5-*-Instruct, SmolLM2-*-Instruct, ...)")
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        text, spans = "", []
        for m in messages:
            text += f"<|im_start|>{m['role']}\n"
            spans.append((len(text), len(text) + len(m["content"]) + len("<|im_end|>")))
            text += f"{m['content']}<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), list(messages), spans

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and the character span (start, end) of each in `text`."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, plus minimal tokenizer_config.json and generation_config.json where the
        folder has none, so the end tokens and pad token survive the trip."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        if not (path / "tokenizer_config.json").exists():
            eos = self.tok.id_to_token(self.eos_ids[0]) if self.eos_ids else None
            cfg = {"eos_token": eos, "pad_token": self.tok.id_to_token(self.pad_id)}
            if self.chat_template:
                cfg["chat_template"] = self.chat_template
            write_json(path / "tokenizer_config.json", cfg)
        if not (path / "generation_config.json").exists():
            write_json(path / "generation_config.json", {"eos_token_id": self.eos_ids, "pad_token_id": self.pad_id})


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system message a ChatML template writes when a conversation has none, read from the
    template's source: the first literal `<|im_start|>system\n...<|im_end|>` with no code in between
    (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ...", SmolLM2: "You are a helpful AI assistant
    named SmolLM, ..."). tests/test_chat.py checks the rendering against transformers' own
    `apply_chat_template` on both checkpoints' templates."""
    found = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]*?)<\|im_end\|>", chat_template or "")
    return found.group(1).replace("\\n", "\n") if found else None


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
