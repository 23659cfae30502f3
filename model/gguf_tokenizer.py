"""The tokenizer as a GGUF file describes it: what llama.cpp (and Ollama, LM Studio) tokenize with.

A GGUF has no tokenizer.json. Its `tokenizer.ggml.*` keys carry the pieces instead, and the runtime
rebuilds the tokenizer from them:

- `model` "gpt2": byte-level BPE, the kind Qwen2.5 and SmolLM2 use (every byte has a printable
  stand-in, a space is `Ġ`, so no text is ever out of vocabulary);
- `tokens`: one string per embedding row, in id order. Qwen2.5's embedding has 151,936 rows for
  151,665 tokens; the rows past the tokenizer are written `[PAD151665]`, ... with type UNUSED, as
  llama.cpp's converter does, because the runtime wants exactly one token per row;
- `token_type`: NORMAL (1) for the BPE vocabulary, CONTROL (3) for special tokens (`<|im_end|>`, and
  added tokens that look like `<|...|>`), USER_DEFINED (4) for other added tokens (`<tool_call>`);
- `merges`: the BPE merge list, "a b" per merge, in priority order;
- `pre`: the name of the pre-tokenizer (the regex that cuts text into words before BPE). It is not in
  the file as a regex: llama.cpp knows a fixed set by name and has each one's regex compiled in. Its
  converter recognizes a tokenizer by a fingerprint, the sha256 of the ids it gives for one fixed text
  (CHECK_TEXT below), and so does `pre_tokenizer_name`. The wrong name tokenizes differently without a
  word: "qwen2" cuts every digit on its own, the default regex keeps "123" whole, and a forecasting
  fine-tune would then read numbers in tokens it never saw in training;
- `bos_token_id`, `eos_token_id`, `padding_token_id`, `unknown_token_id`, and `add_bos_token` /
  `add_eos_token` (whether the runtime puts BOS/EOS around a prompt; Qwen2.5 and SmolLM2 do not);
- `chat_template`: the Jinja template, which llama.cpp and Ollama use to format a chat.

The special ids are found the way llama.cpp's converter (gguf's `SpecialVocab`) finds them, so the
same checkpoint gives the same file: the token named in tokenizer_config.json (`eos_token`, ...) if
it is an added token, else the id in config.json (`eos_token_id`, ...). Qwen2.5-Instruct: BOS 151643
(`<|endoftext|>`, from config.json; tokenizer_config says none), EOS 151645 (`<|im_end|>`), PAD 151643.
tests/test_gguf.py checks these against `SpecialVocab` and the tokenizer read back by transformers.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from common.cli import UserError

# llama.cpp's convert_hf_to_gguf.py `get_vocab_base_pre`: this text's token ids, hashed, name the pre-tokenizer.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# fingerprint -> name, from the same function (the models this codebase runs; others are refused by name)
PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types
SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


def pre_tokenizer_name(tok: HFTokenizer, folder: Path) -> str:
    fingerprint = sha256(str(tok.encode(CHECK_TEXT, add_special_tokens=True).ids).encode()).hexdigest()
    if fingerprint not in PRE_TOKENIZERS:
        raise UserError(f"the tokenizer in {folder} is not one llama.cpp's pre-tokenizers are known to match "
                        f"(fingerprint {fingerprint[:12]}...); GGUF export supports Qwen2.5, SmolLM2 and Llama 3 "
                        f"tokenizers")
    return PRE_TOKENIZERS[fingerprint]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def token_list(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types), one per embedding row, from tokenizer.json's vocabulary and added tokens."""
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update((i, a["content"]) for i, a in added.items())
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model's embedding has only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            text = by_id[i]
            looks_special = text.startswith("<|") and text.endswith("|>")
            tokens.append(text)
            types.append(CONTROL if added[i].get("special") or looks_special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tokens, types


def merge_list(spec: dict) -> list[str]:
    """tokenizer.json's merges as "a b" strings (newer files store pairs; a literal space inside a part
    is written as its byte-level stand-in `Ġ`, as gguf's SpecialVocab does)."""
    merges = spec["model"].get("merges") or []
    if merges and not isinstance(merges[0], str):
        merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return list(merges)


def special_ids(spec: dict, tokenizer_config: dict, config: dict, vocab_size: int) -> dict[str, int]:
    """{"bos": id, "eos": id, ...}: the token tokenizer_config.json names, else config.json's id."""
    added = {a["content"]: a["id"] for a in reversed(spec.get("added_tokens", []))}  # first match wins
    ids = {}
    for kind in SPECIAL_KINDS:
        named = tokenizer_config.get(f"{kind}_token")
        named = named.get("content") if isinstance(named, dict) else named
        token_id = added.get(named) if isinstance(named, str) else None
        if token_id is None:
            token_id = config.get(f"{kind}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            ids[kind] = token_id
    return ids


def adds_special(tok: HFTokenizer, tokenizer_config: dict, ids: dict[str, int]) -> dict[str, bool]:
    """Does the tokenizer put BOS in front of a prompt, EOS after it? tokenizer_config.json's
    `add_bos_token` / `add_eos_token` when it says; else what the tokenizer's post-processor does."""
    plain = tok.encode("a", add_special_tokens=False).ids
    framed = tok.encode("a", add_special_tokens=True).ids
    behaviour = {"bos": len(framed) > len(plain) and framed[0] == ids.get("bos"),
                 "eos": len(framed) > len(plain) and framed[-1] == ids.get("eos")}
    stated = {kind: tokenizer_config.get(f"add_{kind}_token") for kind in ("bos", "eos")}
    return {kind: stated[kind] if isinstance(stated[kind], bool) else bool(behaviour[kind]) for kind in ("bos", "eos")}


def chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def tokenizer_metadata(folder: str | Path, vocab_size: int) -> dict:
    """Everything the `tokenizer.ggml.*` keys hold, read from a checkpoint folder's tokenizer.json,
    tokenizer_config.json and config.json."""
    folder = Path(folder)
    spec = read_json(folder / "tokenizer.json")
    if not spec:
        raise UserError(f"no tokenizer.json in {folder}: GGUF export writes the tokenizer from it")
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise UserError(f"the tokenizer in {folder} is not byte-level BPE, the only kind GGUF export writes "
                        f"(the 'tiny' preset's character tokenizer has no GGUF form)")
    tok = HFTokenizer.from_str(json.dumps(spec))
    tokenizer_config, config = read_json(folder / "tokenizer_config.json"), read_json(folder / "config.json")
    tokens, types = token_list(spec, vocab_size)
    ids = special_ids(spec, tokenizer_config, config, vocab_size)
    return {"model": "gpt2", "pre": pre_tokenizer_name(tok, folder), "tokens": tokens, "token_type": types,
            "merges": merge_list(spec), "special_ids": ids, "add_special": adds_special(tok, tokenizer_config, ids),
            "chat_template": chat_template(folder, tokenizer_config)}
