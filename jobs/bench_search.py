"""Benchmark: ANN search over a LanceDB embedding table, and kNN leave-one-out wall time.

Data: synthetic "embeddings" with a low intrinsic dimension, as real ones have: ``--clusters`` Gaussian
clusters of uneven sizes in a 64-d latent space (centres N(0, 1), standard deviation ``--spread``),
mapped to ``--dim`` dimensions by a fixed random linear map, plus isotropic noise (``--noise`` times the
signal's RMS per dimension), L2-normalised. With the defaults (1.0, 0.2) a row's 10th nearest neighbour
has cosine similarity about 0.58 (0.84 with 0.5, 0.05; 0.42 with 1.5, 0.3: harder for an index). Rows carry
``Metadata_ImageID`` and ``Metadata_Plate`` (row % 100) for filters. Queries are 100 fresh draws from
the same distribution (not rows of the table).

Search section (``--n`` rows, 0 skips it):

1. write the LanceDB table (streamed in chunks of 50,000 rows);
2. :func:`msnoop.store.index.ensure_index` (``--kind``; ``auto`` builds IVF_SQ from 100,000 rows), timed;
3. ground truth: exact top-10 by inner product with ``faiss.IndexFlatIP`` over all rows;
4. ANN path (:func:`msnoop.query.ann.search_vector_ann`, default parameters): recall@10 and
   per-query latency (median, p95; one warm-up query not counted);
5. filtered searches: ``Metadata_Plate = 7`` (1 % of rows: exact path) and ``Metadata_Plate < 30``
   (30 %: ANN with widened nprobes), recall@10 against exact search over the matching rows;
6. reference latencies: LanceDB flat scan (``--exact-queries`` queries) and faiss IndexFlatIP, one
   query at a time (20 queries);
7. the index alone at 0.5x, 1x, 1.5x and 2x the default ``nprobes``: recall@10 and median latency.

kNN section (``--knn-n`` rows, 0 skips it): :func:`msnoop.evaluate.knn.knn_evaluate` with ``cv="loo"``,
``k=11`` on ``--knn-n`` x ``--dim`` vectors of the same generator, labels = cluster; wall time. The index
is chosen as ``knn`` chooses it (IVF for large CPU runs); an IVF run also reports its neighbour recall@11
against the exact search on ``--knn-check`` queries, and the exact search's extrapolated wall time.

Writes ``results/bench_search.json``: search runs are kept per ``<n>x<dim>`` (a new run of the same size
replaces the old one), a skipped kNN section keeps its previous value; prints a Markdown table of all.

Usage:
    nice -n 10 python jobs/bench_search.py --n 200000 --dim 768 --knn-n 0           # ~1.5 min here
    nice -n 10 python jobs/bench_search.py --n 0 --knn-n 100000                     # kNN only, ~1 min here
    nice -n 10 python jobs/bench_search.py --n 1000000 --dim 768 --knn-n 100000    # the full run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from harness import write_results

from msnoop.query.ann import search_vector_ann
from msnoop.store.index import ensure_index
from msnoop.store.lance import VECTOR
from msnoop.core.parts import ID_COLUMN

logger = logging.getLogger("bench_search")

REPO = Path(__file__).resolve().parents[1]
CHUNK = 50_000
LATENT = 64


class Generator:
    """Deterministic clustered vectors, produced chunk by chunk (bounded memory)."""

    def __init__(self, dim: int, clusters: int, seed: int, spread: float = 1.0, noise: float = 0.2) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.clusters, self.seed, self.spread, self.noise = dim, clusters, seed, spread, noise
        self.centres = rng.standard_normal((clusters, LATENT)).astype(np.float32)
        self.proj = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.weights = rng.dirichlet(np.full(clusters, 2.0))  # uneven cluster sizes

    def sample(self, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` normalised vectors and their cluster labels from random stream ``stream``."""
        rng = np.random.default_rng([self.seed, stream])
        labels = rng.choice(self.clusters, size=n, p=self.weights)
        z = self.centres[labels] + self.spread * rng.standard_normal((n, LATENT), dtype=np.float32)
        x = z @ self.proj
        x += self.noise * np.sqrt(np.mean(x**2)) * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), labels

    def chunks(self, n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for i, start in enumerate(range(0, n, CHUNK)):
            x, y = self.sample(min(CHUNK, n - start), stream=1000 + i)
            yield start, x, y


def _batch(start: int, x: np.ndarray) -> pa.RecordBatch:
    n, dim = x.shape
    rows = np.arange(start, start + n)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([f"img{r:08d}" for r in rows]),
            pa.array((rows % 100).astype(np.int32)),
            pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
        ],
        names=[ID_COLUMN, "Metadata_Plate", VECTOR],
    )


