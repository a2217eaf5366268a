"""Notebook 02's experiment: configuration, the measure, the search, the statistics."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from clx_core.config import ConfigError
from clx_core.data import ImageData
from clx_core.experiments import ewc_lambda as el
from clx_core.models import Conv2d, shared_parameters
from clx_core.rng import ModelStreams


def mnist_like(per_class=24, test_per_class=8, seed=0) -> ImageData:
    """28x28 'digits' 0-9: class c lights one of ten blocks (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(10).repeat_interleave(n)
        x = torch.rand(len(y), 1, 28, 28, generator=g) * 0.3
        for c in range(10):
            r, q = divmod(c, 5)
            x[y == c, :, 4 + 10 * r : 12 + 10 * r, 1 + 5 * q : 6 + 5 * q] += 0.7
        return x, y

    (trx, try_), (tex, tey) = make(per_class), make(test_per_class)
    return ImageData("mnist", "mnist", trx, try_, tex, tey, 10, "generated for tests")


@pytest.fixture
def tiny(monkeypatch, tmp_results):
    """A smoke configuration on generated data (no data set is read)."""
    data = mnist_like()
    monkeypatch.setattr(el, "load_data", lambda *a, **k: data)
    return el.EWCLambdaConfig.for_profile("smoke", offline=True, batch_size=16, train_per_task=0)


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(grid=(0.0, -1.0, 2.0)), "grid"),
        (dict(grid=(0.5, 1.0, 2.0)), "grid"),
        (dict(grid=(0.0, 1.0)), "grid"),
        (dict(search_low=(5.0, 1.0)), "search_low"),
        (dict(search_low=(0.0, 30.0)), "search_low"),
        (dict(search_high=(-1.0, 3.0)), "search_high"),
        (dict(num_steps=1), "num_steps"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=-2.0), "threshold"),
        (dict(threshold=25.0), "threshold"),  # no trial could ever train: an endless search
        (dict(search_measure="fisher"), "search_measure"),
        (dict(measures=("fisher_true", "ewc")), "measures"),
        (dict(measures=()), "measures"),
        (dict(task_classes=((0, 1, 2), (2, 3))), "task_classes"),
        (dict(task_classes=((0, 1, 2), ())), "task_classes"),
        (dict(task_classes=((0, 1, 2),)), "task_classes"),
        (dict(task_classes=((0, 1), (9, 10))), "task_classes"),
        (dict(noise="common"), "noise"),
        (dict(fisher_method="fast"), "fisher_method"),
        (dict(trials=-1), "trials"),
        (dict(gamma=2.0), "gamma"),
        (dict(unknown=1), "unknown"),
    ],
)
def test_bad_parameters_are_rejected_with_the_parameter_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        el.EWCLambdaConfig.for_profile("smoke", **kw)


def test_profiles_and_paper_defaults_are_the_source_protocol():
    paper = el.EWCLambdaConfig(profile="paper")
    assert paper.task_classes == ((0, 1, 2), (3, 4, 5))
    assert (paper.epochs, paper.batch_size, paper.lr) == (10, 32, 1e-3)
    assert (paper.channels, paper.dense) == ((32, 32, 64, 64), (32, 32))
    assert (paper.num_steps, paper.threshold, paper.search_high) == (20, 10.0, (10.0, 20.0))
    assert paper.trials >= 50
    quick = el.EWCLambdaConfig.for_profile("quick")
    assert quick.epochs < paper.epochs and quick.channels != paper.channels
    table = el.describe(quick)
    assert table.loc["epochs", "differs"] == "yes"


# ---------------------------------------------------------------------- model and measure


def test_conv_net_shapes_and_one_head_per_task():
    model = el.ConvNet((4, 4, 8, 8), (8, 8), 6, ModelStreams([0, 1, 2]).init)
    assert model(torch.rand(3, 5, 1, 28, 28)).shape == (3, 5, 6)
    assert [type(m).__name__ for m in model.hidden].count("BatchNorm") == 2
    names = [n for n, _ in shared_parameters(model)]
    assert "hidden.3.weight" in names and not any(n.startswith("head") for n in names)  # BatchNorm protected too


