"""Benchmark: the embed job's driver memory and time to the first Parquet part, for manifests of 10^5 and 10^6 rows.

What is measured (per manifest size and format):

* **driver peak RSS**: the resident memory of the driver process only (the Python process that calls
  :func:`msnoop.embed.pipeline.run_embed`; Ray's raylet, GCS, object store and workers are other processes and are not
  counted), sampled by this script every 50 ms with psutil, and the kernel's high-water mark
  (``getrusage(RUSAGE_SELF).ru_maxrss``) reported by the driver itself when it stops. The window is the driver's
  whole life: imports, model set-up, manifest planning, Ray start, and the first ``--after-first`` seconds of
  streaming after the first part exists.
* **time to the first part**: seconds from the driver's call of ``run_embed`` to the first ``part-*.parquet`` in
  ``embeddings/`` or ``errors/`` (polled every 50 ms), and to the end of planning (the job's "N images in ..." log
  line).

The run is not taken to the end: once the first part exists and ``--after-first`` seconds more have been sampled,
the driver is interrupted (SIGINT: ``KeyboardInterrupt``, then ``ray.shutdown()``). Rows repeat a few real
yeast single-cell image pairs (``/work/shared/data/yeast``, 64x64, 2 channels) with a unique ``key`` column as
``input.id_column``; the model is ``random:test_cnn:0`` so that the model does not dominate.

    python jobs/bench_manifest_scale.py --rows 100000 1000000 --formats csv parquet

Writes results/bench_manifest_scale.json and results/bench_manifest_scale.md (Markdown tables; ``--before FILE``
adds the runs of an earlier result file, e.g. results/bench_manifest_scale_before.json, measured before the
manifest was streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, data_dir, write_results

DATA = data_dir()


def make_manifest(folder: Path, n: int, fmt: str, n_files: int = 16) -> Path:
    """A manifest of ``n`` rows repeating the first ``n_files`` yeast image pairs (absolute paths).

    Columns: ``key`` (unique, the id column), ``gfp``, ``rfp`` (paths), ``protein``, ``field``, ``cell``,
    ``localization`` (the real labels of the repeated cell), ``plate`` (``'0001'``), ``well`` and ``dose`` (text).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = folder / f"manifest_{n}.{fmt}"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    labels = pacsv.read_csv(DATA / "yeast" / "yeast_labels.csv").slice(0, n_files).to_pydict()
    base = DATA / "yeast"
    k = np.arange(n) % n_files
    take = lambda col: pa.array(np.asarray(col, dtype=object)[k].astype(str))
    table = pa.table(
        {
            "key": pa.array([f"r{i:07d}" for i in range(n)]),
            "gfp": pa.array(np.asarray([str(base / p) for p in labels["gfp_path"]], dtype=object)[k]),
            "rfp": pa.array(np.asarray([str(base / p) for p in labels["rfp_path"]], dtype=object)[k]),
            "protein": take(labels["protein"]),
            "field": take(labels["field"]),
            "cell": take(labels["cell"]),
            "localization": take(labels["localization_yeastgfp"]),
            "plate": pa.array(["0001"] * n),
            "well": pa.array([f"{'ABCDEFGH'[i % 8]}{i % 12 + 1:02d}" for i in range(n)]),
            "dose": pa.array([f"{(i % 7) * 0.5:.2f}" for i in range(n)]),
        }
    )
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "parquet":
        pq.write_table(table, tmp, row_group_size=65536)
    else:
        pacsv.write_csv(table, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- the driver


def child(manifest: str, out: str, status: str, block: int) -> None:
    """The driver process: run the embed job on ``manifest`` until interrupted; status lines go to ``status``."""
    import logging
    import resource

    import psutil

    t0 = time.time()

    def record(event: str, **extra: object) -> None:
        with open(status, "a") as fh:
            rss = psutil.Process().memory_info().rss
            fh.write(json.dumps({"event": event, "t": time.time(), "rss": rss, **extra}) + "\n")

    class Planned(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            if "already done" in rec.getMessage():
                record("planned", message=rec.getMessage())

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("msnoop").addHandler(Planned())

    from msnoop.embed.pipeline import run_embed
    from msnoop.job_kinds import build_config

    record("imported", since_start=time.time() - t0)
    cfg = build_config(
        {
            "job": "embed",
            "name": "scale",
            "input": {"manifest": manifest, "channels": ["gfp", "rfp"], "id_column": "key"},
            "model": "random:test_cnn:0",
            "output": {"dir": out, "index": "none", "write_lance": False},
            "runtime": {
                "images_per_block": block,
                "batch_size": 64,
                "progress": False,
                "num_cpus": 2,
                "object_store_mb": 768,
            },
        }
    )
    record("run_embed")
    try:
        run_embed(cfg)
        record("finished")
    except KeyboardInterrupt:
        record("interrupted")
    finally:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        record("maxrss", ru_maxrss=kb * 1024)
        import ray

        if ray.is_initialized():
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- the parent


def first_part(out: Path) -> bool:
    return any(any((out / sub).glob("part-*.parquet")) for sub in ("embeddings", "errors") if (out / sub).is_dir())


def measure(manifest: Path, out: Path, *, after_first: float, timeout: float, block: int) -> dict:
    """Run one driver in a fresh process; sample its RSS; stop it ``after_first`` s after its first part."""
    import shutil

    import psutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    status = out.parent / f"{out.name}.status.jsonl"
    status.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", str(manifest), str(out), str(status), str(block)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    peak, samples, t_first, stop_at = 0, [], None, None
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.Error:
            break
        now = time.time()
        peak = max(peak, rss)
        samples.append((round(now - start, 2), rss))
        if t_first is None and first_part(out):
            t_first = now
            stop_at = now + after_first
        if (stop_at is not None and now >= stop_at) or now - start > timeout:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    log.close()
    events = [json.loads(line) for line in status.read_text().splitlines()] if status.exists() else []
    ev = {e["event"]: e for e in events}
    t_run = ev.get("run_embed", {}).get("t")
    result = {
        "manifest": str(manifest),
        "rows": None,
        "peak_rss_sampled_mb": round(peak / 2**20, 1),
        "ru_maxrss_mb": round(ev["maxrss"]["ru_maxrss"] / 2**20, 1) if "maxrss" in ev else None,
        "rss_after_imports_mb": round(ev["imported"]["rss"] / 2**20, 1) if "imported" in ev else None,
        "seconds_to_planned": round(ev["planned"]["t"] - t_run, 2) if "planned" in ev and t_run else None,
        "rss_at_planned_mb": round(ev["planned"]["rss"] / 2**20, 1) if "planned" in ev else None,
        "seconds_to_first_part": round(t_first - t_run, 2) if t_first and t_run else None,
        "reached_first_part": t_first is not None,
        "sampled_after_first_s": after_first,
        "wall_s": round(time.time() - start, 1),
        "exit_code": proc.returncode,
        "rss_curve_mb": [(t, round(r / 2**20)) for t, r in samples[:: max(1, len(samples) // 60)]],
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--formats", nargs="+", default=["csv", "parquet"], choices=["csv", "parquet"])
    ap.add_argument("--after-first", type=float, default=20.0, help="seconds sampled after the first part")
    ap.add_argument("--timeout", type=float, default=900.0, help="stop a driver that has no part after this")
    ap.add_argument("--block", type=int, default=64, help="runtime.images_per_block")
    ap.add_argument("--work", type=Path, default=Path("/tmp/msnoop_bench_manifest_scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_manifest_scale.json")
    ap.add_argument("--label", default="", help="a name for this set of runs (e.g. the branch)")
    ap.add_argument("--before", type=Path, nargs="*", help="earlier result files to report below these runs")
    ap.add_argument("--report-only", action="store_true", help="only write the Markdown from --out and --before")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        manifest, out, status, block = args.child
        child(manifest, out, status, int(block))
        return
    if args.report_only:
        record = json.loads(args.out.read_text())
        write_results(args.out, record, report_markdown(record, args))
        print(report_markdown(record, args))
        return
    runs = []
    for fmt in args.formats:
        for n in args.rows:
            manifest = make_manifest(args.work / "manifests", n, fmt)
            print(f"{fmt} {n} rows: {manifest}", flush=True)
            r = measure(
                manifest, args.work / f"out_{fmt}_{n}", after_first=args.after_first, timeout=args.timeout,
                block=args.block,
            )  # fmt: skip
            r.update(rows=n, format=fmt)
            print({k: v for k, v in r.items() if k != "rss_curve_mb"}, flush=True)
            runs.append(r)
    import platform

    record = {
        "label": args.label,
        "command": "python jobs/bench_manifest_scale.py " + shlex.join(_relative(a) for a in sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared, loaded)",
        "block": args.block,
        "after_first_s": args.after_first,
        "runs": runs,
        "peak_rss_ratio": ratios(runs),
    }
    md = report_markdown(record, args)
    write_results(args.out, record, md)
    print(md)


def _relative(arg: str) -> str:
    return os.path.relpath(arg, Path.cwd()) if arg.startswith("/") and Path(arg).parent.exists() else arg


def report_markdown(record: dict, args: argparse.Namespace) -> str:
    """The ``.md`` report: what is measured, then a table per result file (this one, then ``--before`` files)."""
    lines = [
        "# Embed driver: peak memory and time to the first part vs manifest size",
        "",
        (
            "Driver peak RSS: the process that calls `run_embed` only (not Ray's raylet, object store or workers), "
            "`getrusage(RUSAGE_SELF).ru_maxrss` at the end and the peak of 50 ms psutil samples, over its whole life "
            "(imports, model, planning, Ray start, streaming until stopped). Time to the first part: from the call of "
            "`run_embed` to the first `part-*.parquet` in `embeddings/` or `errors/`; planning ends at the job's "
            "'N images in ...' log line. Rows repeat 16 real yeast image pairs (64x64, 2 channels) with a unique "
            "`key` id column and 7 text metadata columns. Generated by `jobs/bench_manifest_scale.py`."
        ),
        "",
    ]
    lines += report(record, args.timeout)
    for path in args.before or []:
        lines += ["", *report(json.loads(path.read_text()), args.timeout)]
    return "\n".join(lines)


def ratios(runs: list[dict]) -> dict:
    """Peak RSS of the largest over the smallest manifest, per format."""
    out = {}
    for fmt in sorted({r["format"] for r in runs}):
        by_n = {r["rows"]: r for r in runs if r["format"] == fmt}
        lo, hi = min(by_n), max(by_n)
        if lo != hi and by_n[lo]["ru_maxrss_mb"] and by_n[hi]["ru_maxrss_mb"]:
            out[fmt] = {
                "rows": [lo, hi],
                "ru_maxrss": round(by_n[hi]["ru_maxrss_mb"] / by_n[lo]["ru_maxrss_mb"], 3),
                "sampled": round(by_n[hi]["peak_rss_sampled_mb"] / by_n[lo]["peak_rss_sampled_mb"], 3),
            }
    return out


def report(record: dict, timeout: float) -> list[str]:
    """Markdown lines for one result file: the command, a table of runs, the ratios."""
    lines = [
        f"## {record.get('label') or 'runs'}",
        "",
        (
            f"`{record['command']}`; {record['machine']}; images_per_block {record['block']}; model "
            f"random:test_cnn:0; driver stopped {record['after_first_s']:g} s after its first part."
        ),
        "",
        (
            "| format | rows | driver peak RSS (ru_maxrss) MB | sampled peak MB | after imports MB | at end of planning MB "
            "| s to planned | s to first part |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(
            f"| {r['format']} | {r['rows']:,} | {r['ru_maxrss_mb']} | {r['peak_rss_sampled_mb']} | "
            f"{r['rss_after_imports_mb']} | {r['rss_at_planned_mb']} | {r['seconds_to_planned']} | "
            f"{r['seconds_to_first_part'] if r['reached_first_part'] else f'none in {timeout:g} s'} |"
        )
    lines.append("")
    for fmt, r in ratios(record["runs"]).items():
        lines.append(
            f"- {fmt}: peak RSS ratio {r['rows'][1]:,} / {r['rows'][0]:,} rows = {r['ru_maxrss']} (ru_maxrss), "
            f"{r['sampled']} (sampled); goal <= 1.3"
        )
    return lines


if __name__ == "__main__":
    main()
