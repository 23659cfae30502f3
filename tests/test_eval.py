"""Forecast metrics, baselines, malformed output, constrained and batched decoding, and the CLI."""

import json

import numpy as np
import pytest
import torch

import eval as ev
import train
from common.cli import UserError
from data import Scaler, simulate
from data.windows import forecast_task
from forecast.baselines import naive_last, naive_linear
from model import generate, load_tokenizer
from model.tiny import tiny_model


def test_metrics_against_hand_computed_values():
    target = np.zeros((2, 2, 2))
    forecast = np.array([[[1.0, -2.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 2.0]]])
    m = ev.error_metrics(forecast, target)
    # errors: prey 1, 0, 3, 0 ; predator -2, 0, 0, 2
    assert m["mae"] == pytest.approx((1 + 2 + 3 + 2) / 8)
    assert m["mse"] == pytest.approx((1 + 4 + 9 + 4) / 8)
    assert m["rmse"] == pytest.approx(np.sqrt(18 / 8))
    assert m["prey"] == pytest.approx({"mae": 1.0, "mse": 2.5, "rmse": np.sqrt(2.5)})
    assert m["predator"] == pytest.approx({"mae": 1.0, "mse": 2.0, "rmse": np.sqrt(2.0)})
    assert [s["mae"] for s in m["per_step"]] == pytest.approx([(1 + 2 + 3) / 4, 2 / 4])
    assert m["per_system_mae"] == pytest.approx([3 / 4, 5 / 4])


def test_median_of_samples():
    samples = np.stack([np.full((1, 2, 2), v) for v in (1.0, 10.0, 2.0)])  # (S=3, N, H, 2)
    samples[1, 0, 1, 0] = -5.0
    med = ev.median_of_samples(samples)
    assert med[0, 0].tolist() == [2.0, 2.0] and med[0, 1].tolist() == [1.0, 2.0]


def test_baselines():
    context = np.array([[[1.0, 5.0], [2.0, 4.0]]])  # one system, 2 steps
    assert naive_last(context, 3)[0].tolist() == [[2.0, 4.0]] * 3
    assert naive_linear(context, 3)[0].tolist() == [[3.0, 3.0], [4.0, 2.0], [5.0, 1.0]]


@pytest.mark.parametrize("text, expected, invalid, short", [
    ("1.00,2.00;1.10,2.10;1.20,2.20;", [[1.0, 2.0], [1.1, 2.1], [1.2, 2.2]], False, False),
    ("1.00,2.00;1.10,2.10;1.20,2.20;9.99,9.99;", [[1.0, 2.0], [1.1, 2.1], [1.2, 2.2]], False, False),  # extra dropped
    ("1.00,2.00;1.10,2.1", [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], True, True),  # truncated: padded with the last
    ("1.00,2.00;;1.20,2.20;", [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], True, True),  # malformed step 2: alignment lost
    ("", [[0.5, 0.7]] * 3, False, True),  # nothing: the last context value
    ("junk", [[0.5, 0.7]] * 3, True, True),
])
def test_malformed_and_short_forecasts_are_counted_and_filled(text, expected, invalid, short):
    values, bad, cut = ev.complete_forecast(text, 3, 2, np.array([0.5, 0.7]))
    np.testing.assert_allclose(values, expected)
    assert (bad, cut) == (invalid, short)


def test_evaluate_forecasts_counts_and_unscales():
    traj = simulate(2, seed=0).values
    scaler = Scaler(alpha=2.0)
    task = forecast_task(traj, scaler, 2, context_steps=10, horizon=2)
    from data import encode

    good = encode(scaler.scale(task.target[0]), 2) + ";"
    r = ev.evaluate_forecasts([[good], ["1.00,"]], task, scaler, 2, 2)
    assert (r["invalid"], r["short"], r["forecasts"]) == (1, 1, 2)
    np.testing.assert_allclose(r["forecast_values"][0], task.target[0], atol=0.5 * 0.01 * 2 + 1e-9)
    np.testing.assert_allclose(r["forecast_values"][1], np.repeat(task.context[1, -1:], 2, 0), atol=1e-6 * 2 + 0.01)


def test_constrained_decoding_only_emits_allowed_tokens():
    model, tok = tiny_model(), load_tokenizer("tiny")
    allowed = ev.allowed_token_ids(tok)
    out = generate(model, [tok.encode("Hello, 0.12,3.4;")] * 4, 40, temperature=1.5, allowed_ids=allowed,
                   eos_ids=tok.eos_ids, vocab_limit=tok.vocab_size, generator=torch.Generator().manual_seed(0))
    emitted = {t for row in out for t in row}
    assert emitted and emitted <= set(allowed)
    assert set(tok.decode(sum(out, []))) <= set(ev.FORMAT_CHARS)


