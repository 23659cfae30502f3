"""--dtype auto (model/precision.py): the choice on mocked measurements, what wins over it, and that a run
records it and keeps it on --resume, eval.py and sample.py. The real measurement is only run for its
shape (two positive rates), never judged for speed."""

import json

import pytest
import torch

import train
from common.cli import UserError
from model import precision
from tests.test_train import TINY

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FAST_BF16 = {"float32": 200.0, "bfloat16": 700.0}  # an AMX Xeon's ratio
SLOW_BF16 = {"float32": 220.0, "bfloat16": 140.0}  # a Xeon without AMX (issue 29)


@pytest.fixture
def measured(monkeypatch):
    """Unpin auto, forget earlier choices, and make the measurement return `measured.rates`, counting calls."""
    monkeypatch.delenv(precision.PIN_ENV, raising=False)
    precision.cpu_choice.cache_clear()
    box = {"rates": FAST_BF16, "calls": []}

    def fake(hidden, intermediate, **kw):
        box["calls"].append((hidden, intermediate))
        return dict(box["rates"])

    monkeypatch.setattr(precision, "measure_matmul_gflops", fake)
    yield box
    precision.cpu_choice.cache_clear()


def test_fast_bf16_gives_bf16_slow_gives_fp32_and_it_is_said(measured, capsys):
    assert precision.weights_dtype("auto", CPU, "tiny") == torch.bfloat16
    err = capsys.readouterr().err
    assert "--dtype auto: bfloat16 (bf16 matmuls 700 GFLOP/s, fp32 200 (3.50x)" in err and "--dtype float32" in err
    assert measured["calls"] == [(64, 176)]  # the tiny model's own MLP shapes
    precision.cpu_choice.cache_clear()
    measured["rates"] = SLOW_BF16
    assert precision.weights_dtype("auto", CPU, "tiny") == torch.float32
    assert "--dtype auto: float32" in capsys.readouterr().err


def test_the_margin_decides_a_bf16_only_slightly_faster():
    at = precision.BF16_MARGIN
    assert precision.decide({"float32": 100.0, "bfloat16": 100.0 * at}).dtype == torch.bfloat16
    assert precision.decide({"float32": 100.0, "bfloat16": 100.0 * at * 0.99}).dtype == torch.float32


def test_measured_once_per_process_and_shape(measured):
    for _ in range(3):
        precision.weights_dtype("auto", CPU, "tiny")
    precision.weights_dtype("auto", CPU)  # no model: Qwen2.5-0.5B's shapes
    assert measured["calls"] == [(64, 176), precision.QWEN_MLP]


def test_cuda_is_bf16_mps_fp32_and_an_explicit_dtype_always_wins_without_measuring(measured):
    assert precision.weights_dtype("auto", CUDA) == torch.bfloat16
    assert precision.weights_dtype("auto", torch.device("mps")) == torch.float32
    assert precision.weights_dtype("float32", CPU, "tiny") == torch.float32
    measured["rates"] = SLOW_BF16
    assert precision.weights_dtype("bfloat16", CPU, "tiny") == torch.bfloat16
    assert precision.weights_dtype("float32", CUDA) == torch.float32
    assert measured["calls"] == []


def test_the_environment_pins_auto(measured, monkeypatch):
    monkeypatch.setenv(precision.PIN_ENV, "bfloat16")
    measured["rates"] = SLOW_BF16
    assert precision.weights_dtype("auto", CPU, "tiny") == torch.bfloat16 and measured["calls"] == []
    precision.cpu_choice.cache_clear()
    monkeypatch.setenv(precision.PIN_ENV, "fp8")
    with pytest.raises(UserError, match="QWEN_LORA_CPU_DTYPE='fp8'"):
        precision.weights_dtype("auto", CPU, "tiny")


