"""Speed benchmarks (``make bench``): ratios measured in one run, after warm-up.

Each benchmark returns a dict of numbers; the run prints them and writes all of them to one JSON
file. Goals are printed next to the ratios; they are goals, not tests (no timed assertions).

    python -m clx_core.bench [--only NAME ...] [--out build/bench.json] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import scenarios
from .models import MLP
from .results import atomic_write_json, provenance
from .rng import ModelStreams
from .synapses import ComplexSynapseAdam
from .train import Schedule, train

BENCHES: dict[str, Callable[[argparse.Namespace], dict]] = {}


def bench(fn: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], dict]:
    """Register a benchmark (explicitly, by decorating it here or in the module it measures)."""
    BENCHES[fn.__name__] = fn
    return fn


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(n: int = 1024) -> float:
    """This machine's float32 matmul throughput (FLOP/s) with torch's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    reps = 10
    seconds = timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / seconds


def _mnist_like() -> data_mod.ImageData:
    """Real offline data for the timing runs (MNIST if present, else its offline stand-in)."""
    return data_mod.load("mnist", offline=True)


def _mlp_flops(sizes: list[int], batch: int) -> float:
    """Forward + backward FLOPs of one MLP step (backward ~ 2x forward, minus the input grad)."""
    fwd = sum(2 * batch * a * b for a, b in itertools.pairwise(sizes))
    return 3 * fwd - 2 * batch * sizes[0] * sizes[1]


# ---------------------------------------------------------------------- benchmarks


@bench
def loop_vs_dataloader(args: argparse.Namespace) -> dict:
    """Our loop (resident tensors, indexed minibatches) vs a textbook DataLoader loop, same MLP and data."""
    d = _mnist_like()
    scen = scenarios.split(d, "domain", task_classes=[list(range(10))])
    steps, batch, sizes = (100 if args.quick else 300), 128, [784, 400, 400, 10]

    def ours():
        streams = ModelStreams([0])
        model = MLP(784, sizes[1:-1], 10, streams.init)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train(model, opt, scen, Schedule(batch_size=batch, iters=steps), streams, progress_bar=False)

    x, y = d.train_x, d.train_y

    def dataloader():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True
        )
        done = 0
        while done < steps:
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break

    t_ours, t_dl = timed(ours), timed(dataloader)
    peak = matmul_peak()
    flops = _mlp_flops(sizes, batch) * steps
    return {
        "ours_steps_per_s": steps / t_ours,
        "dataloader_steps_per_s": steps / t_dl,
        "speedup_vs_dataloader": t_dl / t_ours,
        "goal_speedup": ">= 1.0",
        "matmul_peak_gflops": peak / 1e9,
        "ours_percent_of_matmul_peak": 100 * flops / t_ours / peak,
    }


def _many_models(sizes: list[int], batch: int, k: int, steps: int) -> dict:
    d = _mnist_like()
    scen = scenarios.split(d, "domain", task_classes=[list(range(10))])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scen = scen.to(device)

    def run(seeds):
        streams = ModelStreams(seeds)
        model = MLP(sizes[0], sizes[1:-1], sizes[-1], streams.init).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        train(model, opt, scen, Schedule(batch_size=batch, iters=steps), streams, progress_bar=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_batched = timed(lambda: run(list(range(k))), repeats=2)
    t_seq = timed(lambda: [run([s]) for s in range(k)], repeats=1)
    return {
        "models": k,
        "batched_s": t_batched,
        "sequential_s": t_seq,
        "speedup": t_seq / t_batched,
        "device": str(device),
    }


@bench
def many_models(args: argparse.Namespace) -> dict:
    """16 models in one batched process vs 16 sequential runs of the same loop."""
    steps = 100 if args.quick else 300
    small = _many_models([784, 100, 10], 32, 16, steps)
    large = _many_models([784, 400, 400, 10], 128, 16, steps // 2)
    return {
        "mlp_784_100_10_b32": {**small, "goal": ">= 2x on 2 CPU cores, >= 10x on a GPU"},
        "mlp_784_400_400_10_b128": {**large, "goal": ">= 1x (not slower); >= 10x on a GPU"},
    }


@bench
def synapse_step(args: argparse.Namespace) -> dict:
    """One optimizer step on the 784-400-400-10 MLP: complex synapses (n 5) vs torch's Adam."""
    streams = ModelStreams([0])
    model = MLP(784, (400, 400), 10, streams.init)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = list(model.parameters())
    reps = 50 if args.quick else 200

    def step_time(opt) -> float:
        return timed(lambda: [opt.step() for _ in range(reps)]) / reps

    out = {
        "adam_default_ms": 1e3 * step_time(torch.optim.Adam(params, lr=1e-3)),
        "adam_fused_ms": 1e3 * step_time(torch.optim.Adam(params, lr=1e-3, fused=True)),
        "cs_n5_ms": 1e3 * step_time(ComplexSynapseAdam(params, n_beakers=5, alpha=500, beta=2500)),
    }
    out["ratio_cs_vs_adam_default"] = out["cs_n5_ms"] / out["adam_default_ms"]
    out["ratio_cs_vs_adam_fused"] = out["cs_n5_ms"] / out["adam_fused_ms"]
    out["goal_ratio_vs_adam"] = "<= 2x"
    return out


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    benches = _load_plugins()  # before the parser: plugin benchmarks are valid --only choices
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(benches), help="run only these benchmarks")
    parser.add_argument("--out", default="build/bench.json", help="where to write all numbers (JSON)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a rough check)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {"provenance": provenance("cuda" if torch.cuda.is_available() else "cpu")}
    for name in args.only or list(benches):
        start = time.perf_counter()
        results[name] = benches[name](args)
        print(f"\n== {name}  ({time.perf_counter() - start:.0f} s)")
        _print(results[name])
    atomic_write_json(args.out, results)
    print(f"\nwritten to {args.out}")
    return 0


def _load_plugins() -> dict[str, Callable[[argparse.Namespace], dict]]:
    """Benchmarks that live next to the code they measure register themselves on import.

    They register in ``clx_core.bench``; under ``python -m`` this file runs as ``__main__``, a
    different module object, so the registry is read from the imported package module.
    """
    import importlib

    for module in ("clx_core.sparse", "clx_core.regularizers"):
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(module)
    return importlib.import_module("clx_core.bench").BENCHES


def _print(d: dict, indent: str = "  ") -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print(v, indent + "  ")
        else:
            print(f"{indent}{k}: {v:.3g}" if isinstance(v, float) else f"{indent}{k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
