"""Sparse activations (k-winners) and sparse weights for many-models networks.

Written from the formulas of the 2019 nupic.torch layers used by the sparse-MNIST source
(``../shared/reference/algorithms.md`` section 1); no code is taken from nupic.torch (AGPL).
Every layer works on the leading models dimension K of :mod:`clx_core.models`: duty cycles,
masks and winners are per model, so model k of a K-model network equals a one-model network
with seed k.

- :class:`KWinners` / :class:`KWinners2d`: keep the k largest (boosted) units, output their
  unboosted values, zero elsewhere; the gradient flows only through the winners.
- :class:`SparseWeights` / :class:`SparseWeights2d`: a fixed random set of zero inputs per
  output unit. ``weight_density`` is the fraction of NON-zero weights (the 2019 meaning of
  the source's ``weight_sparsity``; later nupic.torch used ``sparsity`` = fraction of zeros).
- :class:`KeepSparse`: the training-loop :class:`~clx_core.train.Method` that re-zeroes the
  masked weights after every optimizer step and decays the boost strength once per epoch.
- :class:`ActivityStats`: % of non-zero units of the penultimate layer per epoch (the source's
  ``record_stats``) and per-task unit-activity profiles, from which :func:`code_overlap`
  measures how much the codes of different tasks share units, against chance.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .bench import bench, timed
from .config import fail
from .models import Conv2d, Generators, Linear
from .rng import ModelStreams
from .train import Method, Run

# ---------------------------------------------------------------------- checks


def check_kwinners(
    percent_on: float, k_inference_factor: float, boost_strength: float, boost_strength_factor: float
) -> None:
    """The constructor checks of the source's k-winners, as :class:`~clx_core.config.ConfigError`."""
    for name, v in (
        ("percent_on", percent_on),
        ("k_inference_factor", k_inference_factor),
        ("boost_strength", boost_strength),
        ("boost_strength_factor", boost_strength_factor),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            fail(name, v, "must be a finite number")
    if not 0 < percent_on < 1:
        fail("percent_on", percent_on, "must lie in (0, 1)")
    if not 0 < percent_on * k_inference_factor < 1:
        fail(
            "k_inference_factor",
            k_inference_factor,
            f"percent_on * k_inference_factor = {percent_on * k_inference_factor:g} must lie in (0, 1)",
        )
    if boost_strength < 0:
        fail("boost_strength", boost_strength, "must be >= 0 (0 = no boosting)")
    if not 0 <= boost_strength_factor <= 1:
        fail("boost_strength_factor", boost_strength_factor, "must lie in [0, 1]")


def check_density(weight_density: float) -> None:
    if isinstance(weight_density, bool) or not isinstance(weight_density, (int, float)):
        fail("weight_density", weight_density, "must be a number in (0, 1] (fraction of non-zero weights)")
    if not 0 < weight_density <= 1:
        fail("weight_density", weight_density, "must lie in (0, 1] (fraction of non-zero weights)")


def n_winners(n: int, percent_on: float, k_inference_factor: float = 1.0) -> tuple[int, int]:
    """(k in training, k in evaluation) for ``n`` units: round(n * percent_on), int(k * factor)."""
    k = round(n * percent_on)
    if k < 1:
        fail("percent_on", percent_on, f"gives round({n} * {percent_on:g}) = 0 winners; use more than {0.5 / n:.3g}")
    k_inf = int(k * k_inference_factor)
    if not 1 <= k_inf <= n:
        fail("k_inference_factor", k_inference_factor, f"gives {k_inf} winners of {n} in evaluation; need 1..{n}")
    return k, k_inf


# ---------------------------------------------------------------------- k-winners


class _KWinnersBase(nn.Module):
    """Boosting and duty-cycle bookkeeping shared by the 1-d and 2-d k-winners."""

    def __init__(
        self,
        n_models: int,
        units: int,
        percent_on: float,
        k_inference_factor: float,
        boost_strength: float,
        boost_strength_factor: float,
        duty_cycle_period: int,
    ):
        super().__init__()
        check_kwinners(percent_on, k_inference_factor, boost_strength, boost_strength_factor)
        if isinstance(duty_cycle_period, bool) or not isinstance(duty_cycle_period, int) or duty_cycle_period < 1:
            fail("duty_cycle_period", duty_cycle_period, "must be an integer >= 1")
        self.percent_on, self.k_inference_factor = float(percent_on), float(k_inference_factor)
        self.boost_strength, self.boost_strength_factor = float(boost_strength), float(boost_strength_factor)
        self.duty_cycle_period = duty_cycle_period
        # per model: how often each unit (channel) was a positive winner, averaged over a window
        self.register_buffer("duty_cycle", torch.zeros(n_models, units))
        self.register_buffer("learning_iterations", torch.zeros((), dtype=torch.long))

    def decay_boost(self) -> None:
        """Called once per epoch (by :class:`KeepSparse`): boost_strength *= boost_strength_factor."""
        self.boost_strength *= self.boost_strength_factor

    def _boost(self, x: torch.Tensor, duty: torch.Tensor, target: float) -> torch.Tensor:
        """The values winners are chosen on: x * exp((target - duty) * strength), no gradient."""
        x = x.detach()
        if self.boost_strength == 0:
            return x
        return x * torch.exp((target - duty) * self.boost_strength)

    @torch.no_grad()
    def _update_duty_cycle(self, active_sum: torch.Tensor, batch: int) -> None:
        """dc <- (dc * (period - B) + active_sum) / period, period = min(duty_cycle_period, iters)."""
        self.learning_iterations += batch
        period = self.learning_iterations.clamp(max=self.duty_cycle_period).to(self.duty_cycle.dtype)  # no GPU sync
        self.duty_cycle.mul_(period - batch).add_(active_sum).div_(period)


def _keep(x: torch.Tensor, idx: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x`` at positions ``idx`` along ``dim`` and 0 elsewhere, the kept values).

    Gather the k winners and scatter them into zeros: the gradient reaches only the winners, and
    no full-size mask is built (measured 4x faster than masking on the CPU for k << n).
    """
    vals = x.gather(dim, idx)
    return torch.zeros_like(x).scatter(dim, idx, vals), vals


def _count_positive(idx: torch.Tensor, vals: torch.Tensor, units: int) -> torch.Tensor:
    """Per model, how often each unit was a positive winner: (K, ...) indices -> (K, units)."""
    counts = torch.zeros(idx.shape[0], units, dtype=vals.dtype, device=vals.device)
    return counts.scatter_add_(1, idx.reshape(idx.shape[0], -1), (vals > 0).to(vals.dtype).reshape(idx.shape[0], -1))


class KWinners(_KWinnersBase):
    """k-winners-take-all over the units of (K, B, n) activations.

    k = round(n * percent_on) winners per sample in training, int(k * k_inference_factor) in
    evaluation. Winners are chosen on boosted values (units that were rarely active get a
    bonus), but the output keeps the raw, unboosted values of the winners (no ReLU: negative
    winners pass) and zero elsewhere. The duty cycle is updated in training mode only.
    """

    def __init__(
        self,
        n: int,
        percent_on: float,
        k_inference_factor: float = 1.0,
        boost_strength: float = 1.0,
        boost_strength_factor: float = 1.0,
        duty_cycle_period: int = 1000,
        n_models: int = 1,
    ):
        super().__init__(
            n_models, n, percent_on, k_inference_factor, boost_strength, boost_strength_factor, duty_cycle_period
        )
        self.n = n
        self.k, self.k_inference = n_winners(n, percent_on, k_inference_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k if self.training else self.k_inference
        boosted = self._boost(x, self.duty_cycle.unsqueeze(1), self.k / self.n)
        idx = boosted.topk(k, dim=-1, sorted=False).indices
        y, vals = _keep(x, idx, -1)
        if self.training:
            self._update_duty_cycle(_count_positive(idx, vals.detach(), self.n), x.shape[1])
        return y

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, k={self.k}, k_inference={self.k_inference}, boost_strength={self.boost_strength:g}, "
            f"boost_strength_factor={self.boost_strength_factor:g}, duty_cycle_period={self.duty_cycle_period}"
        )


class KWinners2d(_KWinnersBase):
    """k-winners of (K, B, C, H, W) feature maps.

    ``local=True``: k = round(C * percent_on) winning channels at every position (h, w);
    ``local=False``: k = round(C * H * W * percent_on) winners over the whole map (k is fixed at
    the first forward, when H and W are known). Boosting and duty cycle are per channel, the
    duty cycle averaged over the H * W positions.
    """

    def __init__(
        self,
        channels: int,
        percent_on: float,
        k_inference_factor: float = 1.0,
        boost_strength: float = 1.0,
        boost_strength_factor: float = 1.0,
        duty_cycle_period: int = 1000,
        local: bool = True,
        n_models: int = 1,
    ):
        super().__init__(
            n_models, channels, percent_on, k_inference_factor, boost_strength, boost_strength_factor, duty_cycle_period
        )
        self.channels, self.local = channels, local
        self.n = channels if local else 0  # units a winner is chosen among (global: set at first forward)
        self.k, self.k_inference = n_winners(channels, percent_on, k_inference_factor) if local else (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, B, C, H, W = x.shape
        if not self.local and self.n != C * H * W:
            self.n = C * H * W
            self.k, self.k_inference = n_winners(self.n, self.percent_on, self.k_inference_factor)
        k = self.k if self.training else self.k_inference
        boosted = self._boost(x, self.duty_cycle.view(K, 1, C, 1, 1), self.k / self.n)
        if self.local:
            idx = boosted.topk(k, dim=2, sorted=False).indices  # (K, B, k, H, W): channel ids
            y, vals = _keep(x, idx, 2)
            channel = idx
        else:
            idx = boosted.flatten(2).topk(k, dim=-1, sorted=False).indices  # (K, B, k): ids in C*H*W
            y, vals = _keep(x.flatten(2), idx, -1)
            y, channel = y.view_as(x), idx // (H * W)
        if self.training:
            self._update_duty_cycle(_count_positive(channel, vals.detach(), C) / (H * W), B)
        return y

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, local={self.local}, percent_on={self.percent_on:g}, k={self.k}, "
            f"k_inference={self.k_inference}, boost_strength={self.boost_strength:g}"
        )


# ---------------------------------------------------------------------- sparse weights


class _SparseWeightsBase(nn.Module):
    """A many-models layer whose weight has a fixed random set of zeros per output unit."""

    fan_in_dims: tuple[int, ...]  # weight dimensions (after K) that form one unit's fan-in
    out_dim: int  # weight dimension (after K) of the output units

    def __init__(self, module: nn.Module, weight_density: float, gens: Generators):
        super().__init__()
        check_density(weight_density)
        self.module, self.weight_density = module, float(weight_density)
        w = module.weight
        if len(gens) != w.shape[0]:
            raise ValueError(f"{len(gens)} generators for {w.shape[0]} models")
        shape = w.shape[1:]
        fan_in = math.prod(shape[d] for d in self.fan_in_dims)
        n_out = shape[self.out_dim]
        self.fan_in, self.zeros_per_unit = fan_in, round((1 - weight_density) * fan_in)
        masks = []
        for g in gens:  # per model, from that model's generator: (n_out, fan_in) with exact zero counts
            keys = torch.rand(n_out, fan_in, generator=g)
            m = torch.ones(n_out, fan_in, dtype=torch.bool)
            if self.zeros_per_unit:
                m.scatter_(1, keys.topk(self.zeros_per_unit, dim=1, sorted=False).indices, False)
            masks.append(self._to_weight_layout(m, shape))
        self.register_buffer("mask", torch.stack(masks).to(w.device))
        self.rezero()

    def _to_weight_layout(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def rezero(self) -> None:
        """Set the masked weights to exactly zero (after every optimizer step, see :class:`KeepSparse`)."""
        self.module.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def extra_repr(self) -> str:
        return f"weight_density={self.weight_density:g} (zeros per unit: {self.zeros_per_unit} of {self.fan_in})"


class SparseWeights(_SparseWeightsBase):
    """:class:`~clx_core.models.Linear` with round((1 - weight_density) * in) zero inputs per output unit.

    ``weight_density`` = fraction of NON-zero weights (1 = dense). The mask of model k is drawn
    from generator k (pass the init generators after building the layer, as the builders do).
    """

    fan_in_dims, out_dim = (0,), 1  # weight (in, out): a unit's fan-in is a column

    def __init__(self, module: Linear, weight_density: float, gens: Generators):
        super().__init__(module, weight_density, gens)

    def _to_weight_layout(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return m.t().contiguous()  # (out, in) -> (in, out)


class SparseWeights2d(_SparseWeightsBase):
    """:class:`~clx_core.models.Conv2d` with round((1 - weight_density) * in_channels * kh * kw)
    zero weights per output channel (``weight_density`` = fraction of NON-zeros)."""

    fan_in_dims, out_dim = (1, 2, 3), 0  # weight (out, in, kh, kw)

    def __init__(self, module: Conv2d, weight_density: float, gens: Generators):
        super().__init__(module, weight_density, gens)

    def _to_weight_layout(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return m.view(shape)


def sparse_layers(model: nn.Module) -> list[_SparseWeightsBase]:
    return [m for m in model.modules() if isinstance(m, _SparseWeightsBase)]


def kwinners_layers(model: nn.Module) -> list[_KWinnersBase]:
    return [m for m in model.modules() if isinstance(m, _KWinnersBase)]


# ---------------------------------------------------------------------- loop hooks


class KeepSparse(Method):
    """Keeps a sparse network sparse inside the one training loop.

    - after every optimizer step: masked weights back to exactly zero. (The 2019 source zeroed
      them at each *training* forward instead, so the last step's update leaked into evaluation.)
    - at the end of every epoch: boost_strength *= boost_strength_factor (the source never
      called this; with its factor 1 it changes nothing).
    """

    name = "keep-sparse"

    def before_task(self, run: Run) -> None:
        for layer in sparse_layers(run.model):
            layer.rezero()

    def after_step(self, run: Run) -> None:
        for layer in sparse_layers(run.model):
            layer.rezero()
        if run.task_step % run.epoch_steps == 0:
            for layer in kwinners_layers(run.model):
                layer.decay_boost()


class ActivityStats(Method):
    """The source's ``record_stats`` and the task codes behind the overlap analysis.

    - ``epoch_active``: per epoch, mean and std over minibatches of the % of non-zero units at
      the input of ``model.head`` during training (after dropout, as the source measured it).
    - ``task_profiles``: right after task t is learned, the fraction of task t's test images on
      which each penultimate unit is non-zero (eval mode): (T, K, n). These are the codes the
      later tasks may overwrite, so :func:`code_overlap` compares them across tasks.
    """

    name = "activity-stats"

    def __init__(self, features, profile_samples: int = 1000, chunk: int = 256):
        self.features = features  # (model, x (K, B, ...)) -> (K, B, n): the penultimate layer
        self.profile_samples, self.chunk = profile_samples, chunk
        self.epoch_active: list[tuple[np.ndarray, np.ndarray]] = []  # (mean (K,), std (K,)) per epoch
        self.task_profiles: list[np.ndarray] = []
        self._sum = self._sq = None
        self._count = 0
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not module.training:
            return
        h = args[0].detach()
        pct = (h != 0).flatten(2).float().mean(dim=(1, 2)) * 100  # (K,)
        self._sum = pct if self._sum is None else self._sum + pct
        self._sq = pct * pct if self._sq is None else self._sq + pct * pct
        self._count += 1

    def before_task(self, run: Run) -> None:
        if self._handle is None:
            self._handle = run.model.head.register_forward_pre_hook(self._hook)

    def after_step(self, run: Run) -> None:
        if run.task_step % run.epoch_steps == 0 and self._count:
            n = self._count
            mean = self._sum / n
            var = (self._sq / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
            self.epoch_active.append((mean.cpu().numpy(), var.sqrt().cpu().numpy()))
            self._sum = self._sq = None
            self._count = 0

    @torch.no_grad()
    def after_task(self, run: Run) -> None:
        model, scen, K = run.model, run.scenario, run.n_models
        was = model.training
        model.eval()
        idx = scen.test_index[run.task]
        if len(idx) > self.profile_samples:
            g = torch.Generator().manual_seed(scen.seed * 1000 + run.task)
            idx = idx[torch.randperm(len(idx), generator=g)[: self.profile_samples].to(idx.device)]
        active = None
        for s in range(0, len(idx), self.chunk):  # chunks: a CNN's feature maps are large
            batch = scen.batch("test", run.task, idx[s : s + self.chunk].unsqueeze(0), run.task)
            h = self.features(model, batch.x.expand(K, *batch.x.shape[1:])).flatten(2)
            count = (h != 0).sum(dim=1, dtype=torch.float32)
            active = count if active is None else active + count
        self.task_profiles.append((active / len(idx)).cpu().numpy())  # (K, n)
        model.train(was)
        if run.task == scen.n_tasks - 1 and self._handle is not None:
            self._handle.remove()
            self._handle = None

    def profiles(self) -> np.ndarray:
        """(K, T, n): per model, the unit-activity profile of each task when it was learned."""
        return np.stack(self.task_profiles, axis=1)


def code_overlap(profiles: np.ndarray) -> dict[str, np.ndarray]:
    """How many units the codes of two tasks share, against chance at the same sparsity.

    ``profiles`` (T, n): p_t(u) = fraction of task t's images on which unit u is active.
    With s_t = mean_u p_t(u) the fraction of active units, an image of task i and one of task
    j share on average sum_u p_i(u) p_j(u) units. As a fraction of the geometric mean of their
    active-set sizes n*sqrt(s_i s_j) this is ``shared``; if every image activated a uniformly
    random set of units of the same size it would be ``chance`` = sqrt(s_i s_j). ``ratio`` =
    shared / chance (1 = as random; > 1 = tasks reuse the same units; < 1 = tasks avoid each
    other's units).
    """
    p = np.asarray(profiles, dtype=float)
    n = p.shape[-1]
    s = p.mean(axis=-1)
    dot = p @ p.T / n  # (T, T): expected shared units / n
    geo = np.sqrt(np.outer(s, s))
    with np.errstate(divide="ignore", invalid="ignore"):
        shared = np.where(geo > 0, dot / geo, 0.0)
        ratio = np.where(geo > 0, shared / geo, np.nan)
    return {"shared": shared, "chance": geo, "ratio": ratio, "active": s}


def off_diagonal_mean(m: np.ndarray) -> float:
    """Mean over task pairs i != j."""
    m = np.asarray(m, dtype=float)
    mask = ~np.eye(len(m), dtype=bool)
    return float(np.nanmean(m[mask])) if mask.any() else float("nan")


# ---------------------------------------------------------------------- benchmarks


def _fwd_bwd_seconds(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, reps: int) -> float:
    """Best time of one forward + backward through ``layer`` (after a warm-up call)."""

    def run() -> None:
        for _ in range(reps):
            layer(x).backward(grad)
            x.grad = None

    return timed(run) / reps


@bench
def kwinners_vs_relu(args: argparse.Namespace) -> dict:
    """k-winners forward+backward vs a ReLU of the same width, (K, B=128, n), after warm-up."""
    out: dict = {}
    reps = 20 if args.quick else 100
    for k_models, n, pct in ((1, 4000, 0.001), (1, 4000, 0.1), (5, 1000, 0.004)):
        x = torch.randn(k_models, 128, n, requires_grad=True)
        grad = torch.randn(k_models, 128, n)
        t_kw = _fwd_bwd_seconds(KWinners(n, pct, boost_strength=1.0, n_models=k_models), x, grad, reps)
        t_relu = _fwd_bwd_seconds(nn.ReLU(), x, grad, reps)
        out[f"K{k_models}_n{n}_pct{pct:g}"] = {
            "kwinners_us": 1e6 * t_kw,
            "relu_us": 1e6 * t_relu,
            "ratio_kwinners_vs_relu": t_kw / t_relu,
        }
    x2 = torch.randn(1, 128, 64, 24, 24, requires_grad=True)
    g2 = torch.randn_like(x2)
    reps2 = max(reps // 10, 2)
    t2 = _fwd_bwd_seconds(KWinners2d(64, 0.05, n_models=1), x2, g2, reps2)
    r2 = _fwd_bwd_seconds(nn.ReLU(), x2, g2, reps2)
    out["2d_local_C64_24x24"] = {"kwinners2d_ms": 1e3 * t2, "relu_ms": 1e3 * r2, "ratio_kwinners_vs_relu": t2 / r2}
    # what matters in training: the layer next to the matmul that feeds it
    lin = Linear(784, 4000, ModelStreams([0]).init)
    xin = torch.randn(1, 128, 784)
    t_lin = timed(lambda: [lin(xin).sum().backward() for _ in range(reps)]) / reps
    out["linear_784_4000_fwd_bwd_us"] = 1e6 * t_lin
    out["kwinners_share_of_linear_plus_kwinners"] = out["K1_n4000_pct0.001"]["kwinners_us"] / (
        out["K1_n4000_pct0.001"]["kwinners_us"] + 1e6 * t_lin
    )
    out["goal"] = "ratio vs ReLU <= 5x, and a small share of a layer's step (the matmul dominates)"
    return out


@bench
def sparse_many_models(args: argparse.Namespace) -> dict:
    """The sparse MLP (sparse weights + k-winners, SGD) as K models in one run vs K sequential runs."""
    from . import data as data_mod
    from . import scenarios
    from .models import MLP
    from .train import Schedule, train

    d = data_mod.load("mnist", offline=True)
    scen = scenarios.split(d, "domain", task_classes=[list(range(10))])
    steps = 60 if args.quick else 150
    out = {}
    for hidden, k_models in (((256,), 8), ((1000,), 5)):

        def run(seeds: Sequence[int], hidden=hidden) -> None:
            streams = ModelStreams(list(seeds))
            K = len(seeds)
            model = MLP(
                784,
                hidden,
                10,
                streams.init,
                activation=lambda h: KWinners(h, 0.05, boost_strength=1.0, n_models=K),
                dropout=0.5,
                dropout_gens=streams.method,
                layer=lambda i, o, g: SparseWeights(Linear(i, o, g), 0.5, g),
            )
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
            train(model, opt, scen, Schedule(iters=steps), streams, methods=[KeepSparse()], progress_bar=False)

        t_batched = timed(lambda: run(range(k_models)), repeats=2)  # noqa: B023
        t_seq = timed(lambda: [run([s]) for s in range(k_models)], repeats=1)  # noqa: B023
        out[f"mlp_784_{hidden[0]}_10_K{k_models}"] = {
            "batched_s": t_batched,
            "sequential_s": t_seq,
            "speedup": t_seq / t_batched,
        }
    out["goal"] = ">= 1x (batching must not be slower); the notebook batches seeds only where it pays"
    return out
