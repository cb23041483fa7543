"""Embedding on a CPU at the pace of its cores: encoder throughput, runtimes, bf16 kNN effect, end to end.

    python jobs/bench_cpu.py                                  # every stage, results/bench_cpu.{json,md}
    python jobs/bench_cpu.py --stages sweep encoder           # some stages; others are kept from the file

Stages (each writes its own section with the date, commit and machine load; the rest of the file is kept):

* ``sweep``: the settings that chose the CPU defaults: batch size per canvas (224 and 64 px), channels-last
  against the default layout, bf16 autocast against float32, one process with 2 threads against 2 processes
  with 1 thread (actors per node).
* ``encoder``: tiles/s and achieved GFLOP/s against the float32 peak for 224 px tiles and for 64 px cells,
  at today's settings (batch 64, default layout, float32; a cell zero-padded to 224) and at the new defaults
  (``batch_size: auto``, channels-last; a cell in its tight 64 px canvas).
* ``runtimes``: PyTorch against ONNX Runtime (msnoop's ``onnxruntime`` backend) and OpenVINO (the same ONNX
  graph) on the same tiles, float32 and bf16, with the largest difference of their vectors to PyTorch's.
* ``vectors``: how far each setting moves vectors from the float32 reference (batch 64, default layout).
* ``knn``: bf16 against float32 (and the tight canvas against the 224 canvas) on the dev sets: balanced
  accuracy of the kNN protocols of ``jobs/bench_postprocess.py``, paired bootstrap interval of the
  difference, share of cells whose predicted label changes.
* ``e2e``: cells/s through ``msnoop embed`` for yeast cells (two channels), today's settings against the new
  defaults and against the new defaults with the tight canvas.

Timing on a shared machine: every arm runs in its own process (its own thread pools; OpenMP threads sleep
while waiting, as in the embedding actors), the arms take turns in every round (order rotated per round) and
each figure is the median over rounds with the spread (min-max) beside it; ``best`` is the fastest round,
the figure closest to an idle machine. ``uptime``'s load averages are recorded before and after each stage.
Encoder FLOPs come from ``torch.utils.flop_counter`` (12.67 GFLOP for a 224 px tile, 1.03 for 64 px); the
float32 peak is ``--peak-gflops`` (default 380: 2 Zen 4 cores at ~3 GHz, 32 float32 FMAs per cycle each; give
your machine's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import git_commit  # noqa: E402  (after the path set-up above)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
YEAST = DATA / "yeast" / "yeast_labels.csv"
PEAK_GFLOPS = 380.0


# ----------------------------------------------------------------------------------------------- machine
def load_avg() -> list[float]:
    """``uptime``'s 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def encoder_gflops(canvas: int) -> float:
    """GFLOP of one ``canvas x canvas`` one-channel tile through the shipped encoder (``flop_counter``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from msnoop.models.checkpoint import resolve_model

    net = resolve_model("default").net.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net.embed(torch.zeros(1, 1, canvas, canvas))
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------------------------- tiles
def yeast_cells(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` real yeast cells (GFP channel, 64 x 64 float32), a seeded sample of the dev set."""
    import pandas as pd

    from msnoop.io.readers import read_image

    table = pd.read_csv(YEAST)
    rows = np.random.default_rng(seed).choice(len(table), size=min(n, len(table)), replace=False)
    return [np.asarray(read_image(str(YEAST.parent / table["gfp_path"][i])), dtype=np.float32) for i in rows]


def cell_tiles(cells: list[np.ndarray], mode: str) -> np.ndarray:
    """The cells as the embedder gets them: ``native`` = zero-padded to 224, ``tight`` = their 64 px canvas."""
    from msnoop.preprocess.presets import Preprocessing, prepare_channel

    spec = Preprocessing(mode=mode)
    return np.concatenate([prepare_channel(c, spec) for c in cells])


