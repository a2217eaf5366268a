"""Weight regularisers: EWC with pluggable importance measures, Synaptic Intelligence, MAS.

:class:`EWC` adds ``(lambda / 2) * sum_i Omega_i (theta_i - theta*_i)^2`` over the protected
(shared, non-head) parameters, one term per finished task (the terms accumulate with the same
lambda), or one running term in the *online* variant (``Omega <- gamma * Omega + Omega_new``,
anchor = the latest weights). ``lambda`` may be one value per model (a (K,) tensor), so a whole
lambda grid trains at once as one many-models network.

The importance ``Omega`` of a finished task comes from an :class:`Importance` (names as in the
EWC lambda-search source, implemented correctly):

=================  ===========================================================================
none               Omega = 0 (no penalty whatever lambda is)
weight_decay       Omega = 1
fisher_true        mean squared per-sample gradient of log p(y|x), y ~ the model's prediction
fisher_empirical   the same with the data's labels
sign_flipping      1 / (1 + number of sign flips of the weight during the task)
momentum_based     1 / (1 + number of direction reversals of the weight's update)
weight_change      1 / (1 + distance the weight travelled during the task, sum of |step|)
mas                mean |per-sample gradient| of the squared L2 norm of the head's outputs
si                 Synaptic Intelligence's path integral / (total change^2 + xi)
=================  ===========================================================================

Trackers record *copies* of the weights (``detach().clone()``): the source stored references,
so its trackers saw no change and collapsed to weight decay.

Per-sample gradient statistics (sum over samples of the squared or absolute per-sample gradient)
are computed by one of four interchangeable engines, kept for measurement and exactness tests:
``naive`` (one autograd pass per sample), ``vmap`` (torch.func), ``closed_form`` (one batched
backward to the layer outputs, then per layer: for a linear layer the squared per-sample gradients
sum to (a^2)^T (delta^2), one bmm for all K models; conv layers from unfolded inputs) and
``backpack`` (BackPACK on an equivalent ordinary ``nn.Sequential`` per model, optional).
``make bench`` measures them (``fisher_diagonal``); ``closed_form`` is the default by measurement.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bench import bench
from .config import check_choice, check_float, check_int, fail
from .models import BatchNorm, Conv2d, Flatten, Linear, MaxPool2d, shared_parameters
from .train import Method, Run

ParamFilter = Callable[[nn.Module], list[tuple[str, nn.Parameter]]]

MEASURES = (
    "none",
    "weight_decay",
    "fisher_true",
    "fisher_empirical",
    "sign_flipping",
    "momentum_based",
    "weight_change",
    "mas",
    "si",
)
GRAD_METHODS = ("closed_form", "vmap", "backpack", "naive")
#: Chosen by ``make bench`` (fisher_diagonal): the closed form is the fastest on the EWC model.
DEFAULT_GRAD_METHOD = "closed_form"


# ====================================================================== per-sample gradients


def sample_losses(out: torch.Tensor, y: torch.Tensor | None, active: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Per-sample losses (K, B) from outputs (K, B, C).

    ``nll``: -log p(y|x) over the active output units (a task's head); ``sqnorm``: the squared
    L2 norm of the active outputs (MAS's sensitivity of the learned function).
    """
    if kind == "nll":
        logits = out if active is None else out.masked_fill(~active, float("-inf"))
        return -torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if kind == "sqnorm":
        kept = out if active is None else out * active
        return kept.pow(2).sum(-1)
    raise ValueError(f"unknown per-sample loss {kind!r}")


def _reduce(g: torch.Tensor, reduce: str) -> torch.Tensor:
    return g.square() if reduce == "square" else g.abs()


