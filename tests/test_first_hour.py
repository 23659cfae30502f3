"""What a new user meets in the first hour (issue 30): commands that remember the run, messages that say
what happened, help that helps, and every command of README.md and docs/*.md parsed by its own script."""

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import math
import re
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

import eval as ev
import lora
import sample
import study
import train
from common.cli import ReportedInterrupt, UserError, format_perplexity, run_cli
from lora import export
from model import load_model, save_pretrained
from model.tiny import tiny_config, tiny_model, tiny_tokenizer
from model.transformer import Transformer
from training.runs import base_for
from tests.conftest import ROOT

TINY = ["--model", "tiny", "--systems", "30", "--context-length", "128", "--batch-size", "2", "--eval-batches", "1"]


def tiny_run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    train.train(TINY + ["--out", str(out), *map(str, extra)])
    return out


# ------------------------------------------------------------------------ commands that remember the run
def test_eval_sample_and_export_use_the_runs_model_without_model(tmp_path, capsys):
    """The run was trained on 'tiny' with 3 decimals: without --model (whose default is a hub model this
    offline test cannot fetch) every command loads tiny, and eval's base row uses the run's decimals."""
    run = tiny_run(tmp_path, "--steps", "2", "--decimals", "3")
    report = ev.main(["--adapter", str(run), "--context-steps", "5", "--horizon", "2", "--device", "cpu"])
    assert set(report["results"]) == {"tiny", str(run), "naive_last", "naive_linear", "seasonal_naive", "autoregression",
                                      "lv_fit"}
    assert report["results"]["tiny"]["decimals"] == 3 == report["results"][str(run)]["decimals"]
    sample.main(["--adapter", str(run / "checkpoint-000002"), "--max-new-tokens", "3", "--device", "cpu"])
    export.main(["--adapter", str(run), "--out", str(tmp_path / "merged")])
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "float32"


def test_a_model_that_is_not_the_runs_is_refused_in_one_line(tmp_path):
    run = tiny_run(tmp_path, "--steps", "1")
    other = tmp_path / "other"
    save_pretrained(tiny_model(), other, tiny_tokenizer())
    for call in (lambda: ev.main(["--model", str(other), "--adapter", str(run)]),
                 lambda: sample.main(["--model", str(other), "--adapter", str(run)]),
                 lambda: export.main(["--model", str(other), "--adapter", str(run), "--out", str(tmp_path / "m")])):
        with pytest.raises(UserError, match=f"{re.escape(str(run))} was trained on tiny, not on --model "
                                            f"{re.escape(str(other))}; leave out --model to use the run's own"):
            call()


def test_runs_quantize_is_the_default_and_a_folder_model_matches_itself(tmp_path):
    base = tmp_path / "base"
    save_pretrained(tiny_model(), base, tiny_tokenizer())
    run = tiny_run(tmp_path, "--steps", "1", "--quantize", "nf4", "--model", str(base))
    assert base_for([str(run)], None, None) == (str(base), "nf4")
    assert base_for([str(run)], str(base) + "/", None) == (str(base) + "/", "nf4")  # the same folder, spelled otherwise
    assert base_for([str(tmp_path / "peft-adapter")], None, None) == ("Qwen/Qwen2.5-0.5B-Instruct", None)  # no run


def test_export_writes_the_base_checkpoints_dtype(tmp_path, capsys):
    base = tmp_path / "bf16-base"
    save_pretrained(tiny_model(dtype=torch.bfloat16), base, tiny_tokenizer())
    run = tiny_run(tmp_path, "--steps", "1", "--model", str(base))
    export.main(["--adapter", str(run), "--out", str(tmp_path / "merged")])
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    assert abs(size(tmp_path / "merged") - size(base)) < 1024  # the base's size, not twice it in fp32
    export.main(["--adapter", str(run), "--out", str(tmp_path / "fp32"), "--dtype", "float32"])
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_resume_of_a_checkpoint_folder_points_to_the_run(tmp_path):
    run = tiny_run(tmp_path, "--steps", "1")
    with pytest.raises(UserError, match=f"is a checkpoint of the run {re.escape(str(run))}; resume the run: "
                                        f"--resume {re.escape(str(run))}"):
        train.train(["--resume", str(run / "checkpoint-000001"), "--steps", "2"])


# --------------------------------------------------------------------------- messages that say what happened
def test_an_adapter_for_another_model_says_so(tmp_path):
    two = tiny_model()
    lora.apply_lora(two, verbose=False)
    lora.save_adapter(two, tmp_path / "adapter")
    three = Transformer(dataclasses.replace(tiny_config(), num_hidden_layers=3))
    with pytest.raises(UserError, match=r"lacks 4 tensor\(s\) the model has, e\.g\. .*layers\.2\..* \(made for another "
                                        r"model or other targets: it covers 2 layer\(s\), this model has 3, or incomplete\)"):
        lora.load_adapter(three, tmp_path / "adapter")


