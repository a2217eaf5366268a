"""The one training loop every method runs in.

The loop owns the step: sampling minibatches from resident tensors, forward, loss,
``zero_grad``/``backward``/``step``, evaluation and progress. A continual-learning method is a
:class:`Method` that overrides only the hooks it needs::

    before_task(run)                 new task starts (masks, new heads, optimizer resets)
    replay(run, batch) -> (Batch, w) extra samples, mixed as (1 - w) * current + w * replay
    extra_loss(run, batch, out) -> (K,)  e.g. a regulariser's penalty, one value per model
    after_backward(run)              change gradients before the step (freeze, mask)
    after_step(run)                  after the optimizer step (re-zero weights, trackers)
    after_task(run)                  consolidation (Fisher, SI importance, store a head)

All tensors carry a leading models dimension K (see :mod:`clx_core.models`): a loss is a
(K,) vector, summed for ``backward`` so each model gets exactly its own gradient.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import check_choice, check_int
from .models import n_models
from .rng import ModelStreams
from .scenarios import ORDERS, Batch, Scenario, index_schedule, steps_for


class Method:
    """A continual-learning method: every hook is a no-op; override what you need."""

    name = "none"

    def before_task(self, run: Run) -> None:
        pass

    def replay(self, run: Run, batch: Batch) -> tuple[Batch, float] | None:
        return None

    def extra_loss(self, run: Run, batch: Batch, out: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_backward(self, run: Run) -> None:
        pass

    def after_step(self, run: Run) -> None:
        pass

    def after_task(self, run: Run) -> None:
        pass


def cross_entropy(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy per model (K,), over the batch's active output units.

    Masking inactive units with -inf gives exactly the loss and gradients of a separate head.
    Soft targets (replay/distillation) are used when the batch carries them.
    """
    logits = out if batch.active is None else out.masked_fill(~batch.active, float("-inf"))
    k, b, c = logits.shape
    if batch.targets is not None:
        logp = torch.log_softmax(logits, dim=-1).masked_fill(batch.targets == 0, 0.0)
        return -(batch.targets * logp).sum(-1).mean(-1)
    return F.cross_entropy(logits.reshape(k * b, c), batch.y.reshape(-1), reduction="none").view(k, b).mean(1)


@dataclasses.dataclass
class Schedule:
    """How long each task trains: ``iters`` minibatches or ``epochs`` passes of ``batch_size``."""

    batch_size: int = 128
    iters: int | None = None
    epochs: int | None = None
    first_epochs: int | None = None  # epochs of task 0 when it differs (the sparse source's train_ep)
    # "task": one task after another; "random": every block draws from the union of all tasks
    # (i.i.d.; with the same budget this is the joint / cumulative baseline)
    order: str = "task"
    eval_every: int | None = None  # also evaluate every N iterations (learning curves)
    eval_at: tuple[int, ...] = ()  # ... and at these global iterations (e.g. log-spaced)
    eval_samples: int | None = 1024  # test samples per task for those curves (None = all)
    eval_tasks: tuple[int, ...] | None = None  # tasks the curves evaluate (None = all)

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        if (self.iters is None) == (self.epochs is None):
            raise ValueError("Schedule: give exactly one of 'iters' and 'epochs'")
        if self.iters is not None:
            check_int("iters", self.iters, 1)
        if self.epochs is not None:
            check_int("epochs", self.epochs, 1)
        if self.first_epochs is not None:
            check_int("first_epochs", self.first_epochs, 1)
        check_choice("order", self.order, ORDERS)
        if self.eval_every is not None:
            check_int("eval_every", self.eval_every, 1)
        if self.eval_samples is not None:
            check_int("eval_samples", self.eval_samples, 1)
        for s in self.eval_at:
            check_int("eval_at", s, 1)
        self._eval_set = frozenset(self.eval_at)

    def evaluates_at(self, step: int) -> bool:
        return bool(self.eval_every and step % self.eval_every == 0) or step in self._eval_set


@dataclasses.dataclass
class History:
    """What a run measured, per model: accuracy matrix, learning curves, losses, times."""

    acc: np.ndarray  # (K, T, T): after task i, on task j
    test_loss: np.ndarray  # (K, T, T): mean test cross-entropy, after task i, on task j
    curve_steps: list[int]  # iterations at which curves were evaluated
    curve_acc: np.ndarray  # (K, n_evals, T)
    curve_loss: np.ndarray  # (K, n_evals, T) test cross-entropy at the same points
    loss: np.ndarray  # (K, n_tasks) mean training loss per task
    seconds: float = 0.0
    steps: int = 0


