"""Results on disk: keyed by what produced them, written atomically, reused on re-runs.

A *unit* of work (one seed of one setting) is stored as one JSON file under
``results/<profile>/<experiment>/<key>.json``, where ``key`` hashes the unit's parameters and
the code version (a hash of the ``clx_core`` sources): changing either computes anew, changing
nothing re-uses the file. Files are written to a temporary name and renamed, so an
interrupted run (even ``kill -9``) leaves only complete results, and the next run continues
with the units still missing. Every record carries its provenance.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "numpy", "scipy", "matplotlib", "seaborn", "pandas")


# ---------------------------------------------------------------------- paths


@functools.cache
def project_root() -> Path:
    """The repository root (the folder with pyproject.toml above the working directory)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "clx_core").is_dir():
            return folder
    pkg = Path(__file__).resolve().parent.parent
    return pkg if (pkg / "pyproject.toml").is_file() else here


def results_dir(profile: str) -> Path:
    """``$CLX_RESULTS`` or ``<root>/results``, then the profile."""
    base = Path(os.environ.get("CLX_RESULTS") or project_root() / "results")
    return base / profile


# ---------------------------------------------------------------------- hashing


def _canonical(obj: Any) -> Any:
    if isinstance(obj, float):
        return repr(obj) if not math.isfinite(obj) else float(repr(obj))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot hash a {type(obj).__name__} in result parameters: {obj!r}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-like object that does not depend on key order or the Python session."""
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@functools.cache
def code_version() -> str:
    """Hash of every clx_core source file: results are only re-used by the same code."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        h.update(path.relative_to(pkg).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------- provenance


@functools.cache
def _git() -> dict[str, Any]:
    root = project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "clx_core"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@functools.cache
def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def provenance(device: str | torch.device = "cpu", **extra: Any) -> dict[str, Any]:
    """Where a result comes from: code, packages, machine, time (plus anything in ``extra``)."""
    return {
        "code_version": code_version(),
        "git": _git(),
        "packages": package_versions(),
        "device": device_name(device),
        "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


# ---------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=_json_default).encode())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------- the store


class ResultStore:
    """One JSON file per finished unit of work, under ``root/<experiment>/<key>.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, params: dict[str, Any]) -> str:
        return stable_hash({"params": params, "code": code_version()})

    def path(self, experiment: str, params: dict[str, Any]) -> Path:
        return self.root / experiment / f"{self.key(params)}.json"

    def load(self, experiment: str, params: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(experiment, params)
        try:
            with open(path) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            path.rename(path.with_suffix(".corrupt"))  # keep it for inspection, recompute
            return None
        return record if record.get("params") == _canonical(params) else None

    def save(self, experiment: str, params: dict[str, Any], result: dict[str, Any], prov: dict[str, Any]) -> None:
        record = {"params": _canonical(params), "result": result, "provenance": prov}
        atomic_write_json(self.path(experiment, params), record)

    def records(self, experiment: str) -> list[dict[str, Any]]:
        """Every finished record of an experiment (any code version), for explorers."""
        out = []
        for path in sorted((self.root / experiment).glob("*.json")):
            with contextlib.suppress(json.JSONDecodeError, OSError):
                out.append(json.loads(path.read_text()))
        return out


def run_cached(
    store: ResultStore,
    experiment: str,
    units: Sequence[dict[str, Any]],
    run_group: Callable[[list[dict[str, Any]]], tuple[list[dict[str, Any]], dict[str, Any]]],
    group_key: Callable[[dict[str, Any]], Hashable],
    max_group: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Records for ``units``, computing only the missing ones.

    Missing units that share ``group_key`` (everything but the seed, typically) run together in
    one call ``run_group(units) -> (results, provenance)`` (one batched many-models run), at most
    ``max_group`` at a time; each result is saved as soon as its group finishes.
    """
    todo = [u for u in units if store.load(experiment, u) is None]
    groups: dict[Hashable, list[dict[str, Any]]] = {}
    for u in todo:
        groups.setdefault(group_key(u), []).append(u)
    chunks = [g[i : i + max_group] for g in groups.values() for i in range(0, len(g), max_group)]
    if chunks and progress:
        print(
            f"{experiment}: {len(units) - len(todo)} of {len(units)} units cached, "
            f"computing {len(todo)} in {len(chunks)} batched runs"
        )
    from tqdm.auto import tqdm

    for chunk in tqdm(chunks, desc=experiment, disable=not (progress and chunks), leave=False):
        start = time.perf_counter()
        results, prov = run_group(chunk)
        seconds = time.perf_counter() - start
        for u, r in zip(chunk, results, strict=True):
            store.save(experiment, u, r, {**prov, "wall_seconds_group": seconds, "group_size": len(chunk)})
    out = []
    for u in units:
        rec = store.load(experiment, u)
        if rec is None:
            raise RuntimeError(f"{experiment}: result for {u} missing after computing it")
        out.append(rec)
    return out


def group_without(*names: str) -> Callable[[dict[str, Any]], Hashable]:
    """A ``group_key`` that ignores ``names`` (e.g. "seed"): units differing only there batch together."""

    def key(unit: dict[str, Any]) -> Hashable:
        return stable_hash({k: v for k, v in unit.items() if k not in names})

    return key


def iter_records(records: Iterable[dict[str, Any]]):
    """(params, result) pairs of loaded records."""
    for rec in records:
        yield rec["params"], rec["result"]
