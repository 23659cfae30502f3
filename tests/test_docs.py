"""The README and the guides in docs/ (issue 31): every relative link resolves, to a file and to a
heading's anchor; every flag a guide names after `python SCRIPT ...` in code exists in that script's
--help; every guide is linked from the README, starts with its command and ends with what the tests
guarantee; the README stays short and about the project, not the machine it was written on.

(tests/test_first_hour.py parses every whole command in the fenced blocks; this file adds the links and
the commands written inline, which are often cut short with "...".)"""

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GUIDES = DOCUMENTS[1:]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code: where a link is a link."""
    return re.sub(r"`[^`]*`", "", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lowercase, anything but letters, digits, spaces,
    '-' and '_' dropped, spaces to '-'."""
    text = LINK.sub(r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a document (headings inside fenced blocks are not headings); a repeated
    heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = anchor(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(doc: Path) -> list[str]:
    return [target for _, target in LINK.findall(prose(doc.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # https:, mailto: are not checked here


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: d.name)
def test_every_relative_link_resolves_to_a_file_and_a_heading(doc):
    broken = []
    for target in relative_links(doc):
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (file.suffix != ".md" or fragment not in anchors(file)):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    assert broken == [], f"{doc.name}: {broken}"


def test_the_anchor_rule_on_headings_of_these_guides():
    assert anchor("## A real study: SmolLM2-135M-Instruct".lstrip("# ")) == "a-real-study-smollm2-135m-instruct"
    assert anchor("QLoRA without per-call overhead (`model/nf4.py`)") == "qlora-without-per-call-overhead-modelnf4py"
    assert anchor("1. Install, and which torch") == "1-install-and-which-torch"
    assert anchor("The data: Lotka–Volterra systems as LLMTIME text") == "the-data-lotkavolterra-systems-as-llmtime-text"


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some section\n")
    doc = tmp_path / "README.md"
    doc.write_text("[ok](docs/a.md#some-section) [bad](docs/a.md#other) [gone](docs/b.md) `[code](x.md)`\n"
                   "```\n[in a block](y.md)\n```\n")
    links = relative_links(doc)
    assert links == ["docs/a.md#some-section", "docs/a.md#other", "docs/b.md"]
    assert "other" not in anchors(tmp_path / "docs" / "a.md") and "some-section" in anchors(tmp_path / "docs" / "a.md")


# ------------------------------------------------------------------------------- flags named in the guides
def commands_in_code(text: str) -> list[str]:
    """`python SCRIPT ...` and `torchrun ... SCRIPT ...` as written in fenced blocks (line by line,
    backslash continuations joined) and in inline code (which may wrap across lines)."""
    found = []
    for block in FENCE.findall(text):
        lines = block.replace("\\\n", " ").splitlines()[1:-1]
        for line, after in zip(lines, lines[1:] + [""]):
            if not after.startswith("error: "):  # a command shown failing (test_first_hour.py checks its error)
                found.append(line.strip().removeprefix("$ "))
    for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)):
        found.append(" ".join(span.split()))
    return [c for c in found if c.startswith(("python ", "torchrun "))]


def script_and_flags(command: str) -> tuple[str, list[str], list[str]] | None:
    """(script, its flags, the flags after a `--` that go on to train.py); None for a tool that is not
    one of this repository's scripts (pip, pytest, venv) or an inline `python -c`."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        tokens = command.split()
    if tokens[0] == "python" and len(tokens) > 2 and tokens[1] == "-m":
        script, rest = tokens[2], tokens[3:]
    else:
        at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if at is None:
            return None
        script, rest = tokens[at], tokens[at + 1:]
    if script in ("pip", "pytest", "venv"):
        return None
    after = rest[rest.index("--") + 1:] if "--" in rest else []
    rest = rest[: rest.index("--")] if "--" in rest else rest
    flags = lambda part: [t.split("=")[0] for t in part if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", t)]  # noqa: E731
    return script, flags(rest), flags(after)


class Captured(BaseException):
    def __init__(self, parser):
        self.parser = parser


def capture(self, args=None, namespace=None):
    raise Captured(self)


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def parser_of(script: str) -> argparse.ArgumentParser:
    """The parser a script builds, caught at its first parse (nothing after that runs)."""
    if script not in _PARSERS:
        if script == "train.py":
            import train

            _PARSERS[script] = train.build_parser()
            return _PARSERS[script]
        path = ROOT / script
        with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
                mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture), \
                mock.patch.object(sys, "argv", [script]):
            try:
                if script.endswith(".py"):
                    name = f"_docs_{path.stem}"
                    spec = importlib.util.spec_from_file_location(name, path)
                    module = sys.modules[name] = importlib.util.module_from_spec(spec)
                    sys.path.insert(0, str(path.parent))
                    try:
                        spec.loader.exec_module(module)
                    finally:
                        sys.path.remove(str(path.parent))
                else:
                    module = importlib.import_module(script)
                module.main()
            except Captured as c:
                _PARSERS[script] = c.parser
    assert script in _PARSERS, f"{script} built no parser"
    return _PARSERS[script]


def named_flags() -> list[tuple[str, str, str, str]]:
    """(document, script, flag, command) for every flag written after a script in code."""
    found = []
    for doc in DOCUMENTS:
        for command in commands_in_code(doc.read_text()):
            parsed = script_and_flags(command)
            if parsed is None:
                continue
            script, flags, passthrough = parsed
            found += [(doc.name, script, flag, command) for flag in flags]
            if script == "study.py":  # the flags after -- are train.py's
                found += [(doc.name, "train.py", flag, command) for flag in passthrough]
    return found


FLAGS = named_flags()


def test_the_guides_name_flags_inline_as_well_as_in_blocks():
    inline = [c for doc in DOCUMENTS for c in re.findall(r"`(python [^`]+)`", FENCE.sub("", doc.read_text()))]
    assert len(FLAGS) > 200 and len(inline) >= 10
    assert {"train.py", "eval.py", "study.py", "sample.py", "lora.export", "flops.py"} <= {s for _, s, *_ in FLAGS}


@pytest.mark.parametrize("script", sorted({s for _, s, *_ in FLAGS}))
def test_every_flag_named_after_a_script_is_in_its_help(script):
    parser = parser_of(script)
    help_text = parser.format_help()
    known = set(parser._option_string_actions)
    missing = sorted({(doc, flag, command) for doc, s, flag, command in FLAGS
                      if s == script and (flag not in known or flag not in help_text)})
    assert missing == [], f"flags not in {script} --help: {missing}"


def test_a_flag_that_does_not_exist_is_caught():
    script, flags, passthrough = script_and_flags("python study.py --dry-run --grid-steps 4 -- --batch-sizes 2")
    assert (script, flags, passthrough) == ("study.py", ["--dry-run", "--grid-steps"], ["--batch-sizes"])
    assert "--batch-sizes" not in parser_of("train.py")._option_string_actions
    assert "--batch-size" in parser_of("train.py")._option_string_actions
    assert script_and_flags("pip install -r requirements.txt") is None


# ------------------------------------------------------------------------------- the README and the guides
def test_the_readme_is_short_and_links_every_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    assert [g.name for g in GUIDES if g.resolve() not in linked] == []


@pytest.mark.parametrize("guide", GUIDES, ids=lambda d: d.name)
def test_each_guide_starts_with_its_command_and_says_what_the_tests_guarantee(guide):
    lines = guide.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2].startswith("```"), guide.name
    assert any(line.startswith("## What the tests guarantee") for line in lines), guide.name


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: d.name)
def test_no_sentence_depends_on_the_machine_it_was_written_on(doc):
    text = doc.read_text()
    for phrase in ("../shared", "cannot be downloaded here", "~/.cache/smollm2", "build.sh"):
        assert phrase not in text, f"{doc.name} mentions {phrase!r}"