# ----------------------------------------------------------------------------------------------- arms
def arm(
    label: str,
    *,
    canvas: int = 224,
    batch: int | str = "auto",
    layout: str = "auto",
    amp: str | None = "cuda",
    threads: int = 2,
    procs: int = 1,
    runtime: str = "torch",
) -> dict[str, Any]:
    """One setting to time: ``runtime`` (torch, onnxruntime, openvino) on ``canvas`` px tiles in batches of
    ``batch`` (or the library's ``auto``), ``layout`` (``memory_format``), ``amp`` (``cuda`` = float32 on a CPU,
    ``auto`` = bf16 on a CPU with native bf16, None = the library's default), ``procs`` processes of ``threads``
    threads each."""
    return dict(
        label=label, canvas=canvas, batch=batch, layout=layout, amp=amp, threads=threads, procs=procs, runtime=runtime
    )


class Worker:
    """One arm in its own process: ``python bench_cpu.py --worker ARM``; ``go N`` embeds N tiles and reports."""

    def __init__(self, spec: dict[str, Any], onnx_path: Path | None) -> None:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(spec["threads"])}
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
        if onnx_path is not None:
            cmd += ["--onnx", str(onnx_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()  # {"batch": tiles per batch, "rate": tiles/s of the warm-up}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker exited with {self.proc.wait()}")
        return json.loads(line)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            self.proc.wait(timeout=60)


def worker_main(spec: dict[str, Any], onnx_path: str | None) -> None:
    """The worker process: load the runtime, warm up, then time ``go N`` requests from stdin."""
    import torch

    torch.set_num_threads(spec["threads"])
    tiles = cell_tiles(yeast_cells(64, seed=1), "native" if spec["canvas"] == 224 else "tight")
    if tiles.shape[-1] != spec["canvas"]:
        raise ValueError(f"canvas {spec['canvas']}: the yeast cells give {tiles.shape[-1]} px tiles")
    embed, batch = make_runtime(spec, onnx_path)
    embed(tiles[:batch])  # first call: primitive creation, graph compilation
    t = time.perf_counter()
    embed(tiles[:batch])
    print(json.dumps({"batch": batch, "rate": batch / (time.perf_counter() - t)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        n = int(line.split()[1])
        idx = np.arange(n) % len(tiles)
        work = tiles[idx]
        w0, c0 = time.perf_counter(), time.process_time()
        embed(work)
        print(json.dumps({"tiles": n, "wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}), flush=True)


def make_runtime(spec: dict[str, Any], onnx_path: str | None) -> tuple[Any, int]:
    """``(embed, tiles per batch)``: ``embed([N, S, S] tiles) -> [N, D]`` L2-normalised rows, batched."""
    from msnoop.embed.embedder import Embedder
    from msnoop.models.checkpoint import resolve_model

    library = spec["runtime"] in ("torch", "onnxruntime")  # msnoop's own backends, through the Embedder
    embedder = Embedder(
        resolve_model("default"),
        batch_size=spec["batch"],
        device="cpu",
        memory_format=spec["layout"],
        backend=spec["runtime"] if library else "torch",
        **({"amp": spec["amp"]} if spec["amp"] is not None else {}),
    )
    batch = embedder.settings.tiles_per_batch(spec["canvas"])
    if library:
        return embedder.embed_tiles, batch
    forward = openvino_forward(str(onnx_path), threads=spec["threads"], bf16=spec["amp"] == "auto")

    def embed(tiles: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(tiles), batch):
            e = forward(np.ascontiguousarray(tiles[s : s + batch, None], dtype=np.float32))
            out.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out)

    return embed, batch


def export_onnx(path: Path) -> Path:
    """The shipped model's ``net.embed`` as ONNX (batch and canvas dynamic), as the onnxruntime backend exports it."""
    from msnoop.embed.onnx_backend import export_embed
    from msnoop.models.checkpoint import resolve_model

    path.write_bytes(export_embed(resolve_model("default").net.eval()))
    return path


def openvino_forward(path: str, *, threads: int, bf16: bool) -> Any:
    """``forward([N, 1, S, S] float32) -> [N, D]`` on OpenVINO's CPU plugin, from the ONNX graph at ``path``."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        path,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",  # f32 must be asked for on a bf16 CPU
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


def time_arms(
    arms: list[dict[str, Any]], *, rounds: int, seconds: float, onnx_path: Path | None = None
) -> list[dict[str, Any]]:
    """Time every arm ``rounds`` times, taking turns (the order rotates each round); one row per arm.

    Each turn embeds about ``seconds`` worth of tiles (from the warm-up rate; whole batches, at least one).
    An arm with ``procs`` processes runs them at once and counts their tiles together.
    """
    pools = {a["label"]: [Worker(a, onnx_path) for _ in range(a["procs"])] for a in arms}
    try:
        n = {}
        for a in arms:
            w = pools[a["label"]][0].ready
            n[a["label"]] = max(1, round(w["rate"] * seconds / w["batch"])) * w["batch"]
        runs: dict[str, list[dict[str, float]]] = {a["label"]: [] for a in arms}
        for r in range(rounds):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            for a in order:
                workers = pools[a["label"]]
                for w in workers:
                    w.send(f"go {n[a['label']]}")
                got = [w._read() for w in workers]
                runs[a["label"]].append(
                    {
                        "tiles": sum(g["tiles"] for g in got),
                        "wall": max(g["wall"] for g in got),
                        "cpu": sum(g["cpu"] for g in got),
                    }
                )
            print(f"  round {r + 1}/{rounds} done, load {load_avg()}", flush=True)
    finally:
        for ws in pools.values():
            for w in ws:
                w.close()
    rows = []
    for a in arms:
        rates = [x["tiles"] / x["wall"] for x in runs[a["label"]]]
        per_cpu = [x["tiles"] / x["cpu"] for x in runs[a["label"]]]
        g = encoder_gflops_cached(a["canvas"])
        rows.append(
            {
                **a,
                "tiles_per_batch": pools[a["label"]][0].ready["batch"],
                "tiles_per_round": n[a["label"]] * a["procs"],
                "tiles_per_s": statistics.median(rates),
                "tiles_per_s_min": min(rates),
                "tiles_per_s_max": max(rates),
                "tiles_per_s_runs": [round(x, 2) for x in rates],
                "tiles_per_cpu_s": statistics.median(per_cpu),
                "gflop_per_tile": g,
                "gflops": statistics.median(rates) * g,
                "gflops_best": max(rates) * g,
            }
        )
    return rows


_GFLOPS: dict[int, float] = {}


def encoder_gflops_cached(canvas: int) -> float:
    if canvas not in _GFLOPS:
        _GFLOPS[canvas] = encoder_gflops(canvas)
    return _GFLOPS[canvas]


# ----------------------------------------------------------------------------------------------- stages
def stage_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The measurements behind the CPU defaults (batch per canvas, layout, bf16, threads x processes)."""
    cl, bf = "channels_last", "auto"
    arms = [
        *(arm(f"224 b{b} cl", batch=b, layout=cl) for b in (1, 2, 4, 8, 16)),
        arm("224 b2 contiguous", batch=2, layout="contiguous"),
        arm("224 b2 cl bf16", batch=2, layout=cl, amp=bf),
        arm("224 b2 cl 2 procs x 1 thread", batch=2, layout=cl, threads=1, procs=2),
        *(arm(f"64 b{b} cl", canvas=64, batch=b, layout=cl) for b in (8, 16, 32, 64, 128)),
        arm("64 b32 contiguous", canvas=64, batch=32, layout="contiguous"),
        arm("64 b32 cl bf16", canvas=64, batch=32, layout=cl, amp=bf),
        arm("64 b32 cl 2 procs x 1 thread", canvas=64, batch=32, layout=cl, threads=1, procs=2),
        *(arm(f"224 b{b} onnxruntime", batch=b, runtime="onnxruntime") for b in (1, 2, 4)),
        *(arm(f"64 b{b} onnxruntime", canvas=64, batch=b, runtime="onnxruntime") for b in (16, 32, 64)),
    ]
    return {"arms": time_arms(arms, rounds=args.rounds, seconds=args.seconds)}


def stage_encoder(args: argparse.Namespace) -> dict[str, Any]:
    """Today's settings against the new defaults, for 224 px tiles and 64 px yeast cells."""
    today = {"batch": 64, "layout": "contiguous", "amp": "cuda"}  # float32 on a CPU
    arms = [
        arm("224 px tiles, today (batch 64, contiguous, float32)", **today),
        arm("224 px tiles, new defaults", canvas=224, amp=None),
        arm("224 px tiles, new defaults in float32 (amp cuda)", canvas=224, amp="cuda"),
        arm("224 px tiles, new defaults, onnxruntime backend (float32)", canvas=224, runtime="onnxruntime"),
        arm("64 px cells in their tight canvas, today's batch/layout/float32", canvas=64, **today),
        arm("64 px cells in their tight canvas, new defaults", canvas=64, amp=None),
        arm("64 px cells in their tight canvas, new defaults in float32 (amp cuda)", canvas=64, amp="cuda"),
        arm("64 px cells in their tight canvas, onnxruntime backend (float32)", canvas=64, runtime="onnxruntime"),
    ]
    rows = time_arms(arms, rounds=args.rounds, seconds=args.seconds)
    base = rows[0]["tiles_per_s"]
    for r in rows:
        r["speedup_vs_today_224"] = r["tiles_per_s"] / base
        r["peak_gflops_fp32"] = args.peak_gflops
        r["share_of_fp32_peak"] = r["gflops"] / args.peak_gflops
    return {"arms": rows, "note": "a 64 px cell at today's settings is a 224 px tile (zero-padded): row 1"}


def stage_runtimes(args: argparse.Namespace) -> dict[str, Any]:
    """PyTorch, ONNX Runtime and OpenVINO on the same tiles; speed and vectors."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(Path(tmp) / "encoder.onnx")
        arms = []
        for canvas, batch in ((224, 2), (64, 32)):
            for rt in ("torch", "onnxruntime", "openvino"):
                arms.append(arm(f"{canvas} b{batch} {rt} float32", canvas=canvas, batch=batch, runtime=rt))
            for rt in ("torch", "openvino"):
                arms.append(arm(f"{canvas} b{batch} {rt} bf16", canvas=canvas, batch=batch, runtime=rt, amp="auto"))
        rows = time_arms(arms, rounds=args.rounds, seconds=args.seconds, onnx_path=onnx_path)
        diffs = runtime_vector_diffs(onnx_path)
    for r in rows:
        ref = next(x for x in rows if x["canvas"] == r["canvas"] and x["runtime"] == "torch" and x["amp"] == r["amp"])
        r["speed_vs_torch_same_precision"] = r["tiles_per_s"] / ref["tiles_per_s"]
        r["max_abs_diff_vs_torch_float32"] = diffs[r["canvas"], r["runtime"], r["amp"]]
    return {"arms": rows, "versions": runtime_versions()}


def runtime_versions() -> dict[str, str]:
    import onnxruntime
    import openvino
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def runtime_vector_diffs(onnx_path: Path) -> dict[tuple[int, str, str], float]:
    """Largest |difference| of each runtime's unit vectors to PyTorch float32's, on 64 yeast cells per canvas."""
    import torch

    torch.set_num_threads(2)
    out = {}
    cells = yeast_cells(64, seed=2)
    for canvas, mode in ((224, "native"), (64, "tight")):
        tiles = cell_tiles(cells, mode)
        ref, _ = make_runtime(arm("ref", canvas=canvas, batch=8, layout="contiguous"), None)
        expected = ref(tiles)
        for rt in ("torch", "onnxruntime", "openvino"):
            for amp in ("cuda", "auto"):
                if rt == "onnxruntime" and amp == "auto":
                    continue
                fn, _ = make_runtime(arm("x", canvas=canvas, batch=8, runtime=rt, amp=amp), str(onnx_path))
                out[canvas, rt, amp] = float(np.abs(fn(tiles) - expected).max())
    return out


def stage_vectors(args: argparse.Namespace) -> dict[str, Any]:
    """How far the new settings move vectors from the float32 reference, and tight-canvas batching."""
    import torch

    from msnoop.embed.embedder import Embedder
    from msnoop.models.checkpoint import resolve_model

    torch.set_num_threads(2)
    cells = yeast_cells(96, seed=3)
    model = resolve_model("default")
    ref = Embedder(model, batch_size=64, memory_format="contiguous", device="cpu", amp="cuda")  # float32, as before
    rows = []
    for mode in ("native", "tight"):
        tiles = cell_tiles(cells, mode)
        expected = ref.embed_tiles(tiles)
        for label, kw in (
            ("auto batch, channels-last, float32", {"amp": "cuda"}),
            ("auto batch, channels-last, bf16 (amp auto)", {"amp": "auto"}),
            ("onnxruntime backend (float32)", {"amp": "cuda", "backend": "onnxruntime"}),
        ):
            got = Embedder(model, device="cpu", **kw).embed_tiles(tiles)
            rows.append(
                {
                    "canvas": int(tiles.shape[-1]),
                    "setting": label,
                    "max_abs_diff": float(np.abs(got - expected).max()),
                    "min_cosine": float((got * expected).sum(1).min()),
                }
            )
    native = ref.embed_tiles(cell_tiles(cells, "native"))
    tight = ref.embed_tiles(cell_tiles(cells, "tight"))
    return {
        "rows": rows,
        "tight_vs_native_cosine": {
            "median": float(np.median((native * tight).sum(1))),
            "min": float((native * tight).sum(1).min()),
        },
    }


# ----------------------------------------------------------------------------------------------- kNN
KNN_ARMS = {
    "float32": {"amp": "cuda", "mode": "native"},
    "bf16": {"amp": "auto", "mode": "native"},
    "tight float32": {"amp": "cuda", "mode": "tight"},
}


def embed_set(images: list[list[str]], *, amp: str, mode: str, cache: Path, key: str) -> np.ndarray:
    """``[N, C * 256]`` vectors of the shipped model with the new CPU defaults and ``amp``/``mode``; cached."""
    import torch

    from msnoop.embed.embedder import Embedder
    from msnoop.io.readers import read_image
    from msnoop.models.checkpoint import resolve_model
    from msnoop.preprocess.presets import Preprocessing

    path = cache / f"{key}.npy"
    if path.exists():
        return np.load(path)
    torch.set_num_threads(2)
    model = resolve_model("default")
    model.preprocess = Preprocessing(mode=mode)  # the shipped preset at 224, in this mode
    emb = Embedder(model, device="cpu", amp=amp)
    out, t0 = [], time.perf_counter()
    for s in range(0, len(images), 32):
        out.append(emb.embed_images([[read_image(f) for f in img] for img in images[s : s + 32]]))
    print(f"  {key}: {len(images)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    X = np.concatenate(out).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, X)
    return X


def stage_knn(args: argparse.Namespace) -> dict[str, Any]:
    """bf16 and the tight canvas against float32 on the dev sets: kNN balanced accuracy, paired bootstrap."""
    import bench_postprocess as bp
    from sklearn.preprocessing import StandardScaler

    rows, vec = [], []
    for d in ("yeast", "hpa_toy", "malaria_nih"):
        table, channels, proto = bp.dataset_table(d, DATA, args.malaria_n, args.yeast_n)
        images = bp.dataset_images(table, channels)
        X = {
            name: embed_set(images, **cfg, cache=args.cache, key=f"{d}_{len(table)}_{name.replace(' ', '_')}")
            for name, cfg in KNN_ARMS.items()
        }
        for name in KNN_ARMS:
            if name != "float32":
                cos = (X[name] * X["float32"]).sum(1) / len(channels)  # channel blocks are unit vectors
                vec.append(
                    {
                        "dataset": d,
                        "arm": name,
                        "max_abs_diff": float(np.abs(X[name] - X["float32"]).max()),
                        "min_mean_block_cosine": float(cos.min()),
                    }
                )
        for post in ("standardize", "raw"):
            feats = {n: (StandardScaler().fit_transform(x) if post == "standardize" else x) for n, x in X.items()}
            for tname, col, k, cv in proto["tasks"]:
                y = table[col].astype(str).to_numpy()
                preds = {n: bp.cross_predict(f.astype(np.float32), y, k, cv, table)[0] for n, f in feats.items()}
                boots = bp.bootstrap_rows(len(y), args.bootstrap, seed=0)
                base = np.array([bp.balanced_accuracy(y[b], preds["float32"][b]) for b in boots])
                for n in KNN_ARMS:
                    ba = np.array([bp.balanced_accuracy(y[b], preds[n][b]) for b in boots])
                    diff = ba - base
                    rows.append(
                        {
                            "dataset": d,
                            "task": tname,
                            "postprocess": post,
                            "protocol": f"{k}-NN cosine, cv {cv}, n={len(y)}",
                            "arm": n,
                            "balanced_accuracy": bp.balanced_accuracy(y, preds[n]),
                            "ci95": [float(np.percentile(ba, 2.5)), float(np.percentile(ba, 97.5))],
                            "diff_vs_float32": bp.balanced_accuracy(y, preds[n])
                            - bp.balanced_accuracy(y, preds["float32"]),
                            "diff_ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                            "changed_predictions": float((preds[n] != preds["float32"]).mean()),
                        }
                    )
                    print(
                        f"  {d} {tname} {post} {n}: BA {rows[-1]['balanced_accuracy']:.3f} "
                        f"diff {rows[-1]['diff_vs_float32']:+.3f} {rows[-1]['diff_ci95']}",
                        flush=True,
                    )
    return {"rows": rows, "vectors": vec, "bootstrap": args.bootstrap}


# ----------------------------------------------------------------------------------------------- end to end
E2E_ARMS = {
    "today (batch 64, contiguous, float32, 224 canvas, on Ray)": [
        "runtime.batch_size=64",
        "runtime.memory_format=contiguous",
        "runtime.amp=cuda",
        "runtime.ray_min_images=64",
    ],
    "new defaults (224 canvas)": [],
    "new defaults + tight canvas": ["preprocess.mode=tight"],
    "new defaults + tight canvas, on Ray": ["preprocess.mode=tight", "runtime.ray_min_images=0"],
    "new defaults + tight canvas, onnxruntime (float32)": [
        "preprocess.mode=tight",
        "runtime.backend=onnxruntime",
        "runtime.amp=cuda",
    ],
    "new defaults + tight canvas, 2 actors x 1 thread (Ray)": [
        "preprocess.mode=tight",
        "runtime.actors=2",
        "runtime.ray_min_images=0",
    ],
}


def yeast_manifest(folder: Path, n: int, seed: int = 0) -> Path:
    """A manifest of ``n`` seeded yeast cells with absolute paths (two channels: gfp, rfp)."""
    import pandas as pd

    table = pd.read_csv(YEAST)
    table = table.iloc[np.sort(np.random.default_rng(seed).choice(len(table), size=min(n, len(table)), replace=False))]
    for ch in ("gfp", "rfp"):
        table[f"{ch}_path"] = [str(YEAST.parent / p) for p in table[f"{ch}_path"]]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "yeast.csv"
    table.to_csv(path, index=False)
    return path


def stage_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """``msnoop embed`` of yeast cells, the arms taking turns; wall time of the whole command."""
    from bench_embed import steady_rate
    from bench_s3 import TreeCPU

    msnoop = str(Path(sys.executable).parent / "msnoop")
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in E2E_ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = yeast_manifest(Path(tmp), args.e2e_n)
        cfg = Path(tmp) / "yeast.yaml"
        cfg.write_text(
            "job: embed\nname: yeast\n"
            f"input: {{manifest: {manifest}, channels: [gfp, rfp]}}\n"
            "model: default\n"
            f"output: {{dir: {tmp}/out}}\n"
        )
        arms = list(E2E_ARMS)
        for r in range(args.e2e_rounds):
            for a in arms[r % len(arms) :] + arms[: r % len(arms)]:
                out = Path(tmp) / f"out_{r}_{arms.index(a)}"
                sets = [f"output.dir={out}", *E2E_ARMS[a]]
                cmd = [msnoop, "embed", str(cfg)] + [x for s in sets for x in ("--set", s)]
                t0 = time.perf_counter()
                with tempfile.TemporaryFile("w+") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
                    tree = TreeCPU(proc.pid)  # the command, its Ray processes and their workers
                    code = proc.wait()
                    wall = time.perf_counter() - t0
                    cpu = tree.total()
                    tree.stop()
                    if code:
                        log.seek(0)
                        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read()}")
                job = json.loads((out / "run.json").read_text())["last_run"]
                steady = steady_rate(out / "embeddings")  # parts 2..n over the time from the first to the last
                runs[a].append(
                    {
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "job_s": job["seconds"],
                        "cells": job["embedded"],
                        "steady_cells_per_s": steady["images_per_s"] if steady else None,
                    }
                )
                print(
                    f"  {a}: {args.e2e_n / wall:.2f} cells/s ({wall:.0f} s, {cpu:.0f} CPU-s), load {load_avg()}",
                    flush=True,
                )
    rows = []
    for a in arms:
        w = [x["wall_s"] for x in runs[a]]
        rows.append(
            {
                "arm": a,
                "sets": E2E_ARMS[a],
                "cells": args.e2e_n,
                "cells_per_s": args.e2e_n / statistics.median(w),
                "cells_per_s_runs": [round(args.e2e_n / x, 2) for x in w],
                "cells_per_cpu_s": args.e2e_n / statistics.median([x["cpu_s"] for x in runs[a]]),
                "wall_s_runs": [round(x, 1) for x in w],
                "cpu_s_runs": [round(x["cpu_s"], 1) for x in runs[a]],
                "steady_cells_per_s": _median_or_none([x["steady_cells_per_s"] for x in runs[a]]),
                "job_s_runs": [round(x["job_s"], 1) for x in runs[a]],
            }
        )
    for r in rows:
        r["speedup_vs_today"] = r["cells_per_s"] / rows[0]["cells_per_s"]
    return {"rows": rows, "rounds": args.e2e_rounds}


def _median_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# ----------------------------------------------------------------------------------------------- report
STAGES = {
    "sweep": stage_sweep,
    "encoder": stage_encoder,
    "runtimes": stage_runtimes,
    "vectors": stage_vectors,
    "knn": stage_knn,
    "e2e": stage_e2e,
}


def arms_table(rows: list[dict[str, Any]], extra: list[tuple[str, str]] = ()) -> list[str]:
    head = "| arm | tiles/batch | tiles/s median (min-max) | best | GFLOP/s (best) |" + "".join(
        f" {h} |" for h, _ in extra
    )
    lines = [head, "|" + "---|" * (5 + len(extra))]
    for r in rows:
        cells = [
            r["label"],
            str(r["tiles_per_batch"]),
            f"{r['tiles_per_s']:.1f} ({r['tiles_per_s_min']:.1f}-{r['tiles_per_s_max']:.1f})",
            f"{r['tiles_per_s_max']:.1f}",
            f"{r['gflops']:.0f} ({r['gflops_best']:.0f})",
        ] + [fmt(r.get(k)) for _, k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def markdown(res: dict[str, Any]) -> str:
    out = ["# CPU embedding benchmark (`jobs/bench_cpu.py`)", ""]
    for name in STAGES:
        sec = res.get(name)
        if not sec:
            continue
        out += [
            f"## {name}",
            "",
            f"{sec['date']}, commit {sec['commit']}, load before/after {sec['load_before']} / "
            f"{sec['load_after']}, {sec['seconds']:.0f} s",
            "",
        ]
        if name in ("sweep", "encoder", "runtimes"):
            extra = {
                "encoder": [("x today (224)", "speedup_vs_today_224"), ("share of fp32 peak", "share_of_fp32_peak")],
                "runtimes": [
                    ("x torch", "speed_vs_torch_same_precision"),
                    ("max diff", "max_abs_diff_vs_torch_float32"),
                ],
            }.get(name, [])
            out += arms_table(sec["arms"], extra)
        elif name == "vectors":
            out += ["| canvas | setting | max abs diff | min cosine |", "|---|---|---|---|"]
            out += [
                f"| {r['canvas']} | {r['setting']} | {r['max_abs_diff']:.2e} | {r['min_cosine']:.6f} |"
                for r in sec["rows"]
            ]
            out += ["", f"tight (64) vs native (224) canvas, cosine: {sec['tight_vs_native_cosine']}"]
        elif name == "knn":
            out += [
                "| dataset | task | post | arm | BA [95 % CI] | diff vs float32 [paired 95 % CI] | changed |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in sec["rows"]:
                if r["arm"] == "float32":
                    diff = ""
                else:
                    diff = f"{r['diff_vs_float32']:+.3f} [{r['diff_ci95'][0]:+.3f}, {r['diff_ci95'][1]:+.3f}]"
                out.append(
                    f"| {r['dataset']} | {r['task']} | {r['postprocess']} | {r['arm']} | {r['balanced_accuracy']:.3f} "
                    f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {diff} | {r['changed_predictions']:.3f} |"
                )
        elif name == "e2e":
            out += [
                "| arm | cells | cells/s median (whole command) | runs | cells per CPU-s | cells/s first to last part "
                "| x today |",
                "|---|---|---|---|---|---|---|",
            ]
            out += [
                f"| {r['arm']} | {r['cells']} | {r['cells_per_s']:.2f} | {r['cells_per_s_runs']} "
                f"| {r['cells_per_cpu_s']:.2f} | {fmt(r['steady_cells_per_s'])} | {r['speedup_vs_today']:.2f} |"
                for r in sec["rows"]
            ]
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--rounds", type=int, default=7, help="turns of every arm (timing stages)")
    ap.add_argument("--seconds", type=float, default=2.0, help="work per arm and turn, from its warm-up rate")
    ap.add_argument("--peak-gflops", type=float, default=PEAK_GFLOPS, help="float32 peak of this machine")
    ap.add_argument("--e2e-n", type=int, default=300, help="yeast cells per end-to-end run")
    ap.add_argument("--e2e-rounds", type=int, default=3)
    ap.add_argument("--yeast-n", type=int, default=0, help="kNN: seeded yeast subset (0 = all 1,642 cells)")
    ap.add_argument("--malaria-n", type=int, default=300, help="kNN: seeded malaria subset")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "msnoop_bench_cpu_cache")
    ap.add_argument("--out", default="results/bench_cpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker), args.onnx)
        return
    path = Path(f"{args.out}.json")
    res = json.loads(path.read_text()) if path.exists() else {}
    res["machine"] = {"cpus": os.cpu_count(), "peak_gflops_fp32": args.peak_gflops}
    for name in args.stages:
        print(f"stage {name}, load {load_avg()}", flush=True)
        before, t0 = load_avg(), time.perf_counter()
        sec = STAGES[name](args)
        sec.update(
            date=datetime.now(UTC).isoformat(timespec="seconds"),
            commit=git_commit(),
            load_before=before,
            load_after=load_avg(),
            seconds=time.perf_counter() - t0,
        )
        res[name] = sec
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