def test_forecast_stops_after_horizon_steps():
    model, tok = tiny_model(), load_tokenizer("tiny")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)  # a model that only ever writes ';'
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.token_to_id(";")] = 10.0
    model.lm_head = head
    texts = ev.generate_forecasts(model, tok, ["0.50,0.70;0.52,0.66;"], horizon=3, decimals=2)
    assert texts == [[";;;"]]  # three steps, then stopped (it would write 42 without the stop)


def test_batched_generation_equals_one_at_a_time():
    model, tok = tiny_model(), load_tokenizer("tiny")
    traj = simulate(5, seed=1).values
    task = forecast_task(traj, Scaler(alpha=0.5), 2, context_steps=int(7), horizon=4)
    prompts = [p[: 40 + 9 * i] for i, p in enumerate(task.prompts)]  # different lengths: real left padding
    batched = ev.generate_forecasts(model, tok, prompts, 4, 2, batch_size=5)
    single = ev.generate_forecasts(model, tok, prompts, 4, 2, batch_size=1)
    assert batched == single
    sampled_b = ev.generate_forecasts(model, tok, prompts[:1], 4, 2, samples=3, temperature=1.0, batch_size=3, seed=3)
    assert len(sampled_b[0]) == 3


def uncertain_model(dtype=torch.float32):
    """The tiny model with its logits scaled down 20x: random weights are near-certain of one token,
    and sampling tests need several likely ones."""
    model = tiny_model(dtype)
    with torch.no_grad():
        model.model.norm.weight.mul_(0.05)
    return model


def test_samples_continue_copies_of_their_prompts_cache():
    """Prefill once and copy the cache to each sample == prefill every sample's own copy of the prompt,
    token for token, when each row draws from the same stream (fp64: no rounding flips)."""
    model, tok = uncertain_model(torch.float64), load_tokenizer("tiny")
    allowed = ev.allowed_token_ids(tok)
    prompts = [tok.encode("0.50,0.70;0.52,0.66;"), tok.encode("1.2,0.3;")]  # different lengths: left padding
    S = 5

    def streams():
        return [torch.Generator().manual_seed(100 + r) for r in range(len(prompts) * S)]

    shared = generate(model, prompts, 30, samples=S, temperature=1.0, allowed_ids=allowed, generator=streams())
    copied = generate(model, [p for p in prompts for _ in range(S)], 30, temperature=1.0, allowed_ids=allowed,
                      generator=streams())
    assert shared == copied
    assert len({tuple(row) for row in shared[:S]}) == S  # the samples went their own ways


