"""EWC, its importance measures, SI and MAS, and the per-sample gradient engines."""

import math

import numpy as np
import pytest
import torch

from clx_core import scenarios
from clx_core.config import ConfigError
from clx_core.data import ImageData
from clx_core.experiments.ewc_lambda import ConvNet
from clx_core.models import MLP, BatchNorm, shared_parameters
from clx_core.regularizers import (
    EWC,
    MAS,
    SI,
    Fisher,
    MomentumBased,
    SignFlipping,
    UnsupportedLayerError,
    WeightChange,
    make_importance,
    normalize_importance,
    per_sample_grad_stats,
    sample_losses,
)
from clx_core.rng import ModelStreams
from clx_core.train import Run, Schedule, train

ENGINES = ["vmap", "closed_form", "backpack"]


def conv_model(seeds=(0, 1), n_outputs=6):
    """A small ConvNet in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(0)
    model = ConvNet((3, 3, 4, 4), (8, 8), n_outputs, ModelStreams(list(seeds)).init)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _inputs(K=2, n=7, image=(1, 28, 28)):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(K, n, *image, generator=g)
    y = torch.randint(0, 3, (K, n), generator=g)
    active = torch.zeros(6, dtype=torch.bool)
    active[:3] = True
    return x, y, active


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduce", ["square", "abs"])
@pytest.mark.parametrize("kind", ["nll", "sqnorm"])
def test_engines_equal_the_naive_loop_on_the_conv_model(engine, reduce, kind):
    if engine == "backpack":
        pytest.importorskip("backpack")
    model = conv_model()
    x, y, active = _inputs()
    ref = per_sample_grad_stats(model, x, y, kind=kind, active=active, reduce=reduce, method="naive")
    got = per_sample_grad_stats(model, x, y, kind=kind, active=active, reduce=reduce, method=engine, chunk=3)
    assert len(got) == len(shared_parameters(model))
    for (name, _), a, b in zip(shared_parameters(model), got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()), msg=name)


def test_naive_loop_is_a_sum_of_explicit_per_sample_gradients():
    """The reference itself: one model, one sample at a time, plain autograd."""
    model = conv_model(seeds=(3,))
    x, y, active = _inputs(K=1, n=4)
    params = [p for _, p in shared_parameters(model)]
    want = [torch.zeros_like(p) for p in params]
    for i in range(4):
        loss = sample_losses(model(x[:, i : i + 1]), y[:, i : i + 1], active, "nll").sum()
        for w, g in zip(want, torch.autograd.grad(loss, params), strict=True):
            w += g.square()
    got = per_sample_grad_stats(model, x, y, active=active, method="naive")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_linear_closed_form_is_the_outer_product_formula():
    """For y = x W: sum_b (a_b delta_b^T)^2 = (a^2)^T (delta^2); checked on an MLP head."""
    model = MLP(5, (4,), 3, ModelStreams([0]).init)
    x = torch.randn(1, 6, 5)
    y = torch.randint(0, 3, (1, 6))
    params = lambda m: [("head.weight", m.head.weight)]  # noqa: E731
    got = per_sample_grad_stats(model, x, y, method="closed_form", params=params)[0]
    a = model.hidden(x)[0]  # (6, 4)
    p = torch.softmax(model(x)[0], -1)
    delta = p - torch.nn.functional.one_hot(y[0], 3)  # d(-log p_y)/d logits
    torch.testing.assert_close(got[0], (a.square().T @ delta.square()).detach())


def test_closed_form_rejects_parameters_it_cannot_handle():
    model = conv_model()
    extra = torch.nn.Parameter(torch.ones(2, 3))
    x, y, active = _inputs()
    with pytest.raises(UnsupportedLayerError):
        per_sample_grad_stats(model, x, y, active=active, params=lambda m: [("extra", extra)])


# ---------------------------------------------------------------------- toy continual-learning runs


def toy_data(n_train=240, n_test=60, classes=4, seed=0) -> ImageData:
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % classes
        x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
        for c in range(classes):
            r, q = divmod(c, 2)
            x[y == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 0.7
        return x, y

    (trx, try_), (tex, tey) = make(n_train), make(n_test)
    return ImageData("toy", "toy", trx, try_, tex, tey, classes, "generated")


def _run(model, seeds, data=None, task=0):
    scen = scenarios.split(data or toy_data(), "task", classes_per_task=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Run(model, opt, scen, ModelStreams(seeds), Schedule(batch_size=8, iters=5), task=task)


def _fit(seeds, methods, steps=20, n_tasks_classes=2, lr=0.05):
    data = toy_data(classes=2 * n_tasks_classes)
    scen = scenarios.split(data, "task", classes_per_task=2)
    streams = ModelStreams(seeds)
    model = MLP(64, (16,), scen.n_outputs, streams.init)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    hist = train(model, opt, scen, Schedule(batch_size=8, iters=steps), streams, methods=methods, progress_bar=False)
    return model, hist


def test_empirical_fisher_is_the_mean_squared_per_sample_gradient_with_data_labels():
    model = MLP(64, (16,), 4, ModelStreams([0, 1]).init)
    run = _run(model, [0, 1])
    params = shared_parameters(model)
    got = Fisher(true=False).compute(run, params)
    batch = run.scenario.batch("train", 0, run.scenario.train_index[0].expand(2, -1), 0)
    want = per_sample_grad_stats(model, batch.x, batch.y, active=batch.active, method="naive")
    n = batch.x.shape[1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b / n)


def test_true_fisher_samples_labels_from_the_model_and_estimates_the_expectation():
    """One image repeated many times: the Monte-Carlo true Fisher -> sum_y p(y|x) g(x,y)^2."""
    base = toy_data(n_train=4, classes=2)
    x = base.train_x[:1].expand(3000, -1, -1, -1).clone()
    data = ImageData("toy", "toy", x, torch.zeros(3000, dtype=torch.long), x[:2], torch.zeros(2).long(), 2, "gen")
    model = MLP(64, (16,), 2, ModelStreams([5]).init)
    with torch.no_grad():
        model.head.weight.mul_(4)  # a confident but not certain prediction
    scen = scenarios.split(data, "task", task_classes=[[0, 1]])
    run = Run(model, torch.optim.SGD(model.parameters(), lr=0.1), scen, ModelStreams([5]), Schedule(iters=1))
    params = shared_parameters(model)
    got = Fisher(true=True).compute(run, params)
    xs = x[:1].unsqueeze(0)
    probs = torch.softmax(model(xs)[0, 0], -1).detach()
    assert 0.05 < probs.min() < 0.45
    want = [torch.zeros_like(p) for _, p in params]
    for label in (0, 1):
        g = per_sample_grad_stats(model, xs, torch.tensor([[label]]), method="naive")
        for w, s in zip(want, g, strict=True):
            w += probs[label] * s
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0.08, atol=1e-4 * float(b.abs().max()))
    empirical = Fisher(true=False).compute(run, params)  # all labels 0: a different number
    assert not torch.allclose(empirical[0], got[0], rtol=0.05)


def test_true_fisher_draws_per_model_labels_from_the_method_streams():
    """Models sharing a seed draw the same labels (common random numbers); others differ."""
    model = MLP(64, (16,), 4, ModelStreams([0, 0, 1]).init)
    run = _run(model, [0, 0, 1])
    omega = Fisher(true=True).compute(run, shared_parameters(model))[0]
    torch.testing.assert_close(omega[0], omega[1])
    assert not torch.allclose(omega[0], omega[2])


def test_fisher_subsample_and_model_mode_are_restored():
    model = conv_model(n_outputs=4)
    model.train()
    data = toy_data()
    big = ImageData(
        "toy", "toy", torch.nn.functional.pad(data.train_x, (10, 10, 10, 10)), data.train_y, data.test_x,
        data.test_y, 4, "gen",
    )  # fmt: skip
    run = _run(model, [0, 1], data=big)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    omega = Fisher(true=True, samples=16).compute(run, shared_parameters(model))
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)  # BatchNorm statistics untouched (eval mode)
    assert all(torch.isfinite(o).all() and (o >= 0).all() for o in omega)


def test_mas_is_mean_abs_gradient_of_squared_output_norm():
    """Head-only check against the formula: d||W^T a||^2 / dW_ij = 2 a_i f_j."""
    model = MLP(64, (16,), 4, ModelStreams([2]).init)
    run = _run(model, [2])
    params = [("head.weight", model.head.weight)]
    got = MAS().compute(run, params)[0][0]
    batch = run.scenario.batch("train", 0, run.scenario.train_index[0].unsqueeze(0), 0)
    a = model.hidden(batch.x)[0].detach()
    f = model(batch.x)[0].detach() * batch.active
    want = (2 * a.unsqueeze(2) * f.unsqueeze(1)).abs().mean(0)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------- trackers


class _Param:
    """Feed a tracker a hand-written weight trajectory through in-place updates (as optimizers do)."""

    def __init__(self, tracker, start):
        self.p = torch.nn.Parameter(torch.tensor([[float(start)]]))
        self.params = [("w", self.p)]
        self.tracker = tracker
        tracker.start(None, self.params)

    def step(self, value):
        with torch.no_grad():
            self.p.copy_(torch.tensor([[float(value)]]))
        self.tracker.after_step(None, self.params)

    def omega(self):
        return float(self.tracker.compute(None, self.params)[0])


def test_sign_flipping_counts_sign_changes_of_the_values():
    t = _Param(SignFlipping(), 1.0)
    for v in (-1.0, -2.0, 0.5, 0.7):  # flips: + -> -, - -> +
        t.step(v)
    assert t.omega() == pytest.approx(1 / 3)


def test_momentum_based_counts_update_reversals():
    t = _Param(MomentumBased(), 0.0)
    for v in (1.0, 2.0, 1.0, 3.0, 3.5):  # steps +1 +1 -1 +2 +0.5: two reversals
        t.step(v)
    assert t.omega() == pytest.approx(1 / 3)


def test_weight_change_sums_the_distance_travelled():
    t = _Param(WeightChange(), 0.0)
    for v in (1.0, 2.0, 1.0, 3.0):  # |steps| = 1 + 1 + 1 + 2
        t.step(v)
    assert t.omega() == pytest.approx(1 / 6)


def test_trackers_do_not_collapse_to_weight_decay_in_a_real_run():
    """The source's bug (references instead of copies) gave Omega = 1 everywhere."""
    for name in ("sign_flipping", "momentum_based", "weight_change"):
        ewc = EWC(name, 1.0)
        _fit([0], [ewc], steps=30)
        omega = torch.cat([o.flatten() for o in ewc.terms[0][0]])
        assert (omega < 1).any() and omega.min() > 0, name


