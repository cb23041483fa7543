"""Benchmark: the same ``msnoop embed`` job with its output on local disk and on a local S3 endpoint.

    python jobs/bench_s3.py                       # 384 yeast cells x 2 channels, test_cnn, 5 alternating rounds
    python jobs/bench_s3.py --n 512 --repeats 4 --s3-input   # adds the arm with the inputs in the bucket

The S3 endpoint is moto's standalone server on 127.0.0.1 (``tests/s3_server.py``: started here, stopped at the
end), running in this process; the job runs in a child process with one Ray session on loopback, so the endpoint
and the job do not share an interpreter (nor its GIL). Arms, each a full ``run_embed_job`` (embed to Parquet
parts, run.json, totals check, LanceDB table; on S3 the table is written by Ray tasks, see
:func:`msnoop.job_kinds.run_embed_job`):

* ``local``: manifest and images on local disk, output.dir a fresh local folder;
* ``s3``: manifest and images on local disk, output.dir a fresh ``s3://bench/...`` prefix;
* ``s3_input`` (``--s3-input``): manifest and images in the bucket too (uploaded once before timing).

One warm-up run of each arm is not counted; then the arms alternate in rounds whose order flips each time
(A B, B A, A B, ...), so a slow spell of the shared machine, or a steady drift, hits every arm alike. Reported: median images/s per arm, the ratio of medians s3 / local
with a 95 % bootstrap interval (pairs resampled) and the min / max of the per-pair ratios; per run also the
summed wall time of the write tasks (``write_block``), the LanceDB stage, the objects/files and bytes written,
and the CPU seconds the moto server spent (this process's CPU time during the run: the endpoint competes for
the same 2 cores as the job, which a remote S3 service would not).

On a shared machine the wall-clock rates swing with other people's load (runs of the same arm differed by 1.6x
here), so the job's CPU seconds are counted too: the CPU time of the driver and all its descendants (Ray's
raylet, workers and actors), sampled every 0.2 s. Images per CPU-second is what bounds throughput on a
dedicated CPU-bound machine and barely moves with other load; its s3 / local ratio is reported beside the
wall-clock one.

The data: the yeast single cells of ``/work/shared/data/yeast`` (64x64, 2 channels, padded to 224), first
``--n`` rows of the manifest in a stable random order. ``--model random:test_cnn:0`` (default) keeps the network
cheap so that reading and writing are a visible share of the time; ``default`` is the shipped model.

Writes results/bench_s3.json and results/bench_s3.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from harness import RESULTS, ROOT, bootstrap_ratio, data_dir, write_results

YEAST = data_dir("yeast")
BUCKET_PREFIX = "bench"


class TreeCPU:
    """CPU seconds (user + system) of a process and all its descendants, sampled every ``interval`` seconds.

    Ray's raylet, workers and actors are descendants of the job's driver process; an actor that exits between
    two samples loses at most ``interval`` seconds of its CPU time from the count.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.seen: dict[int, float] = {}  # pid -> last CPU seconds seen
        self.self_cpu = 0.0  # CPU seconds the sampling itself took in this process (not the endpoint's)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        t0 = time.thread_time()
        try:
            self._sample_once()
        finally:
            with self._lock:
                self.self_cpu += time.thread_time() - t0

    def _sample_once(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root exited
            return
        for p in procs:
            with contextlib.suppress(psutil.Error), self._lock:  # a process may exit meanwhile
                t = p.cpu_times()
                # own time only: children_* would count a reaped worker a second time in its parent (raylet)
                self.seen[p.pid] = max(self.seen.get(p.pid, 0.0), t.user + t.system)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def total(self) -> float:
        self._sample()
        with self._lock:
            return sum(self.seen.values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _s3_server_module() -> Any:
    """``tests/s3_server.py`` (the tests' moto server), loaded by path: tests/ is not a package."""
    spec = importlib.util.spec_from_file_location("msnoop_s3_server", ROOT / "tests" / "s3_server.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def make_manifest(work: Path, n: int, seed: int = 0) -> Path:
    """A manifest of ``n`` yeast cells (stable random subset) beside a link to the images; paths stay relative."""
    import pandas as pd

    src = pd.read_csv(YEAST / "yeast_labels.csv")
    rows = src.sample(n=min(n, len(src)), random_state=seed).sort_index()
    folder = work / f"yeast_{len(rows)}"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "images"
    if not link.exists():
        link.symlink_to(YEAST / "images")
    manifest = folder / "manifest.csv"
    rows.to_csv(manifest, index=False)
    return manifest


def upload_inputs(manifest: Path, base: str, cfg: Any) -> tuple[str, float]:
    """Copy the manifest and its images to ``base`` (same relative paths); returns the manifest URI and seconds."""
    import pandas as pd

    from msnoop.core import storage as st

    t0 = time.perf_counter()
    rows = pd.read_csv(manifest)
    for col in ("gfp_path", "rfp_path"):
        for rel in rows[col]:
            st.write_bytes(st.join(base, rel), (manifest.parent / rel).read_bytes(), cfg)
    uri = str(st.join(base, "manifest.csv"))
    st.write_bytes(uri, manifest.read_bytes(), cfg)
    return uri, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- child process


def _timed_write_block(log_path: str) -> Any:
    """``write_block`` that appends its wall time to ``log_path`` (one line per call; a local file: one node)."""
    from msnoop.embed.write import write_block

    def timed(batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = write_block(batch, **kwargs)
        with open(log_path, "a") as f:
            f.write(f"{time.perf_counter() - t0:.6f}\n")
        return out

    return timed


def _written(out: str | Path, cfg: Any) -> dict[str, int]:
    """Files (objects) and bytes under an output folder or prefix."""
    import pyarrow.fs as pafs

    from msnoop.core import storage as st

    fs, path = st.resolve(out, cfg)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    return {"files": len(files), "bytes": int(sum(i.size for i in files))}


def child(args: argparse.Namespace) -> None:
    """All runs in one Ray session; prints ``BEGIN <arm>`` before and ``RESULT {json}`` after every run."""
    import logging

    from msnoop.core import storage as st
    from msnoop.core.runtime import init_ray, shutdown_ray
    from msnoop.embed import pipeline as embed_job
    from msnoop.job_kinds import build_config, run_embed_job

    logging.basicConfig(level=logging.WARNING)
    s3cfg = st.StorageConfig(endpoint_url=args.endpoint, region="us-east-1")
    work = Path(args.work)
    t0 = time.perf_counter()
    init_ray(num_cpus=args.num_cpus, object_store_memory=1024**3, quiet=True)
    print(f"INFO ray_init_s {time.perf_counter() - t0:.2f}", flush=True)
    arms = args.arms.split(",")
    # rounds alternate the order (A B, B A, A B, ...): a machine getting busier or quieter during the benchmark
    # then favours neither arm, and each round's runs are adjacent in time (one pair per round)
    rounds = [arms if r % 2 == 0 else arms[::-1] for r in range(args.repeats)]
    schedule = [(arm, True) for arm in arms] + [(arm, False) for order in rounds for arm in order]
    for i, (arm, warmup) in enumerate(schedule):
        manifest = args.s3_manifest if arm == "s3_input" else args.manifest
        tag = f"r{i:02d}-{uuid.uuid4().hex[:6]}"
        out: str | Path = work / f"out_{tag}" if arm == "local" else f"s3://{args.bucket}/{BUCKET_PREFIX}/{tag}"
        cfg = build_config(
            {
                "job": "embed",
                "name": "yeast",
                "input": {"manifest": str(manifest), "channels": ["gfp", "rfp"]},
                "model": args.model,
                "preprocess": {"mode": "native"},
                "output": {"dir": str(out)},
                **({"storage": {"endpoint_url": args.endpoint, "region": "us-east-1"}} if arm != "local" else {}),
                "runtime": {"batch_size": 64, "images_per_block": args.block, "progress": False},
            }
        )
        log = work / f"write_{tag}.log"
        embed_job.write_block = _timed_write_block(str(log))  # build_dataset looks the name up at call time
        print(f"BEGIN {arm}", flush=True)
        t_run = time.perf_counter()
        result = run_embed_job(cfg)
        seconds = time.perf_counter() - t_run
        print(f"END {arm}", flush=True)
        writes = [float(x) for x in log.read_text().split()] if log.is_file() else []
        res = {
            "arm": arm,
            "warmup": warmup,
            "images": result.n_embedded + result.n_errors,
            "errors": result.n_errors,
            "seconds": round(seconds, 3),
            "images_per_s": round((result.n_embedded + result.n_errors) / seconds, 3),
            "embed_stage_s": round(result.seconds, 3),  # run_embed: parts + run.json + totals check
            "lance_stage_s": round(seconds - result.seconds, 3),  # publish_embeddings
            "write_tasks": len(writes),
            "write_tasks_s": round(sum(writes), 3),
            **_written(out, s3cfg if arm != "local" else None),
            "load_1m": round(os.getloadavg()[0], 2),
        }
        assert result.n_rows_total + result.n_errors_total == result.n_input, res
        print("RESULT " + json.dumps(res), flush=True)
        st.remove(out, s3cfg if arm != "local" else None)  # keep disk and moto's memory small
    shutdown_ray()


# ---------------------------------------------------------------------------------------------- parent process


def summarise(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    counted = {arm: [r for r in runs if r["arm"] == arm and not r["warmup"]] for arm in arms}
    rate = {arm: np.array([r["images_per_s"] for r in rs]) for arm, rs in counted.items()}
    out: dict[str, Any] = {"arms": {}}
    for arm, rs in counted.items():
        out["arms"][arm] = {
            "median_images_per_s": float(np.median(rate[arm])),
            "images_per_s_runs": rate[arm].tolist(),
            "median_seconds": float(np.median([r["seconds"] for r in rs])),
            "median_embed_stage_s": float(np.median([r["embed_stage_s"] for r in rs])),
            "median_lance_stage_s": float(np.median([r["lance_stage_s"] for r in rs])),
            "median_write_tasks_s": float(np.median([r["write_tasks_s"] for r in rs])),
            "write_tasks": rs[0]["write_tasks"],
            "files_written": rs[0]["files"],
            "bytes_written": rs[0]["bytes"],
            "median_endpoint_cpu_s": float(np.median([r["endpoint_cpu_s"] for r in rs])),
            "median_job_cpu_s": float(np.median([r["job_cpu_s"] for r in rs])),
            "median_images_per_cpu_s": float(np.median([r["images_per_cpu_s"] for r in rs])),
        }
    per_cpu = {arm: np.array([r["images_per_cpu_s"] for r in rs]) for arm, rs in counted.items()}
    for arm in arms:
        if arm == "local":
            continue
        for kind, values in (("", rate), ("_per_cpu_s", per_cpu)):
            a, b = values[arm], values["local"]
            pair = a / b
            lo, hi = bootstrap_ratio(a, b)
            out[f"ratio{kind}_{arm}_over_local"] = {
                "median_ratio": float(np.median(a) / np.median(b)),
                "bootstrap_95": [round(lo, 3), round(hi, 3)],
                "pair_ratios": [round(float(x), 3) for x in pair],
                "pair_min": float(pair.min()),
                "pair_max": float(pair.max()),
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Embedding with the output on S3 (moto on 127.0.0.1) against local disk",
        "",
        (
            f"`{result['command']}` on {result['date']} at commit {result['git']} ({result['machine']}; load average "
            f"{result['load_1m_start']} at start, {result['load_1m_end']} at the end). Data: {result['data']}; model "
            f"`{result['model']}`, {result['images']} images x 2 channels per run, {result['block']} images per block. "
            f"One warm-up run per arm (not counted), then {result['repeats']} rounds, the order flipped each round."
        ),
        "",
        (
            "| arm | median images/s | runs (images/s) | median s | images per CPU-s (job) | LanceDB stage s "
            "| write tasks (summed s) | files / bytes written | moto CPU s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in s["arms"].items():
        lines.append(
            f"| {result['arm_names'][arm]} | {a['median_images_per_s']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in a['images_per_s_runs'])} | {a['median_seconds']:.1f} | "
            f"{a['median_images_per_cpu_s']:.3f} ({a['median_job_cpu_s']:.0f} CPU-s) | {a['median_lance_stage_s']:.2f} | "
            f"{a['write_tasks']} ({a['median_write_tasks_s']:.2f}) | "
            f"{a['files_written']} / {a['bytes_written'] / 1e6:.2f} MB | {a['median_endpoint_cpu_s']:.2f} |"
        )
    lines += [
        "",
        "Job CPU-s: CPU time of the job's driver and all its descendants (Ray's raylet, workers, actors). Moto CPU: "
        "the endpoint's request handling, on the same 2 cores (a remote S3 service would not use them)"
        + (f"; {result['endpoint_cpu_note']}" if "endpoint_cpu_note" in result else "")
        + ".",
        "",
    ]
    for key, r in s.items():
        if key.startswith("ratio"):
            what = "images per CPU-second of the job" if key.startswith("ratio_per_cpu_s") else "images/s (wall)"
            arm = key.split("_over_")[0].removeprefix("ratio_per_cpu_s_").removeprefix("ratio_")
            lines.append(
                f"- **{arm} / local, {what}**: {r['median_ratio']:.3f} (95 % bootstrap over pairs "
                f"{r['bootstrap_95'][0]:.3f}-{r['bootstrap_95'][1]:.3f}; per-pair ratios "
                f"{r['pair_min']:.3f}-{r['pair_max']:.3f})"
            )
    lines.append("")
    return "\n".join(lines)


def render(path: Path) -> None:
    """Recompute the summary and the Markdown of a result file from its runs.

    Runs recorded before the sampler's own CPU time was counted (no ``sampler_cpu_s``) have this process's whole
    CPU time in ``endpoint_cpu_s``; the local arm makes no S3 request, so its median is the sampler's share and is
    subtracted from every run's.
    """
    result = json.loads(path.read_text())
    runs = result["runs"]
    if runs and "sampler_cpu_s" not in runs[0]:
        sampler = float(np.median([r["endpoint_cpu_s"] for r in runs if r["arm"] == "local" and not r["warmup"]]))
        for r in runs:
            r["parent_cpu_s"] = r["endpoint_cpu_s"]
            r["endpoint_cpu_s"] = round(max(0.0, r["parent_cpu_s"] - sampler), 3)
        result["endpoint_cpu_note"] = (
            f"moto CPU = this process's CPU minus {sampler:.2f} s, the local arm's median (the CPU sampler's share)"
        )
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    result["summary"] = summarise(runs, arms)
    md = markdown(result)
    write_results(path, result, md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=384, help="yeast cells per run (of 1642)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds after the warm-up")
    ap.add_argument("--model", default="random:test_cnn:0", help="model reference (default: the shipped model)")
    ap.add_argument("--block", type=int, default=64, help="runtime.images_per_block")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--s3-input", action="store_true", help="add the arm with the manifest and images in the bucket")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--out", default=str(RESULTS / "bench_s3.json"))
    ap.add_argument("--render", metavar="JSON", help="rewrite the summary and the .md of an earlier result file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--s3-manifest", help=argparse.SUPPRESS)
    ap.add_argument("--arms", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.render:
        render(Path(args.render))
        return

    import psutil

    from msnoop.core.runtime import provenance

    work = Path(args.work or tempfile.mkdtemp(prefix="msnoop_bench_s3_"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(work, args.n)
    arms = ["local", "s3"] + (["s3_input"] if args.s3_input else [])
    load_start = round(os.getloadavg()[0], 2)
    me = psutil.Process()
    runs: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    server = _s3_server_module()
    with contextlib.contextmanager(server.start_s3)() as s3:
        s3cfg = s3.config
        s3_manifest, upload_s = "", 0.0
        if "s3_input" in arms:
            s3_manifest, upload_s = upload_inputs(manifest, s3.uri("inputs"), s3cfg)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            *("--endpoint", s3.endpoint_url, "--bucket", s3.bucket, "--work", str(work)),
            *("--manifest", str(manifest), "--s3-manifest", s3_manifest, "--arms", ",".join(arms)),
            *("--model", args.model, "--block", str(args.block), "--repeats", str(args.repeats)),
            *("--num-cpus", str(args.num_cpus)),
        ]
        env = {**os.environ, **s3.env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("AWS_ENDPOINT_URL", None)  # the jobs name the endpoint in their storage: section
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        tree = TreeCPU(proc.pid)
        cpu0 = job0 = sampler0 = 0.0
        for line in proc.stdout:
            if line.startswith("BEGIN "):
                t = me.cpu_times()
                cpu0, job0, sampler0 = t.user + t.system, tree.total(), tree.self_cpu
            elif line.startswith("END "):
                job_cpu = tree.total() - job0
                t = me.cpu_times()
                parent_cpu = t.user + t.system - cpu0  # moto's request handling + the CPU sampler
                sampler_cpu = tree.self_cpu - sampler0
            elif line.startswith("RESULT "):
                res = json.loads(line[len("RESULT ") :])
                res["parent_cpu_s"] = round(parent_cpu, 3)
                res["sampler_cpu_s"] = round(sampler_cpu, 3)
                res["endpoint_cpu_s"] = round(max(0.0, parent_cpu - sampler_cpu), 3)
                res["job_cpu_s"] = round(job_cpu, 2)
                res["images_per_cpu_s"] = round(res["images"] / job_cpu, 4)
                runs.append(res)
                print(json.dumps(res), flush=True)
            elif line.startswith("INFO "):
                key, value = line.split()[1:3]
                info[key] = float(value)
        tree.stop()
        if proc.wait() != 0:
            raise SystemExit(f"the benchmark child failed (exit {proc.returncode}); see its output above")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)  # the manifest copy and the link to the images
    prov = provenance()
    summary = summarise(runs, arms)
    result = {
        "command": "python jobs/bench_s3.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "git": prov["git"],
        "machine": f"{os.cpu_count()} CPU cores, {', '.join(prov['gpus']) or 'no GPU'}, Python "
        f"{platform.python_version()}; Ray on {args.num_cpus} CPUs",
        "data": f"yeast single cells ({YEAST}), {args.n} rows, 64x64 float32 TIFF per channel",
        "model": args.model,
        "images": runs[0]["images"],
        "block": args.block,
        "repeats": args.repeats,
        "arm_names": {
            "local": "output on local disk",
            "s3": "output on S3",
            "s3_input": "manifest, images and output on S3",
        },
        "load_1m_start": load_start,
        "load_1m_end": round(os.getloadavg()[0], 2),
        "upload_inputs_s": round(upload_s, 2),
        **info,
        "summary": summary,
        "runs": runs,
    }
    md = markdown(result)
    write_results(args.out, result, md)
    print(md)


if __name__ == "__main__":
    main()
