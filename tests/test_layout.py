"""The layout docs/code_map.md describes (issue 31): every library file and script in its reading order,
each needing only what came before it; scripts alone at the top; short functions; the README's map in
the same order."""

import ast
import re

from tests.conftest import ROOT

SCRIPTS = {"train.py", "sample.py", "eval.py", "flops.py", "study.py"}
PACKAGES = ("common", "model", "lora", "data", "training", "forecast")
MAP_ENTRY = re.compile(r"^\d+\. `([\w/]+\.py)`", re.M)


def reading_order() -> list[str]:
    return MAP_ENTRY.findall((ROOT / "docs" / "code_map.md").read_text())


def library_files() -> set[str]:
    files = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
    return {f for f in files if not f.endswith("__init__.py")} | SCRIPTS


def reexports(package: str) -> dict[str, str]:
    """{name: file} for the names a package's __init__ imports from its modules (`from model import X`)."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    return {alias.asname or alias.name: f"{package}/{node.module}.py" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 for alias in node.names}


def module_file(dotted: str) -> str | None:
    """The project file a module name means, or None (torch, numpy, ...); a package means its __init__."""
    path = dotted.replace(".", "/")
    if (ROOT / f"{path}.py").is_file():
        return f"{path}.py"
    if (ROOT / path / "__init__.py").is_file():
        return f"{path}/__init__.py"
    return None


def needs(file: str) -> set[str]:
    """Every project file `file` imports, at its top or inside a function; a package's __init__ stands
    for the modules it re-exports, `from package import module` for that module."""
    package = file.split("/")[0] if "/" in file else None
    found = set()
    for node in ast.walk(ast.parse((ROOT / file).read_text())):
        if isinstance(node, ast.Import):
            found |= {module_file(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{file}: imports from two levels up; say the package's name instead"
            base = ".".join(filter(None, [package if node.level else None, node.module]))
            target = module_file(base)
            for alias in node.names:
                sub = module_file(f"{base}.{alias.name}")
                if sub:
                    found.add(sub)
                elif target and target.endswith("__init__.py"):
                    found.add(reexports(base).get(alias.name, target))
                else:
                    found.add(target)
    expanded = set()
    for f in found - {None, file}:
        if f.endswith("__init__.py"):
            expanded |= set(reexports(f.removesuffix("/__init__.py")).values())
        else:
            expanded.add(f)
    return expanded - {file}


def test_the_code_map_lists_every_file_once():
    order = reading_order()
    assert len(order) == len(set(order)), "a file is listed twice"
    assert set(order) == library_files()


def test_each_file_needs_only_what_came_before_it():
    order = reading_order()
    position = {f: i for i, f in enumerate(order)}
    late = {f: sorted(d for d in needs(f) if position.get(d, -1) > position[f]) for f in order}
    assert {f: d for f, d in late.items() if d} == {}


def test_needs_follows_re_exports_and_lazy_imports():
    assert "model/loading.py" in needs("sample.py")  # from model import load_pretrained
    assert "model/loss.py" in needs("data/windows.py")  # imported inside a function
    assert "lora/peft_format.py" in needs("train.py")  # import lora: everything lora/__init__ re-exports
    assert "training/distributed.py" in needs("study.py")  # from training import distributed


def test_only_the_scripts_are_at_the_top():
    assert {p.name for p in ROOT.glob("*.py")} == SCRIPTS


def test_no_function_outside_tests_and_bench_is_over_60_lines():
    long = []
    for file in sorted(library_files()):
        for node in ast.walk(ast.parse((ROOT / file).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{file}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def readme_rows() -> list[str]:
    """The packages and scripts the README's map names, one per line, in its order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Map of the code"):]
    end = section.find("\n## ", 4)
    section = section if end < 0 else section[:end]
    return re.findall(r"^\| `([\w/.]+)` \|", section, re.M)


def row_of(file: str, rows: list[str]) -> str:
    """The README line a file is read under: its own, if it has one, else its package's."""
    return file if file in rows else file.split("/")[0] + "/"


def test_the_readme_map_follows_the_reading_order():
    """The README names each package and script once, in the order their first file appears in
    docs/code_map.md; and each line needs only the lines above it (or itself)."""
    rows = readme_rows()
    first_seen = []
    for f in reading_order():
        if row_of(f, rows) not in first_seen:
            first_seen.append(row_of(f, rows))
    assert rows == first_seen
    position = {row: i for i, row in enumerate(rows)}
    late = {f: sorted(d for d in needs(f) if position[row_of(d, rows)] > position[row_of(f, rows)])
            for f in reading_order()}
    assert {f: d for f, d in late.items() if d} == {}


def test_the_first_import_of_a_script_loads_no_torch():
    """Scripts import common.startup before torch so that Ctrl-C during start-up is one line; the
    common package must therefore import nothing heavy on its way there."""
    import subprocess
    import sys

    code = "import sys; from common.startup import quiet_ctrl_c; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