def test_constrained_head_computes_the_allowed_logits():
    from model.generate import LogitSpace
    from model.transformer import KVCache

    model, tok = tiny_model(), load_tokenizer("tiny")
    allowed = torch.tensor(ev.allowed_token_ids(tok))
    ids = torch.tensor([tok.encode("0.50,0.70;0.52,")])
    plain, cut = LogitSpace(model, None, None), LogitSpace(model, allowed, None)
    assert cut.allowed_only and not plain.allowed_only
    full = plain.next_logits(model, ids, None, KVCache(model.config, 1, 20, torch.float32, "cpu"))
    only = cut.next_logits(model, ids, None, KVCache(model.config, 1, 20, torch.float32, "cpu"))
    torch.testing.assert_close(only, full[:, allowed])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_both_logit_spaces_choose_the_same_tokens(temperature):
    """The plain step (all V logits, forbidden ones at -inf, index = token id) and the fast one (the A
    allowed logits, position -> allowed[position]) choose the same tokens from the same streams."""
    from model.generate import LogitSpace

    model, tok = uncertain_model(), load_tokenizer("tiny")
    allowed = torch.tensor(sorted(ev.allowed_token_ids(tok)))
    plain = LogitSpace(model, allowed, None, cut_head=False)  # the same constraint, applied by masking
    cut = LogitSpace(model, allowed, None)
    assert cut.allowed_only and not plain.allowed_only
    full = torch.randn(64, model.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 3

    def streams():
        return [torch.Generator().manual_seed(j) for j in range(64)]

    a = plain.choose(full, temperature, None, None, streams())
    b = cut.choose(full[:, allowed], temperature, None, None, streams())
    assert torch.equal(a, b) and set(a.tolist()) <= set(allowed.tolist())
    assert temperature == 0 or len(set(a.tolist())) > 3  # sampled, not a constant


def test_samples_of_one_system_are_independent_draws():
    """First tokens of 6000 samples of one prompt: their frequencies match the model's distribution, and
    neighbouring samples (which share a prefill) are independent of each other (chi-square tests)."""
    from model.generate import process_logits

    model, tok = uncertain_model(), load_tokenizer("tiny")
    allowed = ev.allowed_token_ids(tok)
    prompt = tok.encode("0.50,0.70;0.52,0.66;0.5")
    n = 6000
    streams = [torch.Generator().manual_seed(ev.row_seed(7, 0, j)) for j in range(n)]
    first = torch.tensor([row[0] for row in generate(model, [prompt], 1, samples=n, temperature=1.0,
                                                     allowed_ids=allowed, generator=streams)])
    with torch.no_grad():
        p = process_logits(model(torch.tensor([prompt]))[:, -1], 1.0, allowed_ids=torch.tensor(allowed)).softmax(-1)[0]
    top = p.argsort(descending=True)[:3]  # the 3 likeliest tokens, and the rest as one class
    classes = torch.full_like(first, 3)
    for c, t in enumerate(top):
        classes[first == t] = c
    expected = torch.cat([p[top], 1 - p[top].sum(0, keepdim=True)]) * n
    observed = torch.bincount(classes, minlength=4).double()
    assert ((observed - expected) ** 2 / expected).sum() < 25  # chi-square, 3 dof: P(>25) ~ 1.6e-5
    a, b = classes[0::2], classes[1::2]
    table = torch.zeros(4, 4, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    independent = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    assert ((table - independent) ** 2 / independent).sum() < 40  # 9 dof: P(>40) ~ 7e-6


def test_forecast_samples_do_not_depend_on_the_batch():
    """A sample's draws come from its own seed: any batch size, or the prompts split in two (as over
    processes), gives the same forecasts."""
    model, tok = uncertain_model(torch.float64), load_tokenizer("tiny")
    task = forecast_task(simulate(3, seed=2).values, Scaler(alpha=0.5), 2, context_steps=5, horizon=3)
    prompts = [p[: 30 + 7 * i] for i, p in enumerate(task.prompts)]

    def run(prompts, batch_size, first=0):
        return ev.generate_forecasts(model, tok, prompts, 3, 2, samples=4, temperature=1.0, batch_size=batch_size,
                                     seed=5, first=first)

    whole = run(prompts, 12)
    assert run(prompts, 4) == whole
    assert run(prompts[:1], 64) + run(prompts[1:], 8, first=1) == whole
    assert run(prompts, 12) == whole and ev.generate_forecasts(
        model, tok, prompts, 3, 2, samples=4, temperature=1.0, batch_size=12, seed=6) != whole


def test_cli_base_adapter_and_baselines_side_by_side(tmp_path, capsys):
    train.train(["--model", "tiny", "--systems", "30", "--context-length", "128", "--steps", "30", "--lr", "3e-3",
                 "--out", str(tmp_path / "run"), "--eval-every", "30"])
    capsys.readouterr()
    report = ev.main(["--model", "tiny", "--adapter", str(tmp_path / "run"), "--horizon", "4", "--context-steps", "10",
                      "--systems", "3", "--loss", "--context-length", "128", "--json", str(tmp_path / "r.json"),
                      "--plots", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["systems"] == report["systems"] == 3 and saved["horizon"] == 4 and saved["context_steps"] == 10
    assert list(saved["results"]) == ["tiny", str(tmp_path / "run"), "naive_last", "naive_linear", "seasonal_naive",
                                      "autoregression", "lv_fit"]
    for name in ("tiny", str(tmp_path / "run")):
        r = saved["results"][name]
        assert {"mae", "mse", "rmse", "prey", "predator", "per_step", "invalid", "short", "loss", "ppl"} <= set(r)
        assert len(r["per_step"]) == 4
    run_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["results"][str(tmp_path / "run")]["alpha"] == run_cfg["scaler"]["alpha"]
    # training moved the text loss
    assert saved["results"][str(tmp_path / "run")]["loss"] < saved["results"]["tiny"]["loss"]
    assert "naive_linear" in out and "MAE" in out
    for r in saved["results"].values():  # every entry with its intervals, MASE included
        assert r["ci"]["mae"][0] <= r["mae"] <= r["ci"]["mae"][1] and len(r["per_system_mase"]) == 3
    assert {(c["model"], c["role"], c["metric"]) for c in saved["comparisons"]} == {
        (m, role, metric) for m in ("tiny", str(tmp_path / "run")) for role in ("best baseline", "physics reference")
        for metric in ("mae", "mase")}
    assert "(best baseline), MAE:" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["error_histogram.png", "error_vs_horizon.png", "forecasts.png"]


def test_cli_errors():
    with pytest.raises(UserError, match="needs --temperature"):
        ev.parse_args(["--samples", "3"])
    with pytest.raises(UserError, match="adapter or run folder not found"):
        ev.main(["--model", "tiny", "--adapter", "/nonexistent/run"])
    with pytest.raises(UserError, match="must fit"):
        ev.main(["--model", "tiny", "--context-steps", "95", "--horizon", "10", "--systems", "1"])