# ---------------------------------------------------------------------- SI


def test_si_path_integral_on_known_steps():
    """omega = -sum g * delta; Omega = omega / (total change^2 + xi)."""
    si = SI(1.0, xi=0.5, params=lambda m: [("w", m.w)])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[1.0]]))

    class R:
        model = M()
        device = torch.device("cpu")

    run = R()
    si.before_task(run)
    w = run.model.w
    total = 0.0
    for g, new in ((2.0, 0.8), (-1.0, 0.9), (4.0, 0.5)):
        w.grad = torch.tensor([[g]])
        si.after_backward(run)
        old = w.item()
        with torch.no_grad():
            w.fill_(new)
        si.after_step(run)
        total += -g * (new - old)
    si.after_task(run)
    assert float(si.omega[0]) == pytest.approx(total / ((0.5 - 1.0) ** 2 + 0.5))
    torch.testing.assert_close(si.anchor[0], torch.tensor([[0.5]]))
    with torch.no_grad():
        w.fill_(0.0)
    pen = si.extra_loss(run, None, None)
    assert float(pen[0]) == pytest.approx(total / 0.75 * 0.25)


def test_si_over_a_parameter_subset_in_training():
    subset = lambda m: [(n, p) for n, p in m.named_parameters() if n.startswith("hidden.1")]  # noqa: E731
    si = SI([0.0, 5.0], params=subset)
    model, _ = _fit([0, 0], [si], steps=15)
    assert len(si.omega) == 2 and si.omega[0].shape == model.hidden[1].weight.shape
    assert torch.isfinite(si.omega[0]).all() and si.omega[0].abs().sum() > 0
    # c = 0 for model 0: it trains exactly like a run without SI
    ref, _ = _fit([0], [], steps=15)
    torch.testing.assert_close(model.hidden[1].weight[0], ref.hidden[1].weight[0])


