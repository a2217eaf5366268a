"""k-winners, sparse weights and their training-loop hooks against hand computations."""

import math

import numpy as np
import pytest
import torch

from clx_core import scenarios
from clx_core.config import ConfigError
from clx_core.models import MLP, Conv2d, Linear
from clx_core.rng import ModelStreams
from clx_core.sparse import (
    ActivityStats,
    KeepSparse,
    KWinners,
    KWinners2d,
    SparseWeights,
    SparseWeights2d,
    code_overlap,
    off_diagonal_mean,
    sparse_layers,
)
from clx_core.train import Schedule, train
from tests.test_models_train import toy_data

# ---------------------------------------------------------------------- k-winners


def test_winners_count_in_training_and_evaluation():
    kw = KWinners(50, 0.1, k_inference_factor=1.5, boost_strength=0.0, n_models=3)
    assert (kw.k, kw.k_inference) == (5, 7)  # round(50 * 0.1), int(5 * 1.5)
    x = torch.randn(3, 16, 50)
    assert ((kw(x) != 0).sum(-1) == 5).all()
    kw.eval()
    assert ((kw(x) != 0).sum(-1) == 7).all()


def test_k_uses_round_and_inference_uses_int():
    kw = KWinners(30, 0.05, k_inference_factor=1.9)  # 1.5 -> round half to even = 2; int(3.8) = 3
    assert (kw.k, kw.k_inference) == (2, 3)


def test_winners_are_the_largest_and_keep_raw_values_without_boosting():
    kw = KWinners(6, 0.5, boost_strength=0.0)
    x = torch.tensor([[[0.3, -2.0, 5.0, -0.1, 1.0, -0.5]]])
    y = kw(x)
    torch.testing.assert_close(y, torch.tensor([[[0.3, 0.0, 5.0, 0.0, 1.0, 0.0]]]))


def test_negative_winners_pass_no_relu():
    kw = KWinners(4, 0.5, boost_strength=0.0)
    y = kw(torch.tensor([[[-1.0, -3.0, -0.5, -2.0]]]))
    torch.testing.assert_close(y, torch.tensor([[[-1.0, 0.0, -0.5, 0.0]]]))


def test_boosting_picks_on_boosted_values_but_outputs_unboosted():
    kw = KWinners(4, 0.5, boost_strength=2.0)
    kw.eval()  # no duty-cycle update: the duty cycle stays as set
    kw.duty_cycle.copy_(torch.tensor([[0.9, 0.9, 0.0, 0.0]]))  # units 0, 1 were active a lot
    x = torch.tensor([[[1.0, 0.9, 0.5, 0.4]]])
    # boosted = x * exp((0.5 - dc) * 2): [0.45, 0.40, 1.36, 1.09] -> units 2 and 3 win
    boosted = x * torch.exp((0.5 - kw.duty_cycle) * 2.0)
    assert boosted[0, 0].topk(2).indices.sort().values.tolist() == [2, 3]
    torch.testing.assert_close(kw(x), torch.tensor([[[0.0, 0.0, 0.5, 0.4]]]))
    kw.boost_strength = 0.0
    torch.testing.assert_close(kw(x), torch.tensor([[[1.0, 0.9, 0.0, 0.0]]]))


def test_gradient_flows_only_through_winners():
    kw = KWinners(8, 0.25, boost_strength=1.0, n_models=2)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = kw(x)
    (y * torch.arange(1.0, 9.0)).sum().backward()
    winners = y.detach() != 0
    assert (x.grad[~winners] == 0).all()
    torch.testing.assert_close(x.grad[winners], torch.arange(1.0, 9.0).expand(2, 5, 8)[winners])