def per_sample_grad_stats(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    kind: str = "nll",
    active: torch.Tensor | None = None,
    reduce: str = "square",
    method: str = DEFAULT_GRAD_METHOD,
    params: ParamFilter = shared_parameters,
    chunk: int | None = None,
) -> list[torch.Tensor]:
    """Sum over samples of ``reduce(per-sample gradient)`` for each parameter in ``params(model)``.

    ``x`` is (K, B, ...) (each model its own samples), ``y`` (K, B) labels as output units (for
    ``kind="nll"``). Run on a model in eval mode: with batch statistics a sample's loss would
    depend on the other samples of the batch, and "per-sample gradient" would lose its meaning
    (the caller switches BatchNorm to its running statistics). Returns one (K, ...) tensor per
    parameter, in ``params(model)`` order.
    """
    check_choice("method", method, GRAD_METHODS)
    check_choice("reduce", reduce, ("square", "abs"))
    check_choice("kind", kind, ("nll", "sqnorm"))
    if kind == "nll" and y is None:
        raise ValueError("per-sample negative log-likelihood needs labels y")
    engine = {"naive": _naive, "vmap": _vmap, "closed_form": _closed_form, "backpack": _backpack}[method]
    return engine(model, x, y, kind, active, reduce, params, chunk)


def _naive(model, x, y, kind, active, reduce, params, chunk):
    """One forward/backward per sample (all K models at once): the reference, and the slow path."""
    ps = [p for _, p in params(model)]
    totals = [torch.zeros_like(p) for p in ps]
    for i in range(x.shape[1]):
        out = model(x[:, i : i + 1])
        yi = None if y is None else y[:, i : i + 1]
        grads = torch.autograd.grad(sample_losses(out, yi, active, kind).sum(), ps, allow_unused=True)
        for t, g in zip(totals, grads, strict=True):
            if g is not None:
                t += _reduce(g, reduce)
    return totals


def _vmap(model, x, y, kind, active, reduce, params, chunk):
    """torch.func: vmap(grad) over the sample axis of the many-models network."""
    from torch.func import functional_call, grad, vmap

    named = params(model)
    pdict = {n: p.detach() for n, p in named}

    def loss_one(pd, xs, ys):  # xs (K, ...), one sample per model
        out = functional_call(model, pd, (xs.unsqueeze(1),))
        return sample_losses(out, None if ys is None else ys.unsqueeze(1), active, kind).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 1, None if y is None else 1))
    totals = {n: torch.zeros_like(p) for n, p in named}
    step = chunk or 64
    for s in range(0, x.shape[1], step):
        g = per_sample(pdict, x[:, s : s + step], None if y is None else y[:, s : s + step])
        for n in totals:
            totals[n] += _reduce(g[n], reduce).sum(0)
    return [totals[n] for n, _ in named]


class UnsupportedLayerError(TypeError):
    """A parameter the closed form cannot handle (it lives outside Linear/Conv2d/BatchNorm)."""


