"""Notebook 02: the EWC lambda search of hmcalister/Tensorflow-EWC-Lambda-Search, and an answer to it.

The source trains the same base model on two Split-MNIST tasks (one head each) for many EWC
lambdas and scores each lambda by a Riemann sum of the tasks' test losses (:func:`lambda_measure`).
It searches lambda recursively (:func:`search`) and found no clear minimum: trial-to-trial noise
swamped the effect. Here every lambda of a grid trains at once as one many-models network
(lambda is a per-model scalar of :class:`~clx_core.regularizers.EWC`), so many trials fit; with
*common random numbers* (the same base model and data order for every lambda of a trial) the
lambdas are compared *within* trials, and paired statistics answer the source's question
(:func:`lambda_tests`, :func:`variance_decomposition`, :func:`compare_measures`).

Every (lambda, trial) is one cached unit: an interrupted search continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from .. import data as data_mod
from .. import metrics, scenarios
from ..config import check_bool, check_choice, check_float, check_int, fail
from ..models import BatchNorm, Conv2d, Flatten, Linear, MaxPool2d
from ..regularizers import EWC, GRAD_METHODS, MEASURES, make_importance
from ..results import group_without, run_cached
from ..rng import ModelStreams, derive_seed, generator
from ..train import Schedule, train
from .common import ExperimentConfig, adam, group_provenance, load_data, resolve_device
from .common import describe as describe  # re-exported: the notebook calls it on this module
from .common import figure_provenance as figure_provenance

NOTEBOOK = "02_ewc_lambda"
EXPERIMENT = "lambda_runs"  # one cache for every (measure, lambda, seeds) unit: search and study share it
NOISES = ("crn", "independent")
MEASURE_LABELS = {
    "none": "none",
    "weight_decay": "weight decay (Ω = 1)",
    "fisher_true": "Fisher (true)",
    "fisher_empirical": "Fisher (empirical)",
    "sign_flipping": "sign flipping",
    "momentum_based": "momentum based",
    "weight_change": "weight change",
    "mas": "MAS",
    "si": "SI",
}

#: The source's stored data (data/lambda_search_fisher_data.json; algorithms.md section 2):
#: its headline graph, Fisher measure (its own, per-batch, label-free variant).
SOURCE_FACTS = {
    "trials": 17,
    "lambdas per trial": 20,
    "lambda range": (0.0, 19.8),
    "measure at lambda 0": (15.4, 30.0),
    "measure above 0": (9.5, 17.0),
    "median above 0": 11.5,
    "best lambda per trial": (0.55, 16.6),
}


# ====================================================================== configuration


@dataclasses.dataclass(frozen=True)
class EWCLambdaConfig(ExperimentConfig):
    """Parameters of notebook 02. Defaults = the source's protocol (the ``paper`` profile)."""

    NOTEBOOK: ClassVar[str] = NOTEBOOK

    PROFILE_OVERRIDES: ClassVar = {
        "smoke": dict(
            channels=(4, 4, 8, 8),  # not 2 per layer: oneDNN's grouped conv backward took 5 s a step there
            dense=(8, 8),
            epochs=1,
            batch_size=64,
            train_per_task=256,
            fisher_samples=64,
            search_trials=1,
            num_steps=3,
            measures=("fisher_true", "weight_decay"),
            grid=(0.0, 0.3, 3.0),
            trials=3,
        ),
        # quick (measured ~7 min on 2 CPU cores): 16 trials x 7 lambdas for 3 measures (+ the
        # independent-noise check); a grid wide enough that the measure rises again on both sides
        "quick": dict(
            channels=(8, 8, 16, 16),
            dense=(32, 32),
            epochs=2,
            train_per_task=1200,
            fisher_samples=300,
            search_trials=2,
            num_steps=6,
            measures=("fisher_true", "weight_decay", "si"),
            grid=(0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
            trials=16,
            models_per_run=48,
        ),
        "paper": {},
    }

    # -- data and tasks (the source's README)
    data: str = "mnist"  # the source's data set; torchvision downloads it when missing
    offline: bool | None = None  # None: from CLX_OFFLINE; True: download nothing, use a real stand-in
    offline_data: str = "mnist_subset"  # MNIST's offline stand-in: "mnist_subset" or "fashion_mnist"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    task_classes: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5))  # one head per task
    train_per_task: int = 0  # training images per task (a fixed subset); 0 = all
    # -- model and training (the source's lambdaSearch.py)
    channels: tuple[int, int, int, int] = (32, 32, 64, 64)  # the four 3x3 conv layers
    dense: tuple[int, ...] = (32, 32)  # dense ReLU layers before the heads
    epochs: int = 10  # per task
    batch_size: int = 32
    lr: float = 1e-3  # Adam, default settings
    # -- EWC
    fisher_samples: int = 0  # training samples per task for Fisher/MAS; 0 = all (the source: all)
    fisher_method: str = "closed_form"  # per-sample gradient engine (all give the same numbers)
    normalize_importance: bool = True  # Omega / mean(Omega): one lambda scale for every measure
    online: bool = False  # online EWC (one running term) instead of one term per task
    gamma: float = 1.0  # online EWC's decay of old importance
    si_xi: float = 0.1  # SI's damping
    # -- the source's recursive search (figure 1)
    search_measure: str = "fisher_true"  # the source's headline used its FISHER_MATRIX
    search_low: tuple[float, float] = (0.0, 0.0)  # SEARCH_LOW_PARAM_RANGE
    search_high: tuple[float, float] = (10.0, 20.0)  # SEARCH_HIGH_PARAM_RANGE
    num_steps: int = 20  # NUM_STEPS: lambdas per grid
    threshold: float = 10.0  # SEARCH_TERMINATION_THRESHOLD
    search_trials: int = 17  # as many as the source's stored data; 0 = until interrupted
    search_noise: str = "independent"  # the source: one base model, but its own data order per lambda
    # -- the answer (figure 2): a fixed grid, many trials, every measure
    measures: tuple[str, ...] = (
        "fisher_true",
        "fisher_empirical",
        "weight_decay",
        "sign_flipping",
        "momentum_based",
        "weight_change",
        "mas",
        "si",
    )
    # the lambdas every trial trains: log-spaced, since with Omega normalised to mean 1 the useful
    # range spans orders of magnitude (the source's linear [0, 20] is its upper end); must start at 0
    grid: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    trials: int = 50  # per measure; 0 = until interrupted
    noise: str = "crn"  # "crn": same base model and data order for every lambda of a trial
    noise_check: bool = True  # also run the first measure with independent noise (what CRN buys)
    models_per_run: int = 200  # most models trained together in one network
    seed: int = 0  # trial t uses seeds derived from (seed, t)

    def validate(self) -> None:
        check_choice("data", self.data, ("mnist", "fashion_mnist"))
        check_choice("offline_data", self.offline_data, data_mod.OFFLINE_SUBSTITUTES["mnist"])
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_task_classes(self.task_classes)
        check_int("train_per_task", self.train_per_task, 0)
        if len(self.channels) != 4:
            fail("channels", self.channels, "give the widths of the 4 conv layers")
        for c in self.channels:
            check_int("channels", c, 1)
        if not self.dense:
            fail("dense", self.dense, "give at least one dense layer width")
        for d in self.dense:
            check_int("dense", d, 1)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr, 0, low_open=True)
        check_int("fisher_samples", self.fisher_samples, 0)
        check_choice("fisher_method", self.fisher_method, GRAD_METHODS)
        check_bool("normalize_importance", self.normalize_importance)
        check_bool("online", self.online)
        check_float("gamma", self.gamma, 0, 1)
        check_float("si_xi", self.si_xi, 0, low_open=True)
        check_choice("search_measure", self.search_measure, MEASURES)
        for name in ("search_low", "search_high"):
            rng = getattr(self, name)
            if len(rng) != 2:
                fail(name, rng, "give a (min, max) pair")
            for v in rng:
                check_float(name, v, 0)
            if rng[0] > rng[1]:
                fail(name, rng, "min must be <= max")
        if self.search_low[1] > self.search_high[0]:
            fail("search_low", self.search_low, f"the low bound must not exceed the high bound {self.search_high}")
        check_int("num_steps", self.num_steps, 2)
        check_float("threshold", self.threshold, 0, low_open=True)
        if self.search_high[1] - self.search_low[0] <= self.threshold:
            widest = self.search_high[1] - self.search_low[0]
            fail("threshold", self.threshold, f"must be below the widest bracket {widest}: no trial could train")
        check_int("search_trials", self.search_trials, 0)
        check_choice("search_noise", self.search_noise, NOISES)
        if not self.measures:
            fail("measures", self.measures, "name at least one importance measure")
        for m in self.measures:
            check_choice("measures", m, MEASURES)
        if len(self.grid) < 3:
            fail("grid", self.grid, "give at least 3 lambdas (0, a best one and a neighbour)")
        for v in self.grid:
            check_float("grid", v, 0)
        if self.grid[0] != 0 or any(b <= a for a, b in itertools.pairwise(self.grid)):
            fail("grid", self.grid, "must start at 0 (the no-EWC baseline) and increase strictly")
        check_int("trials", self.trials, 0)
        check_choice("noise", self.noise, NOISES)
        check_bool("noise_check", self.noise_check)
        check_int("models_per_run", self.models_per_run, 0)
        check_int("seed", self.seed, 0)


