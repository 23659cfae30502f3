"""bench/accelerator_check.py in its CPU mode on the tiny model: the rows that can run on the CPU pass,
the GPU-only ones say skipped, and a broken path is a FAILED row and a failing exit code, not a crash.
(On a GPU every row runs; `--all-on-cpu` runs them all on the CPU, torchrun and --compile included.)"""

import json
import sys

import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import accelerator_check as check  # noqa: E402

GPU_ONLY = {name for name, _, gpu_only in check.CHECKS if gpu_only}


def test_cpu_mode_runs_the_cpu_rows_and_skips_the_gpu_ones(tmp_path, capsys):
    rows = check.main(["--device", "cpu", "--json", str(tmp_path / "check.json")])
    status = {r.check: r.status for r in rows}
    assert status == {name: "skipped" if name in GPU_ONLY else "ok" for name, _, _ in check.CHECKS}
    assert GPU_ONLY == {"parity fp32", "SDPA flash", "NF4 parity", "train step bf16 --compile", "torchrun 1 process"}
    by_name = {r.check: r for r in rows}
    for name in ("train step bf16", "train step NF4 + bf16", "sampled forecasting"):
        assert by_name[name].tokens_per_s > 0
    assert by_name["train step bf16"].memory_bytes > 0 and by_name["train step bf16"].peak_share > 0
    saved = json.loads((tmp_path / "check.json").read_text())
    assert [r["check"] for r in saved["rows"]] == [name for name, _, _ in check.CHECKS]
    table = capsys.readouterr().out
    assert "parity bfloat16             ok" in table and "no GPU (cpu)" in table
    assert check.exit_code(rows) == 0


def test_a_wrong_bf16_path_fails_parity(monkeypatch):
    build = check.Context.build

    def noisy(self, dtype, device=None):  # a bf16 path that computes something else
        model = build(self, dtype, device)
        if dtype == torch.bfloat16:
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight.mul_(-1)
        return model

    monkeypatch.setattr(check.Context, "build", noisy)
    (row,) = check.main(["--device", "cpu", "--only", "parity bfloat16"])
    assert row.status == "FAILED" and "limit 0.1" in row.result


def test_a_crashing_path_is_a_failed_row_and_exit_code_1(monkeypatch):
    def crash(ctx, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(check, "train_step", crash)
    rows = check.main(["--device", "cpu", "--only", "train step NF4 + bf16", "sampled forecasting"])
    assert [(r.check, r.status) for r in rows] == [("train step NF4 + bf16", "FAILED"), ("sampled forecasting", "ok")]
    assert rows[0].result == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert check.exit_code(rows) == 1