def test_patch_conv_equals_the_grouped_convolution_with_gradients():
    streams = ModelStreams([0, 1, 2])
    layer = el.PatchConv2d(2, 5, 3, streams.init, padding=1)
    x = torch.rand(3, 4, 2, 9, 9, requires_grad=True)
    gy = torch.rand(3, 4, 5, 9, 9)
    layer(x).backward(gy)
    got = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    y = Conv2d.forward(layer, x)
    y.backward(gy)
    torch.testing.assert_close(layer(x), y)
    for a, t in zip(got, (x, layer.weight, layer.bias), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)


def test_measure_is_the_sources_riemann_sum():
    """Against the source's own code: base_losses[: T*E - i*E, T - i] = 0, then sum."""
    rng = np.random.default_rng(0)
    for T, E in ((2, 3), (3, 2)):
        losses = rng.random((T * E, T))
        phase = np.repeat(np.arange(T), E)
        src = losses.copy()
        for i in range(1, T):
            src[: T * E - i * E, T - i] = 0
        assert el.lambda_measure(losses, phase) == pytest.approx(src.sum())
        assert el.lambda_measure(losses[None], phase)[0] == pytest.approx(src.sum())


def test_epoch_ends_follow_each_tasks_size():
    data = mnist_like()
    cfg = el.EWCLambdaConfig.for_profile("smoke", offline=True, batch_size=16, train_per_task=0, epochs=2)
    scen = el._scenario(cfg, data)
    scen.train_index[1] = scen.train_index[1][:40]  # unequal tasks: 72 and 40 samples
    steps, phase = el.epoch_ends(scen, 16, 2)
    assert steps == [4, 8, 10, 12] and phase == [0, 0, 1, 1]


def test_train_per_task_is_a_fixed_subset():
    cfg = el.EWCLambdaConfig.for_profile("smoke", offline=True, train_per_task=10)
    a, b = el._scenario(cfg, mnist_like()), el._scenario(cfg, mnist_like())
    assert [len(i) for i in a.train_index] == [10, 10]
    assert all(torch.equal(x, y) for x, y in zip(a.train_index, b.train_index, strict=True))


# ---------------------------------------------------------------------- training a grid


def test_common_random_numbers_and_the_many_models_invariant(tiny):
    """Lambda 0 ignores EWC; equal seeds give equal runs; model k equals a one-model run."""
    lams = [0.0, 0.0, 1.0, 0.0]
    seeds = [3, 3, 3, 4]
    res, prov = el.train_lambdas(tiny, "fisher_true", lams, seeds, seeds)
    assert res[0]["measure"] == pytest.approx(res[1]["measure"], rel=1e-6)
    assert res[0]["measure"] != res[3]["measure"]
    assert prov["data"]["used"] == "mnist"
    one, _ = el.train_lambdas(tiny, "fisher_true", [1.0], [3], [3])
    assert one[0]["measure"] == pytest.approx(res[2]["measure"], rel=1e-5)
    np.testing.assert_allclose(one[0]["epoch_loss"], res[2]["epoch_loss"], rtol=1e-4)
    # same base model, own data order (the source's noise): lambda 0 differs
    ind, _ = el.train_lambdas(tiny, "fisher_true", [0.0, 0.0], [3, 3], [3, 5])
    assert ind[0]["measure"] == pytest.approx(res[0]["measure"], rel=1e-5)
    assert ind[1]["measure"] != ind[0]["measure"]
    r = res[0]
    assert np.array(r["epoch_loss"]).shape == (2, 2) and r["phase"] == [0, 1]
    assert r["measure"] == pytest.approx(el.lambda_measure(np.array(r["epoch_loss"]), np.array(r["phase"])))
    assert -1 <= r["bwt"] <= 1 and 0 <= r["average_accuracy"] <= 1


# ---------------------------------------------------------------------- the search (fast fake training)


def _fake_training(calls, interrupt_after=None):
    def fake(cfg, measure, lambdas, init_seeds, data_seeds):
        calls.append(list(lambdas))
        if interrupt_after is not None and len(calls) > interrupt_after:
            raise KeyboardInterrupt
        out = []
        for lam, _s, d in zip(lambdas, init_seeds, data_seeds, strict=True):
            noise = (d % 1000) / 1000
            out.append(
                {
                    "measure": (lam - 7.3) ** 2 / 10 + 3 + noise,
                    "average_accuracy": 0.9,
                    "bwt": -0.05,
                    "epoch_loss": [[1.0, 2.0], [0.5, 0.4]],
                    "epoch_acc": [[0.9, 0.1], [0.8, 0.9]],
                    "phase": [0, 1],
                    "seconds_per_model": 0.0,
                }
            )
        return out, {"data": {"label": "fake", "used": "mnist"}}

    return fake


