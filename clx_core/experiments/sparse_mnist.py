"""Notebook 01: k-winners and sparse weights vs dense networks (Pervasive-AI-Lab/sparse-dynamic-synapses).

Three studies, all with the source's "OLD" recipe (SGD lr 0.1, Nesterov momentum 0.9, weight
decay 1e-4, dropout 0.5, 2 epochs per task, boost strength 1):

- :func:`benchmark_runs` trains dense and sparse MLPs (1 and 2 hidden layers) and CNNs on
  Permuted MNIST (10 tasks, one shared head), Split MNIST (5 tasks, multi-head) and CIFAR-100
  10 x 10 (multi-head), plus the cumulative (joint) baseline. Every head is trained (the source
  left the heads after the first frozen and random). :func:`headline_table` sets the final
  average accuracy on Permuted MNIST next to the source's published numbers.
- Every run also records the source's sparsity statistics and, right after each task, which
  penultimate units the task activates; :func:`overlap_table` turns them into the overlap of
  the codes of different tasks against chance, next to forgetting (the project's hypothesis).
- :func:`sweep` varies percent_on x weight_density of the sparse 1-layer MLP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from .. import data as data_mod
from .. import metrics, scenarios
from ..config import check_bool, check_choice, check_float, check_int, fail
from ..models import MLP, Conv2d, Dropout, Flatten, Generators, Linear
from ..results import group_without, run_cached
from ..rng import ModelStreams
from ..sparse import (
    ActivityStats,
    KeepSparse,
    KWinners,
    KWinners2d,
    SparseWeights,
    SparseWeights2d,
    check_density,
    check_kwinners,
    code_overlap,
    n_winners,
    off_diagonal_mean,
)
from ..train import Schedule, train
from .common import ExperimentConfig, group_provenance, load_data, resolve_device
from .common import describe as describe  # re-exported: the notebook calls it on this module

NOTEBOOK = "01_sparse_mnist"
BENCHMARKS = {
    "permuted": "Permuted MNIST (single head)",
    "split": "Split MNIST (multi-head)",
    "cifar": "CIFAR-100 10x10 (multi-head)",
}
ARCHS = {"mlp1": "MLP, 1 hidden layer", "mlp2": "MLP, 2 hidden layers", "cnn": "CNN"}
#: The source's published headline (README / results/*.pkl at commit 8ee2b3c, one run each):
#: final average accuracy %, 10-task Permuted MNIST, 2 epochs per task, dense vs sparse.
SOURCE_HEADLINE = {"mlp1": (65.67, 86.63), "mlp2": (47.98, 61.00), "cnn": (52.78, 60.96)}
#: From the same pickles: forgetting % and mean accuracy right after learning each task (dense, sparse),
#: and the % of non-zero penultimate units in the last training epoch (after dropout).
SOURCE_FORGETTING = {"mlp1": (36.31, 7.28), "mlp2": (55.67, 32.82), "cnn": (50.87, 41.40)}
SOURCE_JUST_LEARNED = {"mlp1": (98.35, 93.18), "mlp2": (98.08, 90.53), "cnn": (98.57, 98.22)}
SOURCE_ACTIVE = {"mlp1": (2.60, 0.05), "mlp2": (12.51, 0.05), "cnn": (2.98, 2.15)}
VARIANTS = ("dense", "sparse")
SOURCE_STEPS_PER_TASK = 2 * (60000 // 128)  # 2 epochs of full MNIST, batch 128


@dataclasses.dataclass(frozen=True)
class SparseConfig(ExperimentConfig):
    """Parameters of notebook 01. Defaults = the source's OLD protocol (the ``paper`` profile)."""

    NOTEBOOK: ClassVar[str] = NOTEBOOK

    PROFILE_OVERRIDES: ClassVar = {
        "smoke": dict(
            permuted_tasks=3,
            split_tasks=2,
            cifar_tasks=2,
            split_archs=("mlp1",),
            hidden_units=64,
            percent_on_mlp=0.0625,
            cnn_channels=(4, 8),
            cnn_hidden=16,
            percent_on_cnn=0.25,
            train_samples=128,
            cnn_train_samples=64,
            test_samples=100,
            profile_samples=100,
            seeds=2,
            cumulative_seeds=1,
            sweep_percent_on=(0.0625, 0.25),
            sweep_density=(0.3, 1.0),
            sweep_seeds=1,
        ),
        "quick": dict(
            split_archs=("mlp1",),
            cnn_lr=0.02,  # at lr 0.1 the small CNN diverged (NaN loss) or collapsed in several seeds
            hidden_units=500,
            percent_on_mlp=0.008,  # k = 4 winners, as the source's 4 of 4000
            cnn_channels=(8, 16),
            cnn_hidden=64,
            percent_on_cnn=0.1,  # 1 and 2 winning channels per position, 6 of 64 fc units
            train_samples=2000,
            cnn_train_samples=1000,
            test_samples=300,
            profile_samples=300,
            seeds=5,
            cumulative_seeds=1,
            sweep_percent_on=(0.008, 0.04, 0.2),
            sweep_density=(0.1, 0.5, 1.0),
            sweep_seeds=2,
        ),
        "paper": {},
    }

    # -- data
    data: str = "mnist"  # Permuted / Split MNIST; torchvision downloads it when missing
    cifar_data: str = "cifar100"  # the source's "ICifar10" is CIFAR-100 alone
    offline: bool | None = None  # None: from CLX_OFFLINE; True: download nothing, use real stand-ins
    offline_data: str = "mnist_subset"  # MNIST's offline stand-in: "mnist_subset" or "fashion_mnist"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # -- benchmarks
    benchmarks: tuple[str, ...] = ("permuted", "split", "cifar")
    permuted_tasks: int = 10
    split_tasks: int = 5  # 5 tasks x 2 digits
    cifar_tasks: int = 10  # 10 tasks x 10 classes (a 10-class stand-in becomes 5 x 2)
    headline_archs: tuple[str, ...] = ("mlp1", "mlp2", "cnn")  # Permuted MNIST
    split_archs: tuple[str, ...] = ("mlp1", "mlp2")
    cifar_archs: tuple[str, ...] = ("cnn",)
    train_samples: int = 0  # training images per task (a fixed random subset); 0 = all
    cnn_train_samples: int = 0  # the same for CNNs (the costly model on a CPU); 0 = train_samples
    test_samples: int = 0  # test images per task; 0 = all
    # -- models (algorithms.md section 1)
    hidden_units: int = 4000  # MLP width (1 or 2 hidden layers)
    cnn_channels: tuple[int, ...] = (64, 128)  # two 5x5 convolutions, no padding or pooling
    cnn_hidden: int = 512  # fully connected layer of the CNN
    dropout: float = 0.5
    # -- sparsity (OLD sections; weight densities: see weight_density_mlp)
    percent_on_mlp: float = 0.001  # k-winners of the MLPs: k = round(4000 * 0.001) = 4
    percent_on_cnn: float = 0.05  # k-winners of the CNN (convs: per position over channels; fc)
    # fraction of NON-zero weights. The OLD sections set none; the source's model constructors
    # default to 0.5 for fully connected and 0.99 for conv layers
    weight_density_mlp: float = 0.5
    weight_density_cnn_fc: float = 0.5
    weight_density_conv: float = 0.99
    k_inference_factor: float = 1.0
    boost_strength: float = 1.0
    boost_strength_factor: float = 1.0  # per epoch
    duty_cycle_period: int = 1000
    # -- training (OLD sections)
    lr: float = 0.1
    cnn_lr: float = 0.0  # the CNNs' learning rate; 0 = lr (the source used one lr for every net)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    batch_size: int = 128
    epochs: int = 2  # per task (train_ep_inc)
    first_epochs: int = 2  # task 0 (train_ep)
    seeds: int = 5  # the source ran one seed
    cumulative_seeds: int = 3  # joint baseline (dense nets, as the source's *Cumul sections)
    # -- analysis (beyond the source)
    profile_samples: int = 1000  # test images per task for the unit-activity profiles
    sweep_percent_on: tuple[float, ...] = (0.001, 0.01, 0.05, 0.2)
    sweep_density: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)
    sweep_seeds: int = 3
    models_per_run: int = 0  # MLP seeds trained together in one batched run; 0 = all
    # CNN seeds per batched run: 1, because a grouped convolution over K models is slower on a CPU
    # than K separate ones (measured, 2 cores); on a GPU batching pays: set 0 (all)
    cnn_models_per_run: int = 1

    def validate(self) -> None:
        check_choice("data", self.data, ("mnist", "fashion_mnist"))
        check_choice("cifar_data", self.cifar_data, ("cifar100", "cifar10", "fashion_mnist"))
        check_choice("offline_data", self.offline_data, data_mod.OFFLINE_SUBSTITUTES["mnist"])
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if not self.benchmarks:
            fail("benchmarks", self.benchmarks, "name at least one of " + ", ".join(map(repr, BENCHMARKS)))
        for b in self.benchmarks:
            check_choice("benchmarks", b, BENCHMARKS)
        if "permuted" not in self.benchmarks:
            fail("benchmarks", self.benchmarks, "must include 'permuted' (the source's headline benchmark)")
        if not self.headline_archs:
            fail("headline_archs", self.headline_archs, "name at least one of " + ", ".join(map(repr, ARCHS)))
        check_int("permuted_tasks", self.permuted_tasks, 1)
        check_int("split_tasks", self.split_tasks, 1, 5)
        check_int("cifar_tasks", self.cifar_tasks, 1, 10)
        for name in ("headline_archs", "split_archs", "cifar_archs"):
            for a in getattr(self, name):
                check_choice(name, a, ARCHS)
        check_int("train_samples", self.train_samples, 0)
        check_int("cnn_train_samples", self.cnn_train_samples, 0)
        check_int("test_samples", self.test_samples, 0)
        check_int("hidden_units", self.hidden_units, 1)
        if not self.cnn_channels:
            fail("cnn_channels", self.cnn_channels, "give at least one convolution")
        for c in self.cnn_channels:
            check_int("cnn_channels", c, 1)
        check_int("cnn_hidden", self.cnn_hidden, 1)
        check_float("dropout", self.dropout, 0, 1, high_open=True)
        check_kwinners(self.percent_on_mlp, self.k_inference_factor, self.boost_strength, self.boost_strength_factor)
        n_winners(self.hidden_units, self.percent_on_mlp, self.k_inference_factor)
        _check_percent_on("percent_on_cnn", self.percent_on_cnn, self.k_inference_factor)
        for c in (*self.cnn_channels, self.cnn_hidden):
            _winners_or_fail("percent_on_cnn", c, self.percent_on_cnn, self.k_inference_factor)
        for name in ("weight_density_mlp", "weight_density_cnn_fc", "weight_density_conv"):
            _check_density(name, getattr(self, name))
        check_int("duty_cycle_period", self.duty_cycle_period, 1)
        check_float("lr", self.lr, 0, low_open=True)
        check_float("cnn_lr", self.cnn_lr, 0)
        check_float("momentum", self.momentum, 0, 1, high_open=True)
        check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            fail("nesterov", self.nesterov, "Nesterov momentum needs momentum > 0")
        check_float("weight_decay", self.weight_decay, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("epochs", self.epochs, 1)
        check_int("first_epochs", self.first_epochs, 1)
        check_int("seeds", self.seeds, 1)
        check_int("cumulative_seeds", self.cumulative_seeds, 0)
        check_int("profile_samples", self.profile_samples, 1)
        for p in self.sweep_percent_on:
            _check_percent_on("sweep_percent_on", p, self.k_inference_factor)
            _winners_or_fail("sweep_percent_on", self.hidden_units, p, self.k_inference_factor)
        for d in self.sweep_density:
            _check_density("sweep_density", d)
        check_int("sweep_seeds", self.sweep_seeds, 0)
        check_int("models_per_run", self.models_per_run, 0)
        check_int("cnn_models_per_run", self.cnn_models_per_run, 0)

    def archs(self, benchmark: str) -> tuple[str, ...]:
        return {"permuted": self.headline_archs, "split": self.split_archs, "cifar": self.cifar_archs}[benchmark]


def _check_percent_on(name: str, value: float, factor: float) -> None:
    """k-winners checks, reported under the config's own parameter name."""
    try:
        check_kwinners(value, factor, 0.0, 1.0)
    except ValueError as err:
        fail(name, value, str(err).split("is not allowed: ", 1)[-1])


def _winners_or_fail(name: str, n: int, value: float, factor: float) -> None:
    try:
        n_winners(n, value, factor)
    except ValueError as err:
        fail(name, value, f"with {n} units: " + str(err).split("is not allowed: ", 1)[-1])


def _check_density(name: str, value: float) -> None:
    try:
        check_density(value)
    except ValueError:
        fail(name, value, "must lie in (0, 1] (fraction of non-zero weights)")


# ---------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """The sparse variant's settings (None in a unit = the dense variant)."""

    percent_on: float
    weight_density: float
    weight_density_conv: float = 1.0
    k_inference_factor: float = 1.0
    boost_strength: float = 1.0
    boost_strength_factor: float = 1.0
    duty_cycle_period: int = 1000

    def kwinners(self, n: int, n_models: int) -> KWinners:
        return KWinners(
            n,
            self.percent_on,
            self.k_inference_factor,
            self.boost_strength,
            self.boost_strength_factor,
            self.duty_cycle_period,
            n_models=n_models,
        )

    def kwinners2d(self, channels: int, n_models: int) -> KWinners2d:
        return KWinners2d(
            channels,
            self.percent_on,
            self.k_inference_factor,
            self.boost_strength,
            self.boost_strength_factor,
            self.duty_cycle_period,
            local=True,
            n_models=n_models,
        )


def build_mlp(
    in_features: int,
    layers: int,
    width: int,
    n_outputs: int,
    streams: ModelStreams,
    dropout: float,
    sparsity: Sparsity | None,
) -> MLP:
    """Dense: [Linear -> ReLU -> Dropout] x L; sparse: [SparseWeights(Linear) -> KWinners -> Dropout] x L
    (no ReLU: k-winners keeps the raw winner values); then a dense Linear head."""
    K = len(streams)
    if sparsity is None:
        return MLP(in_features, [width] * layers, n_outputs, streams.init, dropout=dropout, dropout_gens=streams.method)
    return MLP(
        in_features,
        [width] * layers,
        n_outputs,
        streams.init,
        activation=lambda h: sparsity.kwinners(h, K),
        dropout=dropout,
        dropout_gens=streams.method,
        layer=lambda i, o, g: SparseWeights(Linear(i, o, g), sparsity.weight_density, g),
    )


class CNN(nn.Module):
    """The source's CNN for 32x32 inputs: [Conv 5x5 -> ReLU (-> KWinners2d) -> Dropout] per
    channel count, Flatten, Linear -> ReLU (-> KWinners) -> Dropout, then the head. No padding or
    pooling (32 -> 28 -> 24). Sparse: convs in SparseWeights2d, the fc layer in SparseWeights."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        channels: tuple[int, ...],
        hidden: int,
        n_outputs: int,
        streams: ModelStreams,
        dropout: float,
        sparsity: Sparsity | None,
    ):
        super().__init__()
        K = len(streams)
        gens: Generators = streams.init
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out_c in channels:
            conv: nn.Module = Conv2d(c, out_c, 5, gens)
            if sparsity is not None:
                conv = SparseWeights2d(conv, sparsity.weight_density_conv, gens)
            layers += [conv, nn.ReLU()]
            if sparsity is not None:
                layers.append(sparsity.kwinners2d(out_c, K))
            if dropout > 0:
                layers.append(Dropout(dropout, streams.method))
            c, h, w = out_c, h - 4, w - 4
        if h < 1 or w < 1:
            raise ValueError(f"CNN: {len(channels)} 5x5 convolutions do not fit {in_shape[1]}x{in_shape[2]} images")
        fc: nn.Module = Linear(c * h * w, hidden, gens)
        if sparsity is not None:
            fc = SparseWeights(fc, sparsity.weight_density, gens)
        layers += [Flatten(), fc, nn.ReLU()]
        if sparsity is not None:
            layers.append(sparsity.kwinners(hidden, K))
        if dropout > 0:
            layers.append(Dropout(dropout, streams.method))
        self.hidden = nn.Sequential(*layers)
        self.head = Linear(hidden, n_outputs, gens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


def build_model(unit: dict[str, Any], in_shape: tuple[int, ...], n_outputs: int, streams: ModelStreams) -> nn.Module:
    """The network of a unit (arch, variant and their settings) for K = len(streams) models."""
    sp = None
    if unit["variant"] == "sparse":
        sp = Sparsity(
            percent_on=unit["percent_on"],
            weight_density=unit["weight_density"],
            weight_density_conv=unit.get("weight_density_conv", 1.0),
            k_inference_factor=unit["k_inference_factor"],
            boost_strength=unit["boost_strength"],
            boost_strength_factor=unit["boost_strength_factor"],
            duty_cycle_period=unit["duty_cycle_period"],
        )
    if unit["arch"] == "cnn":
        return CNN(in_shape, tuple(unit["cnn_channels"]), unit["cnn_hidden"], n_outputs, streams, unit["dropout"], sp)
    layers = 1 if unit["arch"] == "mlp1" else 2
    return build_mlp(int(np.prod(in_shape)), layers, unit["hidden_units"], n_outputs, streams, unit["dropout"], sp)


# ---------------------------------------------------------------------- scenarios


def _subsample(idx: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n <= 0 or n >= len(idx):
        return idx
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(idx), generator=g)[:n].sort().values
    return idx[pick.to(idx.device)]


def make_scenario(unit: dict[str, Any], cfg: SparseConfig, device: str) -> scenarios.Scenario:
    """The unit's task stream. MLPs see 28x28 MNIST; CNNs 32x32 (MNIST zero-padded, as the
    source's 128*24*24 fc layer requires); CIFAR is scaled to [0, 1] then ImageNet-normalised.

    With ``train_samples`` / ``test_samples`` each task keeps a fixed random subset of its images
    (Permuted MNIST: the same images under every permutation, as the source). The data set is cut
    to those images *before* padding or normalising, so small profiles never copy the whole set.
    """
    bench, tasks = unit["benchmark"], unit["tasks"]
    if bench == "cifar":
        data = load_data(cfg.cifar_data, cfg.is_offline, None, device)
        build = lambda d: scenarios.split(d, "task", classes_per_task=unit["classes_per_task"], n_tasks=tasks)  # noqa: E731
    else:
        data = load_data(cfg.data, cfg.is_offline, cfg.offline_data if cfg.is_offline else None, device)
        if bench == "permuted":
            build = lambda d: scenarios.permuted(d, "domain", tasks)  # noqa: E731
        else:
            build = lambda d: scenarios.split(d, "task", classes_per_task=2, n_tasks=tasks)  # noqa: E731
    probe = build(data)  # only its indices are used
    keep_train = torch.cat([_subsample(i, unit["train_samples"], 100) for i in probe.train_index]).unique()
    keep_test = torch.cat([_subsample(i, unit["test_samples"], 200) for i in probe.test_index]).unique()
    data = dataclasses.replace(
        data,
        train_x=data.train_x[keep_train],
        train_y=data.train_y[keep_train],
        test_x=data.test_x[keep_test],
        test_y=data.test_y[keep_test],
    )
    if bench == "cifar":
        c = data.shape[0]
        data = data_mod.normalize(data, data_mod.IMAGENET_MEAN[:c], data_mod.IMAGENET_STD[:c])
    elif unit["arch"] == "cnn":
        data = data_mod.pad_to(data, 32)
    return build(data)


def cifar_split(cfg: SparseConfig) -> tuple[int, int, str]:
    """(tasks, classes per task, note): 10 x 10 on CIFAR-100; a 10-class stand-in becomes 5 x 2."""
    data = load_data(cfg.cifar_data, cfg.is_offline, None, "cpu")
    if data.n_classes >= 100:
        return cfg.cifar_tasks, 10, ""
    tasks = min(cfg.cifar_tasks, data.n_classes // 2)
    return (
        tasks,
        2,
        (
            f"{data.label} has {data.n_classes} classes, so the 10 tasks x 10 classes of CIFAR-100 become "
            f"{tasks} tasks x 2 classes (multi-head)."
        ),
    )


# ---------------------------------------------------------------------- runs


def _unit(cfg: SparseConfig, benchmark: str, arch: str, variant: str, seed: int, **over: Any) -> dict[str, Any]:
    """Everything that determines one run (the cache key); dense units carry no sparsity settings."""
    if benchmark == "cifar":
        tasks, cpt, _ = cifar_split(cfg)
    else:
        tasks, cpt = (cfg.permuted_tasks, 10) if benchmark == "permuted" else (cfg.split_tasks, 2)
    u: dict[str, Any] = dict(
        benchmark=benchmark,
        data=cfg.cifar_data if benchmark == "cifar" else cfg.data,
        offline_data=(None if benchmark == "cifar" else cfg.offline_data) if cfg.is_offline else None,
        offline=cfg.is_offline,
        tasks=tasks,
        classes_per_task=cpt,
        train_samples=(cfg.cnn_train_samples or cfg.train_samples) if arch == "cnn" else cfg.train_samples,
        test_samples=cfg.test_samples,
        arch=arch,
        variant=variant,
        stream="task",
        dropout=cfg.dropout,
        lr=(cfg.cnn_lr or cfg.lr) if arch == "cnn" else cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        first_epochs=cfg.first_epochs,
        profile_samples=cfg.profile_samples,
        seed=seed,
    )
    if arch == "cnn":
        u.update(cnn_channels=list(cfg.cnn_channels), cnn_hidden=cfg.cnn_hidden)
    else:
        u.update(hidden_units=cfg.hidden_units)
    if variant == "sparse":
        u.update(
            percent_on=cfg.percent_on_cnn if arch == "cnn" else cfg.percent_on_mlp,
            weight_density=cfg.weight_density_cnn_fc if arch == "cnn" else cfg.weight_density_mlp,
            k_inference_factor=cfg.k_inference_factor,
            boost_strength=cfg.boost_strength,
            boost_strength_factor=cfg.boost_strength_factor,
            duty_cycle_period=cfg.duty_cycle_period,
        )
        if arch == "cnn":
            u["weight_density_conv"] = cfg.weight_density_conv
    u.update(over)
    return u


def _run_group(units: list[dict[str, Any]], cfg: SparseConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train every unit of a group (same setting, different seeds) as one many-models network."""
    u0 = units[0]
    device = resolve_device(cfg.device)
    scen = make_scenario(u0, cfg, str(device))
    streams = ModelStreams([u["seed"] for u in units])
    model = build_model(u0, scen.data.shape, scen.n_outputs, streams).to(device)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=u0["lr"],
        momentum=u0["momentum"],
        nesterov=u0["nesterov"],
        weight_decay=u0["weight_decay"],
    )
    schedule = Schedule(
        batch_size=u0["batch_size"], epochs=u0["epochs"], first_epochs=u0["first_epochs"], order=u0["stream"]
    )
    activity = ActivityStats(lambda m, x: m.hidden(x), u0["profile_samples"])
    hist = train(model, opt, scen, schedule, streams, methods=[KeepSparse(), activity], progress_bar=False)
    profiles = activity.profiles()  # (K, T, n)
    results = []
    for k in range(len(units)):
        ov = code_overlap(profiles[k])
        results.append(
            {
                "acc": hist.acc[k].tolist(),
                "average_accuracy": float(metrics.average_accuracy(hist.acc[k])),
                "forgetting": float(metrics.forgetting(hist.acc[k])),
                "just_learned": float(np.mean(np.diag(hist.acc[k]))),
                "active_epoch_mean": [float(m[k]) for m, _ in activity.epoch_active],
                "active_epoch_std": [float(s[k]) for _, s in activity.epoch_active],
                "overlap_shared": ov["shared"].tolist(),
                "overlap_chance": ov["chance"].tolist(),
                "active_eval": ov["active"].tolist(),
                "loss": hist.loss[k].tolist(),
                "diverged": bool(not np.isfinite(hist.loss[k]).all()),  # its accuracies mean nothing
                "seconds_per_model": hist.seconds / len(units),
            }
        )
    prov = group_provenance(
        device, scen.data, scenario=scen.describe(), profile=cfg.profile, train_seconds=hist.seconds
    )
    return results, prov


