"""Continual-learning metrics and across-seed statistics.

The accuracy matrix ``R[i, j]`` is the accuracy on task j after training task i (tasks not yet
seen included, which FWT needs). Functions accept one matrix (T, T) or a stack over seeds
(S, T, T) and return one value per seed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats


def _as3d(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim == 2:
        R = R[None]
    if R.ndim != 3 or R.shape[1] != R.shape[2]:
        raise ValueError(f"accuracy matrix must be (T, T) or (seeds, T, T), got shape {R.shape}")
    return R


def _squeeze(values: np.ndarray, R) -> np.ndarray | float:
    return float(values[0]) if np.asarray(R).ndim == 2 else values


def average_accuracy(R):
    """Mean accuracy over all tasks after the last task."""
    A = _as3d(R)
    return _squeeze(A[:, -1, :].mean(axis=1), R)


def backward_transfer(R):
    """BWT = mean_{j < T-1} (R[T-1, j] - R[j, j]); negative = forgetting (Lopez-Paz & Ranzato)."""
    A = _as3d(R)
    T = A.shape[1]
    if T < 2:
        return _squeeze(np.zeros(len(A)), R)
    j = np.arange(T - 1)
    return _squeeze((A[:, -1, j] - A[:, j, j]).mean(axis=1), R)


def forward_transfer(R, reference):
    """FWT = mean_{j > 0} (R[j-1, j] - b_j), ``b`` the accuracy of a reference (e.g. untrained) model."""
    A = _as3d(R)
    b = np.asarray(reference, dtype=float)
    b = np.broadcast_to(b, (len(A), A.shape[1])) if b.ndim <= 1 else b
    T = A.shape[1]
    if T < 2:
        return _squeeze(np.zeros(len(A)), R)
    j = np.arange(1, T)
    return _squeeze((A[:, j - 1, j] - b[:, j]).mean(axis=1), R)


def forgetting(R):
    """Mean over tasks j < T-1 of the drop from their best accuracy to the final one (Chaudhry et al.)."""
    A = _as3d(R)
    T = A.shape[1]
    if T < 2:
        return _squeeze(np.zeros(len(A)), R)
    drops = [A[:, j : T - 1, j].max(axis=1) - A[:, -1, j] for j in range(T - 1)]
    return _squeeze(np.mean(drops, axis=0), R)


def seen_average(R):
    """Average accuracy over the tasks seen so far after each task: (T,) per seed."""
    A = _as3d(R)
    T = A.shape[1]
    out = np.stack([A[:, i, : i + 1].mean(axis=1) for i in range(T)], axis=1)
    return out[0] if np.asarray(R).ndim == 2 else out


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean across seeds with its standard error and a t-based 95% confidence interval."""

    mean: float
    sem: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def fmt(self, scale: float = 1.0, digits: int = 2, what: str = "sem") -> str:
        err = self.sem if what == "sem" else self.half_width
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} (±{err * scale:.{digits}f})"


def summarize(values, confidence: float = 0.95) -> Summary:
    """Mean, SEM and t-interval of per-seed values (NaN-free; n = 1 gives a NaN interval)."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("summarize: no values")
    n, mean = v.size, float(v.mean())
    if n < 2:
        return Summary(mean, math.nan, math.nan, math.nan, n)
    sem = float(v.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sem)
    return Summary(mean, sem, mean - half, mean + half, n)


def band(curves, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise mean and t-interval of curves (seeds, points): for CI bands in plots."""
    c = np.asarray(curves, dtype=float)
    mean = c.mean(axis=0)
    if len(c) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.5 + confidence / 2, len(c) - 1) * c.std(axis=0, ddof=1) / math.sqrt(len(c))
    return mean, mean - half, mean + half


def paired_test(a, b) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of a - b over seeds/trials, with effect size."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    out = {"mean_diff": float(d.mean()), "n": int(d.size)}
    if d.size < 2 or np.allclose(d, d[0]):
        out.update(t=math.nan, p_t=math.nan, p_wilcoxon=math.nan, cohen_dz=math.nan)
        return out
    t = stats.ttest_rel(a, b)
    out.update(t=float(t.statistic), p_t=float(t.pvalue), cohen_dz=float(d.mean() / d.std(ddof=1)))
    out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue) if np.count_nonzero(d) > 0 else math.nan
    return out


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN): family-wise error control for many tests."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok])]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