def _reference_search(cfg, spec, index, measure_fn):
    """The source's loop, transcribed: the lambdas a trial evaluates, pass by pass."""
    tr = el._new_trial(cfg, spec, index)
    low, high, seen = tr.low, tr.high, []
    while high - low > spec.threshold:
        lams = np.linspace(low, high, spec.steps)
        values = [measure_fn(lam) for lam in lams]
        seen.append(list(lams))
        best = int(np.argmin(values))
        low, high = lams[max(best - 1, 0)], lams[min(best + 1, len(lams) - 1)]
    return seen


def test_recursive_search_matches_the_sources_loop(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(el, "train_lambdas", _fake_training(calls))
    spec = el.SearchSpec("weight_decay", (0.0, 1.0), (20.0, 40.0), 6, 1.0, 3, "crn", label="t")
    runs = el.search(tiny, spec, progress=False)
    for trial in range(3):
        seed = el.trial_seed(tiny, trial)
        want = _reference_search(tiny, spec, trial, lambda lam, s=seed: (lam - 7.3) ** 2 / 10 + 3 + (s % 1000) / 1000)
        got = runs[runs.trial == trial].groupby("pass").lam.apply(list).tolist()
        assert len(got) == len(want) >= 2
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w)
    best = el.best_lambdas(runs)
    assert np.all(np.abs(best.lam - 7.3) < 1.0)


def test_search_is_resumable_and_saves_every_finished_lambda(tiny, monkeypatch):
    spec = el.SearchSpec("weight_decay", (0.0, 0.0), (10.0, 10.0), 5, 1.0, 4, "independent", label="t")
    calls = []
    monkeypatch.setattr(el, "train_lambdas", _fake_training(calls, interrupt_after=1))
    partial = el.search(tiny, spec, progress=False)  # Ctrl-C during the second grid: no exception
    assert len(calls) == 2 and len(partial) == 5 * 4  # the first passes of all 4 trials finished
    calls.clear()
    monkeypatch.setattr(el, "train_lambdas", _fake_training(calls))
    full = el.search(tiny, spec, progress=False)
    assert sum(len(c) for c in calls) == len(full) - len(partial)  # only the missing lambdas ran
    calls.clear()
    again = el.search(tiny, spec, progress=False)
    assert calls == [] and len(again) == len(full)
    pd.testing.assert_frame_equal(
        again.drop(columns=["epoch_loss", "epoch_acc"]), full.drop(columns=["epoch_loss", "epoch_acc"])
    )