def test_qlora_counts_the_nf4_weights_in_the_total(capsys):
    for quantize in (None, "nf4"):
        lora.apply_lora(load_model("tiny", quantize=quantize), rank=8, targets="q_proj,v_proj")
    plain, quantized = capsys.readouterr().out.splitlines()
    assert plain == quantized == "LoRA r=8 alpha=16 on q_proj,v_proj: 3,584 trainable parameters of 102,464 (3.498%)"


@pytest.mark.parametrize("line,column", [
    ('{"prompt": "' + "x" * 58 + '", "completion": "b"', 91),  # 90 characters, the closing brace missing
    ('{"prompt": "a" "completion": "b"}', 16),
])
def test_a_broken_jsonl_line_names_its_column(tmp_path, line, column):
    from data.chat import read_conversations

    data = tmp_path / "chat.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"chat.jsonl:2: not valid JSON .* at column {column}\\)$"):
        read_conversations(data)


SHADOW_TORCH = """import sys, time
print("importing", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("command", ["train.py --help", "eval.py --help", "sample.py --help", "study.py --help",
                                     "flops.py --model tiny", "-m lora.export --help", "-m data.lotka_volterra --help"])
def test_ctrl_c_while_torch_imports_is_one_line(tmp_path, command):
    """A stand-in torch that waits is imported first; SIGINT then lands inside the imports, as a
    Ctrl-C during a real start-up does. (flops.py imports torch only once it counts, so not for --help.)"""
    (tmp_path / "torch.py").write_text(SHADOW_TORCH)
    proc = subprocess.Popen([sys.executable, *command.split()], cwd=ROOT, env={"PYTHONPATH": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "importing\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert err == "interrupted\n" and proc.returncode in (-signal.SIGINT, 130)


def test_flops_help_needs_no_torch(tmp_path):
    """flops.py imports torch only where it counts: its --help comes without the stand-in torch."""
    (tmp_path / "torch.py").write_text(SHADOW_TORCH)
    out = subprocess.run([sys.executable, "flops.py", "--help"], cwd=ROOT, env={"PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("usage: flops.py") and "importing" not in out.stdout


def test_an_interrupt_train_reported_is_not_reported_twice(tmp_path, capsys, monkeypatch):
    calls = []
    real = train.train_step

    def step_then_ctrl_c(run):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: train.main(TINY + ["--steps", "5", "--out", str(tmp_path / "run")]))
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 130 and "interrupted" not in err
    assert sum(line.startswith("interrupted after step 2: checkpoint saved in") for line in err) == 1
    for exception, said in ((ReportedInterrupt(), []), (KeyboardInterrupt(), ["interrupted"])):
        def main():
            raise exception
        with pytest.raises(SystemExit):
            run_cli(main)
        assert capsys.readouterr().err.splitlines() == said


def test_split_sizes_are_said_and_too_many_systems_noted(tmp_path, capsys):
    run = tiny_run(tmp_path, "--steps", "1")
    assert "24 train / 3 val / 3 test systems" in capsys.readouterr().err
    report = ev.main(["--adapter", str(run), "--systems", "10", "--context-steps", "5", "--horizon", "2", "--no-base"])
    assert report["systems"] == 3
    assert ("note: the test split has 3 systems, not the 10 asked for (30 systems split 24 train / 3 val / 3 test); "
            "evaluating 3") in capsys.readouterr().err


def test_perplexity_has_one_format_in_train_and_eval(tmp_path, capsys):
    run = tiny_run(tmp_path, "--steps", "1")
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    train_line = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step 1: val loss")][-1]
    assert train_line.endswith(f"perplexity {format_perplexity(math.exp(val['val_loss']))}")
    assert re.search(r"perplexity \d\.\d{3}e\+\d\d$", train_line)  # a random model: e-notation, not 19 digits
    report = ev.main(["--adapter", str(run), "--context-steps", "5", "--horizon", "2", "--loss", "--no-base"])
    ppl_row = capsys.readouterr().out.splitlines()[-1]
    assert ppl_row.split()[-1] == format_perplexity(report["results"][str(run)]["ppl"])
    assert format_perplexity(3.98712) == "3.987"


def test_eval_table_shows_readable_names(capsys):
    long = "/home/someone/.cache/models/smollm2-135m-instruct"
    assert ev.display_name(long) == ".../.cache/models/smollm2-135m-instruct"  # whole components, within 40
    assert ev.display_name("runs/tiny-demo") == "runs/tiny-demo"
    assert ev.display_name("/a/" + "x" * 50) == ".../" + "x" * 50  # one long component: whole, the column widens
    row = {"mae": 1.0, "mse": 1.0, "rmse": 1.0, "prey": {"mae": 1.0}, "predator": {"mae": 1.0}}
    ev.print_table({long: row, "/a/" + "x" * 50: row}, "header")
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith(".../.cache/models/smollm2-135m-instruct ") and lines[3].startswith(".../" + "x" * 50 + " ")


# ------------------------------------------------------------------------------------------------ no abbreviations
def repository_python_files():
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def test_every_argument_parser_refuses_abbreviations():
    calls = []
    for path in repository_python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(func, "attr", getattr(func, "id", None)) == "ArgumentParser":
                keywords = {k.arg: k.value for k in node.keywords}
                ok = isinstance(keywords.get("allow_abbrev"), ast.Constant) and keywords["allow_abbrev"].value is False
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert len(calls) >= 14 and [where for where, ok in calls if not ok] == []
    for parse, argv in ((train.build_parser().parse_args, ["--step", "3"]), (ev.parse_args, ["--horiz", "3"]),
                        (sample.parse_args, ["--max-new", "3"]), (study.parse_args, ["--grid-step", "3"]),
                        (export.parse_args, ["--adapter", "a", "--out", "b", "--dtyp", "float32"])):
        with pytest.raises(SystemExit):  # each is a prefix of one flag only: argparse would take it by default
            parse(argv)


# ------------------------------------------------------------------------------------------------------- help
class Captured(BaseException):
    def __init__(self, parser):
        self.parser = parser


def parser_of(call) -> argparse.ArgumentParser:
    """The parser a script's entry point builds, caught at its parse_args (nothing after it runs)."""
    def capture(self, args=None, namespace=None):
        raise Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            call()
        except Captured as c:
            return c.parser
    raise AssertionError("no parser was built")


