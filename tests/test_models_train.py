"""Many-models networks, the training loop and its hook protocol."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clx_core import scenarios
from clx_core.data import ImageData
from clx_core.models import MLP, BatchNorm, Conv2d, Linear
from clx_core.rng import ModelStreams
from clx_core.synapses import ComplexSynapseAdam
from clx_core.train import Method, Schedule, cross_entropy, evaluate, train


def toy_data(n_train=600, n_test=200, classes=4, seed=0) -> ImageData:
    """Separable 'images': class c lights up one quadrant (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
        for c in range(classes):
            r, q = divmod(c, 2)
            x[y == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 0.7
        return x, y

    (trx, try_), (tex, tey) = make(n_train), make(n_test)
    return ImageData("toy", "toy", trx, try_, tex, tey, classes, "generated")


def _fit(seeds, kind="task", opt="adam", steps=30, order="task", methods=()):
    data = toy_data()
    scen = scenarios.split(data, kind, classes_per_task=2)
    streams = ModelStreams(seeds)
    model = MLP(64, (32, 16), scen.n_outputs, streams.init)
    optim = (
        torch.optim.Adam(model.parameters(), lr=1e-2)
        if opt == "adam"
        else ComplexSynapseAdam(model.parameters(), lr=1e-2, n_beakers=3, alpha=10, beta=100)
    )
    hist = train(
        model,
        optim,
        scen,
        Schedule(batch_size=16, iters=steps, eval_every=10, eval_samples=50, order=order),
        streams,
        methods=methods,
        progress_bar=False,
    )
    return model, hist


@pytest.mark.parametrize("opt", ["adam", "cs"])
@pytest.mark.parametrize("kind", ["task", "class"])
def test_model_k_of_many_equals_single_run(opt, kind):
    """Model k of a K-model run = a one-model run with seed k (weights and metrics)."""
    seeds = [3, 7, 11]
    many, hist_many = _fit(seeds, kind, opt)
    for k, s in enumerate(seeds):
        one, hist_one = _fit([s], kind, opt)
        for (name, p_many), (_, p_one) in zip(many.named_parameters(), one.named_parameters(), strict=True):
            torch.testing.assert_close(p_many[k], p_one[0], rtol=1e-4, atol=1e-5, msg=name)
        np.testing.assert_allclose(hist_many.acc[k], hist_one.acc[0], atol=1e-6)
        np.testing.assert_allclose(hist_many.curve_acc[k], hist_one.curve_acc[0], atol=1e-6)


def test_same_seed_same_numbers_and_different_seeds_differ():
    _, a = _fit([5])
    _, b = _fit([5])
    _, c = _fit([6])
    np.testing.assert_array_equal(a.acc, b.acc)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert not np.array_equal(a.loss, c.loss)


def test_training_learns_and_fills_the_accuracy_matrix():
    _, h = _fit([0, 1], steps=60)
    assert h.acc.shape == (2, 2, 2)
    assert (h.acc[:, 0, 0] > 0.9).all()  # task 0 learned
    assert (h.acc[:, 1, 1] > 0.9).all()  # task 1 learned
    assert h.curve_steps == list(range(10, 121, 10))


def test_random_order_stream_mixes_tasks():
    _, h = _fit([0], order="random", steps=60)
    assert (h.acc[0, -1] > 0.8).all()  # both tasks known at the end: trained jointly


def test_hooks_are_called_in_order():
    calls = []

    class Spy(Method):
        def before_task(self, run):
            calls.append(("before_task", run.task))

        def extra_loss(self, run, batch, out):
            calls.append(("extra_loss", run.task_step))
            return torch.zeros(out.shape[0])

        def after_backward(self, run):
            assert all(p.grad is not None for p in run.model.parameters())
            calls.append(("after_backward", run.task_step))

        def after_step(self, run):
            calls.append(("after_step", run.task_step))

        def after_task(self, run):
            calls.append(("after_task", run.task))

    _fit([0], steps=2, methods=[Spy()])
    names = [c[0] for c in calls]
    assert names == (["before_task"] + ["extra_loss", "after_backward", "after_step"] * 2 + ["after_task"]) * 2
    assert calls[0] == ("before_task", 0) and calls[-1] == ("after_task", 1)


def test_replay_hook_mixes_losses():
    class ReplayTask0(Method):
        def replay(self, run, batch):
            if run.task == 0:
                return None
            idx = run.scenario.train_index[0][: batch.x.shape[1]].unsqueeze(0).expand(batch.x.shape[0], -1)
            return run.scenario.batch("train", 0, idx, run.task), 0.5

    _, plain = _fit([0], steps=40)
    _, replay = _fit([0], steps=40, methods=[ReplayTask0()])
    assert replay.acc[0, -1, 0] >= plain.acc[0, -1, 0]


def test_masked_cross_entropy_equals_separate_head():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    y = torch.randint(2, 4, (2, 5))
    active = torch.zeros(6, dtype=torch.bool)
    active[2:4] = True
    batch = scenarios.Batch(None, y, 1, active)
    loss = cross_entropy(logits, batch)
    ref = torch.stack([F.cross_entropy(logits[k, :, 2:4], y[k] - 2) for k in range(2)])
    torch.testing.assert_close(loss, ref)


def test_batched_layers_equal_per_model_layers():
    gens = ModelStreams([0, 1, 2]).init
    lin = Linear(5, 4, gens)
    x = torch.randn(3, 7, 5)
    for k in range(3):
        torch.testing.assert_close(lin(x)[k], x[k] @ lin.weight[k] + lin.bias[k])
    conv = Conv2d(2, 3, 3, gens, stride=2, padding=1)
    x = torch.randn(3, 4, 2, 9, 9)
    y = conv(x)
    for k in range(3):
        torch.testing.assert_close(y[k], F.conv2d(x[k], conv.weight[k], conv.bias[k], 2, 1), rtol=1e-5, atol=1e-5)
    bn = BatchNorm(3, 3)
    z = bn(y)
    for k in range(3):
        ref = F.batch_norm(y[k], None, None, training=True)
        torch.testing.assert_close(z[k], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 16, 4), (3, 8, 4, 5, 5)])