def _run(cfg: SparseConfig, name: str, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cached records of ``units``; seeds of a setting batch into one many-models run where it pays
    (MLPs: ``models_per_run``; CNNs: ``cnn_models_per_run``, see ``make bench``)."""
    records: dict[int, dict[str, Any]] = {}
    for is_cnn, group in ((False, cfg.models_per_run), (True, cfg.cnn_models_per_run)):
        pos = [i for i, u in enumerate(units) if (u["arch"] == "cnn") == is_cnn]
        if not pos:
            continue
        recs = run_cached(
            cfg.store(),
            name,
            [units[i] for i in pos],
            lambda us: _run_group(us, cfg),
            group_without("seed"),
            max_group=group or 10**6,
        )
        records.update(zip(pos, recs, strict=True))
    return [records[i] for i in range(len(units))]


def _rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for rec in records:
        p, r = rec["params"], rec["result"]
        shared, chance = np.array(r["overlap_shared"]), np.array(r["overlap_chance"])
        rows.append(
            {
                "benchmark": p["benchmark"],
                "arch": p["arch"],
                "variant": p["variant"] if p["stream"] == "task" else "cumulative",
                "stream": p["stream"],
                "seed": p["seed"],
                "percent_on": p.get("percent_on"),
                "weight_density": p.get("weight_density"),
                "average_accuracy": r["average_accuracy"],
                "forgetting": r["forgetting"],
                "just_learned": r["just_learned"],
                "diverged": r["diverged"],
                "acc": np.array(r["acc"]),
                "active_epoch": np.array(r["active_epoch_mean"]),
                "active_epoch_std": np.array(r["active_epoch_std"]),
                "active_eval": float(np.mean(r["active_eval"])),
                "overlap_shared": shared,
                "overlap_chance": chance,
                "between_shared": off_diagonal_mean(shared),
                "between_chance": off_diagonal_mean(chance),
                "data": rec["provenance"]["data"],
                # SGD steps per task (Permuted MNIST: every task trains on the same image pool)
                "steps_per_task": p["epochs"] * max(1, rec["provenance"]["data"]["train"] // p["batch_size"]),
                "seconds_per_model": r["seconds_per_model"],
            }
        )
    df = pd.DataFrame(rows)
    df["overlap_ratio"] = df.between_shared / df.between_chance
    return df


def benchmark_runs(cfg: SparseConfig) -> pd.DataFrame:
    """Dense and sparse nets on every benchmark x arch x seed, plus the cumulative baseline: one row per run."""
    units = []
    for bench in cfg.benchmarks:
        for arch in cfg.archs(bench):
            for variant in VARIANTS:
                units += [_unit(cfg, bench, arch, variant, s) for s in range(cfg.seeds)]
            # joint training on all tasks with the same budget (the source's *Cumul sections: dense)
            units += [_unit(cfg, bench, arch, "dense", s, stream="random") for s in range(cfg.cumulative_seeds)]
    return _rows(_run(cfg, "benchmarks", units))


def sweep(cfg: SparseConfig) -> pd.DataFrame:
    """Sparse 1-layer MLP on Permuted MNIST over percent_on x weight_density (plus the dense net)."""
    units = [_unit(cfg, "permuted", "mlp1", "dense", s) for s in range(cfg.sweep_seeds)]
    for p in cfg.sweep_percent_on:
        for d in cfg.sweep_density:
            units += [
                _unit(cfg, "permuted", "mlp1", "sparse", s, percent_on=p, weight_density=d)
                for s in range(cfg.sweep_seeds)
            ]
    return _rows(_run(cfg, "benchmarks", units))


# ---------------------------------------------------------------------- tables


def _ci(values: np.ndarray) -> str:
    s = metrics.summarize(values)
    return f"{s.mean:.2f}" if s.n < 2 else f"{s.mean:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}]"


def _paired(runs: pd.DataFrame, column: str = "average_accuracy") -> dict[str, float]:
    """Sparse minus dense over seeds (same seed = same data order and dropout stream)."""
    d = runs[runs.variant == "dense"].sort_values("seed")
    s = runs[runs.variant == "sparse"].sort_values("seed")
    seeds = sorted(set(d.seed) & set(s.seed))
    a = s.set_index("seed").loc[seeds, column].to_numpy() * 100
    b = d.set_index("seed").loc[seeds, column].to_numpy() * 100
    return metrics.paired_test(a, b)


def headline_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Final average accuracy (%) on Permuted MNIST: dense vs sparse, mean [95% CI] over seeds,
    the paired difference, and the source's single-run numbers."""
    rows = []
    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    for arch in dict.fromkeys(perm.arch):
        g = perm[perm.arch == arch]
        dense = g[g.variant == "dense"].average_accuracy.to_numpy() * 100
        sparse = g[g.variant == "sparse"].average_accuracy.to_numpy() * 100
        t = _paired(g)
        src = SOURCE_HEADLINE[arch]
        rows.append(
            {
                "model": ARCHS[arch],
                "dense % [95% CI]": _ci(dense),
                "sparse % [95% CI]": _ci(sparse),
                "sparse - dense": f"{t['mean_diff']:+.2f}",
                "p (paired t)": f"{t['p_t']:.2g}",
                "source dense": f"{src[0]:.2f}",
                "source sparse": f"{src[1]:.2f}",
                "source sparse - dense": f"{src[1] - src[0]:+.2f}",
                "seeds": len(dense),
            }
        )
    return pd.DataFrame(rows).set_index("model")


def benchmark_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every benchmark x model: final average accuracy, forgetting and accuracy right after
    learning each task (%), mean [95% CI], dense / sparse / cumulative."""
    rows = []
    for (bench, arch, variant), g in runs.groupby(["benchmark", "arch", "variant"], sort=False):
        rows.append(
            {
                "benchmark": BENCHMARKS[bench],
                "model": ARCHS[arch],
                "variant": variant,
                "final average accuracy %": _ci(g.average_accuracy.to_numpy() * 100),
                "forgetting %": _ci(g.forgetting.to_numpy() * 100) if variant != "cumulative" else "-",
                "just learned %": _ci(g.just_learned.to_numpy() * 100) if variant != "cumulative" else "-",
                "seeds": len(g),
                "diverged (non-finite loss)": int(g.diverged.sum()),
            }
        )
    return pd.DataFrame(rows)


def sparsity_table(runs: pd.DataFrame) -> pd.DataFrame:
    """% non-zero penultimate units: last training epoch (after dropout, the source's measure) and
    evaluation (no dropout), next to the source's last-epoch numbers."""
    rows = []
    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    for (arch, variant), g in perm.groupby(["arch", "variant"], sort=False):
        src = SOURCE_ACTIVE[arch][VARIANTS.index(variant)]
        rows.append(
            {
                "model": ARCHS[arch],
                "variant": variant,
                "% active, last epoch (train)": _ci(np.array([a[-1] for a in g.active_epoch])),
                "% active, evaluation": _ci(g.active_eval.to_numpy() * 100),
                "source, last epoch": f"{src:g}",
            }
        )
    return pd.DataFrame(rows)


def overlap_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Between-task overlap of the penultimate codes vs chance, next to forgetting (Permuted MNIST).

    ``shared``: units an image of task i and one of task j have in common, as a fraction of
    their active-set size, averaged over task pairs; ``chance``: the same for random active sets
    of the same sizes; ``ratio`` = shared / chance.
    """
    rows = []
    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    for (arch, variant), g in perm.groupby(["arch", "variant"], sort=False):
        rows.append(
            {
                "model": ARCHS[arch],
                "variant": variant,
                "% active (eval)": _ci(g.active_eval.to_numpy() * 100),
                "shared % [95% CI]": _ci(g.between_shared.to_numpy() * 100),
                "chance %": _ci(g.between_chance.to_numpy() * 100),
                "ratio to chance": _ci(g.overlap_ratio.to_numpy()),
                "forgetting % [95% CI]": _ci(g.forgetting.to_numpy() * 100),
                "seeds": len(g),
            }
        )
    return pd.DataFrame(rows)


def overlap_correlation(runs: pd.DataFrame) -> dict[str, float]:
    """Across all Permuted-MNIST runs (every model, dense and sparse): Spearman correlation of
    between-task shared fraction with forgetting, and of the ratio to chance with forgetting."""
    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    out: dict[str, float] = {"n": len(perm)}
    for col in ("between_shared", "overlap_ratio"):
        if len(perm) > 2:
            r = stats.spearmanr(perm[col], perm.forgetting)
            out[f"rho_{col}"], out[f"p_{col}"] = float(r.statistic), float(r.pvalue)
        else:
            out[f"rho_{col}"] = out[f"p_{col}"] = float("nan")
    return out


def sweep_grid(sw: pd.DataFrame, value: str = "average_accuracy") -> pd.DataFrame:
    """Mean over seeds of ``value`` (%) per percent_on (rows) x weight_density (columns)."""
    sp = sw[sw.variant == "sparse"]
    return sp.pivot_table(index="percent_on", columns="weight_density", values=value, aggfunc="mean") * 100


# ---------------------------------------------------------------------- reporting


def winners_note(cfg: SparseConfig) -> str:
    """What the sparsity settings mean in units, for the notebook's settings paragraph."""
    k, _ = n_winners(cfg.hidden_units, cfg.percent_on_mlp, cfg.k_inference_factor)
    kc = [n_winners(c, cfg.percent_on_cnn, cfg.k_inference_factor)[0] for c in cfg.cnn_channels]
    kf, _ = n_winners(cfg.cnn_hidden, cfg.percent_on_cnn, cfg.k_inference_factor)
    return (
        f"MLP: k = {k} winners of {cfg.hidden_units} units per layer (percent_on {cfg.percent_on_mlp:g}), "
        f"{cfg.weight_density_mlp:g} of the weights non-zero. CNN: {', '.join(map(str, kc))} winning channels "
        f"per position of {', '.join(map(str, cfg.cnn_channels))}, {kf} of {cfg.cnn_hidden} fc units; "
        f"conv weight density {cfg.weight_density_conv:g}, fc {cfg.weight_density_cnn_fc:g}."
    )


def figure_provenance(cfg: SparseConfig, runs: pd.DataFrame, benchmark: str | None = "permuted") -> dict[str, Any]:
    """Provenance for a figure of one benchmark, or (``None``) of all benchmarks: then the data
    label names every data set used, substitutions included."""
    from ..results import provenance

    if benchmark is None:
        per = {b: g.data.iloc[0] for b, g in runs.groupby("benchmark", sort=False)}
        data = {"label": "; ".join(f"{b}: {d['label']}" for b, d in per.items()), "benchmarks": per}
    else:
        rows = runs[runs.benchmark == benchmark]
        data = (rows if len(rows) else runs).data.iloc[0]
    return provenance(resolve_device(cfg.device), data=data, profile=cfg.profile, config=cfg.to_dict())


def data_labels(runs: pd.DataFrame) -> str:
    """The data each benchmark actually used (naming any offline substitution)."""
    out = []
    for bench, g in runs.groupby("benchmark", sort=False):
        out.append(f"{bench}: {g.data.iloc[0]['label']}")
    return "\n".join(out)


def key_overlap(runs: pd.DataFrame) -> str:
    """Mean between-task overlap / chance and forgetting (%) per model, rounded: regression-checked."""
    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    g = perm.groupby(["arch", "variant"], sort=False)[["overlap_ratio", "forgetting"]].mean()
    return "\n".join(
        f"{a:4s} {v:6s} overlap/chance {r:5.1f}  forgetting {f * 100:5.1f}" for (a, v), (r, f) in g.iterrows()
    )


def key_numbers(runs: pd.DataFrame) -> str:
    """Mean final accuracy (%) per benchmark x model x variant, rounded: the regression-checked output."""
    g = runs.groupby(["benchmark", "arch", "variant"], sort=False).average_accuracy.mean() * 100
    return "\n".join(f"{b:8s} {a:4s} {v:10s} {x:5.1f}" for (b, a, v), x in g.items())


def _plain_ticks():
    """Log-axis tick labels as plain numbers (0.05, 2, 60) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def plot_headline(runs: pd.DataFrame):
    """Bars: final average accuracy on Permuted MNIST, dense vs sparse, 95% CI, seeds as dots,
    with the source's single runs as markers."""
    import matplotlib.pyplot as plt

    from ..plotting import bars_with_ci

    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    archs = list(dict.fromkeys(perm.arch))
    fig, ax = plt.subplots(figsize=(1.9 * len(archs) + 2.5, 3.8))
    groups = {
        v: [perm[(perm.arch == a) & (perm.variant == v)].average_accuracy.to_numpy() * 100 for a in archs]
        for v in VARIANTS
    }
    bars_with_ci(ax, [ARCHS[a] for a in archs], groups)
    for i, a in enumerate(archs):
        for j, v in enumerate(SOURCE_HEADLINE[a]):
            ax.scatter(i + (j - 0.5) * 0.4, v, marker="_", s=400, color="crimson", zorder=4, lw=2.5)
    ax.scatter([], [], marker="_", s=200, color="crimson", lw=2.5, label="source (1 run, paper scale)")
    ax.set_ylabel("final average accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Permuted MNIST, {perm.acc.iloc[0].shape[0]} tasks: dense vs sparse")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_matrices(runs: pd.DataFrame, benchmark: str = "permuted"):
    """Mean accuracy matrices (after task i, on task j), dense and sparse, one column per model."""
    import matplotlib.pyplot as plt

    from ..plotting import accuracy_matrix

    g = runs[(runs.benchmark == benchmark) & (runs.stream == "task")]
    archs = list(dict.fromkeys(g.arch))
    fig, axes = plt.subplots(2, len(archs), figsize=(4.6 * len(archs), 7.4), squeeze=False)
    for j, a in enumerate(archs):
        for i, v in enumerate(VARIANTS):
            rows = g[(g.arch == a) & (g.variant == v)]
            accuracy_matrix(axes[i][j], np.mean(np.stack(rows.acc.to_list()), axis=0), f"{ARCHS[a]}, {v}")
    fig.suptitle(f"{BENCHMARKS[benchmark]}: accuracy on every task after each task (mean over seeds)")
    fig.tight_layout()
    return fig


def plot_after_each_task(runs: pd.DataFrame):
    """Average accuracy over the tasks seen so far after each task, per benchmark and model; the
    cumulative baseline's final accuracy as a dotted line."""
    import matplotlib.pyplot as plt

    from ..plotting import curve_with_band

    pairs = list(dict.fromkeys(zip(runs.benchmark, runs.arch, strict=True)))
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.8 * len(pairs), 3.4), squeeze=False)
    for ax, (b, a) in zip(axes[0], pairs, strict=True):
        g = runs[(runs.benchmark == b) & (runs.arch == a)]
        for v in VARIANTS:
            rows = g[g.variant == v]
            if len(rows):
                seen = metrics.seen_average(np.stack(rows.acc.to_list())) * 100
                curve_with_band(ax, np.arange(1, seen.shape[1] + 1), seen, v, clip=(0, 100), marker="o", ms=3)
        cum = g[g.variant == "cumulative"]
        if len(cum):
            ax.axhline(cum.average_accuracy.mean() * 100, color="0.3", ls=":", label="cumulative (joint)")
        ax.set_title(f"{b} ({g.data.iloc[0]['used']}), {ARCHS[a]}", fontsize=8)
        ax.set_xlabel("tasks learned")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("accuracy on tasks so far (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sparsity(runs: pd.DataFrame):
    """% non-zero penultimate units per training epoch (after dropout), Permuted MNIST."""
    import matplotlib.pyplot as plt

    from ..plotting import curve_with_band

    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    archs = list(dict.fromkeys(perm.arch))
    fig, axes = plt.subplots(1, len(archs), figsize=(4 * len(archs), 3.4), squeeze=False, sharey=True)
    for ax, a in zip(axes[0], archs, strict=True):
        for v in VARIANTS:
            rows = perm[(perm.arch == a) & (perm.variant == v)]
            curves = np.stack(rows.active_epoch.to_list())
            curve_with_band(ax, np.arange(1, curves.shape[1] + 1), curves, v)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_plain_ticks())
        ax.set_title(ARCHS[a])
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("% non-zero penultimate units")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_overlap(runs: pd.DataFrame):
    """Left: between-task shared units vs chance (log); right: forgetting vs ratio to chance, one
    dot per run (Permuted MNIST)."""
    import matplotlib.pyplot as plt

    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 3.9))
    labels, xs = [], []
    for i, ((arch, variant), g) in enumerate(perm.groupby(["arch", "variant"], sort=False)):
        labels.append(f"{arch}\n{variant}")
        xs.append(i)
        a.scatter(np.full(len(g), i - 0.12), g.between_shared * 100, color="C0", s=14)
        a.scatter(np.full(len(g), i + 0.12), g.between_chance * 100, color="C1", s=14, marker="x")
        b.scatter(g.overlap_ratio, g.forgetting * 100, label=f"{ARCHS[arch]}, {variant}", s=18)
    a.scatter([], [], color="C0", s=14, label="shared between tasks")
    a.scatter([], [], color="C1", s=14, marker="x", label="chance at that sparsity")
    a.set_xticks(xs, labels, fontsize=8)
    a.set_yscale("log")
    a.yaxis.set_major_formatter(_plain_ticks())
    a.set_ylabel("% of active units shared")
    a.set_title("Overlap of task codes")
    a.legend(fontsize=7)
    b.axvline(1, color="0.6", ls=":")
    b.set_xscale("log")
    b.xaxis.set_major_formatter(_plain_ticks())
    b.xaxis.set_minor_formatter(_plain_ticks())
    b.set_xlabel("between-task overlap / chance")
    b.set_ylabel("forgetting (%)")
    b.set_title("Overlap vs forgetting (one dot per run)")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sweep(sw: pd.DataFrame):
    """Heatmaps over percent_on x weight_density: final average accuracy and forgetting."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    dense = sw[sw.variant == "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.9))
    for ax, (col, title, cmap) in zip(
        axes,
        (("average_accuracy", "final average accuracy (%)", "viridis"), ("forgetting", "forgetting (%)", "magma_r")),
        strict=True,
    ):
        grid = sweep_grid(sw, col)
        sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", cmap=cmap, cbar_kws={"label": title})
        ax.set_xlabel("weight_density (fraction of non-zero weights)")
        ax.set_ylabel("percent_on (fraction of winners)")
        ref = dense[col].mean() * 100 if len(dense) else float("nan")
        ax.set_title(f"{title}; dense net: {ref:.1f}", fontsize=9)
    fig.suptitle("Sparse 1-layer MLP on Permuted MNIST")
    fig.tight_layout()
    return fig


def verdict(runs: pd.DataFrame, sw: pd.DataFrame | None = None) -> str:
    """The conclusions in words, computed from this run's numbers."""
    lines = []
    perm = runs[(runs.benchmark == "permuted") & (runs.stream == "task")]
    steps = ", ".join(f"{ARCHS[a]} {int(g.steps_per_task.iloc[0])}" for a, g in perm.groupby("arch", sort=False))
    lines.append(
        f"- Scale: SGD steps per Permuted-MNIST task in this run: {steps}; the source: {SOURCE_STEPS_PER_TASK} "
        f"(60,000 images, batch 128, 2 epochs). Forgetting grows with the steps spent on later tasks."
        if int(perm.steps_per_task.max()) < SOURCE_STEPS_PER_TASK
        else f"- Scale: SGD steps per Permuted-MNIST task: {steps} (the source: {SOURCE_STEPS_PER_TASK})."
    )
    for arch in dict.fromkeys(perm.arch):
        g = perm[perm.arch == arch]
        t = _paired(g)
        src = SOURCE_HEADLINE[arch]
        sig = t["p_t"] == t["p_t"] and t["p_t"] < 0.05
        same_sign = np.sign(t["mean_diff"]) == np.sign(src[1] - src[0])
        if sig and same_sign:
            word = "reproduces the direction of"
        elif sig:
            word = "contradicts"
        else:
            word = "does not significantly reproduce"
        lines.append(
            f"- Permuted MNIST, {ARCHS[arch]}: sparse - dense = {t['mean_diff']:+.2f} points (paired t-test "
            f"p = {t['p_t']:.2g}, {t['n']} seeds); this {word} the source's {src[1] - src[0]:+.2f}."
        )
    for bench in [b for b in dict.fromkeys(runs.benchmark) if b != "permuted"]:
        for arch in dict.fromkeys(runs[runs.benchmark == bench].arch):
            g = runs[(runs.benchmark == bench) & (runs.arch == arch) & (runs.stream == "task")]
            t = _paired(g)
            lines.append(
                f"- {BENCHMARKS[bench]}, {ARCHS[arch]}: sparse - dense = {t['mean_diff']:+.2f} points "
                f"(p = {t['p_t']:.2g})."
            )
    for arch in dict.fromkeys(perm.arch):
        g = perm[perm.arch == arch]
        d, s = g[g.variant == "dense"], g[g.variant == "sparse"]
        lines.append(
            f"- Task codes, {ARCHS[arch]}: an image of one task shares {s.between_shared.mean() * 100:.2g}% of its "
            f"active units with an image of another task in the sparse net ({s.overlap_ratio.mean():.2g}x chance) vs "
            f"{d.between_shared.mean() * 100:.2g}% in the dense net ({d.overlap_ratio.mean():.2g}x chance); "
            f"forgetting {s.forgetting.mean() * 100:.1f}% vs {d.forgetting.mean() * 100:.1f}%."
        )
    bad = runs[runs.diverged]
    if len(bad):
        where = ", ".join(
            f"{BENCHMARKS[b]} {ARCHS[a]} {v} ({len(g)})"
            for (b, a, v), g in bad.groupby(["benchmark", "arch", "variant"], sort=False)
        )
        lines.append(
            f"- {len(bad)} of {len(runs)} runs diverged (a non-finite training loss): {where}; their accuracies "
            f"are those of a broken net and pull the means above down. Lower the learning rate (`lr`, `cnn_lr`)."
        )
    c = overlap_correlation(runs)
    if c["n"] > 2:
        lines.append(
            f"- Across all {c['n']} Permuted-MNIST runs, forgetting rises with the between-task overlap "
            f"(Spearman rho = {c['rho_between_shared']:+.2f}, p = {c['p_between_shared']:.2g}); with the overlap "
            f"relative to chance rho = {c['rho_overlap_ratio']:+.2f} (p = {c['p_overlap_ratio']:.2g})."
            if c["rho_between_shared"] > 0
            else f"- Across all {c['n']} Permuted-MNIST runs, forgetting does not rise with the between-task "
            f"overlap (Spearman rho = {c['rho_between_shared']:+.2f}, p = {c['p_between_shared']:.2g})."
        )
    if sw is not None and len(sw):
        grid = sweep_grid(sw)
        dense = sw[sw.variant == "dense"].average_accuracy.mean() * 100
        best = grid.stack().idxmax()
        better = int((grid > dense).to_numpy().sum())
        lines.append(
            f"- Sweep: the best sparse setting is percent_on {best[0]:g}, weight_density {best[1]:g} "
            f"({grid.loc[best]:.1f}% vs dense {dense:.1f}%); {better} of {grid.size} settings beat the dense net."
        )
    return "\n".join(lines)


