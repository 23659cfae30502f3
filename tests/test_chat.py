"""Chat and instruction data: the template, the loss masks, packing, the loop on conversations, errors."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora
import train
from data.chat import chat_data, pack_windows, pad_windows, read_conversations, row_messages, tokenize_conversation
from model.loss import lm_loss_sum, lm_loss_sum_reference
from model.tiny import tiny_model, tiny_tokenizer
from model.tokenizer import Tokenizer
from tests.conftest import QWEN_DIR, ROOT, needs_qwen_files
from tests.test_crash_safety import cli
from tests.test_train import assert_same_run, interrupt_at, records, trainer_state

SMOL_DIR = Path(os.environ.get("SMOLLM2_DIR", "~/.cache/smollm2-135m-instruct")).expanduser()
TEMPLATE_DIRS = [pytest.param(QWEN_DIR, marks=needs_qwen_files, id="qwen2.5"),
                 pytest.param(SMOL_DIR, id="smollm2", marks=pytest.mark.skipif(
                     not (SMOL_DIR / "tokenizer_config.json").is_file(), reason="SmolLM2 not built (build.sh)"))]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": " Bonjour !\n"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Au revoir"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "system", "content": "late system turn"}, {"role": "user", "content": "c\n\nd"},
     {"role": "assistant", "content": "e"}],
]


# ------------------------------------------------------------------------------------ the template
@pytest.mark.parametrize("folder", TEMPLATE_DIRS)
def test_rendering_matches_the_checkpoints_own_chat_template(folder):
    """Our ChatML equals transformers' apply_chat_template on the checkpoint's Jinja template (default
    system message included), text and token ids, with and without the generation prompt."""
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(folder), Tokenizer.from_dir(folder)
    assert ours.default_system is not None  # both templates add one when a chat has none
    for messages in CONVERSATIONS:
        for gen in (False, True):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            text = ours.render_chat(messages, add_generation_prompt=gen)[0]
            assert text == expected
            assert ours.encode(text) == hf(expected, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ masks
ROWS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                              {"role": "assistant", "content": "Ciao"}]},
    "prompt": {"prompt": "Hi", "completion": "Hello"},
    "alpaca": {"instruction": "Add", "input": "2 and 2", "output": "4"},
}
S, E = "<|im_start|>", "<|im_end|>"
# The expected loss mask, written by hand: [[ ... ]] around the supervised tokens.
EXPECTED = {
    ("messages", "assistant"): f"{S}system\nBe brief.{E}\n{S}user\nHi{E}\n{S}assistant\n[[Hello{E}]]\n"
                               f"{S}user\nBye{E}\n{S}assistant\n[[Ciao{E}]]\n",
    ("messages", "last"): f"{S}system\nBe brief.{E}\n{S}user\nHi{E}\n{S}assistant\nHello{E}\n"
                          f"{S}user\nBye{E}\n{S}assistant\n[[Ciao{E}]]\n",
    ("messages", "all"): f"[[{S}system\nBe brief.{E}\n{S}user\nHi{E}\n{S}assistant\nHello{E}\n"
                         f"{S}user\nBye{E}\n{S}assistant\nCiao{E}\n]]",
    ("prompt", "assistant"): f"{S}user\nHi{E}\n{S}assistant\n[[Hello{E}]]\n",
    ("prompt", "last"): f"{S}user\nHi{E}\n{S}assistant\n[[Hello{E}]]\n",
    ("prompt", "all"): f"[[{S}user\nHi{E}\n{S}assistant\nHello{E}\n]]",
    ("alpaca", "assistant"): f"{S}user\nAdd\n\n2 and 2{E}\n{S}assistant\n[[4{E}]]\n",
    ("alpaca", "last"): f"{S}user\nAdd\n\n2 and 2{E}\n{S}assistant\n[[4{E}]]\n",
    ("alpaca", "all"): f"[[{S}user\nAdd\n\n2 and 2{E}\n{S}assistant\n4{E}\n]]",
}


def marked_tokens(marked: str) -> list[tuple[str, bool]]:
    """The tiny tokenizer's tokens (one per character, the markers whole) with their [[ ]] flag."""
    out, on, i = [], False, 0
    while i < len(marked):
        if marked.startswith(("[[", "]]"), i):
            on, i = marked[i] == "[", i + 2
            continue
        special = next((t for t in (S, E) if marked.startswith(t, i)), None)
        piece = special or marked[i]
        out.append((piece, on))
        i += len(piece)
    return out


