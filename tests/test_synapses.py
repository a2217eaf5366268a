"""The complex-synapse optimizers against a naive per-element transcription of the formulas."""

import math

import pytest
import torch

from clx_core.synapses import ComplexSynapseAdam, ComplexSynapseSGD, chain_constants


def naive_run(w0, grads, n, alpha, beta, lr, adam, init="same", timescales="iterations", betas=(0.9, 0.999), eps=1e-8):
    """Element by element, beaker by beaker, in plain Python floats (the algorithm as written)."""
    if n > 1:
        x = (beta / alpha) ** (1 / (2 * n - 2))
        C = [x ** (k - 1) for k in range(1, n + 1)]
        g = [(1 / alpha) * x ** (1 - k) for k in range(1, n + 1)]
    elif n == 1:
        C, g = [1.0], [1 / beta]
    w = [float(v) for v in w0]
    u = [[(v if init == "same" else 0.0) for v in w] for _ in range(max(n - 1, 0))]  # u_2..u_n
    m = [0.0] * len(w)
    s = [0.0] * len(w)
    for t, grad in enumerate(grads, 1):
        grad = [float(v) for v in grad]
        if adam:
            m = [betas[0] * a + (1 - betas[0]) * b for a, b in zip(m, grad, strict=False)]
            s = [betas[1] * a + (1 - betas[1]) * b * b for a, b in zip(s, grad, strict=False)]
            d = [a / (math.sqrt(b) + eps) for a, b in zip(m, s, strict=False)]
            eta = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        else:
            d, eta = grad, lr
        flow = eta if timescales == "lr-scaled" else 1.0
        for i in range(len(w)):
            if n == 0:
                w[i] -= eta * d[i]
                continue
            levels = [w[i]] + [u[k][i] for k in range(n - 1)] + [0.0]  # u_1..u_n, leak
            new1 = levels[0] + (eta / C[0]) * (-d[i]) + (flow / C[0]) * g[0] * (levels[1] - levels[0])
            levels[0] = new1
            for k in range(2, n + 1):  # Gauss-Seidel: u_{k-1} new, u_{k+1} old
                j = k - 1
                levels[j] = levels[j] + (flow / C[j]) * (
                    g[j - 1] * (levels[j - 1] - levels[j]) + g[j] * (levels[j + 1] - levels[j])
                )
            w[i] = levels[0]
            for k in range(n - 1):
                u[k][i] = levels[k + 1]
    return w, u


CASES = [(0, 500, 2500), (1, 500, 2500), (2, 10, 1000), (5, 500, 2500), (6, 4, 1024)]


def _torch_run(opt_cls, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone().double())
    opt = opt_cls([p], **kw)
    for grad in grads:
        p.grad = grad.clone().double()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("n,alpha,beta", CASES)
@pytest.mark.parametrize("timescales", ["iterations", "lr-scaled"])
@pytest.mark.parametrize("init", ["same", "zero"])
def test_adam_matches_naive(n, alpha, beta, timescales, init, monkeypatch):
    torch.manual_seed(n)
    w0 = torch.randn(7)
    grads = [torch.randn(7) for _ in range(25)]
    want, hidden = naive_run(w0, grads, n, alpha, beta, lr=0.01, adam=True, init=init, timescales=timescales)
    for fused in ("0", "1"):
        monkeypatch.setenv("CLX_NO_FUSED", "1" if fused == "0" else "0")
        got, opt = _torch_run(
            ComplexSynapseAdam,
            w0,
            grads,
            lr=0.01,
            n_beakers=n,
            alpha=alpha,
            beta=beta,
            init=init,
            timescales=timescales,
        )
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-11)
        levels = opt.hidden_levels(next(iter(opt.state)))
        assert len(levels) == max(n - 1, 0)
        for k, level in enumerate(levels):
            torch.testing.assert_close(level, torch.tensor(hidden[k], dtype=torch.float64), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n,alpha,beta", CASES)
@pytest.mark.parametrize("timescales", ["iterations", "lr-scaled"])
def test_sgd_matches_naive(n, alpha, beta, timescales):
    torch.manual_seed(10 + n)
    w0 = torch.randn(6)
    grads = [torch.randn(6) for _ in range(30)]
    want, _ = naive_run(w0, grads, n, alpha, beta, lr=0.05, adam=False, timescales=timescales)
    got, _ = _torch_run(
        ComplexSynapseSGD, w0, grads, lr=0.05, n_beakers=n, alpha=alpha, beta=beta, timescales=timescales
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-11)


def test_zero_beakers_is_plain_optimizer():
    torch.manual_seed(0)
    w0, grads = torch.randn(4, 3), [torch.randn(4, 3) for _ in range(10)]
    got, _ = _torch_run(ComplexSynapseAdam, w0, grads, lr=1e-2, n_beakers=0)
    ref, _ = _torch_run(torch.optim.Adam, w0, grads, lr=1e-2)
    # torch adds eps to sqrt(v / bc2), the source to sqrt(v): equal up to eps-sized terms
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    got, _ = _torch_run(ComplexSynapseSGD, w0, grads, lr=0.1, n_beakers=0)
    ref, _ = _torch_run(torch.optim.SGD, w0, grads, lr=0.1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_one_beaker_is_sgd_with_decay():
    torch.manual_seed(1)
    w, grads, lr, beta = torch.randn(5).double(), [torch.randn(5).double() for _ in range(8)], 0.1, 50.0
    got, _ = _torch_run(ComplexSynapseSGD, w, grads, lr=lr, n_beakers=1, beta=beta, alpha=2.0, timescales="lr-scaled")
    for grad in grads:
        w = w - lr * grad - lr / beta * w
    torch.testing.assert_close(got, w)


def test_chain_constants_time_scales():
    caps, g = chain_constants(5, 500.0, 2500.0)
    assert caps[0] == 1.0 and g[0] == pytest.approx(1 / 500)  # first beaker: alpha
    assert caps[-1] / g[-1] == pytest.approx(2500.0)  # last beaker: beta
    assert chain_constants(1, 3.0, 7.0) == ([1.0], [1 / 7.0])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=0.0), "'lr' = 0.0"),
        (dict(n_beakers=-1), "'n_beakers' = -1"),
        (dict(alpha=3000.0, beta=2500.0), "'alpha' = 3000.0"),
        (dict(init="random"), "'init' = 'random'"),
        (dict(timescales="seconds"), "'timescales' = 'seconds'"),
        (dict(alpha=1.0, beta=100.0), "'alpha' = 1.0"),  # unstable with time scales in iterations
    ],
)
def test_bad_parameters(kw, match):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=match):
        ComplexSynapseAdam([p], **kw)