def test_duty_cycle_arithmetic_against_hand_computation():
    n, period, B = 5, 10, 4
    kw = KWinners(n, 0.4, boost_strength=0.0, duty_cycle_period=period, n_models=2)
    g = torch.Generator().manual_seed(0)
    dc = np.zeros((2, n))
    iters = 0
    for _ in range(6):  # crosses the period: 4, 8, then min(10, 12) = 10, ...
        x = torch.randn(2, B, n, generator=g)
        y = kw(x)
        iters += B
        p = min(period, iters)
        active = (y > 0).sum(dim=1).numpy()  # counts positive winners only
        dc = (dc * (p - B) + active) / p
        np.testing.assert_allclose(kw.duty_cycle.numpy(), dc, rtol=1e-6, atol=1e-7)
    assert int(kw.learning_iterations) == 6 * B


def test_duty_cycle_frozen_in_evaluation():
    kw = KWinners(10, 0.2, n_models=1)
    kw(torch.randn(1, 8, 10))
    before = kw.duty_cycle.clone()
    kw.eval()
    kw(torch.randn(1, 8, 10))
    torch.testing.assert_close(kw.duty_cycle, before)
    assert int(kw.learning_iterations) == 8


def test_kwinners2d_local_per_position_and_duty_cycle_per_channel():
    K, B, C, H, W = 2, 3, 10, 4, 5
    kw = KWinners2d(C, 0.3, boost_strength=0.0, duty_cycle_period=100, local=True, n_models=K)
    x = torch.randn(K, B, C, H, W)
    y = kw(x)
    assert kw.k == 3
    assert ((y != 0).sum(dim=2) == 3).all()  # 3 channels win at every (h, w)
    ref = x.topk(3, dim=2).values.sum(dim=2)
    torch.testing.assert_close(y.sum(dim=2), ref)
    hand = (y > 0).sum(dim=(1, 3, 4)).float() / (H * W) / B  # first batch: period = B
    torch.testing.assert_close(kw.duty_cycle, hand)


def test_kwinners2d_global_over_the_whole_map():
    kw = KWinners2d(4, 0.1, k_inference_factor=2.0, boost_strength=0.0, local=False, n_models=2)
    x = torch.randn(2, 3, 4, 5, 5)
    y = kw(x)
    assert kw.k == 10 and kw.k_inference == 20  # round(100 * 0.1)
    assert ((y != 0).flatten(2).sum(-1) == 10).all()
    kw.eval()
    assert ((kw(x) != 0).flatten(2).sum(-1) == 20).all()


def test_kwinners2d_boosting_uses_channel_duty_cycle():
    kw = KWinners2d(2, 0.5, boost_strength=3.0, local=True)
    kw.eval()
    kw.duty_cycle.copy_(torch.tensor([[1.0, 0.0]]))
    x = torch.zeros(1, 1, 2, 1, 1)
    x[0, 0, 0], x[0, 0, 1] = 1.0, 0.5  # boosted: 1 * e^-1.5 = 0.22 < 0.5 * e^1.5 = 2.24
    y = kw(x)
    assert y[0, 0, 0].item() == 0 and y[0, 0, 1].item() == 0.5


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(percent_on=0.0), "'percent_on' = 0.0"),
        (dict(percent_on=1.0), "'percent_on' = 1.0"),
        (dict(percent_on=-0.2), r"must lie in \(0, 1\)"),
        (dict(percent_on=0.5, k_inference_factor=2.0), r"'k_inference_factor' = 2.0.*\(0, 1\)"),
        (dict(boost_strength=-1.0), "'boost_strength' = -1.0.*>= 0"),
        (dict(boost_strength_factor=1.5), r"'boost_strength_factor' = 1.5.*\[0, 1\]"),
        (dict(duty_cycle_period=0), "'duty_cycle_period' = 0"),
        (dict(percent_on=0.001), "0 winners"),
    ],
)
def test_kwinners_rejects_bad_parameters(kw, match):
    args = dict(percent_on=0.1, k_inference_factor=1.0, boost_strength=1.0, boost_strength_factor=1.0)
    args.update(kw)
    with pytest.raises(ConfigError, match=match):
        KWinners(100, **args)


