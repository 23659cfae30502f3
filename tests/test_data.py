"""Lotka–Volterra simulation and files, LLMTIME encoding/decoding, windows and prompts."""

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.cli import UserError
from data import (Scaler, decode, encode, forecast_task, load_h5, make_windows, save_h5, simulate, split_indices,
                  trajectory_texts, window_starts)
from data.lotka_volterra import INITIAL_RANGE, integrate_rk4, sample_systems
from tests.conftest import LV_FILE, QWEN_DIR, needs_lv_file, needs_qwen_files

# ------------------------------------------------------------------------------------------ LLMTIME
values_2d = arrays(np.float64, st.tuples(st.integers(1, 30), st.just(2)),
                   elements=st.floats(0, 999.0, allow_nan=False, allow_infinity=False))


@settings(max_examples=200, deadline=None)
@given(values_2d, st.sampled_from([2, 3]))
def test_encode_decode_round_trip(values, decimals):
    text = encode(values, decimals)
    assert " " not in text and not text.endswith(";")
    decoded = decode(text, decimals=decimals)
    assert decoded.malformed == 0 and decoded.first_bad is None
    assert decoded.values.shape == values.shape
    assert np.all(np.abs(decoded.values - values) <= 0.5 * 10.0**-decimals + 1e-9)
    # the same text with its trailing separator (as a forecast continues) decodes the same
    assert np.array_equal(decode(text + ";", decimals=decimals).values, decoded.values)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.,;-ab \n", max_size=80), st.sampled_from([None, 2, 3]))
def test_decoding_junk_never_crashes(text, decimals):
    d = decode(text, decimals=decimals)
    assert d.values.ndim == 2 and d.values.shape[1] == 2 and np.isfinite(d.values).all()
    steps = text.split(";")
    assert len(d.values) + d.malformed == len(steps) - (steps[-1] == "")
    assert d.first_bad is None or d.first_bad <= len(d.values)
    assert len(d.aligned) <= len(d.values)


def test_encoding_example_and_decoding_problems():
    assert encode(np.array([[0.25, 1.5], [0.27, 1.47], [0.31, 1.42]])) == "0.25,1.50;0.27,1.47;0.31,1.42"
    assert encode(np.array([[-0.0001, 2.0]]), 3) == "0.000,2.000"
    d = decode("0.25,1.50;;x,1;1,2,3;0.31,1.42;0.3", decimals=2)
    assert d.values.tolist() == [[0.25, 1.5], [0.31, 1.42]]
    assert d.problems == {"empty": 1, "non-numeric": 1, "fields": 1, "truncated": 1}
    assert d.first_bad == 1 and d.aligned.tolist() == [[0.25, 1.5]]
    assert decode("1.00,2.0", decimals=2).problems == {"truncated": 1}  # stopped mid-number
    assert decode("1.00,2.0", decimals=None).values.tolist() == [[1.0, 2.0]]
    assert decode("1.00,2.00").problems == {}


def test_scaler_rule_and_inverse():
    rng = np.random.default_rng(0)
    train = rng.gamma(2.0, 1.5, size=(50, 100, 2))
    s = Scaler.fit(train)
    assert s.alpha == pytest.approx(np.percentile(train, 99) / 10)
    assert np.mean(s.scale(train) <= 10) == pytest.approx(0.99, abs=1e-3)
    np.testing.assert_allclose(s.unscale(s.scale(train)), train)
    assert Scaler.from_dict(s.to_dict()) == s


# --------------------------------------------------------------------------------------- simulator
def test_simulator_is_deterministic_and_in_documented_ranges():
    a, b = simulate(1000, seed=0), simulate(1000, seed=0)
    assert np.array_equal(a.values, b.values) and a.values.dtype == np.float32
    assert not np.array_equal(a.values, simulate(1000, seed=1).values)
    assert a.values.shape == (1000, 100, 2)
    np.testing.assert_array_equal(a.time, np.linspace(0, 200, 100))
    assert (a.values > 0).all()
    assert a.values[..., 0].max() < 16 and a.values[..., 1].max() < 6
    assert ((a.values[:, 0] >= INITIAL_RANGE[0]) & (a.values[:, 0] <= INITIAL_RANGE[1])).all()


def test_rk4_agrees_with_much_finer_integration():
    initial, params = sample_systems(50, seed=3)
    time = np.linspace(0, 200, 100)
    coarse = integrate_rk4(initial, params, time, substeps=20)
    fine = integrate_rk4(initial, params, time, substeps=400)
    assert np.max(np.abs(coarse - fine) / (np.abs(fine) + 1e-3)) < 1e-4


def test_rk4_keeps_the_conserved_quantity():
    # V = delta x - gamma ln x + beta y - alpha ln y is constant along exact solutions
    initial, params = sample_systems(20, seed=4)
    out = integrate_rk4(initial, params, np.linspace(0, 200, 100), substeps=20)
    a, b, g, d = params.T
    x, y = out[..., 0], out[..., 1]
    v = d[:, None] * x - g[:, None] * np.log(x) + b[:, None] * y - a[:, None] * np.log(y)
    assert np.max(np.abs(v - v[:, :1])) < 1e-5