@pytest.mark.parametrize("shape,train_on", list(EXPECTED))
def test_loss_mask_of_each_row_shape_and_train_on(shape, train_on):
    tok = tiny_tokenizer()
    ids, supervised = tokenize_conversation(tok, row_messages(ROWS[shape]), train_on)
    assert [(tok.decode([i]), s) for i, s in zip(ids, supervised)] == marked_tokens(EXPECTED[shape, train_on])


@needs_qwen_files
def test_loss_mask_on_qwens_tokenizer_by_hand():
    """Real BPE tokens: the default system message is added and never supervised; each answer's tokens
    and its <|im_end|> (151645) are; the role header and the newline after the end token are not."""
    tok = Tokenizer.from_dir(QWEN_DIR)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " Four.\n"},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six"}]
    ids, sup = tokenize_conversation(tok, messages, "assistant")
    assert len(ids) == 57 and ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert [i for i, s in zip(ids, sup) if s] == [13322, 624, 151645, 41460, 151645]  # " Four" ".\n" end "Six" end
    ids, sup = tokenize_conversation(tok, messages, "last")
    assert [i for i, s in zip(ids, sup) if s] == [41460, 151645]
    assert all(tokenize_conversation(tok, messages, "all")[1])


# ---------------------------------------------------------------------------------------- packing
def samples(tok, n=3, train_on="assistant"):
    return [tokenize_conversation(tok, m, train_on) for m in CONVERSATIONS[:n]]