def _check_task_classes(task_classes) -> None:
    """Reject empty, overlapping or out-of-range task class lists before any data is loaded."""
    if len(task_classes) < 2:
        fail("task_classes", task_classes, "give at least two tasks (EWC protects earlier tasks)")
    flat = []
    for cs in task_classes:
        if len(cs) == 0:
            fail("task_classes", task_classes, "every task needs at least one class")
        for c in cs:
            check_int("task_classes", c, 0, 9)
        flat.extend(cs)
    if len(set(flat)) != len(flat):
        fail("task_classes", task_classes, "tasks must not share classes")


# ====================================================================== the model


def _patches(x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H' W', C k k) patches via strided views (F.unfold was far slower here)."""
    if padding:
        x = F.pad(x, (padding,) * 4)
    p = x.unfold(2, k, stride).unfold(3, k, stride)  # (N, C, H', W', k, k)
    n, c, h, w = p.shape[:4]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(n, h * w, c * k * k)


def _grouped(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, B, C, H, W) input and (K, O, C, k, k) weight in the layout of one grouped convolution."""
    k, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:]), weight.reshape(-1, *weight.shape[2:])


class _PatchGradConv(torch.autograd.Function):
    """Grouped convolution forward; weight gradient as patches^T @ output gradient (one bmm)."""

    generate_vmap_rule = True  # torch.func (the vmap per-sample engine) runs it sample by sample

    @staticmethod
    def forward(x, weight, bias, stride, padding):
        k, b = x.shape[:2]
        xg, wg = _grouped(x, weight)
        y = F.conv2d(xg, wg, bias.reshape(-1), stride, padding, groups=k)
        return y.view(b, k, -1, *y.shape[2:]).transpose(0, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, stride, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        k, b, o = gy.shape[:3]
        g = gy.permute(0, 1, 3, 4, 2).reshape(k, -1, o)  # (K, B L, O)
        gw = gb = gx = None
        if ctx.needs_input_grad[1]:
            cols = _patches(x.flatten(0, 1), weight.shape[-1], ctx.stride, ctx.padding)  # (K B, L, C k k)
            gw = torch.bmm(cols.reshape(k, -1, cols.shape[-1]).transpose(1, 2), g)  # (K, C k k, O)
            gw = gw.transpose(1, 2).reshape(weight.shape)
        if ctx.needs_input_grad[2]:
            gb = g.sum(1)
        if ctx.needs_input_grad[0]:
            xg, wg = _grouped(x, weight)
            gyg = gy.transpose(0, 1).reshape(b, k * o, *gy.shape[3:])
            gxg = torch.nn.grad.conv2d_input(xg.shape, wg, gyg, ctx.stride, ctx.padding, groups=k)
            gx = gxg.view(b, k, *x.shape[2:]).transpose(0, 1)
        return gx, gw, gb, None, None


class PatchConv2d(Conv2d):
    """:class:`~clx_core.models.Conv2d` whose weight gradient is computed from patches.

    Same parameters, outputs and gradients; used for the first layer (one input channel), where
    oneDNN's grouped-convolution weight gradient was pathologically slow here (measured, one
    training step of the smoke network at 9 models: 0.8 s -> 0.04 s; the grouped forward is
    kept, it is 2-4x faster than patches @ weights).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None or not torch.is_grad_enabled():
            return super().forward(x)
        return _PatchGradConv.apply(x, self.weight, self.bias, self.stride, self.padding)


class ConvNet(nn.Module):
    """The source's base model for K models, with one output layer whose slices are the heads.

    Conv(c1, 3x3, ReLU) -> MaxPool 2 -> BatchNorm -> Conv(c2) -> Conv(c3) -> BatchNorm ->
    Conv(c4) -> Flatten -> Dense(d, ReLU) x n -> head. BatchNorm as Keras's default (momentum
    0.99 = our 0.01, eps 1e-3), after the ReLU as in the source. Initialisation is PyTorch's
    default, not Keras's Glorot (per-model streams need our own initialiser). The first conv
    is a :class:`PatchConv2d` (speed only).
    """

    def __init__(self, channels, dense, n_outputs: int, gens, image: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        c1, c2, c3, c4 = channels
        K = len(gens)
        side = (image[1] - 2) // 2 - 6  # 3 valid 3x3 convs after the pool
        layers: list[nn.Module] = [
            PatchConv2d(image[0], c1, 3, gens),
            nn.ReLU(),
            MaxPool2d(2),
            BatchNorm(c1, K, momentum=0.01, eps=1e-3),
            Conv2d(c1, c2, 3, gens),
            nn.ReLU(),
            Conv2d(c2, c3, 3, gens),
            nn.ReLU(),
            BatchNorm(c3, K, momentum=0.01, eps=1e-3),
            Conv2d(c3, c4, 3, gens),
            nn.ReLU(),
            Flatten(),
        ]
        width = c4 * side * side
        for d in dense:
            layers += [Linear(width, d, gens), nn.ReLU()]
            width = d
        self.hidden = nn.Sequential(*layers)
        self.head = Linear(width, n_outputs, gens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


# ====================================================================== one grid of lambdas


def _scenario(cfg: EWCLambdaConfig, data: data_mod.ImageData) -> scenarios.Scenario:
    scen = scenarios.split(data, "task", task_classes=[list(c) for c in cfg.task_classes])
    if cfg.train_per_task:
        # a fixed subset per task (the same for every trial): quick runs stay quick on full MNIST
        keep = []
        for t, idx in enumerate(scen.train_index):
            perm = torch.randperm(len(idx), generator=generator(0, "train_subset", t))[: cfg.train_per_task]
            keep.append(idx[perm.sort().values.to(idx.device)])
        scen = dataclasses.replace(scen, train_index=keep)
    return scen


def epoch_ends(scen: scenarios.Scenario, batch_size: int, epochs: int) -> tuple[list[int], list[int]]:
    """Global iterations at the end of every epoch, and the task being trained at each."""
    steps, phase, at = [], [], 0
    for t, idx in enumerate(scen.train_index):
        per_epoch = max(1, len(idx) // batch_size)
        for _ in range(epochs):
            at += per_epoch
            steps.append(at)
            phase.append(t)
    return steps, phase


def lambda_measure(epoch_loss: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """The source's measure: sum over tasks k of k's test loss after every epoch from k's start on.

    ``epoch_loss`` (..., n_epochs, T) test losses after each epoch, ``phase`` (n_epochs,) the task
    trained in each epoch. A unit-width Riemann sum of each task's loss curve from its
    introduction; lower is better.
    """
    phase = np.asarray(phase)
    seen = np.arange(epoch_loss.shape[-1])[None, :] <= phase[:, None]  # (n_epochs, T)
    return (np.asarray(epoch_loss) * seen).sum(axis=(-2, -1))


def train_lambdas(
    cfg: EWCLambdaConfig, measure: str, lambdas, init_seeds, data_seeds
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train one model per (lambda, init seed, data seed) as one many-models network.

    Model k starts from the base model of ``init_seeds[k]`` and draws its data order, Fisher
    samples and sampled labels from ``data_seeds[k]``: equal seeds for every lambda of a trial
    are common random numbers. Returns one result per model and the provenance.
    """
    device = resolve_device(cfg.device)
    data = load_data(cfg.data, cfg.is_offline, cfg.offline_data, str(device))
    scen = _scenario(cfg, data)
    streams = ModelStreams(list(data_seeds))
    streams.init = [generator(s, "init") for s in init_seeds]  # the trial's base model
    model = ConvNet(cfg.channels, cfg.dense, scen.n_outputs, streams.init, tuple(data.shape)).to(device)
    importance = make_importance(
        measure, fisher_samples=cfg.fisher_samples or None, fisher_method=cfg.fisher_method, si_xi=cfg.si_xi
    )
    ewc = EWC(importance, list(lambdas), online=cfg.online, gamma=cfg.gamma, normalize=cfg.normalize_importance)
    ends, phase = epoch_ends(scen, cfg.batch_size, cfg.epochs)
    schedule = Schedule(batch_size=cfg.batch_size, epochs=cfg.epochs, eval_at=tuple(ends), eval_samples=None)
    hist = train(model, adam(model.parameters(), cfg.lr), scen, schedule, streams, methods=[ewc], progress_bar=False)
    if hist.curve_steps != ends:
        raise RuntimeError(f"evaluations at {hist.curve_steps}, expected every epoch end {ends}")
    values = lambda_measure(hist.curve_loss, np.array(phase))
    results = []
    for k in range(len(lambdas)):
        results.append(
            {
                "measure": float(values[k]),
                "average_accuracy": float(metrics.average_accuracy(hist.acc[k])),
                "bwt": float(metrics.backward_transfer(hist.acc[k])),
                "acc": hist.acc[k].tolist(),
                "epoch_loss": hist.curve_loss[k].tolist(),
                "epoch_acc": hist.curve_acc[k].tolist(),
                "phase": phase,
                "seconds_per_model": hist.seconds / len(lambdas),
            }
        )
    prov = group_provenance(
        device, scen.data, scenario=scen.describe(), profile=cfg.profile, train_seconds=hist.seconds
    )
    return results, prov