# ---------------------------------------------------------------------- sparse weights


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 1.0])
def test_linear_mask_fan_in_counts(density):
    gens = ModelStreams([0, 1, 2]).init
    layer = SparseWeights(Linear(40, 7, gens), density, gens)
    zeros = round((1 - density) * 40)
    assert layer.zeros_per_unit == zeros
    assert ((layer.module.weight == 0).sum(dim=1) == zeros).all()  # per model, per output unit
    assert (layer.mask.sum(dim=1) == 40 - zeros).all()
    if 0 < zeros < 40:
        assert not torch.equal(layer.mask[0], layer.mask[1])  # every model draws its own mask


def test_conv_mask_fan_in_counts_per_output_channel():
    gens = ModelStreams([0, 1]).init
    layer = SparseWeights2d(Conv2d(3, 6, 5, gens), 0.2, gens)
    fan_in = 3 * 5 * 5
    zeros = round(0.8 * fan_in)
    assert layer.fan_in == fan_in
    assert ((layer.module.weight == 0).flatten(2).sum(-1) == zeros).all()


def test_mask_of_model_k_equals_single_model_with_seed_k():
    many = ModelStreams([4, 9]).init
    one = ModelStreams([9]).init
    a = SparseWeights(Linear(30, 5, many), 0.3, many)
    b = SparseWeights(Linear(30, 5, one), 0.3, one)
    torch.testing.assert_close(a.mask[1], b.mask[0])
    torch.testing.assert_close(a.module.weight[1], b.module.weight[0])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_range_is_rejected(density):
    gens = ModelStreams([0]).init
    with pytest.raises(ConfigError, match=r"'weight_density' = .*\(0, 1\]"):
        SparseWeights(Linear(10, 3, gens), density, gens)


# ---------------------------------------------------------------------- in the training loop


def _sparse_mlp(seeds, density=0.3, percent_on=0.25, dropout=0.0, boost_factor=1.0):
    streams = ModelStreams(seeds)
    K = len(seeds)
    model = MLP(
        64,
        (32, 16),
        4,
        streams.init,
        activation=lambda h: KWinners(h, percent_on, 1.0, 1.0, boost_factor, n_models=K),
        dropout=dropout,
        dropout_gens=streams.method,
        layer=lambda i, o, g: SparseWeights(Linear(i, o, g), density, g),
    )
    return model, streams


