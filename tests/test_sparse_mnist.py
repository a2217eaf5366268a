"""Notebook 01's experiment module: configuration, models, and a tiny cached end-to-end run."""

import numpy as np
import pytest
import torch

from clx_core.config import ConfigError
from clx_core.experiments import sparse_mnist as sm
from clx_core.models import Dropout
from clx_core.rng import ModelStreams
from clx_core.sparse import KWinners, KWinners2d, SparseWeights, SparseWeights2d


def test_paper_profile_is_the_source_old_protocol():
    cfg = sm.SparseConfig.for_profile("paper")
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.1, 0.9, True, 1e-4)
    assert (cfg.epochs, cfg.first_epochs, cfg.batch_size, cfg.dropout) == (2, 2, 128, 0.5)
    assert (cfg.hidden_units, cfg.percent_on_mlp, cfg.percent_on_cnn) == (4000, 0.001, 0.05)
    assert (cfg.cnn_channels, cfg.cnn_hidden, cfg.boost_strength) == ((64, 128), 512, 1.0)
    assert cfg.permuted_tasks == 10 and cfg.seeds >= 5
    quick = sm.SparseConfig.for_profile("quick")
    assert quick.seeds >= 5  # the headline needs >= 5 seeds at every real profile
    assert "hidden_units" in sm.describe(quick).query("differs == 'yes'").index


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(benchmarks=("permuted", "imagenet")), "'benchmarks' = 'imagenet'"),
        (dict(benchmarks=("split",)), "'benchmarks'.*must include 'permuted'"),
        (dict(percent_on_mlp=1.2), r"'percent_on' = 1.2.*\(0, 1\)"),
        (dict(percent_on_mlp=0.0), r"'percent_on' = 0.0"),
        (dict(percent_on_mlp=0.001), "0 winners"),  # 64 smoke units: round(0.064) = 0
        (dict(percent_on_cnn=0.6, k_inference_factor=2.0), r"percent_on \* k_inference_factor"),
        (dict(weight_density_mlp=0.0), r"'weight_density_mlp' = 0.0.*\(0, 1\]"),
        (dict(weight_density_conv=1.5), r"'weight_density_conv' = 1.5"),
        (dict(sweep_density=(0.5, 2.0)), r"'sweep_density' = 2.0"),
        (dict(boost_strength=-0.5), "'boost_strength' = -0.5.*>= 0"),
        (dict(cnn_lr=-0.1), "'cnn_lr' = -0.1"),
        (dict(headline_archs=("mlp3",)), "'headline_archs' = 'mlp3'"),
        (dict(data="cifar100"), "'data' = 'cifar100'"),
        (dict(seeds=0), "'seeds' = 0"),
        (dict(percent_on=0.1), "'percent_on' = 0.1.*unknown parameter"),
    ],
)
def test_bad_values_name_parameter_value_and_range(kw, match):
    with pytest.raises(ConfigError, match=match):
        sm.SparseConfig.for_profile("smoke", **kw)


def _unit(cfg, bench, arch, variant):
    return sm._unit(cfg, bench, arch, variant, 0)


@pytest.mark.parametrize("arch", ["mlp1", "mlp2"])
def test_mlp_architectures(arch):
    cfg = sm.SparseConfig.for_profile("smoke")
    streams = ModelStreams([0, 1])
    dense = sm.build_model(_unit(cfg, "permuted", arch, "dense"), (1, 28, 28), 10, streams)
    sparse = sm.build_model(_unit(cfg, "permuted", arch, "sparse"), (1, 28, 28), 10, streams)
    layers = 1 if arch == "mlp1" else 2
    kinds = [type(m).__name__ for m in sparse.hidden]
    assert kinds == ["Flatten"] + ["SparseWeights", "KWinners", "Dropout"] * layers  # no ReLU
    assert [type(m).__name__ for m in dense.hidden] == ["Flatten"] + ["Linear", "ReLU", "Dropout"] * layers
    kw = [m for m in sparse.modules() if isinstance(m, KWinners)]
    assert all(m.k == 4 and m.boost_strength == 1.0 for m in kw)  # round(64 * 0.0625)
    sw = [m for m in sparse.modules() if isinstance(m, SparseWeights)]
    assert all(m.weight_density == cfg.weight_density_mlp for m in sw)
    x = torch.rand(2, 5, 1, 28, 28)
    assert sparse(x).shape == dense(x).shape == (2, 5, 10)


