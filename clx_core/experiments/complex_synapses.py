"""Notebook 05: the Benna-Fusi complex-synapse optimizer vs Adam (and SGD) on Split/Permuted MNIST.

Two studies:

- :func:`compare` reproduces the source's comparison: an MLP trained with Adam or with
  complex synapses (Adam-based, n beakers, alpha, beta) on Split MNIST (5 tasks) and Permuted
  MNIST (10 tasks, images padded to 32x32) in the task, domain and class scenarios; final
  average accuracy per seed, and average accuracy over the tasks seen so far every
  ``eval_every`` iterations.
- :func:`memory_decay` tests the model's core claim, power-law forgetting: the accuracy on the
  first task of a long Permuted-MNIST stream at log-spaced times after it was learned, for
  several beaker counts next to plain Adam and SGD.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from .. import data as data_mod
from .. import metrics, scenarios
from ..config import check_choice, check_float, check_int, fail
from ..models import MLP
from ..results import group_without, run_cached
from ..rng import ModelStreams
from ..synapses import ComplexSynapseAdam
from ..train import Schedule, train
from .common import ExperimentConfig, adam, group_provenance, load_data, resolve_device
from .common import describe as describe  # re-exported: the notebook calls it on this module
from .common import figure_provenance as figure_provenance

NOTEBOOK = "05_complex_synapses"

#: The source's published numbers (compare.py, 10 seeds, mean and SEM, %): Split MNIST, task scenario.
#: Its complex synapses scaled the couplings by the learning rate: our "cs-lr".
SOURCE_RESULTS = {("split", "task"): {"adam": (92.60, 0.98), "cs-lr": (93.96, 0.84)}}
OPTIMIZERS = {
    "adam": "Adam",
    "cs-lr": "CS, lr-scaled (source code)",
    "cs": "CS, time scales in iterations",
    "sgd": "SGD",
}


@dataclasses.dataclass(frozen=True)
class SynapsesConfig(ExperimentConfig):
    """Parameters of notebook 05. Defaults = the source's protocol (the ``paper`` profile)."""

    NOTEBOOK: ClassVar[str] = NOTEBOOK

    PROFILE_OVERRIDES: ClassVar = {
        "smoke": dict(
            hidden=(64,),
            iters=40,
            eval_every=20,
            eval_samples=200,
            seeds=2,
            permuted_tasks=3,
            decay_tasks=4,
            decay_seeds=2,
            decay_points=8,
            decay_beakers=(2, 5),
        ),
        "quick": dict(
            hidden=(100, 100),
            seeds=5,
            iters=200,
            eval_every=100,
            eval_samples=500,
            permuted_tasks=5,
            decay_tasks=8,
            decay_seeds=3,
            decay_points=14,
            decay_beakers=(1, 3, 8),
        ),
        "paper": {},
    }

    # -- data
    data: str = "mnist"  # the source's data set; torchvision downloads it when missing
    offline: bool | None = None  # None: from CLX_OFFLINE; True: download nothing, use real stand-ins
    offline_data: str = "mnist_subset"  # MNIST's offline stand-in: "mnist_subset" or "fashion_mnist"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # -- protocol of the source (compare.py / main_example.py)
    experiments: tuple[str, ...] = ("split", "permuted")
    scenarios: tuple[str, ...] = ("task", "domain", "class")
    optimizers: tuple[str, ...] = ("adam", "cs-lr", "cs")  # Adam; complex synapses as coded / as documented
    split_tasks: int = 5  # 5 tasks x 2 digits
    permuted_tasks: int = 10  # 10 permutations (images padded to 32x32)
    stream: str = "task"  # "task": one task after another; "random": all tasks mixed
    hidden: tuple[int, ...] = (400, 400)  # MLP 784-400-400 (+ output layer)
    batch_size: int = 128
    iters: int = 500  # iterations per task
    lr: float = 1e-3  # Adam, both optimizers
    eval_every: int = 100  # learning-curve evaluation interval (iterations)
    eval_samples: int = 1024  # test samples per task in curve evaluations (final: all)
    seeds: int = 10
    # -- complex synapses (source's compare.py)
    n_beakers: int = 5
    alpha: float = 500.0  # shortest time scale (iterations)
    beta: float = 2500.0  # longest time scale (iterations)
    init: str = "same"  # hidden beakers start as copies of the weights ("same") or at 0 ("zero")
    # (alpha, beta are iterations for "cs"; the source's "cs-lr" divides them by Adam's step size)
    # -- memory decay (beyond the source)
    decay_tasks: int = 20  # Permuted-MNIST tasks in the long stream; task 0 is the memory
    decay_beakers: tuple[int, ...] = (1, 2, 3, 5, 8)
    decay_beta: float = 10000.0  # longest time scale: the whole stream
    decay_sgd_lr: float = 0.1  # plain SGD baseline (the source's SGD default)
    decay_seeds: int = 5
    decay_points: int = 25  # log-spaced evaluations of task 0
    models_per_run: int = 0  # seeds trained together in one batched run; 0 = all

    def validate(self) -> None:
        check_choice("data", self.data, ("mnist", "fashion_mnist"))
        check_choice("offline_data", self.offline_data, data_mod.OFFLINE_SUBSTITUTES["mnist"])
        if not self.experiments:
            fail("experiments", self.experiments, "name at least one of 'split', 'permuted'")
        for e in self.experiments:
            check_choice("experiments", e, ("split", "permuted"))
        if not self.scenarios:
            fail("scenarios", self.scenarios, "name at least one of 'task', 'domain', 'class'")
        for s in self.scenarios:
            check_choice("scenarios", s, scenarios.KINDS)
        if "adam" not in self.optimizers:
            fail("optimizers", self.optimizers, "must include 'adam' (the baseline every comparison is paired with)")
        for o in self.optimizers:
            check_choice("optimizers", o, ("adam", "cs-lr", "cs"))
        check_int("split_tasks", self.split_tasks, 1, 5)
        check_int("permuted_tasks", self.permuted_tasks, 1)
        check_choice("stream", self.stream, scenarios.ORDERS)
        if not self.hidden:
            fail("hidden", self.hidden, "give at least one hidden layer width")
        for h in self.hidden:
            check_int("hidden", h, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("iters", self.iters, 1)
        check_float("lr", self.lr, 0, low_open=True)
        check_int("eval_every", self.eval_every, 1)
        check_int("eval_samples", self.eval_samples, 1)
        check_int("seeds", self.seeds, 1)
        check_int("n_beakers", self.n_beakers, 0)
        check_float("alpha", self.alpha, 0, low_open=True)
        check_float("beta", self.beta, 0, low_open=True)
        if self.alpha > self.beta:
            fail("alpha", self.alpha, f"must be <= beta ({self.beta})")
        check_choice("init", self.init, ("same", "zero"))
        check_int("decay_tasks", self.decay_tasks, 2)
        for n in self.decay_beakers:
            check_int("decay_beakers", n, 0)
        check_float("decay_beta", self.decay_beta, self.alpha)
        check_float("decay_sgd_lr", self.decay_sgd_lr, 0, low_open=True)
        check_int("decay_seeds", self.decay_seeds, 1)
        check_int("decay_points", self.decay_points, 2)
        check_int("models_per_run", self.models_per_run, 0)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))

    # -- derived