def test_packed_logits_equal_each_conversation_alone():
    tok, model = tiny_tokenizer(), tiny_model()
    convs = samples(tok)
    packed = pack_windows(convs, context_length=sum(len(t) for t, _ in convs) + 5, pad_id=tok.pad_id)
    assert len(packed) == 1 and packed.segments[0].max() == 3 and int((packed.segments[0] == 0).sum()) == 5
    with torch.no_grad():
        logits = model(packed.input_ids, segments=packed.segments)[0]  # (T, V)
        start = 0
        for ids, _ in convs:
            alone = model(torch.tensor([ids]))[0]
            torch.testing.assert_close(logits[start : start + len(ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(ids)


def test_packed_loss_equals_padded_loss_and_no_target_crosses_a_boundary():
    tok, model = tiny_tokenizer(), tiny_model()
    for train_on in ("assistant", "all"):
        convs = samples(tok, train_on=train_on)
        L = max(len(t) for t, _ in convs)
        padded, packed = pad_windows(convs, L, tok.pad_id), pack_windows(convs, 2 * L, tok.pad_id)
        assert len(packed) < len(padded)
        with torch.no_grad():
            a, na = lm_loss_sum(model, chunk=7, **padded.batch(torch.arange(len(padded)), "cpu"))
            b, nb = lm_loss_sum(model, chunk=7, **packed.batch(torch.arange(len(packed)), "cpu"))
            c, nc = lm_loss_sum_reference(model, **packed.batch(torch.arange(len(packed)), "cpu"))
        expected = sum(sum(s[1:]) for _, s in convs)  # targets inside each conversation only
        assert na == nb == nc == expected
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)


def test_micro_batches_average_over_supervised_tokens_like_one_batch():
    """Windows with very different numbers of supervised tokens: the accumulated loss and gradients
    equal one batch of all of them, and that loss is the plain mean over the answers' tokens."""
    tok = tiny_tokenizer()
    convs = samples(tok) + samples(tok, train_on="last") + [tokenize_conversation(tok, CONVERSATIONS[1], "all")]
    windows = pad_windows(convs, max(len(t) for t, _ in convs), tok.pad_id)
    results = []
    for micro in ([torch.arange(7)], [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5, 6])]):
        model = tiny_model()
        lora.apply_lora(model, rank=4, verbose=False)
        with torch.no_grad():
            for p in lora.lora_parameters(model).values():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        loss, n = train.accumulated_step(model, windows, micro, lambda: torch.autocast("cpu", enabled=False), 512)
        results.append((loss, n, {k: p.grad.clone() for k, p in lora.lora_parameters(model).items()}))
        with torch.no_grad():
            total, count = lm_loss_sum_reference(model, **windows.batch(torch.arange(7), "cpu"))
        assert loss == pytest.approx(float(total) / count, rel=1e-5)
    assert results[0][1] == results[1][1] == sum(sum(s[1:]) for _, s in convs)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for k in results[0][2]:
        torch.testing.assert_close(results[0][2][k], results[1][2][k], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------- the loop
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_chat_file(tmp_path, n=24):
    """Conversations with a pattern a tiny model can learn: the answer repeats the question twice."""
    rows = []
    for i in range(n):
        word = "abcdefgh"[i % 8] * (1 + i % 3)
        shape = i % 3
        if shape == 0:
            rows.append({"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word + word}]})
        elif shape == 1:
            rows.append({"prompt": word, "completion": word + word})
        else:
            rows.append({"instruction": word, "input": "", "output": word + word})
    return write_jsonl(tmp_path / "chat.jsonl", rows)


CHAT = ["--model", "tiny", "--context-length", "48", "--batch-size", "4", "--eval-every", "5", "--eval-batches", "2",
        "--lr", "1e-2", "--targets", "all"]


def chat_run(tmp_path, data, *extra, out="run"):
    return train.train(CHAT + ["--data", str(data), "--out", str(tmp_path / out), *map(str, extra)])


def test_a_tiny_model_learns_a_small_conversation_file(tmp_path):
    data = small_chat_file(tmp_path)
    result = chat_run(tmp_path, data, "--steps", "40", "--pack")
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    vals = [r["val_loss"] for r in records(tmp_path / "run") if "val_loss" in r]
    assert sum(r["loss"] for r in steps[-5:]) / 5 < 0.5 * sum(r["loss"] for r in steps[:5]) / 5
    assert vals[-1] < 0.5 * vals[0] and result["val_loss"] == vals[-1]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["packed"] and cfg["data"]["train"]["conversations"] + cfg["data"]["val"]["conversations"] == 24
    assert "chat" in cfg and "scaler" not in cfg
    # `tokens` is what each step's loss was averaged over: the supervised tokens of its windows
    assert all(0 < r["tokens"] < r["tokens_seen"] for r in steps)


def test_resume_is_exact_on_chat_data(tmp_path, monkeypatch):
    """Packed chat windows, dropout, answers before and after: a run stopped by Ctrl-C in the forward
    pass of step 6 (it saves step 5) and resumed ends where the uninterrupted run does."""
    data = small_chat_file(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc\n\nhello there\n")
    common = ("--steps", "8", "--pack", "--eval-prompts", prompts, "--eval-max-tokens", "6", "--save-every", "3",
              "--dropout", "0.1", "--grad-accum", "2")
    chat_run(tmp_path, data, *common, out="straight")
    with monkeypatch.context() as m:
        interrupt_at(m, "forward", 6)  # the forward and backward of step 6
        with pytest.raises(KeyboardInterrupt):
            chat_run(tmp_path, data, *common, out="split")
    assert trainer_state(tmp_path / "split")["step"] == 5
    train.train(["--resume", str(tmp_path / "split")])
    assert_same_run(tmp_path / "straight", tmp_path / "split")
    assert (tmp_path / "straight" / "samples.md").read_text() == (tmp_path / "split" / "samples.md").read_text()


def test_eval_prompts_write_before_and_after_answers(tmp_path):
    from training.eval_prompts import answer, encode_prompts

    data = small_chat_file(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc\nwhat | is <this>?\n")
    chat_run(tmp_path, data, "--steps", "10", "--eval-prompts", prompts, "--eval-max-tokens", "8")
    saved = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert saved["prompts"] == ["abc", "what | is <this>?"]
    assert saved["before"]["step"] == 0 and saved["after"]["step"] == 10
    tok = tiny_tokenizer()
    untrained, _ = answer(tiny_model(), tok, encode_prompts(tok, saved["prompts"], chat=True), 8, contextlib.nullcontext)
    assert saved["before"]["answers"] == untrained  # "before" is the base model itself
    assert saved["after"]["answers"] != saved["before"]["answers"]
    md = (tmp_path / "run" / "samples.md").read_text()
    assert "| prompt | before training (step 0) | after step 10 |" in md and "what &#124; is &lt;this&gt;?" in md
    booked = [r for r in records(tmp_path / "run") if "samples" in r]
    assert [r["samples"] for r in booked] == ["before", "after"] and booked[0]["flops"] > 0


def test_budget_keeps_room_for_the_final_answers(tmp_path):
    data = small_chat_file(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc\n")
    probe = chat_run(tmp_path, data, "--steps", "2", "--eval-prompts", prompts, out="probe")
    cfg = json.loads((tmp_path / "probe" / "config.json").read_text())["flops"]
    budget = probe["flops"] + 3 * cfg["train_step"]  # room for a few more steps, if the answers were free
    result = chat_run(tmp_path, data, "--steps", "50", "--eval-prompts", prompts, "--max-flops", budget, out="capped")
    assert result["stopped"] == "budget" and result["flops"] <= budget
    assert json.loads((tmp_path / "capped" / "samples.json").read_text())["after"]["step"] == result["step"]


def test_truncation_drops_samples_with_nothing_left_and_counts_them(tmp_path, capsys):
    long_question = {"prompt": "x" * 60, "completion": "y"}
    rows = [long_question, {"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d" * 50}] * 2
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    tok = tiny_tokenizer()
    d = chat_data(tok, data, None, 0.5, 0, 40, "assistant", pack=False)
    counts = d.info["train"], d.info["val"]
    assert sum(c["dropped"] for c in counts) == 2  # the answer after 60 characters is cut away
    assert sum(c["truncated"] for c in counts) == 4  # the long answer is cut, but kept
    assert "2 dropped with nothing left to learn" in d.summary
    write_jsonl(data, [long_question] * 3)
    code, err = cli(capsys, CHAT + ["--data", str(data), "--context-length", "40", "--out", str(tmp_path / "r")])
    assert code == 2 and len(err) == 1 and "nothing to learn" in err[0] and "raise --context-length" in err[0]


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty content"),
    ('{"question": "hi", "answer": "yo"}', "needs 'messages', or 'prompt' and 'completion', or 'instruction' and 'output'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"prompt": "hi", "completion": 3}', "'completion' must be a string"),
    ('[1, 2]', "expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_each_bad_row_is_one_line_with_file_and_line_number(tmp_path, capsys, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n\n' + line + "\n")
    code, err = cli(capsys, CHAT + ["--data", str(data), "--out", str(tmp_path / "r")])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {data}:3: ") and message in err[0]
    assert not (tmp_path / "r").exists()


def test_chat_flag_errors(tmp_path, capsys):
    data = small_chat_file(tmp_path)
    for argv, message in (
        (["--pack"], "apply to JSONL chat data"),
        (["--data", str(data), "--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
        (["--data", str(data), "--val-data", str(tmp_path / "missing.jsonl")], "no such chat data file"),
        (["--data", str(data), "--eval-prompts", str(tmp_path / "none.txt")], "no such --eval-prompts file"),
    ):
        code, err = cli(capsys, CHAT + argv + ["--out", str(tmp_path / "r")])
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_resume_refuses_changed_conversations(tmp_path, capsys):
    data = small_chat_file(tmp_path)
    chat_run(tmp_path, data, "--steps", "2")
    write_jsonl(data, [{"prompt": "z", "completion": "zz"}] * 24)
    code, err = cli(capsys, ["--resume", str(tmp_path / "run"), "--steps", "4"])
    assert code == 2 and len(err) == 1 and "not what the run began with" in err[0]


def test_val_data_file_is_used_whole(tmp_path):
    data = small_chat_file(tmp_path)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "q", "completion": "qq"}] * 5)
    d = chat_data(tiny_tokenizer(), data, val, 0.1, 0, 48, "assistant", pack=False)
    assert d.info["train"]["conversations"] == 24 and d.info["val"]["conversations"] == 5 and len(d.val) == 5


def test_read_conversations_maps_the_three_shapes(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", list(ROWS.values()))
    convs = read_conversations(path)
    assert convs[1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert convs[2][0] == {"role": "user", "content": "Add\n\n2 and 2"}
    assert row_messages({"instruction": "Add", "output": "4"})[0]["content"] == "Add"  # no input: the instruction alone


# ------------------------------------------------------------------------------------ sample.py --chat
def test_sample_chat_keeps_the_history_within_the_context(tmp_path):
    """An interactive session on standard input: the second question sees the first exchange, until the
    history no longer fits; /reset clears it."""
    import sample
    from model.tiny import tiny_tokenizer as tt

    tok = tt()
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
               {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"},
               {"role": "user", "content": "three"}]
    full = len(tok.encode(tok.chat_prompt(history)))
    prompt, kept = sample.fit_history(tok, [], history, full)
    assert kept == history and len(prompt) == full
    prompt, kept = sample.fit_history(tok, [], history, full - 1)  # the oldest exchange goes first
    assert kept == history[2:]
    prompt, kept = sample.fit_history(tok, [], history, 5)
    assert prompt is None and kept == []

    proc = subprocess.run([sys.executable, "sample.py", "--model", "tiny", "--chat", "--max-new-tokens", "4",
                           "--context-length", "64", "--device", "cpu"], input="hello\nagain\n/reset\nbye\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=900)  # a hang guard
    assert proc.returncode == 0, proc.stderr
    prompt_sizes = [int(line.split()[2]) for line in proc.stderr.splitlines() if line.startswith("prompt tokens")]
    assert len(prompt_sizes) == 3 and prompt_sizes[1] > prompt_sizes[0] and prompt_sizes[2] < prompt_sizes[1]
    assert "(history cleared)" in proc.stderr


def test_sample_chat_one_prompt_with_an_adapter(tmp_path, capsys):
    import sample

    data = small_chat_file(tmp_path)
    chat_run(tmp_path, data, "--steps", "20")
    answers = {}
    for adapter in ([], ["--adapter", str(tmp_path / "run")]):
        capsys.readouterr()
        sample.main(["--model", "tiny", *adapter, "--chat", "--prompt", "abc", "--max-new-tokens", "6", "--device", "cpu"])
        out = capsys.readouterr()
        assert "new tokens" in out.err
        answers[bool(adapter)] = out.out
    assert answers[True].strip() != ""
    # the trained adapter really answers: the same text as the run's model generates, not the base model's
    from model import generate, load_pretrained

    model, tok = load_pretrained("tiny", dtype=torch.float32, device=torch.device("cpu"))
    lora.load_adapter(model, tmp_path / "run")
    model.eval()
    prompt = tok.encode(tok.chat_prompt([{"role": "user", "content": "abc"}]))
    (new,) = generate(model, [prompt], 6, eos_ids=tok.eos_ids, vocab_limit=tok.vocab_size, pad_id=tok.pad_id)
    assert answers[True].strip() == tok.decode(new, skip_special_tokens=True).strip()
    assert answers[True] != answers[False]


def test_eval_py_on_a_chat_run_says_what_to_use_instead(tmp_path):
    import eval as ev
    from common.cli import UserError

    chat_run(tmp_path, small_chat_file(tmp_path), "--steps", "1")
    with pytest.raises(UserError, match="trained on chat data .* sample.py --chat"):
        ev.main(["--model", "tiny", "--adapter", str(tmp_path / "run"), "--systems", "2", "--horizon", "2",
                 "--context-steps", "5"])


@needs_qwen_files
def test_real_chitchat_dialogues_on_qwens_tokenizer(tmp_path):
    """Human dialogues (chitchat-dataset, via examples/chitchat_to_jsonl.py) on the real tokenizer: each
    run of supervised tokens decodes to exactly one assistant turn and its end token, and packing keeps
    every supervised target while using fewer windows."""
    pytest.importorskip("chitchat_dataset")
    path = tmp_path / "chitchat.jsonl"
    subprocess.run([sys.executable, "examples/chitchat_to_jsonl.py", "--dialogues", "30", "--out", str(path)],
                   cwd=ROOT, check=True, capture_output=True)
    tok = Tokenizer.from_dir(QWEN_DIR)
    convs = read_conversations(path)
    assert len(convs) == 30 and all(m[-1]["role"] == "assistant" for m in convs)
    for messages in convs:
        ids, sup = tokenize_conversation(tok, messages, "assistant")
        runs, current = [], []
        for i, s in zip(ids + [None], sup + [False]):
            if s:
                current.append(i)
            elif current:
                runs, current = runs + [tok.decode(current)], []
        assert runs == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    d_pad = chat_data(tok, path, None, 0.2, 0, 512, "assistant", pack=False)
    d_pack = chat_data(tok, path, None, 0.2, 0, 512, "assistant", pack=True)
    assert len(d_pack.train) < len(d_pad.train)
    assert d_pack.info["train"]["supervised_tokens"] == d_pad.info["train"]["supervised_tokens"] == int(
        (d_pack.train.supervised[:, 1:] & (d_pack.train.segments[:, 1:] == d_pack.train.segments[:, :-1])).sum())


def test_study_py_refuses_chat_data():
    import study
    from common.cli import UserError

    with pytest.raises(UserError, match="forecasting study"):
        study.parse_args(["--data", "chats.jsonl"])
