"""Plumbing shared by the notebook experiments: device, data cache, provenance, unit keys."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import pandas as pd
import torch

from .. import data as data_mod
from ..config import Config, check_choice, env_offline
from ..results import ResultStore, provenance, results_dir

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    check_choice("device", device, DEVICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("parameter 'device' = 'cuda' is not allowed: no CUDA device is available here")
    return torch.device(device)


def resolve_offline(offline: bool | None) -> bool:
    return env_offline() if offline is None else bool(offline)


@functools.lru_cache(maxsize=4)
def load_data(name: str, offline: bool, substitute: str | None, device: str) -> data_mod.ImageData:
    """Data sets are loaded once per process and shared by every run that asks for them."""
    return data_mod.load(name, offline=offline, substitute=substitute, device=device)


def data_provenance(data: data_mod.ImageData) -> dict[str, Any]:
    return {**data.provenance(), "label": data.label}


def group_provenance(device: torch.device, data: data_mod.ImageData, **extra: Any) -> dict[str, Any]:
    return provenance(device, data=data_provenance(data), **extra)


def adam(params, lr: float, **kw: Any) -> torch.optim.Adam:
    """torch's Adam, fused into one kernel where this torch supports it (CPU since 2.4, CUDA)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **kw)


class ExperimentConfig(Config):
    """A notebook's config: the offline switch resolved and the notebook's result store."""

    NOTEBOOK: ClassVar[str] = ""  # results/<profile>/<NOTEBOOK>/

    @property
    def is_offline(self) -> bool:
        return resolve_offline(self.offline)  # every notebook config has an ``offline`` field

    def store(self) -> ResultStore:
        return ResultStore(results_dir(self.profile) / self.NOTEBOOK)


def describe(cfg: Config) -> pd.DataFrame:
    """The settings of this run next to the source protocol (the paper profile of its config)."""
    paper = type(cfg)(profile="paper")
    rows = []
    for name in cfg.field_names():
        ours, theirs = getattr(cfg, name), getattr(paper, name)
        rows.append(
            {
                "parameter": name,
                "this run": str(ours),
                "source protocol": str(theirs),
                "differs": "yes" if ours != theirs and name != "profile" else "",
            }
        )
    return pd.DataFrame(rows).set_index("parameter")


def figure_provenance(cfg: Config, runs: pd.DataFrame) -> dict[str, Any]:
    """Provenance for a figure drawn from ``runs`` (data source of its first row, the config)."""
    return provenance(resolve_device(cfg.device), data=runs.data.iloc[0], profile=cfg.profile, config=cfg.to_dict())