# ====================================================================== the search


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """One search: the source's (random bounds, recursion) or the study's (fixed grid, one pass)."""

    measure: str
    low: tuple[float, float]
    high: tuple[float, float]
    steps: int
    threshold: float
    trials: int  # 0 = until interrupted
    noise: str
    max_passes: int | None = None
    label: str = ""
    grid: tuple[float, ...] | None = None  # a fixed first grid instead of linspace(low, high, steps)


@dataclasses.dataclass
class _Trial:
    index: int
    seed: int
    low: float
    high: float
    passes: int = 0
    done: bool = False


def _unit_base(cfg: EWCLambdaConfig) -> dict[str, Any]:
    return dict(
        data=cfg.data,
        offline_data=cfg.offline_data if cfg.is_offline else None,
        task_classes=[list(c) for c in cfg.task_classes],
        train_per_task=cfg.train_per_task,
        channels=list(cfg.channels),
        dense=list(cfg.dense),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        fisher_samples=cfg.fisher_samples,
        fisher_method=cfg.fisher_method,
        normalize_importance=cfg.normalize_importance,
        online=cfg.online,
        gamma=cfg.gamma,
        si_xi=cfg.si_xi,
    )


def trial_seed(cfg: EWCLambdaConfig, index: int) -> int:
    """Seed of trial ``index``: its base model (and, with CRN, its data order)."""
    return derive_seed(cfg.seed, "trial", index) % 2**31