SCRIPT_PARSERS = {
    "train.py": train.build_parser,
    "eval.py": lambda: parser_of(lambda: ev.parse_args([])),
    "sample.py": lambda: parser_of(lambda: sample.parse_args([])),
    "study.py": lambda: parser_of(lambda: study.parse_args([])),
    "lora.export": lambda: parser_of(lambda: export.parse_args([])),
}


@pytest.mark.parametrize("script", SCRIPT_PARSERS)
def test_every_option_has_help_that_gives_its_default(script):
    parser = SCRIPT_PARSERS[script]()
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        default = train.DEFAULTS.get(action.dest) if script == "train.py" else action.default
        says_default = "default" in text or default in (None, False, []) or str(default) in text
        if not text or not says_default:
            missing.append(action.option_strings[0])
    assert missing == []


def test_train_help_groups_every_flag_once():
    flags = [flag for flag, *_ in train.FLAGS] + ["--resume"]
    grouped = [flag for group in train.FLAG_GROUPS.values() for flag in group]
    assert sorted(grouped) == sorted(flags), "a flag without a group (or in two): add it to train.FLAG_GROUPS"
    assert list(train.FLAG_GROUPS) == ["model and data", "LoRA", "optimizer", "schedule and budget", "evaluation",
                                       "checkpoints", "performance"]
    text = train.build_parser().format_help()
    for title, group in train.FLAG_GROUPS.items():
        section = text.split(f"\n{title}:\n")[1].split("\n\n")[0]
        assert all(re.search(rf"^  {flag}\b", section, re.M) for flag in group), title


def test_study_usage_shows_the_pass_through_and_checks_it():
    assert study.parse_args(["--model", "tiny", "--", "--rank", "4"]).passthrough == ["--rank", "4"]
    assert "[-- TRAIN.PY FLAGS ...]" in parser_of(lambda: study.parse_args([])).format_usage()
    with pytest.raises(UserError, match="after --: --dry-run is a study.py flag: put it before --"):
        study.parse_args(["--", "--dry-run"])
    with pytest.raises(UserError, match="after --: argument --rank: invalid int value: 'x'"):
        study.parse_args(["--", "--rank", "x"])


# ------------------------------------------------------------------------- the commands in README.md and docs/
# Tools, not this repository's scripts: the commands that run them are not parsed here.
EXTERNAL_MODULES = {"pytest", "venv", "pip"}
# Commands that cannot be parsed as printed, each with the reason (keep this short).
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands():
    """(document, line, command, the error it is shown to end in or None) for every `python ...` /
    `torchrun ... x.py` line in a fenced shell or output block (a leading "$ " prompt dropped, backslash
    continuations joined; an output line "error: ..." right after a command is its documented error)."""
    found = []
    for doc in DOCUMENTS:
        fence, pending, start = None, None, 0
        lines = doc.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                fence, pending = (None if fence is not None else line[3:].strip()), None
                continue
            if fence not in ("", "bash", "sh", "shell", "console"):
                continue
            text = line.strip().removeprefix("$ ")
            if pending is None:
                if not text.startswith(("python ", "torchrun ")):
                    continue
                pending, start = "", number
            pending += text.removesuffix("\\").strip() + " "
            if not text.endswith("\\"):
                after = lines[number] if number < len(lines) else ""
                found.append((doc.name, start, pending.strip(), after[7:] if after.startswith("error: ") else None))
                pending = None
    return found


