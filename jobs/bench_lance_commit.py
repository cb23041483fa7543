"""Time to build a LanceDB table from Parquet parts: Ray tasks writing fragments + one commit, vs the driver.

    python jobs/bench_lance_commit.py                           # 10^6 rows x 64 dims, 100 parts, local disk
    python jobs/bench_lance_commit.py --rows 200000 --s3        # parts and table on a local moto S3 server

``driver``: :func:`msnoop.store.lance.build_table` (every row streams through this process into
``lancedb.create_table`` from a RecordBatchReader). ``ray``: :func:`msnoop.store.lance_ray.build_table_ray`
(Ray tasks read parts and write Lance fragments; this process commits once). Both tables are checked
to hold every row and to return the same nearest neighbours. Peak driver memory is the RSS of this
process above its level before the build, sampled every 20 ms (the Ray workers' memory is not in
it; with ``--s3`` the moto server runs in this process and its memory is counted too).
Each method builds ``--repeat`` times (overwriting); the median is reported with every run.
Writes ``results/bench_lance_commit.json`` (one entry per storage/rows/dim).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harness import RESULTS, PeakRSS, write_results

from msnoop.core import parts, storage
from msnoop.core.storage import StorageConfig


def write_parts(folder: str, rows: int, dim: int, n_parts: int, cfg: StorageConfig | None) -> None:
    rng = np.random.default_rng(0)
    per = -(-rows // n_parts)
    for k in range(n_parts):
        n = min(per, rows - k * per)
        if n <= 0:
            break
        ids = [f"img{k * per + i:08d}" for i in range(n)]
        meta = pd.DataFrame({"Metadata_ImageID": ids, "Metadata_Plate": f"P{k % 4}", "Metadata_Well": "A01"})
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        parts.write_part(parts.embeddings_frame(meta, emb), folder, storage=cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--parts", type=int, default=100)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="builds per method; the median is reported")
    ap.add_argument("--s3", action="store_true", help="parts and tables on a moto S3 server on 127.0.0.1")
    ap.add_argument("--out", default=str(RESULTS / "bench_lance_commit.json"))
    args = ap.parse_args()

    import lancedb

    from msnoop.core.runtime import init_ray, shutdown_ray
    from msnoop.store.lance import build_table
    from msnoop.store.lance_ray import build_table_ray

    load_at_start = round(os.getloadavg()[0], 1)
    tmp = tempfile.mkdtemp(prefix="bench_lance_")
    server = None
    cfg: StorageConfig | None = None
    base = tmp
    if args.s3:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        cfg = StorageConfig(endpoint_url=endpoint, region="us-east-1")
        base = "s3://bench/run"
    try:
        emb = str(storage.join(base, "embeddings"))
        t0 = time.perf_counter()
        write_parts(emb, args.rows, args.dim, args.parts, cfg)
        t_parts = time.perf_counter() - t0
        info = {"model": "bench", "embed_dim": args.dim}
        results: dict[str, dict[str, float]] = {}

        db_driver = str(storage.join(base, "lancedb_driver"))
        if args.s3:  # build_table has no storage options: it runs on local paths only
            results["driver"] = {"skipped": "build_table takes local paths only"}  # type: ignore[dict-item]
        else:
            times, mems = [], []
            for _ in range(args.repeat):
                with PeakRSS(0.02, children=False) as mem:
                    t0 = time.perf_counter()
                    n = build_table(db_driver, "images", emb, dim=args.dim, info=info)
                    times.append(round(time.perf_counter() - t0, 2))
                mems.append(mem.mib)
                assert n == args.rows, n
            results["driver"] = {"seconds": float(np.median(times)), "runs": times, "peak_rss_mib": max(mems)}

        t0 = time.perf_counter()
        init_ray(num_cpus=args.num_cpus, object_store_memory=1024**3, quiet=True)
        t_init = time.perf_counter() - t0
        db_ray = str(storage.join(base, "lancedb_ray"))
        remote = (
            {"runtime_env": {"env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}}
            if args.s3
            else None
        )
        times, mems = [], []
        for _ in range(args.repeat):
            with PeakRSS(0.02, children=False) as mem:
                t0 = time.perf_counter()
                n = build_table_ray(db_ray, "images", emb, dim=args.dim, info=info, storage=cfg, ray_remote_args=remote)
                times.append(round(time.perf_counter() - t0, 2))
            mems.append(mem.mib)
            assert n == args.rows, n
        results["ray"] = {"seconds": float(np.median(times)), "runs": times, "peak_rss_mib": max(mems)}
        results["ray"]["ray_init_seconds"] = round(t_init, 2)

        opts = storage.storage_options(db_ray, cfg) or None
        t_ray = lancedb.connect(db_ray, storage_options=opts).open_table("images")
        results["ray"]["fragments"] = len(t_ray.to_lance().get_fragments())
        if "seconds" in results["driver"]:
            t_drv = lancedb.connect(db_driver).open_table("images")
            queries = np.random.default_rng(1).standard_normal((5, args.dim), dtype=np.float32)
            for q in queries:
                a = t_drv.search(q).limit(5).to_pandas()["Metadata_ImageID"].tolist()
                b = t_ray.search(q).limit(5).to_pandas()["Metadata_ImageID"].tolist()
                assert a == b, (a, b)
        shutdown_ray()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    out = {
        "command": "python jobs/bench_lance_commit.py " + " ".join(sys.argv[1:]),
        "rows": args.rows,
        "dim": args.dim,
        "parts": args.parts,
        "storage": "s3 (moto on 127.0.0.1)" if args.s3 else "local disk",
        "num_cpus": args.num_cpus,
        "machine_cpus": os.cpu_count(),
        "load_avg_1m_at_start": load_at_start,  # the box is shared: other jobs' load skews both timings
        "python": platform.python_version(),
        "write_parts_seconds": round(t_parts, 2),
        "results": results,
    }
    print(json.dumps(out, indent=2))
    path = Path(args.out)
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[f"{'s3' if args.s3 else 'local'}_{args.rows}x{args.dim}"] = out
    write_results(path, runs)


if __name__ == "__main__":
    main()
