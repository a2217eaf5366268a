"""One look for every figure, and figures that say where they come from.

:func:`save_figure` writes ``figures/<notebook>/<name>.pdf`` and ``.png`` (atomically), embeds
the provenance in the files' metadata, writes it in full to a ``<name>.json`` sidecar, and
prints the data source (and any offline substitution) on the figure itself.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from . import metrics
from .results import atomic_write_bytes, atomic_write_json, project_root

PALETTE = "colorblind"


def set_style() -> None:
    """The project's seaborn style (call once per notebook)."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE, font_scale=0.95)
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "pdf.fonttype": 42,  # editable text in the PDF
            "axes.titleweight": "bold",
            "legend.frameon": False,
        }
    )


def figures_dir(notebook: str, profile: str) -> Path:
    """``figures/<notebook>`` for real profiles; smoke runs write under ``build/`` only."""
    base = os.environ.get("CLX_FIGURES")
    if base:
        return Path(base) / notebook
    if profile == "smoke":
        return project_root() / "build" / "smoke-figures" / notebook
    return project_root() / "figures" / notebook


def save_figure(fig: plt.Figure, notebook: str, name: str, provenance: dict[str, Any], profile: str) -> list[Path]:
    """Save ``fig`` as PDF + PNG with provenance metadata and a JSON sidecar; returns the paths."""
    folder = figures_dir(notebook, profile)
    footer = _footer(provenance, profile)
    text = fig.text(0.01, -0.01, footer, ha="left", va="top", fontsize=7, color="0.35", wrap=True)
    summary = json.dumps({k: provenance.get(k) for k in ("data", "profile", "code_version", "git")}, default=str)
    paths = []
    for ext, meta in (
        ("pdf", {"Title": name, "Subject": footer, "Keywords": summary, "Creator": "clx_core"}),
        ("png", {"Title": name, "Description": footer, "Comment": summary, "Software": "clx_core"}),
    ):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, metadata=meta)
        path = folder / f"{name}.{ext}"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    atomic_write_json(folder / f"{name}.json", {"figure": name, "notebook": notebook, **provenance})
    text.remove()
    return paths


def _footer(prov: dict[str, Any], profile: str) -> str:
    data = prov.get("data") or {}
    data_text = f"data: {data.get('label') or data.get('used')}" if isinstance(data, dict) and data else "data: -"
    git = prov.get("git") or {}
    commit = (git.get("commit") or "no-git")[:8] + ("+dirty" if git.get("dirty") else "")
    return f"{data_text} | profile: {profile} | clx {commit} / code {prov.get('code_version', '?')}"


# ---------------------------------------------------------------------- common plots


def curve_with_band(
    ax: plt.Axes, x: Sequence[float], curves, label: str, color=None, clip: tuple[float, float] | None = None, **kw
) -> None:
    """Mean curve over seeds with its 95% CI band (optionally clipped to a valid range, e.g. 0-100 %)."""
    mean, lo, hi = metrics.band(curves)
    if clip is not None:
        lo, hi = np.clip(lo, *clip), np.clip(hi, *clip)
    (line,) = ax.plot(x, mean, label=label, color=color, **kw)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def bars_with_ci(ax: plt.Axes, labels: Sequence[str], groups: dict[str, Sequence[Sequence[float]]]) -> None:
    """Grouped bars (mean over seeds) with 95% CI whiskers and the seeds as dots."""
    names = list(groups)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = np.arange(len(labels)) + (i - (len(names) - 1) / 2) * width
        sums = [metrics.summarize(v) for v in groups[name]]
        means = [s.mean for s in sums]
        err = [
            [s.mean - s.ci_low if s.n > 1 else 0 for s in sums],
            [s.ci_high - s.mean if s.n > 1 else 0 for s in sums],
        ]
        ax.bar(xs, means, width, label=name, yerr=err, capsize=3, alpha=0.85)
        for x, v in zip(xs, groups[name], strict=True):
            ax.scatter(np.full(len(v), x), v, s=6, color="k", alpha=0.5, zorder=3)
    ax.set_xticks(np.arange(len(labels)), labels)


def accuracy_matrix(ax: plt.Axes, R: np.ndarray, title: str = "") -> None:
    """Heatmap of the mean accuracy matrix R[i, j] (after task i, on task j)."""
    sns.heatmap(
        np.asarray(R) * 100,
        ax=ax,
        vmin=0,
        vmax=100,
        annot=len(R) <= 10,
        fmt=".0f",
        cmap="viridis",
        cbar_kws={"label": "accuracy (%)"},
    )
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