def script_and_argv(command: str) -> tuple[str, list[str]]:
    tokens = shlex.split(command, comments=True)
    if tokens[0] == "python" and tokens[1] == "-m":
        return tokens[2], tokens[3:]
    start = 1 if tokens[0] == "python" else next(i for i, t in enumerate(tokens) if t.endswith(".py"))
    return tokens[start], tokens[start + 1:]


class Parsed(BaseException):
    pass


@contextmanager
def stop_after_parsing():
    """Any argparse parse in the block parses for real (errors exit as usual), then stops the script."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed

    hook, path = sys.excepthook, list(sys.path)
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
            yield
    except Parsed:
        pass
    finally:
        sys.excepthook, sys.path[:] = hook, path


def parse_command(script: str, argv: list[str]) -> None:
    """Parse `argv` with the script's own parser, without running the script: the entry points that
    check more than argparse does are called as they are; any other script's main stops at its parse."""
    own = {"train.py": train.build_parser().parse_args, "eval.py": ev.parse_args, "sample.py": sample.parse_args,
           "study.py": study.parse_args, "lora.export": export.parse_args}
    if script in own:
        own[script](argv)
        return
    path = ROOT / script
    assert path.is_file() if script.endswith(".py") else importlib.util.find_spec(script), f"{script}: no such script"
    source = path.read_text() if script.endswith(".py") else Path(importlib.util.find_spec(script).origin).read_text()
    if "ArgumentParser(" not in source:  # a script without flags (bench/fsdp_gloo_check.py): never run its main
        assert argv == [], f"{script} takes no arguments"
        return
    with stop_after_parsing(), mock.patch.object(sys, "argv", [script, *argv]):
        if script.endswith(".py"):  # imported under another name, so its `if __name__ == "__main__"` stays idle
            sys.path.insert(0, str(path.parent))  # as `python path/x.py` does
            name = f"_documented_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(script)
        module.main()
        raise AssertionError(f"{script}'s main() returned without parsing its arguments")


COMMANDS = documented_commands()


def test_the_documents_hold_commands():
    assert len(COMMANDS) >= 30 and any(doc == "first_hour.md" for doc, *_ in COMMANDS)
    assert any(error for *_, error in COMMANDS)


@pytest.mark.parametrize("doc,line,command,error", COMMANDS, ids=[f"{d}:{n}" for d, n, *_ in COMMANDS])
def test_every_documented_command_parses_with_its_scripts_parser(doc, line, command, error):
    """A command shown ending in an error parses, or fails in parsing with exactly that error."""
    script, argv = script_and_argv(command)
    if script in EXTERNAL_MODULES:
        return
    for token in argv:  # files the repository ships must be there
        if token.startswith("examples/"):
            assert (ROOT / token).is_file(), f"{doc}:{line}: {token} is not in the repository"
    try:
        parse_command(script, argv)
    except SystemExit as e:
        raise AssertionError(f"{doc}:{line}: {command!r} does not parse (exit {e.code})") from None
    except UserError as e:
        if str(e) != error:
            raise


def offline_commands(doc: str) -> list[tuple[str, str | None]]:
    """The commands of a document that need only the tiny model (README.md: of its first runs), in order."""
    lines = (ROOT / doc.replace("first_hour.md", "docs/first_hour.md")).read_text().splitlines()
    first, last = 0, len(lines)
    if doc == "README.md":
        first = lines.index("## First runs")
        last = next(i for i in range(first + 1, len(lines)) if lines[i].startswith("## "))
    return [(c, error) for d, n, c, error in COMMANDS if d == doc and first < n <= last and "tiny" in c]


@pytest.mark.parametrize("doc", ["README.md", "first_hour.md"])
def test_the_offline_commands_run_as_printed(tmp_path, monkeypatch, capsys, doc):
    """Every command of the README's first runs and of docs/first_hour.md that needs no download, run as printed
    one after the other in an empty folder (beside the shipped examples/); a command shown ending in an
    error ends in exactly that error."""
    commands = offline_commands(doc)
    assert len(commands) >= (2 if doc == "README.md" else 8) and commands[0][0].startswith("python train.py --model tiny")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    run = {"train.py": train.main, "eval.py": ev.main, "sample.py": sample.main, "lora.export": export.main,
           "study.py": study.main}
    for command, error in commands:
        script, argv = script_and_argv(command)
        if error is None:
            run[script](argv)
        else:
            with pytest.raises(UserError) as e:
                run[script](argv)
            assert str(e.value) == error
    assert (tmp_path / "runs" / "tiny" / "config.json").is_file()