def test_until_interrupted_stops_cleanly(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(el, "train_lambdas", _fake_training(calls, interrupt_after=3))
    tiny = tiny.replace(models_per_run=10)
    spec = el.SearchSpec(
        "weight_decay", (0.0, 0.0), (10.0, 10.0), 5, 100.0, 0, "crn", 1, "t", (0.0, 1.0, 2.0, 4.0, 8.0)
    )
    runs = el.search(tiny, spec, progress=False)
    assert runs.trial.nunique() == 6 and len(runs) == 30  # 3 rounds of 2 trials, the 4th interrupted


def test_study_uses_one_fixed_grid_and_common_random_numbers(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(el, "train_lambdas", _fake_training(calls))
    cfg = tiny.replace(measures=("fisher_true", "weight_decay"), grid=(0.0, 1.0, 5.0, 7.0, 9.0), trials=4)
    runs = el.study(cfg, progress=False)
    assert set(map(tuple, runs[["importance", "noise"]].drop_duplicates().to_numpy())) == {
        ("fisher_true", "crn"),
        ("weight_decay", "crn"),
        ("fisher_true", "independent"),
    }
    for _, g in runs.groupby(["importance", "noise", "trial"]):
        assert g.lam.tolist() == [0.0, 1.0, 5.0, 7.0, 9.0]


# ---------------------------------------------------------------------- statistics


def _synthetic(trials=12, lams=(0.0, 1.0, 2.0, 4.0, 8.0), bump=(3.0, 1.0, 0.0, 0.6, 1.5), sd=0.2, seed=0, imp="a"):
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(trials):
        base = rng.normal(0, 3)  # large trial-to-trial noise, shared by all lambdas of the trial
        for lam, b in zip(lams, bump, strict=True):
            rows.append(
                {
                    "study": "s",
                    "importance": imp,
                    "noise": "crn",
                    "trial": t,
                    "pass": 0,
                    "lam": lam,
                    "measure": 10 + base + b + rng.normal(0, sd),
                    "average_accuracy": 0.9,
                    "bwt": -0.1,
                }
            )
    return pd.DataFrame(rows)


def test_paired_tests_find_the_minimum_under_large_trial_noise():
    runs = _synthetic()
    t = el.lambda_tests(runs).set_index("selection")
    assert t.loc["in-sample", "best λ"] == 2.0
    assert t.loc["in-sample", "p vs λ = 0"] < 1e-6
    assert t.loc["in-sample", "p vs left neighbour"] < 1e-4 and t.loc["in-sample", "p vs right neighbour"] < 1e-3
    assert t.loc["held-out", "trials tested"] == 6
    # unpaired, the trial noise (sd 3) would hide a 0.6 difference; paired it does not
    lams, M = el.measure_matrix(runs, "a", "crn")
    assert M.shape == (12, 5) and list(lams) == [0, 1, 2, 4, 8]


def test_variance_decomposition_splits_trials_lambdas_and_residual():
    T, L = 30, 4
    trial = np.arange(T)[:, None] * 1.0
    lam = np.array([0.0, 1.0, 0.0, -1.0])[None, :]
    v = el.variance_decomposition(trial + lam)
    assert v["residual (trial x lambda)"] == pytest.approx(0, abs=1e-12)
    want_trial = L * ((trial[:, 0] - trial.mean()) ** 2).sum()
    want_lam = T * (lam[0] ** 2).sum()
    assert v["between trials"] == pytest.approx(want_trial / (want_trial + want_lam))
    noisy = el.variance_decomposition(np.random.default_rng(0).normal(size=(T, L)))
    assert noisy["p (lambda)"] > 0.01 and sum(
        noisy[k] for k in ("between trials", "between lambdas", "residual (trial x lambda)")
    ) == pytest.approx(1)


def test_compare_measures_and_verdict_are_computed_from_the_numbers(monkeypatch):
    runs = pd.concat([_synthetic(imp="a"), _synthetic(imp="b", bump=(3.0, 2.0, 1.5, 1.2, 1.4))])
    table = el.compare_measures(runs)
    assert table.measure.tolist() == ["a", "b"]
    assert table.loc[1, "p (paired t)"] < 1e-3 and table.loc[1, "Δ vs a"] > 0
    monkeypatch.setitem(el.MEASURE_LABELS, "a", "A")
    monkeypatch.setitem(el.MEASURE_LABELS, "b", "B")
    text = el.verdict(runs, runs.iloc[:0])
    assert "**A**" in text and "significant" in text and "Best importance measure" in text
    assert text.count("Variance of the measure") == 2 and "among λ > 0 only" in text
    var = el.variance_table(runs)
    assert set(var.lambdas) == {"all λ", "λ > 0"} and set(var["n λ"]) == {5, 4}


def test_source_comparison_table(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(el, "train_lambdas", _fake_training(calls))
    spec = el.SearchSpec("fisher_true", (0.0, 0.0), (10.0, 20.0), 5, 10.0, 2, "independent", label="source search")
    table = el.source_comparison(el.search(tiny, spec, progress=False))
    assert table.loc["trials", "this run"] == "2" and table.loc["trials", "source (stored data)"] == "17"


def test_bounds_are_drawn_per_trial_and_reproducible(tiny):
    spec = el.SearchSpec("fisher_true", (0.0, 2.0), (10.0, 20.0), 5, 1.0, 3, "crn")
    a = [el._new_trial(tiny, spec, i) for i in range(3)]
    b = [el._new_trial(tiny, spec, i) for i in range(3)]
    assert [(t.low, t.high) for t in a] == [(t.low, t.high) for t in b]
    assert len({t.high for t in a}) == 3 and all(0 <= t.low <= 2 and 10 <= t.high <= 20 for t in a)
    assert len(set(itertools.chain.from_iterable((t.seed,) for t in a))) == 3