# ---------------------------------------------------------------------- EWC


def test_ewc_terms_accumulate_one_per_task_and_skip_the_last():
    ewc = EWC("weight_decay", 2.0)
    model, _ = _fit([0], [ewc], steps=10, n_tasks_classes=3)
    assert len(ewc.terms) == 2  # 3 tasks: terms after tasks 0 and 1
    params = shared_parameters(model)
    want = sum(sum(((p - a) ** 2).sum() for (_, p), a in zip(params, anchor, strict=True)) for _, anchor in ewc.terms)
    got = ewc.extra_loss(Run(model, None, None, None, None), None, None)
    torch.testing.assert_close(got[0], want.detach() * 1.0)
    assert not torch.equal(ewc.terms[0][1][0], ewc.terms[1][1][0])  # anchors are copies per task


def test_online_ewc_keeps_one_decayed_term():
    ewc = EWC("weight_change", 1.0, online=True, gamma=0.5, consolidate_last=True)
    _fit([0], [ewc], steps=10, n_tasks_classes=2)
    assert len(ewc.terms) == 1
    offline = EWC("weight_change", 1.0, consolidate_last=True)
    _fit([0], [offline], steps=10, n_tasks_classes=2)
    (o1, _), (o2, a2) = offline.terms
    torch.testing.assert_close(ewc.terms[0][0][0], 0.5 * o1[0] + o2[0])
    torch.testing.assert_close(ewc.terms[0][1][0], a2[0])