def test_the_real_measurement_gives_two_rates_and_gives_up_on_a_slow_bf16(monkeypatch):
    rates = precision.measure_matmul_gflops(32, 48, rows=8, repeats=2)
    assert set(rates) == {"float32", "bfloat16"} and all(r > 0 for r in rates.values())
    calls = []

    def slow_bf16(a, b):  # bf16 takes 10 times fp32: the warm-up is enough to know
        calls.append(a.dtype)
        return 0.010 if a.dtype == torch.bfloat16 else 0.001

    monkeypatch.setattr(precision, "_seconds", slow_bf16)
    rates = precision.measure_matmul_gflops(32, 48, rows=8, repeats=3)
    assert calls == [torch.float32] * 2 + [torch.bfloat16] * 2  # one pass of the two shapes each, no repeats
    assert rates["float32"] == pytest.approx(10 * rates["bfloat16"])
    calls.clear()
    monkeypatch.setattr(precision, "_seconds", lambda a, b: calls.append(a.dtype) or 0.001)
    precision.measure_matmul_gflops(32, 48, rows=8, repeats=3)
    assert len(calls) == 2 * 2 * (1 + 3)  # two dtypes x two shapes x (warm-up + 3 repeats)


# ------------------------------------------------------------------------------------------ runs
def loaded_dtypes(monkeypatch) -> list:
    """The dtypes train.py, eval.py and sample.py load the frozen weights in."""
    seen = []
    import model.loading

    real = model.loading.load_model

    def spy(name, dtype=torch.float32, *a, **kw):
        seen.append(dtype)
        return real(name, dtype, *a, **kw)

    monkeypatch.setattr(model.loading, "load_model", spy)
    return seen


def test_a_run_records_the_choice_and_resume_eval_and_sample_keep_it(measured, monkeypatch, tmp_path, capsys):
    seen = loaded_dtypes(monkeypatch)
    out = tmp_path / "run"
    train.train(TINY + ["--steps", "2", "--out", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weights_dtype"] == "bfloat16" and cfg["args"]["dtype"] == "auto" and seen == [torch.bfloat16]
    precision.cpu_choice.cache_clear()
    measured["rates"] = SLOW_BF16  # the machine would now choose fp32: the run keeps what it began with
    train.train(["--resume", str(out), "--steps", "3"])
    assert json.loads((out / "config.json").read_text())["weights_dtype"] == "bfloat16"
    import eval as eval_script
    import sample

    eval_script.main(["--model", "tiny", "--adapter", str(out), "--systems", "1", "--horizon", "1",
                      "--context-steps", "2", "--no-base"])
    sample.main(["--model", "tiny", "--adapter", str(out), "--max-new-tokens", "2"])
    assert seen == [torch.bfloat16] * 4
    sample.main(["--model", "tiny", "--max-new-tokens", "2"])  # no run: measured here (cached: fp32 now)
    sample.main(["--model", "tiny", "--adapter", str(out), "--dtype", "float32", "--max-new-tokens", "2"])
    assert seen[4:] == [torch.float32, torch.float32]


def test_a_run_from_before_the_measurement_resumes_with_the_old_auto(measured, tmp_path):
    cfg = {"args": {"dtype": "auto"}, "scaler": {"alpha": 1.0}}
    measured["rates"] = FAST_BF16
    assert precision.recorded(cfg, CPU) == torch.float32 and precision.recorded(cfg, CUDA) == torch.bfloat16
    assert precision.recorded({**cfg, "weights_dtype": "bfloat16"}, CPU) == torch.bfloat16
    assert precision.recorded({"args": {"dtype": "float32"}}, CUDA) == torch.float32
    assert measured["calls"] == []


def test_runs_that_disagree_take_the_first_and_say_so(measured, capsys):
    runs = [{"args": {}, "weights_dtype": "float32"}, {"args": {}, "weights_dtype": "bfloat16"}]
    assert precision.weights_dtype("auto", CPU, "tiny", runs) == torch.float32
    assert "different dtypes" in capsys.readouterr().err
    assert precision.weights_dtype("bfloat16", CPU, "tiny", runs) == torch.bfloat16


def test_under_torchrun_every_process_takes_rank_0s_choice(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    from tests.precision_worker import choice_in_process

    procs = [ctx.Process(target=choice_in_process, args=(rank, str(tmp_path / "store"), answers)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(answers.get(timeout=5) for _ in procs) == [(0, "bfloat16"), (1, "bfloat16")]