def _closed_form(model, x, y, kind, active, reduce, params, chunk):
    """One batched backward to every layer's output, then per-sample statistics per layer.

    Linear: the per-sample weight gradient is the outer product a_b delta_b^T, so its square
    (or abs) sums to (a^2)^T (delta^2): one bmm for all K models, no per-sample tensor at all.
    Conv2d: the per-sample gradient is delta_b (O, L) @ unfold(x_b)^T (L, C k k), formed in
    chunks (a sum over positions sits inside the square). BatchNorm (running statistics):
    gamma's per-sample gradient is sum over positions of delta * x_hat, beta's of delta.
    """
    wanted = {id(p): n for n, p in params(model)}
    layers = [m for m in model.modules() if isinstance(m, (Linear, Conv2d, BatchNorm))]
    owned = {id(p) for m in layers for p in m.parameters(recurse=False)}
    missing = [n for i, n in wanted.items() if i not in owned]
    if missing:
        raise UnsupportedLayerError(f"closed form: parameters outside Linear/Conv2d/BatchNorm: {missing}")
    for m in layers:
        if isinstance(m, BatchNorm) and not m.track and any(id(p) in wanted for p in m.parameters()):
            raise UnsupportedLayerError("closed form: BatchNorm without running statistics has no per-sample gradient")
    layers = [m for m in layers if any(id(p) in wanted for p in m.parameters(recurse=False))]
    totals = {id(p): torch.zeros_like(p) for m in layers for p in m.parameters(recurse=False) if id(p) in wanted}
    K, B = x.shape[:2]
    if chunk is None:  # keep the largest per-sample tensor (conv: K*b*O*Ckk floats) near 64 MB
        per = max([m.weight[0].numel() for m in layers if isinstance(m, Conv2d)] + [1])
        chunk = max(1, min(B, (16 * 2**20) // (K * per)))
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(mod, inp, out):
        seen.append((mod, inp[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for s in range(0, B, chunk):
            seen.clear()
            out = model(x[:, s : s + chunk])
            loss = sample_losses(out, None if y is None else y[:, s : s + chunk], active, kind).sum()
            deltas = torch.autograd.grad(loss, [o for _, _, o in seen], allow_unused=True)
            for (mod, a, _), d in zip(seen, deltas, strict=True):
                if d is not None:
                    _layer_stats(mod, a, d, reduce, totals)
    finally:
        for h in handles:
            h.remove()
    return [totals[id(p)] for _, p in params(model)]


def _im2col(x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C k k, L) patches, as F.unfold but via strided views.

    Measured: F.unfold (aten::im2col) took 2-3 s for the EWC model's first two conv layers at
    256 samples on this CPU, the strided view + one copy 20-80 ms.
    """
    if padding:
        x = F.pad(x, (padding,) * 4)
    p = x.unfold(2, k, stride).unfold(3, k, stride)  # (N, C, H', W', k, k)
    n, c, h, w = p.shape[:4]
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, c * k * k, h * w)


def _layer_stats(mod: nn.Module, a: torch.Tensor, d: torch.Tensor, reduce: str, totals: dict) -> None:
    r = (lambda t: t.square()) if reduce == "square" else (lambda t: t.abs())
    w, b = mod.weight, mod.bias
    if isinstance(mod, Linear):
        if id(w) in totals:
            totals[id(w)] += torch.bmm(r(a).transpose(1, 2), r(d))
        if b is not None and id(b) in totals:
            totals[id(b)] += r(d).sum(1)
    elif isinstance(mod, Conv2d):
        K, bsz = a.shape[:2]
        dd = d.reshape(K * bsz, mod.out_channels, -1)  # (Kb, O, L)
        if id(w) in totals:
            g = torch.bmm(dd, _im2col(a.flatten(0, 1), mod.kernel_size, mod.stride, mod.padding).transpose(1, 2))
            # g: (Kb, O, C k k), the per-sample weight gradients
            totals[id(w)] += r(g).view(K, bsz, *w.shape[1:]).sum(1)
        if b is not None and id(b) in totals:
            totals[id(b)] += r(dd.sum(-1)).view(K, bsz, -1).sum(1)
    else:  # BatchNorm with running statistics
        shape = (a.shape[0], 1, a.shape[2]) + (1,) * (a.ndim - 3)
        xhat = (a - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
        dims = tuple(range(3, a.ndim))
        if w is not None and id(w) in totals:
            totals[id(w)] += r((d * xhat).sum(dims)).sum(1)
        if b is not None and id(b) in totals:
            totals[id(b)] += r(d.sum(dims)).sum(1)


# ---------------------------------------------------------------------- BackPACK (optional)


def backpack_available() -> bool:
    try:
        import backpack  # noqa: F401
    except ImportError:
        return False
    return True


def to_sequential(model: nn.Module, k: int) -> tuple[nn.Sequential, dict[int, tuple[nn.Parameter, Callable]]]:
    """Model k of a many-models network with ``hidden`` and ``head`` as an ordinary ``nn.Sequential``.

    Returns the network (a copy, eval mode) and, keyed by ``id`` of each parameter of ``model``,
    the torch parameter holding it and a function mapping a statistic in torch's layout back to
    ours. Used for BackPACK, which extends only torch's own layers.
    """
    layers: list[nn.Module] = []
    mapping: dict[int, tuple[nn.Parameter, Callable]] = {}
    same = lambda t: t  # noqa: E731
    for mod in [*model.hidden, model.head]:
        if isinstance(mod, Linear):
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            new.weight.data.copy_(mod.weight[k].T)
            mapping[id(mod.weight)] = (new.weight, lambda t: t.transpose(-1, -2))
            if mod.bias is not None:
                new.bias.data.copy_(mod.bias[k])
                mapping[id(mod.bias)] = (new.bias, same)
        elif isinstance(mod, Conv2d):
            new = nn.Conv2d(
                mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, bias=mod.bias is not None
            )
            new.weight.data.copy_(mod.weight[k])
            mapping[id(mod.weight)] = (new.weight, same)
            if mod.bias is not None:
                new.bias.data.copy_(mod.bias[k])
                mapping[id(mod.bias)] = (new.bias, same)
        elif isinstance(mod, BatchNorm):
            if not mod.track:
                raise UnsupportedLayerError("BatchNorm without running statistics")
            channels = mod.running_mean.shape[1]
            new = nn.BatchNorm2d(channels, eps=mod.eps, affine=mod.weight is not None)
            new.running_mean.copy_(mod.running_mean[k])
            new.running_var.copy_(mod.running_var[k])
            if mod.weight is not None:
                new.weight.data.copy_(mod.weight[k])
                new.bias.data.copy_(mod.bias[k])
                mapping[id(mod.weight)] = (new.weight, same)
                mapping[id(mod.bias)] = (new.bias, same)
        elif isinstance(mod, MaxPool2d):
            new = nn.MaxPool2d(mod.kernel_size, mod.stride)
        elif isinstance(mod, Flatten):
            new = nn.Flatten()
        elif isinstance(mod, (nn.ReLU, nn.Identity)):
            new = type(mod)()
        else:
            raise UnsupportedLayerError(f"no torch equivalent for {type(mod).__name__}")
        layers.append(new)
    seq = nn.Sequential(*layers).to(next(model.parameters()).device).eval()
    return seq, mapping


def _backpack(model, x, y, kind, active, reduce, params, chunk):
    """BackPACK's SumGradSquared (square) or BatchGrad (abs), one ordinary network per model."""
    if not backpack_available():
        raise ImportError("the 'backpack' method needs backpack-for-pytorch (pip install backpack-for-pytorch)")
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, SumGradSquared

    named = params(model)
    totals = [torch.zeros_like(p) for _, p in named]
    step = chunk or 1024
    for k in range(x.shape[0]):
        seq, by_id = to_sequential(model, k)
        seq = extend(seq)
        for s in range(0, x.shape[1], step):
            out = seq(x[k, s : s + step])
            yk = None if y is None else y[k : k + 1, s : s + step]
            loss = sample_losses(out.unsqueeze(0), yk, active, kind).sum()
            ext = SumGradSquared() if reduce == "square" else BatchGrad()
            with backpack(ext):
                loss.backward()
            for t, (_, p) in zip(totals, named, strict=True):
                tp, back = by_id[id(p)]
                stat = tp.sum_grad_squared if reduce == "square" else tp.grad_batch.abs().sum(0)
                t[k] += back(stat)
            seq.zero_grad(set_to_none=True)
    return totals


# ====================================================================== importance measures


def _values(params: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    """Copies of the current values (never references: see the module docstring)."""
    return [p.detach().clone() for _, p in params]


class Importance:
    """Computes Omega for the task just finished; trackers also observe every step of it."""

    name = "importance"

    def start(self, run: Run, params: list[tuple[str, nn.Parameter]]) -> None:
        """A task begins."""

    def after_backward(self, run: Run, params: list[tuple[str, nn.Parameter]]) -> None:
        """Gradients of this step are in ``p.grad``; the optimizer has not stepped yet."""

    def after_step(self, run: Run, params: list[tuple[str, nn.Parameter]]) -> None:
        """The optimizer has stepped."""

    def compute(self, run: Run, params: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
        raise NotImplementedError


class Constant(Importance):
    """Omega = value everywhere: 0 is "none" (no penalty), 1 is weight decay."""

    def __init__(self, value: float, name: str):
        self.value, self.name = value, name

    def compute(self, run, params):
        return [torch.full_like(p, self.value) for _, p in params]


def _task_samples(run: Run, n: int | None) -> torch.Tensor:
    """(K, S) indices into the training set of the current task, one draw per model.

    ``n`` = None or >= the task's size: every sample, in order. Otherwise each model draws its
    own subset from its ``method`` stream (the same subset for models sharing a seed).
    """
    idx = run.scenario.train_index[run.task]
    K = run.n_models
    if n is None or n >= len(idx):
        return idx.unsqueeze(0).expand(K, -1)
    picks = torch.stack([torch.randperm(len(idx), generator=g)[:n] for g in run.streams.method])
    return idx[picks.to(idx.device)]


class _PerSample(Importance):
    """Base of the measures computed from per-sample gradients on the task's training data."""

    def __init__(self, samples: int | None = None, method: str = DEFAULT_GRAD_METHOD, chunk: int | None = None):
        if samples is not None:
            check_int("fisher_samples", samples, 1)
        check_choice("fisher_method", method, GRAD_METHODS)
        self.samples, self.method, self.chunk = samples, method, chunk

    def compute(self, run, params):
        batch = run.scenario.batch("train", run.task, _task_samples(run, self.samples), run.task)
        was_training = run.model.training
        run.model.eval()  # BatchNorm on running statistics: samples independent (see per_sample_grad_stats)
        try:
            y, kind, reduce = self._targets(run, batch)
            stats = per_sample_grad_stats(
                run.model,
                batch.x,
                y,
                kind=kind,
                active=batch.active,
                reduce=reduce,
                method=self.method,
                params=lambda m: params,
                chunk=self.chunk,
            )
        finally:
            run.model.train(was_training)
        n = batch.x.shape[1]
        return [s / n for s in stats]

    def _targets(self, run, batch):
        raise NotImplementedError


class Fisher(_PerSample):
    """Diagonal Fisher: mean over samples of the squared per-sample gradient of log p(y|x).

    ``true``: y drawn from the model's own predictive distribution over the task's head (the
    Fisher information), one label per sample from each model's ``method`` stream; else the
    data's labels (the empirical Fisher).
    """

    def __init__(self, true: bool = True, **kw):
        super().__init__(**kw)
        self.true = true
        self.name = "fisher_true" if true else "fisher_empirical"

    def _targets(self, run, batch):
        if not self.true:
            return batch.y, "nll", "square"
        with torch.no_grad():
            out = run.model(batch.x)
            logits = out if batch.active is None else out.masked_fill(~batch.active, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
        y = torch.stack(
            [torch.multinomial(probs[k], 1, generator=g).squeeze(1) for k, g in enumerate(run.streams.method)]
        )
        return y.to(batch.x.device), "nll", "square"


class MAS(_PerSample):
    """Memory Aware Synapses (Aljundi et al. 2018): mean |gradient| of the squared L2 norm of
    the (active) outputs, per sample: how sensitive the learned function is to each weight."""

    name = "mas"

    def _targets(self, run, batch):
        return None, "sqnorm", "abs"


class SignFlipping(Importance):
    """1 / (1 + number of sign changes of each weight between consecutive steps of the task)."""

    name = "sign_flipping"

    def start(self, run, params):
        self.prev = [v.sign() for v in _values(params)]
        self.count = [torch.zeros_like(p) for _, p in params]

    def after_step(self, run, params):
        for i, (_, p) in enumerate(params):
            s = p.detach().sign()
            self.count[i] += (s * self.prev[i] < 0).to(p.dtype)
            self.prev[i] = s

    def compute(self, run, params):
        return [1 / (1 + c) for c in self.count]


class MomentumBased(Importance):
    """1 / (1 + number of reversals of each weight's update direction during the task)."""

    name = "momentum_based"

    def start(self, run, params):
        self.prev = _values(params)
        self.prev_step = [torch.zeros_like(p) for _, p in params]
        self.count = [torch.zeros_like(p) for _, p in params]

    def after_step(self, run, params):
        for i, (_, p) in enumerate(params):
            step = p.detach() - self.prev[i]
            self.count[i] += (step * self.prev_step[i] < 0).to(p.dtype)
            self.prev_step[i] = step
            self.prev[i] = p.detach().clone()

    def compute(self, run, params):
        return [1 / (1 + c) for c in self.count]


class WeightChange(Importance):
    """1 / (1 + distance each weight travelled during the task, sum over steps of |step|).

    The source summed signed steps (which telescope to the net change and can make 1 + change
    vanish); the tracker's name and comment ("an important weight moves very little", total
    distances) say distance, so we sum absolute steps.
    """

    name = "weight_change"

    def start(self, run, params):
        self.prev = _values(params)
        self.total = [torch.zeros_like(p) for _, p in params]

    def after_step(self, run, params):
        for i, (_, p) in enumerate(params):
            self.total[i] += (p.detach() - self.prev[i]).abs()
            self.prev[i] = p.detach().clone()

    def compute(self, run, params):
        return [1 / (1 + t) for t in self.total]


class PathIntegral(Importance):
    """Synaptic Intelligence's importance (Zenke et al. 2017) of one task.

    omega accumulates -g * delta_theta over the task's steps (g = the gradient the optimizer
    used, as in the reference implementations), and Omega = omega / (total change^2 + xi).
    Not clipped at 0, as in the original.
    """

    name = "si"

    def __init__(self, xi: float = 0.1):
        check_float("xi", xi, 0, low_open=True)
        self.xi = xi

    def start(self, run, params):
        self.begin = _values(params)
        self.prev = _values(params)
        self.omega = [torch.zeros_like(p) for _, p in params]
        self.grad: list[torch.Tensor | None] = [None] * len(params)

    def after_backward(self, run, params):
        self.grad = [None if p.grad is None else p.grad.detach().clone() for _, p in params]

    def after_step(self, run, params):
        for i, (_, p) in enumerate(params):
            now = p.detach()
            if self.grad[i] is not None:
                self.omega[i] -= self.grad[i] * (now - self.prev[i])
            self.prev[i] = now.clone()

    def compute(self, run, params):
        return [
            w / ((p.detach() - b) ** 2 + self.xi) for w, b, (_, p) in zip(self.omega, self.begin, params, strict=True)
        ]


def make_importance(
    name: str,
    *,
    fisher_samples: int | None = None,
    fisher_method: str = DEFAULT_GRAD_METHOD,
    si_xi: float = 0.1,
) -> Importance:
    """The importance measure called ``name`` (one of :data:`MEASURES`)."""
    check_choice("measure", name, MEASURES)
    if name == "none":
        return Constant(0.0, "none")
    if name == "weight_decay":
        return Constant(1.0, "weight_decay")
    if name in ("fisher_true", "fisher_empirical"):
        return Fisher(true=name == "fisher_true", samples=fisher_samples, method=fisher_method)
    if name == "mas":
        return MAS(samples=fisher_samples, method=fisher_method)
    if name == "si":
        return PathIntegral(si_xi)
    return {"sign_flipping": SignFlipping, "momentum_based": MomentumBased, "weight_change": WeightChange}[name]()


# ====================================================================== the methods


def _per_model(value: float | Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if not torch.isfinite(t).all() or (t < 0).any():
        fail(name, t.tolist() if t.numel() > 1 else float(t), "must be finite and >= 0")
    return t


def quadratic_penalty(
    params: list[tuple[str, nn.Parameter]], omega: list[torch.Tensor], anchor: list[torch.Tensor]
) -> torch.Tensor:
    """sum_i Omega_i (theta_i - theta*_i)^2 per model: (K,)."""
    total = None
    for (_, p), o, a in zip(params, omega, anchor, strict=True):
        term = (o * (p - a).square()).flatten(1).sum(1)
        total = term if total is None else total + term
    return total


class EWC(Method):
    """Elastic Weight Consolidation with any importance measure; lambda per model.

    After each task (but the last of a run, whose term nothing would use) a term
    ``(Omega_t, theta*_t)`` is stored; the penalty is ``lambda / 2 * sum_t sum_i Omega_t,i
    (theta_i - theta*_t,i)^2``. ``online=True`` keeps one term instead (Schwarz et al. 2018):
    ``Omega <- gamma * Omega + Omega_t`` and the anchor moves to the latest weights.
    ``normalize=True`` divides each task's Omega by its mean over the protected parameters
    (per model), so that lambda means the same for every measure (weight decay is already 1).
    """

    name = "ewc"

    def __init__(
        self,
        importance: Importance | str,
        lam: float | Sequence[float] | torch.Tensor,
        *,
        online: bool = False,
        gamma: float = 1.0,
        normalize: bool = False,
        params: ParamFilter = shared_parameters,
        consolidate_last: bool = False,
    ):
        self.importance = make_importance(importance) if isinstance(importance, str) else importance
        self.lam = _per_model(lam, "lambda")
        check_float("gamma", gamma, 0, 1)
        self.online, self.gamma, self.normalize = online, gamma, normalize
        self.params = params
        self.consolidate_last = consolidate_last
        self.terms: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def _params(self, run: Run) -> list[tuple[str, nn.Parameter]]:
        return self.params(run.model)

    def before_task(self, run: Run) -> None:
        if self.lam.numel() not in (1, run.n_models):
            fail("lambda", self.lam.tolist(), f"give one value or one per model ({run.n_models})")
        self.lam = self.lam.to(run.device)
        self.importance.start(run, self._params(run))

    def after_backward(self, run: Run) -> None:
        self.importance.after_backward(run, self._params(run))

    def after_step(self, run: Run) -> None:
        self.importance.after_step(run, self._params(run))

    def extra_loss(self, run: Run, batch, out) -> torch.Tensor | None:
        if not self.terms:
            return None
        params = self._params(run)
        total = sum(quadratic_penalty(params, omega, anchor) for omega, anchor in self.terms)
        return self.lam / 2 * total

    def after_task(self, run: Run) -> None:
        if run.task == run.scenario.n_tasks - 1 and not self.consolidate_last:
            return
        params = self._params(run)
        omega = [o.detach() for o in self.importance.compute(run, params)]
        if self.normalize:
            omega = normalize_importance(omega)
        anchor = _values(params)
        if self.online and self.terms:
            old, _ = self.terms[0]
            self.terms = [([self.gamma * a + b for a, b in zip(old, omega, strict=True)], anchor)]
        else:
            self.terms.append((omega, anchor))


def normalize_importance(omega: list[torch.Tensor]) -> list[torch.Tensor]:
    """Omega / (its mean over all protected parameters), per model; all-zero Omega stays 0."""
    K = omega[0].shape[0]
    total = sum(o.reshape(K, -1).sum(1) for o in omega)
    count = sum(o[0].numel() for o in omega)
    mean = total / count
    scale = torch.where(mean > 0, 1 / mean.clamp_min(torch.finfo(mean.dtype).tiny), torch.zeros_like(mean))
    return [o * scale.view(K, *([1] * (o.dim() - 1))) for o in omega]


class SI(Method):
    """Synaptic Intelligence (Zenke et al. 2017) over any parameter subset (``params``).

    Penalty ``c * sum_i Omega_i (theta_i - theta*_i)^2`` with Omega summed over finished tasks
    and theta* the weights at the end of the latest task; ``c`` may be one value per model.
    """

    name = "si"

    def __init__(
        self, c: float | Sequence[float] | torch.Tensor, xi: float = 0.1, params: ParamFilter = shared_parameters
    ):
        self.c = _per_model(c, "c")
        self.importance = PathIntegral(xi)
        self.params = params
        self.omega: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None

    def before_task(self, run: Run) -> None:
        self.c = self.c.to(run.device)
        self.importance.start(run, self.params(run.model))

    def after_backward(self, run: Run) -> None:
        self.importance.after_backward(run, self.params(run.model))

    def after_step(self, run: Run) -> None:
        self.importance.after_step(run, self.params(run.model))

    def extra_loss(self, run: Run, batch, out) -> torch.Tensor | None:
        if self.omega is None:
            return None
        return self.c * quadratic_penalty(self.params(run.model), self.omega, self.anchor)

    def after_task(self, run: Run) -> None:
        params = self.params(run.model)
        new = self.importance.compute(run, params)
        self.omega = new if self.omega is None else [a + b for a, b in zip(self.omega, new, strict=True)]
        self.anchor = _values(params)


class WeightDecay(Method):
    """Plain L2 weight decay towards 0, ``coef / 2 * ||theta||^2`` per model (a baseline)."""

    name = "weight_decay"

    def __init__(self, coef: float | Sequence[float] | torch.Tensor, params: ParamFilter = shared_parameters):
        self.coef = _per_model(coef, "coef")
        self.params = params

    def extra_loss(self, run: Run, batch, out) -> torch.Tensor:
        total = sum(p.square().flatten(1).sum(1) for _, p in self.params(run.model))
        return self.coef.to(run.device) / 2 * total


# ====================================================================== benchmarks


def _bench_model(K: int, full: bool):
    from .experiments.ewc_lambda import ConvNet
    from .rng import ModelStreams

    streams = ModelStreams(list(range(K)))
    channels, dense = ((32, 32, 64, 64), (32, 32)) if full else ((8, 8, 16, 16), (32, 32))
    model = ConvNet(channels, dense, 6, streams.init)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one batched forward + backward of the whole batch (the least any engine must do)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = model(x)
        torch.autograd.grad(out.logsumexp(-1).sum(), [p for _, p in shared_parameters(model)])
    return float(counter.get_total_flops())


@bench
def fisher_diagonal(args) -> dict:
    """Per-sample squared gradients (the Fisher diagonal) on the EWC conv model: each engine vs the naive loop.

    The engines run interleaved, several rounds, best time each: on a shared CPU a burst of
    load then hits every engine alike instead of one.
    """
    from .bench import matmul_peak

    out: dict = {"matmul_peak_gflops": (peak := matmul_peak()) / 1e9}
    cases = (("source_model_K1", 1, True, 64 if args.quick else 128), ("quick_model_K20", 20, False, 64))
    methods = [m for m in GRAD_METHODS if m != "backpack" or backpack_available()]
    for label, K, full, n in cases:
        torch.manual_seed(0)
        model = _bench_model(K, full)
        x = torch.rand(K, n, 1, 28, 28)
        y = torch.randint(0, 3, (K, n))
        active = torch.zeros(6, dtype=torch.bool)
        active[:3] = True
        calls = {m: functools.partial(per_sample_grad_stats, model, x, y, active=active, method=m) for m in methods}
        ref = calls["naive"]()
        res: dict = {"models": K, "samples": n}
        best = dict.fromkeys(methods, float("inf"))
        for m in methods:
            stats = calls[m]()  # warm-up, and the exactness check
            err = max(
                float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).detach())
                for a, b in zip(stats, ref, strict=True)
            )
            res[m] = {"max_rel_error_vs_naive": err}
        for _ in range(2 if args.quick else 3):
            for m in methods:
                start = time.perf_counter()
                calls[m]()
                best[m] = min(best[m], time.perf_counter() - start)
        for m in methods:
            res[m]["ms_per_sample"] = 1e3 * best[m] / n
            if m != "naive":
                res[m]["speedup_vs_naive"] = best["naive"] / best[m]
        res["goal_speedup"] = ">= 20x (best engine vs naive)"
        # The compute floor: no engine can beat one batched forward + backward at the matmul peak.
        floor = _flops(model, x)
        res["floor_gflop_per_sample"] = floor / n / 1e9
        res["best_possible_speedup_at_matmul_peak"] = best["naive"] / (floor / peak)
        res["closed_form_percent_of_matmul_peak"] = 100 * floor / best["closed_form"] / peak
        out[label] = res
    return out


@bench
def lambda_grid_at_once(args) -> dict:
    """A grid of lambdas trained as one many-models network vs one lambda at a time (quick model)."""
    from .experiments import ewc_lambda as el

    cfg = el.EWCLambdaConfig.for_profile("quick", offline=True, epochs=1)
    grid = [float(v) for v in torch.linspace(0, 19, 8 if args.quick else 20)]
    seeds = [0] * len(grid)

    def run(lams, sds):
        el.train_lambdas(cfg, "fisher_true", lams, sds, sds)

    run(grid[:2], seeds[:2])  # warm-up: data cached, kernels chosen
    start = time.perf_counter()
    run(grid, seeds)
    t_grid = time.perf_counter() - start
    start = time.perf_counter()
    for lam, s in zip(grid, seeds, strict=True):
        run([lam], [s])
    t_one = time.perf_counter() - start
    return {
        "lambdas": len(grid),
        "grid_at_once_s": t_grid,
        "one_at_a_time_s": t_one,
        "speedup": t_one / t_grid,
        "goal": ">= 2x on 2 CPU cores",
    }