# ---------------------------------------------------------------------- building blocks


def _scenario(experiment: str, kind: str, n_tasks: int, data: data_mod.ImageData) -> scenarios.Scenario:
    if experiment == "split":
        return scenarios.split(data, kind, classes_per_task=2, n_tasks=n_tasks)
    return scenarios.permuted(data_mod.pad_to(data, 32), kind, n_tasks)


def _optimizer(unit: dict[str, Any], params) -> torch.optim.Optimizer:
    name = unit["optimizer"]
    if name == "adam":
        return adam(params, lr=unit["lr"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=unit["lr"])
    return ComplexSynapseAdam(
        params,
        lr=unit["lr"],
        n_beakers=unit["n_beakers"],
        alpha=unit["alpha"],
        beta=unit["beta"],
        init=unit["init"],
        timescales="lr-scaled" if name == "cs-lr" else "iterations",
    )


def _run_group(units: list[dict[str, Any]], cfg: SynapsesConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train every unit of a group (same setting, different seeds) as one many-models network."""
    u0 = units[0]
    device = resolve_device(cfg.device)
    data = load_data(cfg.data, cfg.is_offline, cfg.offline_data, str(device))
    scen = _scenario(u0["experiment"], u0["scenario"], u0["tasks"], data)
    streams = ModelStreams([u["seed"] for u in units])
    model = MLP(int(np.prod(scen.data.shape)), u0["hidden"], scen.n_outputs, streams.init).to(device)
    schedule = Schedule(
        batch_size=u0["batch_size"],
        iters=u0["iters"],
        order=u0["stream"],
        eval_every=u0.get("eval_every"),
        eval_at=tuple(u0.get("eval_at", ())),
        eval_samples=u0["eval_samples"],
        eval_tasks=tuple(u0["eval_tasks"]) if u0.get("eval_tasks") is not None else None,
    )
    hist = train(model, _optimizer(u0, model.parameters()), scen, schedule, streams, progress_bar=False)
    results = []
    for k in range(len(units)):
        results.append(
            {
                "acc": hist.acc[k].tolist(),
                "average_accuracy": float(metrics.average_accuracy(hist.acc[k])),
                "curve_steps": hist.curve_steps,
                "curve_acc": np.nan_to_num(hist.curve_acc[k], nan=-1.0).tolist(),
                "loss": hist.loss[k].tolist(),
                "seconds_per_model": hist.seconds / len(units),
            }
        )
    prov = group_provenance(
        device, scen.data, scenario=scen.describe(), profile=cfg.profile, train_seconds=hist.seconds
    )
    return results, prov


def _base_unit(cfg: SynapsesConfig) -> dict[str, Any]:
    return dict(
        data=cfg.data,
        offline_data=cfg.offline_data if cfg.is_offline else None,
        hidden=list(cfg.hidden),
        batch_size=cfg.batch_size,
        iters=cfg.iters,
        stream=cfg.stream,
        eval_samples=cfg.eval_samples,
    )


def _run(cfg: SynapsesConfig, name: str, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return run_cached(
        cfg.store(),
        name,
        units,
        lambda us: _run_group(us, cfg),
        group_without("seed"),
        max_group=cfg.models_per_run or 10**6,
    )


# ---------------------------------------------------------------------- study 1: the comparison


def compare(cfg: SynapsesConfig) -> pd.DataFrame:
    """Adam vs complex synapses, every experiment x scenario x seed: one row per run."""
    units = []
    for exp in cfg.experiments:
        tasks = cfg.split_tasks if exp == "split" else cfg.permuted_tasks
        for kind in cfg.scenarios:
            for opt in cfg.optimizers:
                for seed in range(cfg.seeds):
                    u = dict(
                        _base_unit(cfg),
                        experiment=exp,
                        scenario=kind,
                        tasks=tasks,
                        optimizer=opt,
                        lr=cfg.lr,
                        eval_every=cfg.eval_every,
                        seed=seed,
                    )
                    if opt != "adam":
                        u.update(n_beakers=cfg.n_beakers, alpha=cfg.alpha, beta=cfg.beta, init=cfg.init)
                    units.append(u)
    records = _run(cfg, "compare", units)
    rows = []
    for rec in records:
        p, r = rec["params"], rec["result"]
        rows.append(
            {
                **{k: p[k] for k in ("experiment", "scenario", "optimizer", "seed")},
                "average_accuracy": r["average_accuracy"],
                "acc": np.array(r["acc"]),
                "curve_steps": r["curve_steps"],
                "curve_acc": np.array(r["curve_acc"]),
                "data": rec["provenance"]["data"],
            }
        )
    return pd.DataFrame(rows)


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Final average accuracy (%): one row per experiment x scenario x optimizer with mean ±
    SEM, the 95% CI, the difference to Adam paired over seeds (same seed = same initial weights
    and data order) with its p-value, and the source's published number where it has one."""
    rows = []
    for (exp, kind), g in runs.groupby(["experiment", "scenario"], sort=False):
        adam = g[g.optimizer == "adam"].sort_values("seed").average_accuracy.to_numpy() * 100
        for opt in g.optimizer.unique():
            v = g[g.optimizer == opt].sort_values("seed").average_accuracy.to_numpy() * 100
            s = metrics.summarize(v)
            src = SOURCE_RESULTS.get((exp, kind), {}).get(opt)
            row: dict[str, Any] = {
                "experiment": exp,
                "scenario": kind,
                "optimizer": OPTIMIZERS[opt],
                "accuracy % (±SEM)": s.fmt(),
                "95% CI": f"[{s.ci_low:.2f}, {s.ci_high:.2f}]" if s.n > 1 else "-",
                "source % (±SEM)": f"{src[0]:.2f} (±{src[1]:.2f})" if src else "-",
            }
            if opt == "adam":
                row.update({"vs Adam": "", "p (paired t)": ""})
            else:
                test = metrics.paired_test(v, adam)
                row.update({"vs Adam": f"{test['mean_diff']:+.2f}", "p (paired t)": f"{test['p_t']:.2g}"})
            row["seeds"] = s.n
            rows.append(row)
    return pd.DataFrame(rows)


def seen_curves(runs: pd.DataFrame, experiment: str, kind: str, optimizer: str, iters: int):
    """(steps, curves (seeds, points)): accuracy averaged over the tasks seen so far."""
    g = runs[(runs.experiment == experiment) & (runs.scenario == kind) & (runs.optimizer == optimizer)]
    steps = np.array(g.curve_steps.iloc[0])
    curves = np.stack(g.curve_acc.to_list())  # (seeds, points, tasks)
    seen = np.minimum((steps - 1) // iters + 1, curves.shape[-1])  # tasks reached at each evaluation
    out = np.stack([curves[:, i, :s].mean(axis=1) for i, s in enumerate(seen)], axis=1)
    return steps, out


# ---------------------------------------------------------------------- study 2: memory decay


def decay_settings(cfg: SynapsesConfig) -> list[tuple[str, dict[str, Any]]]:
    """(label, optimizer parameters) of every curve in the decay study."""
    out = [("Adam", dict(optimizer="adam", lr=cfg.lr)), ("SGD", dict(optimizer="sgd", lr=cfg.decay_sgd_lr))]
    for n in cfg.decay_beakers:
        out.append(
            (
                f"CS n={n}",
                dict(optimizer="cs", lr=cfg.lr, n_beakers=n, alpha=cfg.alpha, beta=cfg.decay_beta, init=cfg.init),
            )
        )
    n = max(cfg.decay_beakers, default=cfg.n_beakers)
    out.append(
        (
            f"CS n={n}, lr-scaled",
            dict(optimizer="cs-lr", lr=cfg.lr, n_beakers=n, alpha=cfg.alpha, beta=cfg.decay_beta, init=cfg.init),
        )
    )
    return out


def decay_steps(cfg: SynapsesConfig) -> list[int]:
    """Log-spaced evaluation iterations after task 0 ends (plus its end)."""
    horizon = cfg.iters * (cfg.decay_tasks - 1)
    since = np.unique(np.round(np.logspace(0, np.log10(horizon), cfg.decay_points)).astype(int))
    return [cfg.iters] + [cfg.iters + int(s) for s in since]


def memory_decay(cfg: SynapsesConfig) -> pd.DataFrame:
    """Task-0 accuracy vs iterations since it was learned, one row per (setting, seed, time)."""
    units = []
    for label, opt in decay_settings(cfg):
        for seed in range(cfg.decay_seeds):
            units.append(
                dict(
                    _base_unit(cfg),
                    experiment="permuted",
                    scenario="domain",
                    tasks=cfg.decay_tasks,
                    stream="task",
                    eval_every=None,
                    eval_at=decay_steps(cfg),
                    eval_tasks=[0],
                    seed=seed,
                    label=label,
                    **opt,
                )
            )
    records = _run(cfg, "decay", units)
    rows = []
    for rec in records:
        p, r = rec["params"], rec["result"]
        acc0 = np.array(r["curve_acc"])[:, 0]
        for step, a in zip(r["curve_steps"], acc0, strict=True):
            rows.append({"setting": p["label"], "seed": p["seed"], "since": step - cfg.iters, "accuracy": a})
    return pd.DataFrame(rows)


def fit_decay(decay: pd.DataFrame, chance: float = 0.1, min_since: int = 10) -> pd.DataFrame:
    """Per setting: power-law exponent b of (acc - chance) ~ t^b and how well a power law vs an
    exponential fits (R^2 on log(acc - chance)), both fitted per seed; mean and 95% CI over seeds."""
    rows = []
    for setting, g in decay.groupby("setting", sort=False):
        exps, r2_pow, r2_exp = [], [], []
        for _, s in g[g.since >= min_since].groupby("seed"):
            t = s.since.to_numpy(float)
            y = np.log(np.clip(s.accuracy.to_numpy() - chance, 1e-3, None))
            for x, store in ((np.log(t), r2_pow), (t, r2_exp)):
                coef = np.polyfit(x, y, 1)
                resid = y - np.polyval(coef, x)
                store.append(1 - resid.var() / max(y.var(), 1e-12))
                if store is r2_pow:
                    exps.append(coef[0])
        b = metrics.summarize(exps)
        rows.append(
            {
                "setting": setting,
                "power-law exponent": b.fmt(digits=3, what="ci"),
                "R² power law": float(np.mean(r2_pow)),
                "R² exponential": float(np.mean(r2_exp)),
                "seeds": b.n,
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- reporting


def key_numbers(runs: pd.DataFrame) -> str:
    """Mean final accuracy (%) per setting, rounded: the notebook's regression-checked output."""
    g = runs.groupby(["experiment", "scenario", "optimizer"], sort=False).average_accuracy.mean() * 100
    return "\n".join(f"{e:8s} {s:6s} {o:6s} {v:5.1f}" for (e, s, o), v in g.items())


def plot_final(runs: pd.DataFrame):
    """Bars: final average accuracy per scenario and optimizer, 95% CI, seeds as dots."""
    import matplotlib.pyplot as plt

    from ..plotting import bars_with_ci

    exps = list(dict.fromkeys(runs.experiment))
    fig, axes = plt.subplots(1, len(exps), figsize=(5.2 * len(exps), 3.6), squeeze=False)
    for ax, exp in zip(axes[0], exps, strict=True):
        g = runs[runs.experiment == exp]
        kinds = list(dict.fromkeys(g.scenario))
        groups = {
            OPTIMIZERS[o]: [g[(g.scenario == k) & (g.optimizer == o)].average_accuracy.to_numpy() * 100 for k in kinds]
            for o in dict.fromkeys(g.optimizer)
        }
        bars_with_ci(ax, [f"{k}-IL" for k in kinds], groups)
        ax.set_title(f"{exp.capitalize()} MNIST")
        ax.set_ylabel("final average accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(labels), fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(runs: pd.DataFrame, iters: int):
    """Average accuracy over the tasks seen so far during training, mean and 95% CI band."""
    import matplotlib.pyplot as plt

    from ..plotting import curve_with_band

    exps = list(dict.fromkeys(runs.experiment))
    kinds = list(dict.fromkeys(runs.scenario))
    fig, axes = plt.subplots(
        len(exps), len(kinds), figsize=(4 * len(kinds), 3 * len(exps)), squeeze=False, sharex="row"
    )
    for i, exp in enumerate(exps):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            for opt in dict.fromkeys(runs.optimizer):
                steps, curves = seen_curves(runs, exp, kind, opt, iters)
                curve_with_band(ax, steps, curves * 100, OPTIMIZERS[opt], clip=(0, 100))
            n_tasks = runs[runs.experiment == exp].acc.iloc[0].shape[0]
            for t in range(1, n_tasks):
                ax.axvline(t * iters, color="0.8", lw=0.8, zorder=0)
            ax.set_title(f"{exp} MNIST, {kind}-IL")
            ax.set_xlabel("iteration")
            ax.set_ylabel("accuracy on tasks so far (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(labels), fontsize=9)
    fig.tight_layout()
    return fig


def plot_decay(decay: pd.DataFrame, chance: float = 0.1):
    """Log-log: task-0 accuracy above chance vs iterations since it was learned (mean, 95% CI)."""
    import matplotlib.pyplot as plt

    from ..plotting import curve_with_band

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for setting, g in decay[decay.since > 0].groupby("setting", sort=False):
        table = g.pivot(index="seed", columns="since", values="accuracy")
        above = np.clip(table.to_numpy() - chance, 1e-3, None) * 100
        style = dict(ls="--") if setting in ("Adam", "SGD") else {}
        curve_with_band(ax, table.columns.to_numpy(), above, setting, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iterations since task 0 was learned")
    ax.set_ylabel("task-0 accuracy above chance (points)")
    ax.set_title("Memory decay on Permuted MNIST (domain-IL)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def verdict(runs: pd.DataFrame, fits: pd.DataFrame) -> str:
    """The conclusions in words, computed from this run's numbers.

    Every optimizer is compared with Adam paired over seeds; with many comparisons at once the
    p-values are also Holm-adjusted (family-wise error 5%).
    """
    tests = []
    for (exp, kind), g in runs.groupby(["experiment", "scenario"], sort=False):
        adam = g[g.optimizer == "adam"].sort_values("seed").average_accuracy.to_numpy() * 100
        for opt in [o for o in dict.fromkeys(g.optimizer) if o != "adam"]:
            v = g[g.optimizer == opt].sort_values("seed").average_accuracy.to_numpy() * 100
            tests.append((exp, kind, opt, metrics.paired_test(v, adam)))
    adjusted = metrics.holm([t["p_t"] for *_, t in tests])
    lines = []
    for (exp, kind, opt, t), p_holm in zip(tests, adjusted, strict=True):
        sig = "significant" if p_holm < 0.05 else "not significant"
        lines.append(
            f"- {exp} MNIST, {kind}-IL, {OPTIMIZERS[opt]}: {t['mean_diff']:+.2f} points vs Adam "
            f"(paired t-test p = {t['p_t']:.2g}, Holm-adjusted {p_holm:.2g}: {sig}; {t['n']} seeds)"
        )
    best = fits.loc[fits["R² power law"].idxmax()]
    n_pow = int((fits["R² power law"] > fits["R² exponential"]).sum())
    lines.append(
        f"- Memory decay: a power law fits task-0 forgetting better than an exponential for {n_pow} of {len(fits)} "
        f"settings; the best power-law fit is {best.setting} (R² {best['R² power law']:.2f}, "
        f"exponent {best['power-law exponent']})."
    )
    return "\n".join(lines)


def explore(runs: pd.DataFrame, iters: int):
    """ipywidgets explorer over the cached runs: mean accuracy matrix and curves per setting."""
    import matplotlib.pyplot as plt

    from ..plotting import accuracy_matrix, curve_with_band
    from ..widgets import explorer

    def show(rows: pd.DataFrame) -> None:
        _fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        accuracy_matrix(a, np.mean(np.stack(rows.acc.to_list()), axis=0), "mean accuracy matrix")
        steps = np.array(rows.curve_steps.iloc[0])
        curves = np.stack(rows.curve_acc.to_list())
        for t in range(curves.shape[-1]):
            curve_with_band(b, steps, curves[:, :, t] * 100, f"task {t}", clip=(0, 100))
        b.set_xlabel("iteration")
        b.set_ylabel("accuracy (%)")
        b.legend(fontsize=7, ncol=2)
        plt.show()

    return explorer(runs, ["experiment", "scenario", "optimizer"], show)