def _fit(model, streams, methods, epochs=2, on_eval=None):
    scen = scenarios.split(toy_data(), "task", classes_per_task=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = Schedule(batch_size=32, epochs=epochs, eval_every=5, eval_samples=50)
    return train(model, opt, scen, sched, streams, methods=methods, progress_bar=False, on_eval=on_eval)


def test_masked_weights_stay_exactly_zero_through_training_and_evaluation():
    model, streams = _sparse_mlp([0, 1])
    masks = [layer.mask.clone() for layer in sparse_layers(model)]
    checked = []

    def on_eval(run, acc, loss):  # every evaluation sees exactly-zero masked weights
        for layer, m in zip(sparse_layers(run.model), masks, strict=True):
            assert (layer.module.weight[~m] == 0).all()
        checked.append(run.step)

    hist = _fit(model, streams, [KeepSparse()], on_eval=on_eval)
    assert hist.steps >= 30 and len(checked) == hist.steps // 5
    for layer, m in zip(sparse_layers(model), masks, strict=True):
        torch.testing.assert_close(layer.mask, m)  # the mask never changes
        assert (layer.module.weight[~m] == 0).all()
        assert (layer.module.weight[m] != 0).float().mean() > 0.99  # the others learn


def test_without_rezeroing_masked_weights_leak():
    """Why KeepSparse exists: momentum and gradients move the masked weights."""
    model, streams = _sparse_mlp([0])
    _fit(model, streams, [])
    leaked = [(layer.module.weight[~layer.mask] != 0).float().mean() for layer in sparse_layers(model)]
    assert all(v > 0.2 for v in leaked)  # (units that never win get no gradient: their weights stay put)


def test_boost_strength_decays_once_per_epoch():
    model, streams = _sparse_mlp([0], boost_factor=0.5)
    hist = _fit(model, streams, [KeepSparse()], epochs=3)
    scen_tasks = 2
    for layer in model.modules():
        if isinstance(layer, KWinners):
            assert layer.boost_strength == pytest.approx(0.5 ** (3 * scen_tasks))
    assert hist.acc.shape == (1, 2, 2)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_model_k_of_many_equals_single_run(arch):
    """Model k of a K-model sparse run = a one-model run with seed k (weights, duty cycles, metrics)."""
    from clx_core.experiments.sparse_mnist import CNN, Sparsity

    def build(seeds):
        if arch == "mlp":
            return _sparse_mlp(seeds, dropout=0.5)
        streams = ModelStreams(seeds)
        sp = Sparsity(percent_on=0.3, weight_density=0.5, weight_density_conv=0.6)
        return CNN((1, 8, 8), (3,), 8, 4, streams, 0.5, sp), streams  # toy images are 8x8

    seeds = [3, 7, 11]
    many, s_many = build(seeds)
    h_many = _fit(many, s_many, [KeepSparse()], epochs=1)
    for k, s in enumerate(seeds):
        one, s_one = build([s])
        h_one = _fit(one, s_one, [KeepSparse()], epochs=1)
        for (name, a), (_, b) in zip(many.state_dict().items(), one.state_dict().items(), strict=True):
            if a.ndim == 0:  # shared scalar counters (learning_iterations)
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(a[k].float(), b[0].float(), rtol=1e-4, atol=1e-5, msg=name)
        np.testing.assert_allclose(h_many.acc[k], h_one.acc[0], atol=1e-6)


def test_activity_stats_per_epoch_and_task_profiles():
    model, streams = _sparse_mlp([0, 1], percent_on=0.25)  # last hidden layer: 4 of 16 units, no dropout
    stats = ActivityStats(lambda m, x: m.hidden(x), profile_samples=40)
    _fit(model, streams, [KeepSparse(), stats], epochs=2)
    assert len(stats.epoch_active) == 2 * 2  # epochs x tasks
    for mean, std in stats.epoch_active:
        # exactly 4 of 16 units are winners; a winner is zero only by accident
        assert mean.shape == (2,) and np.all(mean <= 25.0 + 1e-4) and np.all(mean > 20.0)
        assert np.all(std >= 0)
    prof = stats.profiles()
    assert prof.shape == (2, 2, 16)
    np.testing.assert_allclose(prof.sum(-1), 4.0, atol=0.2)  # eval mode: k winners per image


def test_code_overlap_hand_examples():
    uniform = np.full((3, 100), 0.1)  # every unit active on 10% of images: as random
    ov = code_overlap(uniform)
    np.testing.assert_allclose(ov["ratio"], 1.0)
    np.testing.assert_allclose(ov["chance"], 0.1)
    disjoint = np.zeros((2, 100))
    disjoint[0, :10], disjoint[1, 10:20] = 1.0, 1.0  # each task always uses its own 10 units
    ov = code_overlap(disjoint)
    assert ov["shared"][0, 1] == 0 and ov["shared"][0, 0] == pytest.approx(1.0)
    assert ov["ratio"][0, 0] == pytest.approx(10.0)  # same units every time: 10x chance
    assert off_diagonal_mean(ov["ratio"]) == 0
    same = np.zeros((2, 100))
    same[:, :10] = 1.0
    assert code_overlap(same)["ratio"][0, 1] == pytest.approx(10.0)
    assert math.isnan(off_diagonal_mean(np.ones((1, 1))))