def test_lambda_per_model_equals_single_runs_and_zero_is_plain_training():
    lams = [0.0, 3.0, 30.0]
    many, hist = _fit([4, 4, 4], [EWC("fisher_true", lams)], steps=15)
    plain, _ = _fit([4], [], steps=15)
    torch.testing.assert_close(many.hidden[1].weight[0], plain.hidden[1].weight[0])
    for k, lam in enumerate(lams):
        one, h1 = _fit([4], [EWC("fisher_true", lam)], steps=15)
        torch.testing.assert_close(many.hidden[1].weight[k], one.hidden[1].weight[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(hist.acc[k], h1.acc[0], atol=1e-6)
    assert not torch.allclose(many.hidden[1].weight[1], many.hidden[1].weight[2])


def test_normalize_importance_gives_mean_one_per_model_and_keeps_zeros():
    omega = [torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[4.0], [0.0]])]
    out = normalize_importance(omega)
    flat = torch.cat([o.reshape(2, -1) for o in out], 1)
    torch.testing.assert_close(flat[0].mean(), torch.tensor(1.0))
    assert (flat[1] == 0).all()


def test_none_measure_gives_no_penalty_whatever_lambda():
    ewc = EWC("none", 100.0)
    _, h_none = _fit([1], [ewc], steps=10)
    _, h_plain = _fit([1], [], steps=10)
    np.testing.assert_allclose(h_none.acc, h_plain.acc)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EWC("weight_decay", -1.0), "lambda"),
        (lambda: EWC("weight_decay", [1.0, math.nan]), "lambda"),
        (lambda: make_importance("fisher"), "measure"),
        (lambda: EWC("weight_decay", 1.0, gamma=1.5), "gamma"),
        (lambda: SI(-0.1), "'c'"),
        (lambda: Fisher(samples=0), "fisher_samples"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_lambda_count_must_match_models():
    with pytest.raises(ConfigError, match="one per model"):
        _fit([0, 1], [EWC("weight_decay", [1.0, 2.0, 3.0])], steps=2)