def _recall(got: list[np.ndarray], truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(g[:k].tolist()) & set(t[:k].tolist())) / k for g, t in zip(got, truth, strict=True)]))


def _row_ids(df: Any) -> np.ndarray:
    return np.array([int(s[3:]) for s in df[ID_COLUMN]], dtype=np.int64)


def _ms(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {"median_ms": round(float(np.median(a)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2), "n": len(a)}


def sweep_nprobes(tbl: Any, queries: np.ndarray, truth: np.ndarray, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Recall@10 and latency of the index at 0.5x, 1x, 1.5x and 2x the default ``nprobes``."""
    rows = []
    for factor in (0.5, 1.0, 1.5, 2.0):
        nprobes = max(1, round(params["nprobes"] * factor))
        got, times = [], []
        for q in queries:
            t = time.perf_counter()
            s = tbl.search(q).distance_type("cosine").limit(10).nprobes(nprobes)
            if params.get("refine_factor"):
                s = s.refine_factor(params["refine_factor"])
            if params.get("ef"):
                s = s.ef(params["ef"])
            res = s.select([ID_COLUMN, "_distance"]).to_arrow()
            times.append(time.perf_counter() - t)
            got.append(np.array([int(v[3:]) for v in res.column(ID_COLUMN).to_pylist()]))
        rows.append({"nprobes": nprobes, "recall_at_10": round(_recall(got, truth), 4), **_ms(times)})
        logger.info("nprobes sweep: %s", rows[-1])
    return rows


def bench_search(args: argparse.Namespace, gen: Generator, workdir: Path) -> dict[str, Any]:
    import faiss
    import lancedb

    n, dim = args.n, args.dim
    out: dict[str, Any] = {"n": n, "dim": dim, "clusters": args.clusters, "queries": args.queries, "kind": args.kind}
    flat = faiss.IndexFlatIP(dim)
    plates = np.empty(n, dtype=np.int32)

    def batches() -> Iterator[pa.RecordBatch]:
        for start, x, _ in gen.chunks(n):
            flat.add(x)
            plates[start : start + len(x)] = np.arange(start, start + len(x)) % 100
            yield _batch(start, x)

    t0 = time.perf_counter()
    schema = _batch(0, np.zeros((1, dim), np.float32)).schema
    db = lancedb.connect(str(workdir / "lancedb"))
    tbl = db.open_table("bench") if args.reuse and "bench" in db.list_tables().tables else None
    if tbl is not None and tbl.count_rows() == n and tbl.schema.field(VECTOR).type.list_size == dim:
        for _ in batches():  # ground truth only
            pass
        out["write_s"] = None
        logger.info("reusing the table in %s", workdir)
    else:
        tbl = db.create_table("bench", data=pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite")
        out["write_s"] = round(time.perf_counter() - t0, 2)
        logger.info("wrote %d x %d rows in %.1f s", n, dim, out["write_s"])

    index = ensure_index(
        tbl,
        kind=args.kind,
        num_partitions=args.partitions,
        num_sub_vectors=args.sub_vectors,
        sample_rate=args.sample_rate,
        max_iterations=args.max_iterations,
    )
    out["index"] = index
    logger.info("index: %s", index)

    queries, _ = gen.sample(args.queries, stream=7)
    _, truth = flat.search(queries, 10)

    def run(
        where: str | None, exact: bool | None, qs: np.ndarray
    ) -> tuple[list[np.ndarray], list[float], dict[str, Any]]:
        search_vector_ann(tbl, qs[0], k=10, where=where, exact=exact, index=index)  # warm-up
        got, times, params = [], [], {}
        for q in qs:
            t = time.perf_counter()
            df = search_vector_ann(tbl, q, k=10, where=where, exact=exact, index=index)
            times.append(time.perf_counter() - t)
            got.append(_row_ids(df))
            params = df.attrs["search"]
        return got, times, params

    got, times, params = run(None, None, queries)
    out["ann"] = {"recall_at_10": round(_recall(got, truth), 4), **_ms(times), "params": params}
    logger.info("ANN: %s", out["ann"])
    if index["kind"] != "none":
        out["nprobes_sweep"] = sweep_nprobes(tbl, queries, truth, params)

    xb = faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)
    for name, where, mask in [
        ("filter_1pct", "Metadata_Plate = 7", plates == 7),
        ("filter_30pct", "Metadata_Plate < 30", plates < 30),
    ]:
        rows = np.flatnonzero(mask)
        nq = min(args.queries, args.filter_queries)
        ftruth = rows[np.argsort(-(queries[:nq] @ xb[rows].T), axis=1)[:, :10]]
        got, times, params = run(where, None, queries[:nq])
        out[name] = {
            "where": where,
            "matches": len(rows),
            "recall_at_10": round(_recall(got, ftruth), 4),
            **_ms(times),
            "params": params,
        }
        logger.info("%s: %s", name, out[name])

    nq = max(1, args.exact_queries)
    got, times, _ = run(None, True, queries[:nq])
    out["lancedb_flat"] = {"recall_at_10": round(_recall(got, truth[:nq]), 4), **_ms(times)}
    times = []
    for q in queries[:20]:
        t = time.perf_counter()
        flat.search(q[None], 10)
        times.append(time.perf_counter() - t)
    out["faiss_flat"] = _ms(times)
    logger.info("flat: lancedb %s, faiss %s", out["lancedb_flat"], out["faiss_flat"])
    return out


def bench_knn(args: argparse.Namespace, gen: Generator) -> dict[str, Any]:
    from msnoop.evaluate.knn import _loo_neighbors, choose_index, ivf_params, knn_evaluate, knn_search

    parts = [(x, y) for _, x, y in gen.chunks(args.knn_n)]
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    kind = choose_index(len(X), len(X), X.shape[1])
    t0 = time.perf_counter()
    res = knn_evaluate(X, y, k=11, cv="loo")
    wall = time.perf_counter() - t0
    out = {
        "n": len(X),
        "dim": int(X.shape[1]),
        "k": 11,
        "cv": "loo",
        "classes": len(np.unique(y)),
        "index": kind,
        "wall_s": round(wall, 2),
        "accuracy": round(res["accuracy"], 4),
    }
    if kind == "ivf":
        nlist, nprobe = ivf_params(len(X))
        out |= {"nlist": nlist, "nprobe": nprobe}
        # agreement with the exact search on a sample of queries: neighbour recall and equal predictions
        q = np.random.default_rng(1).choice(len(X), min(args.knn_check, len(X)), replace=False)
        t1 = time.perf_counter()
        _, exact = knn_search(X, X[q], 12, index="exact")
        exact_s = time.perf_counter() - t1
        approx = _loo_neighbors(X, 11, "cosine", "ivf", rows=q)  # the same index (seeded training), sample only
        exact_nb = np.array([[j for j in row if j != i][:11] for i, row in zip(q, exact, strict=True)])
        recall = float(np.mean([len(set(a) & set(e)) / 11 for a, e in zip(approx, exact_nb, strict=True)]))
        out |= {
            "check_queries": len(q),
            "neighbour_recall_at_11": round(recall, 4),
            "exact_wall_s_estimate": round(exact_s * len(X) / len(q), 1),
        }
    logger.info("kNN LOO: %s", out)
    return out


def _search_lines(s: dict[str, Any]) -> list[str]:
    lines = []
    size = f"{s['n']:,} x {s['dim']}"
    ix = s["index"]
    shape = f"{ix['num_partitions']} partitions" + (
        f", {ix['num_sub_vectors']} PQ sub-vectors" if ix["num_sub_vectors"] else ""
    )
    write = f"table write {s['write_s']:.1f} s" if s["write_s"] is not None else "table reused"
    lines.append(
        f"| index build ({ix['kind']}, {ix['action']}) | {size} | | {ix['build_s']:.1f} s | | {shape}; {write} |"
    )
    for key, label in [
        ("ann", "search_vector_ann"),
        ("filter_1pct", "search_vector_ann, where 1 %"),
        ("filter_30pct", "search_vector_ann, where 30 %"),
        ("lancedb_flat", "LanceDB flat scan"),
        ("faiss_flat", "faiss IndexFlatIP"),
    ]:
        r = s[key]
        p = r.get("params", {})
        note = f"exact={p.get('exact')} nprobes={p.get('nprobes')} refine={p.get('refine_factor')}" if p else ""
        if "matches" in r:
            note += f"; {r['matches']:,} matching rows"
        rec = f"{r['recall_at_10']:.3f}" if "recall_at_10" in r else ""
        lines.append(
            f"| {label} | {size} | {rec} | {r['median_ms']:.1f} ms | {r['p95_ms']:.1f} ms | {note} (n={r['n']}) |"
        )
    if s.get("nprobes_sweep"):
        sweep = ", ".join(
            f"{r['nprobes']}: {r['recall_at_10']:.3f} / {r['median_ms']:.1f} ms" for r in s["nprobes_sweep"]
        )
        lines.append(f"| nprobes sweep (nprobes: recall@10 / median) | {size} | | | | {sweep} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = ["| measurement | n x dim | recall@10 | median | p95 | notes |", "|---|---|---|---|---|---|"]
    for s in sorted(results.get("search_runs", {}).values(), key=lambda r: (r["n"], r["dim"])):
        lines += _search_lines(s)
    k = results.get("knn_loo")
    if k:
        how = (
            "faiss flat"
            if k.get("index", "exact") == "exact"
            else f"faiss IVF {k['nlist']} lists, nprobe {k['nprobe']}"
        )
        notes = f"accuracy {k['accuracy']:.3f}, {k['classes']} classes"
        if "neighbour_recall_at_11" in k:
            notes += (
                f"; neighbour recall@11 vs exact {k['neighbour_recall_at_11']:.3f} ({k['check_queries']} queries),"
                f" exact search est. {k['exact_wall_s_estimate']:.0f} s"
            )
        lines.append(f"| kNN LOO (k=11, {how}) | {k['n']:,} x {k['dim']} | | {k['wall_s']:.1f} s wall | | {notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n", type=int, default=1_000_000, help="rows of the search table (0: skip the search section)"
    )
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="cluster standard deviation in the latent space")
    parser.add_argument("--noise", type=float, default=0.2, help="isotropic noise, relative to the signal RMS")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--filter-queries", type=int, default=50, help="queries per filtered search")
    parser.add_argument("--exact-queries", type=int, default=3, help="queries for the LanceDB flat-scan latency")
    parser.add_argument("--kind", choices=["auto", "ivf_pq", "ivf_sq", "hnsw"], default="auto")
    parser.add_argument("--partitions", type=int, default=None, help="IVF partitions (default sqrt(n))")
    parser.add_argument("--sub-vectors", type=int, default=None, help="PQ sub-vectors (default dim/16)")
    parser.add_argument("--sample-rate", type=int, default=256, help="k-means training rows per partition")
    parser.add_argument("--max-iterations", type=int, default=50, help="k-means iterations")
    parser.add_argument("--knn-n", type=int, default=100_000, help="rows for kNN leave-one-out (0: skip)")
    parser.add_argument("--knn-check", type=int, default=2000, help="queries checked against exact search (IVF runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the LanceDB table goes (default: a temporary folder, removed)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the table (and index) in --workdir if it has --n rows"
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_search.json")
    args = parser.parse_args(argv)

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "search" in results:  # older layout: one search section
        old = results.pop("search")
        results.setdefault("search_runs", {})[f"{old['n']}x{old['dim']}"] = old
    gen = Generator(args.dim, args.clusters, args.seed, args.spread, args.noise)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    data = {"clusters": args.clusters, "spread": args.spread, "noise": args.noise, "seed": args.seed}
    command = "python jobs/bench_search.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.n > 0:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_search_"))
        try:
            results.setdefault("search_runs", {})[f"{args.n}x{args.dim}"] = bench_search(args, gen, workdir) | {
                "data": data,
                "command": command,
                "machine": machine,
            }
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    if args.knn_n > 0:
        results["knn_loo"] = bench_knn(args, gen) | {"data": data, "command": command, "machine": machine}
    write_results(args.out, results)
    print(markdown(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
