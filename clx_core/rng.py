"""Seeds and random streams.

A seed fixes every random choice. Each model of a many-models run owns separate streams
(initialisation, data order, method randomness) derived from its own seed, so model k of a
K-model run draws exactly what a single run with seed k draws. Streams live on the CPU: the
same seed gives the same initial weights and data order on any device.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

STREAMS = ("init", "data", "method", "scenario")


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for a named sub-stream of ``seed`` (stable across runs and platforms)."""
    text = "/".join([str(int(seed)), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *names: object) -> torch.Generator:
    """A CPU generator for the named sub-stream of ``seed``."""
    return torch.Generator().manual_seed(derive_seed(seed, *names))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (for code we do not control)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ModelStreams:
    """One generator per (model, stream): ``streams.init[k]`` draws model k's initial weights."""

    def __init__(self, seeds: list[int]):
        self.seeds = [int(s) for s in seeds]
        for name in STREAMS:
            setattr(self, name, [generator(s, name) for s in self.seeds])

    def __len__(self) -> int:
        return len(self.seeds)

    def state(self) -> dict[str, list[torch.Tensor]]:
        return {name: [g.get_state() for g in getattr(self, name)] for name in STREAMS}

    def load_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        for name in STREAMS:
            for g, s in zip(getattr(self, name), state[name], strict=True):
                g.set_state(s)