@dataclasses.dataclass
class Run:
    """What hooks can see and change while training."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scenario: Scenario
    streams: ModelStreams
    schedule: Schedule
    task: int = 0  # current task (in a random stream: the block index)
    step: int = 0  # global iteration
    task_step: int = 0  # iteration within the current task
    epoch_steps: int = 0  # iterations per epoch of the current task (epoch schedules)
    methods: Sequence[Method] = ()

    @property
    def n_models(self) -> int:
        return n_models(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    scenario: Scenario,
    progress: int,
    max_samples: int | None = None,
    tasks: Sequence[int] | None = None,
    chunk_rows: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean cross-entropy, each (K, T), of every model on every task's test set.

    Uses each task's whole test set, or a fixed subset of ``max_samples``; only ``tasks`` are
    evaluated when given (the others are NaN). Each task's samples go through the network in
    large chunks shared by all K models; ``progress`` is the task being trained (it decides the
    class scenario's seen outputs).
    """
    was_training = model.training
    model.eval()
    K = n_models(model)
    acc = np.full((K, scenario.n_tasks), np.nan)
    loss = np.full((K, scenario.n_tasks), np.nan)
    for t in range(scenario.n_tasks) if tasks is None else tasks:
        idx = _eval_index(scenario, t, max_samples)
        chunk = max(1, chunk_rows // K)
        correct = torch.zeros(K, device=idx.device)
        total_loss = torch.zeros(K, device=idx.device)
        for s in range(0, len(idx), chunk):
            part = idx[s : s + chunk].unsqueeze(0)
            batch = scenario.batch("test", t, part, progress)
            out = model(batch.x.expand(K, *batch.x.shape[1:]))
            if batch.active is not None:
                out = out.masked_fill(~batch.active, float("-inf"))
            correct += (out.argmax(-1) == batch.y).sum(1)
            logp = torch.log_softmax(out, dim=-1)
            total_loss -= logp.gather(-1, batch.y.expand(K, -1).unsqueeze(-1)).squeeze(-1).sum(1)
        acc[:, t] = (correct / len(idx)).cpu().numpy()
        loss[:, t] = (total_loss / len(idx)).cpu().numpy()
    model.train(was_training)
    return acc, loss


def _eval_index(scenario: Scenario, task: int, max_samples: int | None) -> torch.Tensor:
    """A fixed subset of a task's test set (the same at every evaluation: curves stay smooth)."""
    idx = scenario.test_index[task]
    if max_samples is None or max_samples >= len(idx):
        return idx
    g = torch.Generator().manual_seed(scenario.seed * 1000 + task)
    pick = torch.randperm(len(idx), generator=g)[:max_samples].to(idx.device)
    return idx[pick]


# ---------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scenario: Scenario,
    schedule: Schedule,
    streams: ModelStreams,
    methods: Sequence[Method] = (),
    objective: Callable[[torch.Tensor, Batch], torch.Tensor] = cross_entropy,
    progress_bar: bool = True,
    on_eval: Callable[[Run, np.ndarray, np.ndarray], None] | None = None,
) -> History:
    """Train K models (one per seed in ``streams``) through the scenario's tasks.

    After every task all tasks are evaluated on their full test sets (the accuracy matrix);
    with ``schedule.eval_every`` also every N iterations on ``eval_samples`` per task.
    """
    K = n_models(model)
    if len(streams) != K:
        raise ValueError(f"{len(streams)} seed streams for a network of {K} models")
    T = scenario.n_tasks
    run = Run(model, optimizer, scenario, streams, schedule, methods=methods)
    acc, test_loss = np.zeros((K, T, T)), np.zeros((K, T, T))
    curve_steps, curve_acc, curve_loss = [], [], []
    losses = np.zeros((K, T))
    device = run.device
    plans = [_plan(scenario, schedule, t) for t in range(T)]
    total = sum(p[0] for p in plans)
    bar = tqdm(total=total, disable=not progress_bar, leave=False, mininterval=1.0, desc="train")
    start = time.perf_counter()
    model.train()
    for t in range(T):
        steps, pool_task, pool_idx = plans[t]
        run.task, run.task_step = t, 0
        progress = t if schedule.order == "task" else T - 1  # a random stream has seen every task
        run.epoch_steps = max(1, len(pool_idx) // schedule.batch_size)
        for m in methods:
            m.before_task(run)
        positions = index_schedule(len(pool_idx), steps, schedule.batch_size, streams.data).to(device)
        pool_task_d, pool_idx_d = pool_task.to(device), pool_idx.to(device)
        loss_sum = torch.zeros(K, device=device)
        for i in range(steps):
            pos = positions[:, i]
            task = t if schedule.order == "task" else pool_task_d[pos]
            batch = scenario.batch("train", task, pool_idx_d[pos], progress)
            out = model(batch.x)
            loss = objective(out, batch)
            loss_sum += loss.detach()
            for m in methods:
                replayed = m.replay(run, batch)
                if replayed is not None:
                    rbatch, weight = replayed
                    loss = (1 - weight) * loss + weight * objective(model(rbatch.x), rbatch)
            for m in methods:
                extra = m.extra_loss(run, batch, out)
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            for m in methods:
                m.after_backward(run)
            optimizer.step()
            for m in methods:
                m.after_step(run)
            run.step += 1
            run.task_step += 1
            if schedule.evaluates_at(run.step):
                a, lo = evaluate(model, scenario, progress, schedule.eval_samples, schedule.eval_tasks)
                curve_steps.append(run.step)
                curve_acc.append(a)
                curve_loss.append(lo)
                if on_eval is not None:
                    on_eval(run, a, lo)
            bar.update(1)
        losses[:, t] = (loss_sum / steps).cpu().numpy()
        for m in methods:
            m.after_task(run)
        acc[:, t, :], test_loss[:, t, :] = evaluate(model, scenario, progress)
    bar.close()

    def stack(cs: list[np.ndarray]) -> np.ndarray:
        return np.stack(cs, axis=1) if cs else np.zeros((K, 0, T))

    return History(
        acc, test_loss, curve_steps, stack(curve_acc), stack(curve_loss), losses, time.perf_counter() - start, run.step
    )


def _plan(scenario: Scenario, schedule: Schedule, t: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(steps, task id of each pool sample, data index of each pool sample) for block t."""
    if schedule.order == "task":
        idx = scenario.train_index[t].cpu()
        task = torch.full_like(idx, t)
    else:  # random order: every block draws from the union of all tasks
        idx = torch.cat([i.cpu() for i in scenario.train_index])
        task = torch.cat([torch.full_like(i.cpu(), j) for j, i in enumerate(scenario.train_index)])
    epochs = schedule.first_epochs if (t == 0 and schedule.first_epochs is not None) else schedule.epochs
    pool = len(idx) if schedule.order == "task" else len(idx) // scenario.n_tasks
    steps = steps_for(pool, schedule.batch_size, schedule.iters, epochs)
    return steps, task, idx