def _new_trial(cfg: EWCLambdaConfig, spec: SearchSpec, index: int) -> _Trial:
    seed = trial_seed(cfg, index)
    rng = np.random.default_rng(derive_seed(seed, "bounds"))
    low = float(rng.uniform(*spec.low))
    high = float(rng.uniform(*spec.high))
    return _Trial(index, seed, low, high)


def _grid_units(cfg: EWCLambdaConfig, spec: SearchSpec, tr: _Trial) -> list[dict[str, Any]]:
    lambdas = spec.grid if spec.grid is not None and tr.passes == 0 else np.linspace(tr.low, tr.high, spec.steps)
    units = []
    for i, lam in enumerate(lambdas):
        data_seed = tr.seed if spec.noise == "crn" else derive_seed(tr.seed, "noise", tr.passes, i) % 2**31
        units.append(
            dict(_unit_base(cfg), measure=spec.measure, lam=float(lam), init_seed=tr.seed, data_seed=data_seed)
        )
    return units


def search(cfg: EWCLambdaConfig, spec: SearchSpec, progress: bool = True) -> pd.DataFrame:
    """The source's recursive search, every grid of every trial trained at once, resumable.

    Per trial: low ~ U(spec.low), high ~ U(spec.high); while high - low > threshold: train
    linspace(low, high, steps) from the trial's base model, then narrow to the grid points either
    side of the best (NaN measures are skipped). Grids of several trials train together in one
    network. Every finished lambda is saved; a rerun continues from the cache. ``trials = 0``
    runs until interrupted (Ctrl-C stops cleanly and returns what has finished).
    """
    store = cfg.store()
    per_round = spec.trials or max(1, (cfg.models_per_run or 200) // spec.steps)
    trial_ids = itertools.count() if spec.trials == 0 else iter(range(spec.trials))
    rows: list[dict[str, Any]] = []

    def run_group(units):
        lams = [u["lam"] for u in units]
        return train_lambdas(
            cfg, units[0]["measure"], lams, [u["init_seed"] for u in units], [u["data_seed"] for u in units]
        )

    try:
        while True:
            trials = [_new_trial(cfg, spec, i) for i in itertools.islice(trial_ids, per_round)]
            if not trials:
                break
            while True:
                todo = []
                for tr in trials:
                    fixed_first = spec.grid is not None and tr.passes == 0  # a given grid always runs once
                    narrow = tr.high - tr.low <= spec.threshold and not fixed_first
                    if narrow or (spec.max_passes and tr.passes >= spec.max_passes):
                        tr.done = True
                    if not tr.done:
                        todo.append((tr, _grid_units(cfg, spec, tr)))
                if not todo:
                    break
                units = [u for _, us in todo for u in us]
                records = run_cached(
                    store,
                    EXPERIMENT,
                    units,
                    run_group,
                    group_without("lam", "init_seed", "data_seed"),
                    max_group=cfg.models_per_run or 10**6,
                    progress=progress,
                )
                at = 0
                for tr, us in todo:
                    recs = records[at : at + len(us)]
                    at += len(us)
                    rows.extend(_rows(spec, tr, recs))
                    values = np.array([r["result"]["measure"] for r in recs])
                    if np.isnan(values).all():
                        tr.done = True  # the source stops a trial whose whole grid fell over
                        continue
                    best = int(np.nanargmin(values))
                    lams = [r["params"]["lam"] for r in recs]
                    tr.low, tr.high = lams[max(best - 1, 0)], lams[min(best + 1, len(lams) - 1)]
                    tr.passes += 1
    except KeyboardInterrupt:
        done = len({r["trial"] for r in rows})
        print(f"interrupted: {len(rows)} finished lambdas of {done} trials are saved; rerun to continue")
    return pd.DataFrame(rows)


def _rows(spec: SearchSpec, tr: _Trial, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in recs:
        p, res = r["params"], r["result"]
        out.append(
            {
                "study": spec.label,
                "importance": spec.measure,
                "noise": spec.noise,
                "trial": tr.index,
                "pass": tr.passes,
                "lam": p["lam"],
                "measure": res["measure"],
                "average_accuracy": res["average_accuracy"],
                "bwt": res["bwt"],
                "epoch_loss": np.array(res["epoch_loss"]),
                "epoch_acc": np.array(res["epoch_acc"]),
                "phase": res["phase"],
                "data": r["provenance"]["data"],
                "seconds_per_model": res["seconds_per_model"],
            }
        )
    return out


def source_search(cfg: EWCLambdaConfig, progress: bool = True) -> pd.DataFrame:
    """Figure 1's runs: the source's search as it was (random bounds, recursion, its noise)."""
    spec = SearchSpec(
        cfg.search_measure,
        cfg.search_low,
        cfg.search_high,
        cfg.num_steps,
        cfg.threshold,
        cfg.search_trials,
        cfg.search_noise,
        label="source search",
    )
    return search(cfg, spec, progress)


def study(cfg: EWCLambdaConfig, progress: bool = True) -> pd.DataFrame:
    """Figure 2's runs: every measure on one fixed grid ``cfg.grid``, ``trials`` trials each.

    The search with a fixed grid and a single pass: every trial sees the same lambdas, so
    trials can be averaged and paired. With ``noise_check`` the
    first measure also runs with independent noise (same trials, fresh data order per lambda).
    """
    runs = [(m, cfg.noise) for m in cfg.measures]
    if cfg.noise_check:
        other = "independent" if cfg.noise == "crn" else "crn"
        runs.append((cfg.measures[0], other))
    frames = []
    for measure, noise in runs:
        top = (cfg.grid[-1], cfg.grid[-1])
        spec = SearchSpec(measure, (0.0, 0.0), top, len(cfg.grid), 0.0, cfg.trials, noise, 1, "study", cfg.grid)
        frames.append(search(cfg, spec, progress))
    return pd.concat(frames, ignore_index=True)


# ====================================================================== statistics


def measure_matrix(runs: pd.DataFrame, importance: str, noise: str) -> tuple[np.ndarray, np.ndarray]:
    """(lambdas (L,), measure (trials, L)) of one measure and noise, complete trials only."""
    g = runs[(runs.importance == importance) & (runs.noise == noise)]
    table = g.pivot_table(index="trial", columns="lam", values="measure", aggfunc="first").dropna()
    return table.columns.to_numpy(float), table.to_numpy(float)


def best_lambdas(runs: pd.DataFrame) -> pd.DataFrame:
    """Per trial: the lambda with the lowest measure among all it evaluated (every pass)."""
    ok = runs.dropna(subset=["measure"])
    idx = ok.groupby(["importance", "noise", "trial"]).measure.idxmin()
    return ok.loc[idx, ["importance", "noise", "trial", "lam", "measure"]].reset_index(drop=True)


def _test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    t = metrics.paired_test(a, b)
    d = a - b
    s = metrics.summarize(d) if len(d) > 1 else None
    t["ci_low"] = s.ci_low if s else math.nan
    t["ci_high"] = s.ci_high if s else math.nan
    return t


def lambda_tests(runs: pd.DataFrame, noise: str = "crn") -> pd.DataFrame:
    """Per measure: is the best lambda's measure lower than lambda = 0's and its neighbours'?

    Paired over trials (same base model; with CRN also the same data order). The best lambda is
    the grid point with the lowest mean. In-sample tests reuse the trials that picked it
    (optimistic); the held-out row picks it on the even trials and tests on the odd ones.
    """
    rows = []
    for imp in dict.fromkeys(runs[runs.noise == noise].importance):
        lams, M = measure_matrix(runs, imp, noise)
        if M.shape[0] < 2:
            continue
        halves = {
            "in-sample": (np.arange(len(M)), np.arange(len(M))),
            "held-out": (np.arange(0, len(M), 2), np.arange(1, len(M), 2)),
        }
        for how, (pick, test) in halves.items():
            if len(test) < 2:
                continue
            j = int(np.nanargmin(M[pick].mean(0)))
            row: dict[str, Any] = {
                "measure": imp,
                "selection": how,
                "trials tested": len(test),
                "best λ": lams[j],
                "at best": M[test, j].mean(),
            }
            for name, jj in (("λ = 0", 0), ("left neighbour", j - 1), ("right neighbour", j + 1)):
                if jj < 0 or jj >= len(lams) or jj == j:
                    row[f"Δ vs {name}"] = math.nan
                    row[f"p vs {name}"] = math.nan
                    continue
                t = _test(M[test, j], M[test, jj])
                row[f"Δ vs {name}"] = t["mean_diff"]
                row[f"p vs {name}"] = t["p_t"]
                row[f"d_z vs {name}"] = t["cohen_dz"]
                row[f"Wilcoxon p vs {name}"] = t["p_wilcoxon"]
            rows.append(row)
    return pd.DataFrame(rows)


def variance_decomposition(M: np.ndarray) -> dict[str, float]:
    """Two-way decomposition of a (trials, lambdas) table: trial + lambda + residual.

    Fractions of the total sum of squares, and the repeated-measures F-test of the lambda effect
    (lambda vs residual = trial x lambda interaction, the within-trial noise).
    """
    T, L = M.shape
    grand = M.mean()
    ss_trial = L * ((M.mean(1) - grand) ** 2).sum()
    ss_lam = T * ((M.mean(0) - grand) ** 2).sum()
    ss_tot = ((M - grand) ** 2).sum()
    ss_res = max(ss_tot - ss_trial - ss_lam, 0.0)
    df_lam, df_res = L - 1, (T - 1) * (L - 1)
    F = (ss_lam / df_lam) / (ss_res / df_res) if ss_res > 0 and df_res > 0 else math.inf
    p = float(stats.f.sf(F, df_lam, df_res)) if math.isfinite(F) else 0.0
    return {
        "trials": T,
        "lambdas": L,
        "between trials": ss_trial / ss_tot,
        "between lambdas": ss_lam / ss_tot,
        "residual (trial x lambda)": ss_res / ss_tot,
        "F (lambda)": F,
        "p (lambda)": p,
    }


def variance_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Variance decomposition per measure and noise, with all lambdas and with lambda > 0 only."""
    rows = []
    for (imp, noise), _ in runs.groupby(["importance", "noise"], sort=False):
        lams, M = measure_matrix(runs, imp, noise)
        if M.shape[0] < 2:
            continue
        for which, cols in (("all λ", slice(None)), ("λ > 0", lams > 0)):
            sub = M[:, cols]
            if sub.shape[1] < 2:
                continue
            d = variance_decomposition(sub)
            rows.append({"measure": imp, "noise": noise, "lambdas": which, "n λ": d.pop("lambdas"), **d})
    return pd.DataFrame(rows)


def compare_measures(runs: pd.DataFrame, noise: str = "crn") -> pd.DataFrame:
    """Each measure at its own best lambda (lowest mean), with a 95% CI over trials, and paired
    differences to the best measure (trials share base models and data order across measures).
    Held-out: lambda picked on the even trials, the value measured on the odd ones."""
    rows, held = [], {}
    for imp in dict.fromkeys(runs[runs.noise == noise].importance):
        lams, M = measure_matrix(runs, imp, noise)
        if len(M) == 0:
            continue
        j = int(np.nanargmin(M.mean(0)))
        s = metrics.summarize(M[:, j])
        odd = np.arange(1, len(M), 2)
        jh = int(np.nanargmin(M[0::2].mean(0)))
        held[imp] = (M[:, j], M[odd, jh])
        rows.append(
            {
                "measure": imp,
                "best λ": lams[j],
                "mean at best λ": s.mean,
                "95% CI": f"[{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.n > 1 else "-",
                "held-out mean": float(M[odd, jh].mean()) if len(odd) else math.nan,
                "at λ = 0": float(M[:, 0].mean()),
                "final accuracy at best λ (%)": 100 * _mean_at(runs, imp, noise, lams[j], "average_accuracy"),
                "BWT at best λ (%)": 100 * _mean_at(runs, imp, noise, lams[j], "bwt"),
                "trials": len(M),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    best = table.loc[table["mean at best λ"].idxmin(), "measure"]
    diffs, ps, cis = [], [], []
    for imp in table.measure:
        a, b = held[imp][0], held[best][0]
        n = min(len(a), len(b))
        if imp == best or n < 2:
            diffs.append(0.0 if imp == best else math.nan)
            ps.append(math.nan)
            cis.append("-")
            continue
        t = _test(a[:n], b[:n])
        diffs.append(t["mean_diff"])
        ps.append(t["p_t"])
        cis.append(f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]")
    table[f"Δ vs {best}"] = diffs
    table["Δ 95% CI"] = cis
    table["p (paired t)"] = ps
    return table.sort_values("mean at best λ").reset_index(drop=True)


def _mean_at(runs: pd.DataFrame, imp: str, noise: str, lam: float, col: str) -> float:
    g = runs[(runs.importance == imp) & (runs.noise == noise) & np.isclose(runs.lam, lam)]
    return float(g[col].mean())


def source_comparison(search_runs: pd.DataFrame) -> pd.DataFrame:
    """Our faithful search next to the facts of the source's stored data."""
    zero = search_runs[search_runs.lam == 0].measure
    above = search_runs[search_runs.lam > 0].measure
    best = best_lambdas(search_runs).lam
    per_trial = search_runs.groupby("trial").size()

    def span(v) -> str:
        return f"{np.min(v):.3g} - {np.max(v):.3g}" if len(v) else "-"

    f = SOURCE_FACTS
    rows = [
        ("trials", f"{f['trials']}", f"{search_runs.trial.nunique()}"),
        ("lambdas per trial", f"{f['lambdas per trial']}", f"{int(per_trial.median()) if len(per_trial) else 0}"),
        ("lambda range", span(f["lambda range"]), span(search_runs.lam)),
        ("measure at λ = 0", span(f["measure at lambda 0"]), span(zero)),
        ("measure at λ > 0", span(f["measure above 0"]), span(above)),
        ("median at λ > 0", f"{f['median above 0']}", f"{np.median(above):.3g}" if len(above) else "-"),
        (
            "median(λ = 0) / median(λ > 0)",
            f"{np.median([15.4, 30.0]) / f['median above 0']:.2f} (range midpoint)",
            f"{np.median(zero) / np.median(above):.2f}" if len(zero) and len(above) else "-",
        ),
        ("best λ per trial", span(f["best lambda per trial"]), span(best)),
    ]
    return pd.DataFrame(rows, columns=["", "source (stored data)", "this run"]).set_index("")


# ====================================================================== reporting


def key_numbers(search_runs: pd.DataFrame, study_runs: pd.DataFrame) -> str:
    """Rounded headline numbers: the notebook's regression-checked output."""
    lines = [f"search: {search_runs.trial.nunique()} trials, {len(search_runs)} lambdas"]
    for imp, noise in study_runs[["importance", "noise"]].drop_duplicates().itertuples(index=False):
        _, M = measure_matrix(study_runs, imp, noise)
        lines.append(
            f"{imp:16s} {noise:11s} trials {len(M)}  λ=0 {M[:, 0].mean():6.2f}  min mean {M.mean(0).min():6.2f}"
        )
    return "\n".join(lines)


def plot_search(search_runs: pd.DataFrame, title_measure: str):
    """Figure 1, the source's graph: measure vs lambda, one colour per trial."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.get_cmap("tab20")
    for i, (trial, g) in enumerate(search_runs.groupby("trial")):
        g = g.sort_values("lam")
        ax.scatter(g.lam, g.measure, s=16, color=colors(i % 20), label=f"trial {trial + 1}")
    ax.set_xlabel("λ")
    ax.set_ylabel("measure (sum of test losses over epochs)")
    ax.set_title(f"Measure over EWC λ, {MEASURE_LABELS[title_measure]} (the source's search)")
    if search_runs.trial.nunique() <= 20:
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def _lambda_axis(ax, lams) -> None:
    """Symmetric-log x axis when the lambdas span orders of magnitude (0 stays on the axis)."""
    pos = np.asarray(lams)[np.asarray(lams) > 0]
    if len(pos) > 1 and pos.max() / pos.min() > 20:
        ax.set_xscale("symlog", linthresh=pos.min(), linscale=0.5)


def _panels(n: int, width: float = 3.3, height: float = 2.7):
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_study(study_runs: pd.DataFrame, noise: str = "crn"):
    """Figure 2: mean measure vs lambda with 95% CI bands over trials, one panel per measure
    (the independent-noise run, when there is one, drawn in grey for contrast)."""
    from ..plotting import curve_with_band

    measures = list(dict.fromkeys(study_runs[study_runs.noise == noise].importance))
    fig, axes = _panels(len(measures))
    for ax, imp in zip(axes, measures, strict=True):
        for nz, color in ((noise, None), *[(o, "0.5") for o in NOISES if o != noise]):
            lams, M = measure_matrix(study_runs, imp, nz)
            if len(M) < 2:
                continue
            curve_with_band(ax, lams, M, f"{nz} ({len(M)} trials)", color=color, marker="o", ms=3)
            if nz == noise:
                j = int(np.argmin(M.mean(0)))
                ax.axvline(lams[j], color="C3", lw=0.8, ls=":")
        _lambda_axis(ax, lams)
        ax.set_title(MEASURE_LABELS[imp], fontsize=10)
        ax.set_xlabel("λ")
        ax.set_ylabel("measure")
        ax.legend(fontsize=7)
    fig.suptitle("Mean measure over λ with 95% CI over trials (dotted: lowest mean)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_differences(study_runs: pd.DataFrame, noise: str = "crn"):
    """Measure minus its value at the best lambda, paired within trials (mean, 95% CI): a lambda
    whose band lies above 0 is significantly worse than the best."""
    from ..plotting import curve_with_band

    measures = list(dict.fromkeys(study_runs[study_runs.noise == noise].importance))
    fig, axes = _panels(len(measures))
    for ax, imp in zip(axes, measures, strict=True):
        lams, M = measure_matrix(study_runs, imp, noise)
        if len(M) < 2:
            continue
        j = int(np.argmin(M.mean(0)))
        keep = lams > 0  # lambda 0 is far off the scale of the differences
        curve_with_band(ax, lams[keep], (M - M[:, [j]])[:, keep], MEASURE_LABELS[imp], marker="o", ms=3)
        ax.axhline(0, color="k", lw=0.8)
        _lambda_axis(ax, lams)
        ax.set_title(MEASURE_LABELS[imp], fontsize=10)
        ax.set_xlabel("λ (> 0)")
        ax.set_ylabel("Δ measure vs best λ")
    fig.suptitle("Paired difference to the best λ (mean and 95% CI over trials)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_best_lambdas(study_runs: pd.DataFrame, search_runs: pd.DataFrame | None = None, noise: str = "crn"):
    """The distribution of the per-trial best lambda, per measure (and the source search's)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    best = best_lambdas(study_runs[study_runs.noise == noise]).assign(run=lambda d: d.importance.map(MEASURE_LABELS))
    if search_runs is not None and len(search_runs):
        extra = best_lambdas(search_runs).assign(run="source search, " + MEASURE_LABELS[search_runs.importance.iloc[0]])
        best = pd.concat([best, extra], ignore_index=True)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * best.run.nunique() + 1.5))
    sns.boxplot(data=best, x="lam", y="run", ax=ax, color="0.9", fliersize=0, width=0.6)
    sns.stripplot(data=best, x="lam", y="run", ax=ax, size=4, alpha=0.7, jitter=0.2)
    _lambda_axis(ax, best.lam)
    ax.set_xlabel("best λ of a trial")
    ax.set_ylabel("")
    ax.set_title("Where each trial's best λ lies")
    fig.tight_layout()
    return fig


def verdict(study_runs: pd.DataFrame, search_runs: pd.DataFrame, noise: str = "crn") -> str:
    """The answer in words, computed from this run's numbers."""
    tests = lambda_tests(study_runs, noise)
    var = variance_table(study_runs)
    comp = compare_measures(study_runs, noise)
    lines = []

    grid = sorted(study_runs.lam.unique())

    def lams_right(h) -> str:
        i = grid.index(h["best λ"])
        return f"{grid[i + 1]:.3g}" if i + 1 < len(grid) else "-"

    def p_text(p: float) -> str:
        return f"{p:.2g}" if np.isfinite(p) else "n/a"

    def p_word(p: float) -> str:
        if not np.isfinite(p):
            return "untestable"
        return "significant" if p < 0.05 else "not significant"

    for _, r in tests[tests.selection == "in-sample"].iterrows():
        held = tests[(tests.selection == "held-out") & (tests.measure == r.measure)]
        text = (
            f"- **{MEASURE_LABELS[r.measure]}** ({r['trials tested']} trials): lowest mean measure at "
            f"λ = {r['best λ']:.3g} ({r['at best']:.3f}); vs λ = 0: Δ = {r['Δ vs λ = 0']:+.3f} "
            f"(p = {r['p vs λ = 0']:.2g}, {p_word(r['p vs λ = 0'])}); "
            f"vs its neighbours: Δ = {r['Δ vs left neighbour']:+.3f} "
            f"(p = {r['p vs left neighbour']:.2g}) and {r['Δ vs right neighbour']:+.3f} "
            f"(p = {r['p vs right neighbour']:.2g})."
        )
        if len(held):
            h = held.iloc[0]
            text += f" Held out (λ chosen on half the trials, tested on the other {h['trials tested']}): "
            if h["best λ"] == 0:
                p_right = p_text(h["p vs right neighbour"])
                text += f"the best λ is 0 itself (no EWC; vs λ = {lams_right(h)}: p = {p_right})."
            else:
                text += (
                    f"best λ = {h['best λ']:.3g}, vs λ = 0 Δ = {h['Δ vs λ = 0']:+.3f} (p = {p_text(h['p vs λ = 0'])}), "
                    f"vs neighbours p = {p_text(h['p vs left neighbour'])} / {p_text(h['p vs right neighbour'])}."
                )
        lines.append(text)
    for (imp, noise), g in var.groupby(["measure", "noise"], sort=False):
        every, pos = g[g.lambdas == "all λ"], g[g.lambdas == "λ > 0"]
        if not len(every):
            continue
        r = every.iloc[0]
        line = (
            f"- Variance of the measure, {MEASURE_LABELS[imp]}, {noise}: between trials "
            f"{100 * r['between trials']:.0f}%, between λ {100 * r['between lambdas']:.0f}%, residual "
            f"{100 * r['residual (trial x lambda)']:.0f}%; λ matters at all: F = {r['F (lambda)']:.2f}, "
            f"p = {r['p (lambda)']:.2g} ({p_word(r['p (lambda)'])})"
        )
        if len(pos):
            q = pos.iloc[0]
            line += f"; among λ > 0 only: F = {q['F (lambda)']:.2f}, p = {q['p (lambda)']:.2g}"
        lines.append(line + ".")
    if len(comp):
        b = comp.iloc[0]
        line = (
            f"- Best importance measure (lowest mean measure at its best λ): **{MEASURE_LABELS[b.measure]}**, "
            f"{b['mean at best λ']:.3f} {b['95% CI']} at λ = {b['best λ']:.3g}."
        )
        if len(comp) > 1:
            s = comp.iloc[1]
            line += (
                f" Runner-up {MEASURE_LABELS[s.measure]}: Δ = {s.iloc[comp.columns.get_loc('Δ 95% CI') - 1]:+.3f} "
                f"{s['Δ 95% CI']} (paired p = {s['p (paired t)']:.2g}, {p_word(s['p (paired t)'])})."
            )
        lines.append(line)
    if len(search_runs):
        best = best_lambdas(search_runs).lam
        lines.append(
            f"- The source-style search ({search_runs.trial.nunique()} trials, {search_runs.noise.iloc[0]} noise) put "
            f"the per-trial best λ anywhere from {best.min():.3g} to {best.max():.3g} (the source: 0.55 - 16.6)."
        )
    return "\n".join(lines)


# ====================================================================== explorer


def explore(runs: pd.DataFrame):
    """ipywidgets explorer over the cached trials: pick a measure, noise, task and lambda range;
    shows that task's test loss after every epoch (mean over trials) per lambda, and the measure
    of every trial over lambda. Reads cached runs only; trains nothing."""
    try:
        import ipywidgets as W
    except ImportError:
        print("ipywidgets is not installed: the explorer needs it (pip install ipywidgets)")
        return None
    import matplotlib.pyplot as plt

    keys = runs[["study", "importance", "noise"]].drop_duplicates()
    options = [(f"{s}: {MEASURE_LABELS[i]} ({n})", (s, i, n)) for s, i, n in keys.itertuples(index=False)]
    n_tasks = runs.epoch_loss.iloc[0].shape[1]
    lo, hi = float(runs.lam.min()), float(runs.lam.max())

    def show(run, task, lam_range):
        s, imp, noise = run
        g = runs[(runs.study == s) & (runs.importance == imp) & (runs.noise == noise)]
        g = g[(g.lam >= lam_range[0] - 1e-9) & (g.lam <= lam_range[1] + 1e-9)]
        if g.empty:
            print("no cached runs in this λ range")
            return
        _fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
        cmap = plt.get_cmap("viridis")
        lams = sorted(g.lam.unique())
        for i, lam in enumerate(lams[:: max(1, len(lams) // 12)]):
            curves = np.stack(g[np.isclose(g.lam, lam)].epoch_loss.to_list())[:, :, task]
            a.plot(
                np.arange(1, curves.shape[1] + 1),
                curves.mean(0),
                color=cmap(i / max(1, len(lams) - 1)),
                label=f"λ={lam:.3g}",
            )
        a.set_xlabel("epoch (both tasks)")
        a.set_ylabel(f"task {task} test loss (mean over trials)")
        a.legend(fontsize=6, ncol=2)
        for trial, t in g.groupby("trial"):
            t = t.sort_values("lam")
            b.plot(t.lam, t.measure, marker="o", ms=3, lw=0.8, label=f"trial {trial + 1}")
        b.set_xlabel("λ")
        b.set_ylabel("measure")
        plt.show()

    return W.interactive(
        show,
        run=W.Dropdown(options=options, description="runs"),
        task=W.Dropdown(options=list(range(n_tasks)), description="task"),
        lam_range=W.FloatRangeSlider(value=(lo, hi), min=lo, max=hi, step=(hi - lo) / 100 or 1, description="λ range"),
    )