def test_cnn_architecture_on_32x32():
    cfg = sm.SparseConfig.for_profile("smoke")
    streams = ModelStreams([0])
    sparse = sm.build_model(_unit(cfg, "cifar", "cnn", "sparse"), (3, 32, 32), 4, streams)
    kinds = [type(m).__name__ for m in sparse.hidden]
    assert kinds == [
        *("SparseWeights2d", "ReLU", "KWinners2d", "Dropout"),
        *("SparseWeights2d", "ReLU", "KWinners2d", "Dropout"),
        *("Flatten", "SparseWeights", "ReLU", "KWinners", "Dropout"),
    ]
    fc = next(m for m in sparse.hidden if isinstance(m, SparseWeights))
    assert fc.module.in_features == cfg.cnn_channels[-1] * 24 * 24  # 32 -> 28 -> 24, no padding or pooling
    assert all(m.local for m in sparse.modules() if isinstance(m, KWinners2d))
    convs = [m for m in sparse.modules() if isinstance(m, SparseWeights2d)]
    assert all(m.weight_density == cfg.weight_density_conv for m in convs)
    dense = sm.build_model(_unit(cfg, "cifar", "cnn", "dense"), (3, 32, 32), 4, streams)
    assert not any(isinstance(m, (KWinners, KWinners2d, SparseWeights)) for m in dense.modules())
    assert sum(isinstance(m, Dropout) for m in dense.modules()) == 3
    x = torch.rand(1, 3, 3, 32, 32)
    assert sparse(x).shape == dense(x).shape == (1, 3, 4)


def test_offline_cifar_stand_in_adapts_the_split():
    cfg = sm.SparseConfig.for_profile("smoke", offline=True)
    tasks, per_task, note = sm.cifar_split(cfg)
    assert per_task == 2 and tasks == 2 and "10 classes" in note  # smoke: 2 of the 5 possible tasks
    full = sm.SparseConfig.for_profile("paper", offline=True)
    assert sm.cifar_split(full)[:2] == (5, 2)


def test_tiny_end_to_end_run_is_cached_and_reported(tmp_results):
    cfg = sm.SparseConfig.for_profile(
        "smoke",
        offline=True,
        benchmarks=("permuted", "split"),
        headline_archs=("mlp1",),
        permuted_tasks=2,
        hidden_units=32,
        percent_on_mlp=0.125,
        train_samples=128,
        test_samples=64,
        profile_samples=64,
        seeds=2,
        cumulative_seeds=1,
        sweep_percent_on=(0.125,),
        sweep_density=(0.5, 1.0),
    )
    runs = sm.benchmark_runs(cfg)
    assert set(runs.variant) == {"dense", "sparse", "cumulative"}
    assert len(runs) == 2 * (2 + 2 + 1)  # benchmarks x (dense, sparse seeds + cumulative seed)
    assert "offline stand-in for MNIST" in runs.data.iloc[0]["label"]
    row = runs[(runs.benchmark == "permuted") & (runs.variant == "sparse")].iloc[0]
    assert row.acc.shape == (2, 2) and len(row.active_epoch) == 2 * 2  # epochs x tasks
    assert row.active_eval == pytest.approx(4 / 32, abs=0.01)  # k = 4 winners of 32
    assert row.overlap_shared.shape == (2, 2)
    head = sm.headline_table(runs)
    assert head.loc["MLP, 1 hidden layer", "source sparse"] == "86.63"
    assert {"dense % [95% CI]", "sparse % [95% CI]", "p (paired t)"} <= set(head.columns)
    assert len(sm.benchmark_table(runs)) == 6 and len(sm.overlap_table(runs)) == 2
    sw = sm.sweep(cfg)  # the dense seeds and the headline's sparse setting come from the cache
    assert sm.sweep_grid(sw).shape == (1, 2)
    text = sm.verdict(runs, sw)
    assert "source's +20.96" in text and "Sweep" in text
    assert "permuted mlp1 sparse" in " ".join(sm.key_numbers(runs).split())
    again = sm.benchmark_runs(cfg)  # everything cached: same numbers
    np.testing.assert_allclose(again.average_accuracy, runs.average_accuracy)
    assert not runs.diverged.any() and "diverged" not in text
    broken = cfg.replace(lr=1e30, seeds=1)
    bad = sm.benchmark_runs(broken)  # a learning rate no net survives: flagged, not silently averaged
    assert bad[bad.variant == "dense"].diverged.all()
    assert "diverged" in sm.verdict(bad) and sm.benchmark_table(bad)["diverged (non-finite loss)"].sum() >= 2
