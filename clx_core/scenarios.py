"""Task streams: which samples form each task and what the network must output for them.

A :class:`Scenario` splits one :class:`~clx_core.data.ImageData` into tasks (split by class, or
permuted pixels) and fixes the label handling of the continual-learning scenario:

- ``task``: multi-head; every task owns a slice ("head") of the output layer and the other
  units are masked out, for training and testing alike (equivalent to separate heads).
- ``domain``: one shared head of ``classes per task`` units; the label is the position of the
  class within its task (split) or the class itself (permuted).
- ``class``: one unit per class of every task. ``class_outputs="all"`` keeps every unit active
  (the complex-synapses source); ``"seen"`` masks classes of tasks not yet reached, in training
  and evaluation (the BI-R source).

Every sample is addressed by (task, index into the data set's arrays). Batches for K models are
gathered from the resident tensors in one indexing operation; permutations are applied per
batch, so Permuted MNIST costs no extra copies of the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .config import check_choice, check_int, fail
from .data import ImageData
from .rng import generator

KINDS = ("task", "domain", "class")


@dataclasses.dataclass
class Batch:
    """K minibatches: ``x`` (K, B, ...), labels ``y`` (K, B) as output-unit indices."""

    x: torch.Tensor
    y: torch.Tensor
    task: int | torch.Tensor  # one task for all samples, or per-sample ids (K, B)
    active: torch.Tensor | None  # output units allowed: (C,) or (K, B, C); None = all
    targets: torch.Tensor | None = None  # soft targets (K, B, C) for replayed samples, if any


@dataclasses.dataclass
class Scenario:
    """Tasks over one data set, with the label mapping of a continual-learning scenario."""

    name: str  # "split" or "permuted"
    kind: str  # "task", "domain" or "class"
    data: ImageData
    task_classes: list[tuple[int, ...]]  # the original classes of each task
    n_outputs: int
    label_table: torch.Tensor  # (n_tasks, n_classes): original class -> output unit, -1 = absent
    heads: list[tuple[int, int]]  # output units [start, stop) each task's labels live in
    train_index: list[torch.Tensor]  # per task: indices into data.train_*
    test_index: list[torch.Tensor]
    perms: torch.Tensor | None = None  # (n_tasks, pixels): flat pixel permutation per task
    class_outputs: str = "all"  # class scenario: "all" or "seen"
    seed: int = 0  # scenario seed (permutations, evaluation subsets)

    @property
    def n_tasks(self) -> int:
        return len(self.task_classes)

    def describe(self) -> dict[str, object]:
        return {
            "scenario": self.name,
            "kind": self.kind,
            "tasks": self.n_tasks,
            "task_classes": [list(c) for c in self.task_classes],
            "outputs": self.n_outputs,
            "class_outputs": self.class_outputs,
            "seed": self.seed,
            "data": self.data.provenance(),
        }

    # ------------------------------------------------------------------ masks

    def active(self, task: int | torch.Tensor, progress: int) -> torch.Tensor | None:
        """Output units allowed for samples of ``task`` while training task ``progress``."""
        device = self.label_table.device
        if self.kind == "task":
            masks = self._head_masks()
            return masks[task]  # (C,) for one task, (K, B, C) per sample
        if self.kind == "class" and self.class_outputs == "seen":
            top = max(progress, task) if isinstance(task, int) else progress
            stop = self.heads[min(top, self.n_tasks - 1)][1]
            mask = torch.zeros(self.n_outputs, dtype=torch.bool, device=device)
            mask[:stop] = True
            return mask
        return None

    def _head_masks(self) -> torch.Tensor:
        cached = getattr(self, "_masks", None)
        if cached is None:
            cached = torch.zeros(self.n_tasks, self.n_outputs, dtype=torch.bool, device=self.label_table.device)
            for t, (a, b) in enumerate(self.heads):
                cached[t, a:b] = True
            self._masks = cached
        return cached

    # ------------------------------------------------------------------ batches

    def batch(self, split: str, task: int | torch.Tensor, idx: torch.Tensor, progress: int) -> Batch:
        """Gather samples ``idx`` (K, B) of ``split`` ("train"/"test") belonging to ``task``.

        ``task`` is an int when every sample comes from the same task (the fast path), else a
        (K, B) tensor of task ids.
        """
        xs, ys = (self.data.train_x, self.data.train_y) if split == "train" else (self.data.test_x, self.data.test_y)
        x, y = xs[idx], ys[idx]
        if self.perms is not None:
            # torch.gather with a broadcast index is ~7x faster than x[..., perm] on the CPU
            flat = x.flatten(2)
            perm = self.perms[task]  # (pixels,) for one task, (K, B, pixels) per sample
            x = torch.gather(flat, 2, perm.expand_as(flat)).view_as(x)
        labels = self.label_table[task, y]
        return Batch(x, labels, task, self.active(task, progress))

    def to(self, device: str | torch.device) -> Scenario:
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return dataclasses.replace(
            self,
            data=self.data.to(device),
            label_table=self.label_table.to(device),
            train_index=move(self.train_index),
            test_index=move(self.test_index),
            perms=None if self.perms is None else self.perms.to(device),
        )


# ---------------------------------------------------------------------- builders


def _label_table(kind: str, task_classes: Sequence[Sequence[int]], n_classes: int):
    table = torch.full((len(task_classes), n_classes), -1, dtype=torch.long)
    heads, start = [], 0
    width = max(len(c) for c in task_classes)
    for t, classes in enumerate(task_classes):
        for pos, c in enumerate(classes):
            table[t, c] = pos if kind == "domain" else start + pos
        heads.append((0, width) if kind == "domain" else (start, start + len(classes)))
        start += len(classes)
    n_outputs = width if kind == "domain" else start
    return table, heads, n_outputs


def split(
    data: ImageData,
    kind: str,
    *,
    classes_per_task: int | None = None,
    task_classes: Sequence[Sequence[int]] | None = None,
    n_tasks: int | None = None,
    class_order: str = "identity",
    order_seed: int = 0,
    class_outputs: str = "all",
) -> Scenario:
    """Split ``data`` by class: task t holds classes ``order[t*c:(t+1)*c]``.

    Give either ``classes_per_task`` (with optional ``n_tasks``) or explicit ``task_classes``
    (e.g. ``[[0, 1, 2], [3, 4, 5]]``). ``class_order="shuffled"`` permutes the classes with
    ``order_seed`` before splitting.
    """
    check_choice("scenario", kind, KINDS)
    check_choice("class_order", class_order, ("identity", "shuffled"))
    check_choice("class_outputs", class_outputs, ("all", "seen"))
    n_classes = data.n_classes
    if task_classes is None:
        if classes_per_task is None:
            fail("classes_per_task", None, "give classes_per_task or task_classes")
        check_int("classes_per_task", classes_per_task, 1, n_classes)
        max_tasks = n_classes // classes_per_task
        n_tasks = max_tasks if n_tasks is None else n_tasks
        check_int("n_tasks", n_tasks, 1, max_tasks)
        order = list(range(n_classes))
        if class_order == "shuffled":
            order = torch.randperm(n_classes, generator=generator(order_seed, "class_order")).tolist()
        task_classes = [tuple(order[t * classes_per_task : (t + 1) * classes_per_task]) for t in range(n_tasks)]
    else:
        task_classes = [tuple(int(c) for c in cs) for cs in task_classes]
        flat = [c for cs in task_classes for c in cs]
        if not task_classes or any(len(cs) == 0 for cs in task_classes):
            fail("task_classes", task_classes, "every task needs at least one class")
        if len(set(flat)) != len(flat):
            fail("task_classes", task_classes, "tasks must not share classes")
        if min(flat) < 0 or max(flat) >= n_classes:
            fail("task_classes", task_classes, f"classes must lie in 0..{n_classes - 1} for {data.name}")
    table, heads, n_outputs = _label_table(kind, task_classes, n_classes)
    if kind == "domain" and len({len(c) for c in task_classes}) != 1:
        fail("task_classes", task_classes, "the domain scenario needs the same number of classes per task")

    def index(ys: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
        return torch.nonzero(torch.isin(ys.cpu(), torch.tensor(classes))).flatten()

    return Scenario(
        name="split",
        kind=kind,
        data=data,
        task_classes=list(task_classes),
        n_outputs=n_outputs,
        label_table=table,
        heads=heads,
        train_index=[index(data.train_y, c) for c in task_classes],
        test_index=[index(data.test_y, c) for c in task_classes],
        class_outputs=class_outputs,
        seed=order_seed,
    ).to(data.train_x.device)


def permuted(
    data: ImageData,
    kind: str,
    n_tasks: int,
    *,
    seed: int = 0,
    first_unpermuted: bool = False,
    class_outputs: str = "all",
) -> Scenario:
    """Permuted tasks: task t shows every image with a fixed pixel permutation drawn from ``seed``.

    The permutations belong to the scenario, not the run: every seed of an experiment sees the
    same tasks, so seeds differ in initial weights and data order only (and can share a batched
    run). ``first_unpermuted`` keeps task 0 as the original images.
    """
    check_choice("scenario", kind, KINDS)
    check_int("n_tasks", n_tasks, 1)
    pixels = int(torch.tensor(data.shape).prod())
    perms = torch.stack(
        [
            torch.arange(pixels)
            if (t == 0 and first_unpermuted)
            else torch.randperm(pixels, generator=generator(seed, "permutation", t))
            for t in range(n_tasks)
        ]
    )
    classes = tuple(range(data.n_classes))
    task_classes = [classes] * n_tasks
    table, heads, n_outputs = _label_table(kind, task_classes, data.n_classes)
    all_train = torch.arange(len(data.train_y))
    all_test = torch.arange(len(data.test_y))
    return Scenario(
        name="permuted",
        kind=kind,
        data=data,
        task_classes=task_classes,
        n_outputs=n_outputs,
        label_table=table,
        heads=heads,
        train_index=[all_train] * n_tasks,
        test_index=[all_test] * n_tasks,
        perms=perms,
        class_outputs=class_outputs,
        seed=seed,
    ).to(data.train_x.device)


# ---------------------------------------------------------------------- streams

ORDERS = ("task", "random")


def index_schedule(pool_size: int, steps: int, batch_size: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Positions (K, steps, B) into a pool of ``pool_size`` samples, one stream per model.

    Each model walks through fresh random permutations of the pool (sampling without
    replacement within an epoch), drawn from its own generator.
    """
    need = steps * batch_size
    out = torch.empty(len(gens), need, dtype=torch.long)
    for k, g in enumerate(gens):
        reps = -(-need // pool_size)
        out[k] = torch.cat([torch.randperm(pool_size, generator=g) for _ in range(reps)])[:need]
    return out.view(len(gens), steps, batch_size)


def steps_for(pool_size: int, batch_size: int, iters: int | None, epochs: int | None) -> int:
    """Number of minibatches: ``iters`` or ``epochs`` full passes (last partial batch dropped)."""
    if iters is not None:
        return iters
    return epochs * max(1, pool_size // batch_size)