def test_batch_norm_is_k_independent_torch_batch_norms(shape):
    """Training steps update each model's running statistics as nn.BatchNorm does; eval uses them."""
    torch.manual_seed(0)
    k, c = shape[0], shape[2]
    ours = BatchNorm(c, k, momentum=0.2)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    refs = [(nn.BatchNorm2d if len(shape) == 5 else nn.BatchNorm1d)(c, momentum=0.2) for _ in range(k)]
    for i, r in enumerate(refs):
        with torch.no_grad():
            r.weight.copy_(ours.weight[i])
            r.bias.copy_(ours.bias[i])
    for _ in range(3):
        x = torch.randn(*shape) * 2 + 1
        y = ours(x)
        for i, r in enumerate(refs):
            torch.testing.assert_close(y[i], r(x[i]), rtol=1e-4, atol=1e-5)
    for i, r in enumerate(refs):
        torch.testing.assert_close(ours.running_mean[i], r.running_mean)
        torch.testing.assert_close(ours.running_var[i], r.running_var)
    ours.eval()
    x = torch.randn(*shape)
    for i, r in enumerate(refs):
        torch.testing.assert_close(ours(x)[i], r.eval()(x[i]), rtol=1e-4, atol=1e-5)


def test_init_is_per_model_and_default_scale():
    a = Linear(100, 10, ModelStreams([1, 2]).init)
    b = Linear(100, 10, ModelStreams([2]).init)
    torch.testing.assert_close(a.weight[1], b.weight[0])
    assert a.weight.abs().max() <= 0.1 and a.weight.abs().max() > 0.09  # U(-1/sqrt(100), 1/sqrt(100))


def test_evaluate_chunking_does_not_change_accuracy():
    data = toy_data()
    scen = scenarios.split(data, "task", classes_per_task=2)
    model = MLP(64, (8,), scen.n_outputs, ModelStreams([0, 1]).init)
    a, lo = evaluate(model, scen, 1)
    b, lo2 = evaluate(model, scen, 1, chunk_rows=14)
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(lo, lo2, rtol=1e-5)
    # the loss is the mean cross-entropy over each task's test set, in its head
    x = scen.data.test_x[scen.test_index[0]]
    logits = model(x.unsqueeze(0).expand(2, -1, -1, -1, -1))[:, :, :2]
    ref = torch.stack([F.cross_entropy(logits[k], scen.data.test_y[scen.test_index[0]]) for k in range(2)])
    np.testing.assert_allclose(lo[:, 0], ref.detach().numpy(), rtol=1e-5)