def explore(runs: pd.DataFrame):
    """ipywidgets explorer over the cached runs: accuracy matrix, activity per epoch, overlap matrix."""
    import matplotlib.pyplot as plt

    from ..plotting import accuracy_matrix
    from ..widgets import explorer

    def show(rows: pd.DataFrame) -> None:
        _fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
        accuracy_matrix(a, np.mean(np.stack(rows.acc.to_list()), axis=0), "mean accuracy matrix")
        act = np.stack(rows.active_epoch.to_list())
        if act.size:
            b.plot(np.arange(1, act.shape[1] + 1), act.mean(axis=0), marker="o")
        b.set_yscale("log")
        b.set_xlabel("epoch")
        b.set_ylabel("% non-zero penultimate units (train)")
        ratio = np.mean([s / ch for s, ch in zip(rows.overlap_shared, rows.overlap_chance, strict=True)], axis=0)
        im = c.imshow(ratio, cmap="coolwarm", vmin=0, vmax=max(2.0, float(np.nanmax(ratio))))
        plt.colorbar(im, ax=c, label="shared / chance")
        c.set_title("overlap of task codes vs chance")
        c.set_xlabel("task")
        c.set_ylabel("task")
        plt.show()

    return explorer(runs, ["benchmark", "arch", "variant"], show)