def test_splits_are_deterministic_disjoint_and_80_10_10():
    s = split_indices(1000, seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(1000))
    assert all(np.array_equal(s[k], split_indices(1000, seed=0)[k]) for k in s)
    assert not np.array_equal(s["test"], split_indices(1000, seed=1)["test"])
    small = split_indices(5)
    assert all(len(small[k]) >= 1 for k in small)


# --------------------------------------------------------------------------------------------- files
def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_loader_reads_the_coursework_layout(tmp_path):
    traj = simulate(20, seed=0)
    save_h5(traj, tmp_path / "lv.h5")
    back = load_h5(tmp_path / "lv.h5")
    assert np.array_equal(back.values, traj.values) and np.array_equal(back.time, traj.time)


GOOD = np.ones((3, 5, 2), np.float32)
T5 = np.arange(5.0)


@pytest.mark.parametrize("datasets, message", [
    ({"time": T5}, "no dataset 'trajectories'"),
    ({"trajectories": GOOD}, "no dataset 'time'"),
    ({"trajectories": np.ones((3, 5)), "time": T5}, r"shape \(N, T, 2\)"),
    ({"trajectories": np.ones((3, 5, 3)), "time": T5}, r"shape \(N, T, 2\)"),
    ({"trajectories": np.ones((0, 5, 2)), "time": T5}, "empty"),
    ({"trajectories": np.where(np.arange(30).reshape(3, 5, 2) == 7, np.nan, 1.0), "time": T5}, "non-finite.*system 0, step 3, variable 1"),
    ({"trajectories": -GOOD, "time": T5}, "negative"),
    ({"trajectories": GOOD, "time": T5[::-1].copy()}, "strictly increasing"),
    ({"trajectories": GOOD, "time": np.arange(4.0)}, "'time' must have shape"),
])
def test_loader_rejects_broken_files(tmp_path, datasets, message):
    with pytest.raises(UserError, match=message):
        load_h5(_write(tmp_path / "bad.h5", **datasets))


def test_loader_rejects_missing_and_non_hdf5(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_h5(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UserError, match="not a readable HDF5"):
        load_h5(tmp_path / "text.h5")


def test_simulator_cli_writes_the_format(tmp_path):
    from data.lotka_volterra import main

    main(["--out", str(tmp_path / "lv.h5"), "--n", "7", "--seed", "2"])
    assert np.array_equal(load_h5(tmp_path / "lv.h5").values, simulate(7, seed=2).values)


@needs_lv_file
def test_real_coursework_dataset_loads():
    traj = load_h5(LV_FILE)
    assert traj.values.shape == (1000, 100, 2)
    np.testing.assert_array_equal(traj.time, np.linspace(0, 200, 100))
    assert 13.7 < traj.values[..., 0].max() < 13.75 and 4.76 < traj.values[..., 1].max() < 4.77


# ----------------------------------------------------------------------------------------- windows
def test_windows_cover_every_token_pad_the_last_and_never_cross_systems():
    a, b = list(range(1, 24)), list(range(100, 105))
    w = make_windows([a, b], context_length=10, stride=5, pad_id=0)
    assert window_starts(23, 10, 5) == [0, 5, 10, 15]
    assert w.input_ids.shape == (5, 10)
    assert w.input_ids[3].tolist() == list(range(16, 24)) + [0, 0] and w.real[3].tolist() == [True] * 8 + [False] * 2
    assert w.input_ids[4].tolist() == b + [0] * 5  # system b alone, padded
    covered = {t for row, real in zip(w.input_ids.tolist(), w.real.tolist()) for t, r in zip(row, real) if r}
    assert covered == set(a) | set(b)


def test_forecast_prompts_end_with_separator_and_keep_true_numbers():
    traj = simulate(4, seed=0)
    s = Scaler(alpha=0.5)
    task = forecast_task(traj.values, s, 2, context_steps=10, horizon=5)
    assert task.prompts[0].endswith(";") and task.prompts[0].count(";") == 10
    assert np.allclose(decode(task.prompts[0]).values, s.scale(traj.values[0, :10]), atol=0.005 + 1e-9)
    assert np.array_equal(task.target, traj.values[:, 10:15].astype(np.float64))
    with pytest.raises(UserError, match="must fit"):
        forecast_task(traj.values, s, 2, context_steps=90, horizon=20)


# ------------------------------------------------------------------------------- the real tokenizer
@needs_qwen_files
def test_qwen_tokenizes_llmtime_text_digit_by_digit():
    from model import load_tokenizer

    tok = load_tokenizer(QWEN_DIR)
    assert tok.encode("1.23") == [16, 13, 17, 18]
    traj = simulate(50, seed=0).values
    scaler = Scaler.fit(traj)
    below_10 = [v for v in traj if (scaler.scale(v) < 9.995).all()]
    assert below_10, "expected some systems entirely below 10 after scaling"
    text = trajectory_texts(np.stack(below_10[:3]), scaler, decimals=2)
    assert [len(tok.encode(t)) for t in text] == [999] * len(text)  # 100 x (4 + 1 + 4) + 99 separators
