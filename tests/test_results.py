import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clx_core.results import (
    ResultStore,
    atomic_write_json,
    code_version,
    group_without,
    provenance,
    run_cached,
    stable_hash,
)


def test_stable_hash_ignores_key_order_and_sees_values():
    assert stable_hash({"a": 1, "b": [1.0, 2]}) == stable_hash({"b": [1.0, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert stable_hash({"a": 1.0}) != stable_hash({"a": 1.5})
    with pytest.raises(TypeError, match="cannot hash"):
        stable_hash({"a": object()})
    assert len(code_version()) == 12


def test_store_roundtrip_and_corrupt_file(tmp_path):
    store = ResultStore(tmp_path)
    params = {"seed": 1, "lr": 0.1}
    assert store.load("exp", params) is None
    store.save("exp", params, {"acc": 0.5}, {"x": 1})
    assert store.load("exp", params)["result"] == {"acc": 0.5}
    path = store.path("exp", params)
    path.write_text("{ truncated")
    assert store.load("exp", params) is None  # recomputed, not crashed
    assert path.with_suffix(".corrupt").exists()


def test_run_cached_computes_only_missing_and_groups(tmp_path):
    store = ResultStore(tmp_path)
    calls = []

    def group(units):
        calls.append([u["seed"] for u in units])
        return [{"v": u["seed"] * u["lr"]} for u in units], {"device": "test"}

    units = [{"lr": lr, "seed": s} for lr in (0.1, 0.2) for s in range(3)]
    recs = run_cached(store, "exp", units[:4], group, group_without("seed"), progress=False)
    assert calls == [[0, 1, 2], [0]]
    assert [r["result"]["v"] for r in recs] == [0.0, 0.1, 0.2, 0.0]
    assert recs[0]["provenance"]["group_size"] == 3
    calls.clear()
    recs = run_cached(store, "exp", units, group, group_without("seed"), max_group=1, progress=False)
    assert calls == [[1], [2]]  # only the two missing units, one per run
    assert len(recs) == 6


def test_provenance_fields():
    p = provenance("cpu", data={"used": "x"})
    for key in ("code_version", "git", "packages", "device", "created"):
        assert key in p
    assert "torch" in p["packages"] and p["data"] == {"used": "x"}


def test_atomic_write_leaves_no_partial_file(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from clx_core.results import ResultStore, run_cached, group_without
    store = ResultStore(sys.argv[1])
    log = open(sys.argv[2], "a")
    def group(units):
        for u in units:
            log.write(f"{u['seed']}\\n"); log.flush()
        time.sleep(float(sys.argv[3]))
        return [{"seed": u["seed"], "blob": "x" * 200000} for u in units], {}
    units = [{"seed": s} for s in range(6)]
    run_cached(store, "exp", units, group, group_without("seed"), max_group=2, progress=False)
    """
)


def test_kill_minus_nine_then_resume(tmp_path):
    """kill -9 mid-run leaves only complete results; the rerun computes just what is missing."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    log = tmp_path / "log.txt"
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(log), "0.6"], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((root / "exp").glob("*.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((root / "exp").glob("*.json"))
    assert 2 <= len(done) < 6
    for path in done:  # complete, parseable records only
        assert json.loads(path.read_text())["result"]["blob"] == "x" * 200000
    # at most an unfinished temporary file (never read as a result), nothing half-written
    assert all(p.suffix == ".json" or (p.name.startswith(".") and p.suffix == ".tmp") for p in (root / "exp").iterdir())
    log.write_text("")
    subprocess.run([sys.executable, str(script), str(root), str(log), "0"], env=env, check=True)
    recomputed = sorted(int(s) for s in log.read_text().split())
    assert len(recomputed) == 6 - len(done)
    assert len(list((root / "exp").glob("*.json"))) == 6
