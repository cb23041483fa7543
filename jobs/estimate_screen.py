"""On paper: what a 10^8-cell, five-channel screen (JUMP scale) needs on a GPU cluster. An ESTIMATE, not a run.

    python jobs/estimate_screen.py                      # prints the table, writes results/estimate_screen.{json,md}
    python jobs/estimate_screen.py --gpus 16 --eta 0.25 # other cluster size / a more pessimistic GPU efficiency

No GPU was available for this project, so the GPU side is derived, and every number says where it comes from:

* **measured here, by this script**: FLOPs of one 224x224 one-channel tile through the embedding path of
  ``microsnoop_cnn`` (``torch.utils.flop_counter.FlopCounterMode`` on the CPU), the bytes its layers read and
  write (forward hooks: every leaf module's input and output, as bf16, nothing fused: an upper bound on memory
  traffic), the number of tiles msnoop cuts from a field (``msnoop.preprocess.geometry.tile_starts``) and the
  CPU seconds (``time.process_time``, the least of 7 runs, so other load on the machine counts little) to decode and preprocess
  tiles and cell crops, on a real BBBC013 field;
* **measured here earlier**: read from the result files under ``results/`` (named in each row);
* **cited**: the screen's size (the question this estimate answers: 10^8 cells, about 1.5 million five-channel
  fields, the scale of the JUMP Cell Painting screens), the field size
  (Cell Painting plates in the IDR are 1080x1080x5), GPU peak throughput and memory bandwidth (NVIDIA
  datasheets), S3 request latency (AWS's S3 performance guide);
* **assumed**: the fraction ``--eta`` of the roofline bound a GPU reaches on this network (default 0.5), the
  S3 latency used for the driver's per-part requests (``--s3-latency-ms``, default 30) and the cluster shape.

GPU time per tile = max(FLOPs / peak, bytes / bandwidth) / eta (a roofline bound divided by an efficiency).
Writes results/estimate_screen.json and results/estimate_screen.md; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from harness import RESULTS, data_dir, write_results

BBBC013_FIELD = data_dir("bbbc013") / "images" / "Channel2-01-A-01.tif"  # DNA channel of well A01

#: cited inputs: value, source
SCREEN = {
    "cells": (1e8, "the screen this estimate is for (10^8 cells)"),
    "fields": (1.5e6, "JUMP scale: about 1.5 million five-channel fields"),
    "channels": (5, "Cell Painting: DNA, RNA, ER, AGP, Mito (the LoadData columns of its pipelines)"),
    "field_px": (
        1080,
        (
            "Cell Painting plates in the IDR are 1080x1080x5 (idr0033, https://github.com/ome/blog "
            "_data/zarr_data_2020-12-01.json); JUMP sources differ by microscope"
        ),
    ),
}
GPUS = {
    "H100 SXM": {
        "bf16_tflops": 989.4,
        "hbm_tb_s": 3.35,
        "source": "NVIDIA H100 datasheet: BF16 tensor 1,979 TFLOPS with sparsity = 989 dense; HBM3 3.35 TB/s "
        "(https://glennklockwood.com/garden/processors/h100 tabulates both)",
    },
    "A100 SXM 80GB": {
        "bf16_tflops": 312.0,
        "hbm_tb_s": 2.039,
        "source": "NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS dense; HBM2e 2,039 GB/s "
        "(https://glennklockwood.com/garden/processors/A100)",
    },
}
S3_LATENCY_SOURCE = (
    "AWS, Best Practices Design Patterns: Optimizing Amazon S3 Performance (small requests: median latencies "
    "'often in the range of tens of milliseconds'), https://docs.aws.amazon.com/whitepapers/latest/"
    "s3-optimizing-performance-best-practices/timeouts-and-retries-for-latency-sensitive-applications.html"
)


def model_cost(input_size: int = 224) -> dict[str, float]:
    """FLOPs and unfused bf16 activation bytes of ``microsnoop_cnn.embed`` on one ``[1, 1, S, S]`` tile."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from msnoop.models.registry import create_model

    net = create_model("microsnoop_cnn").eval()
    x = torch.zeros(1, 1, input_size, input_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net.embed(x)
    flops = float(counter.get_total_flops())
    moved = [0]

    def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        moved[0] += sum(t.numel() for t in inputs if hasattr(t, "numel")) + output.numel()

    leaves = [m for m in net.encoder.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with torch.inference_mode():
        net.embed(x)
    for h in handles:
        h.remove()
    params = sum(p.numel() for p in net.encoder.parameters())
    return {"flops": flops, "bytes_bf16": 2.0 * moved[0], "encoder_params": float(params)}


def _cpu_seconds(fn: Any, reps: int) -> float:
    """The least CPU time (``time.process_time``) of ``reps`` calls: other load on a shared machine only adds."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def cpu_costs(field_px: int, reps: int = 7) -> dict[str, float]:
    """CPU seconds to decode and preprocess, from a real BBBC013 field made ``field_px`` wide (least of ``reps``).

    The 640x640 field is mirror-padded to ``field_px`` (the preprocessing cost depends on the shape, not the
    content); decoding is timed on the real file (8-bit, zlib) and scaled by pixel count.
    """
    import tifffile

    from msnoop.preprocess.geometry import pad_center
    from msnoop.preprocess.normalize import normalize99
    from msnoop.preprocess.presets import Preprocessing, prepare_channel

    img = tifffile.imread(BBBC013_FIELD)
    decode_per_px = _cpu_seconds(lambda: tifffile.imread(BBBC013_FIELD), reps) / img.size
    pad = (field_px - img.shape[0] + 1) // 2
    big = np.pad(img.astype(np.uint16), pad, mode="reflect")[:field_px, :field_px]
    spec = Preprocessing(mode="tile")
    n = len(prepare_channel(big, spec))
    prep = _cpu_seconds(lambda: prepare_channel(big, spec), reps)
    crop = big[:64, :64].astype(np.float32)  # a cell-sized window, padded to 224 and normalised as in cells mode
    per_crop = _cpu_seconds(lambda: [normalize99(pad_center(crop, 224)) for _ in range(20)], reps) / 20
    decode = decode_per_px * field_px * field_px
    return {
        "tiles_per_channel": float(n),
        "decode_s_per_channel": decode,
        "prepare_s_per_channel": prep,
        "cpu_s_per_tile": (decode + prep) / n,
        "cpu_s_per_crop": per_crop,
    }


def load(name: str) -> dict[str, Any]:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else {}


def lance_fragments(total_rows: int, rows_per_part: int, cpus: int) -> int:
    """Fragments :func:`msnoop.store.lance_ray.build_table_ray` writes for ``total_rows`` in equal parts."""
    from msnoop.store.lance_ray import MAX_ROWS_PER_FRAGMENT, MIN_ROWS_PER_FRAGMENT

    per = min(MAX_ROWS_PER_FRAGMENT, max(MIN_ROWS_PER_FRAGMENT, -(-total_rows // cpus)))
    parts_per_group = max(1, -(-per // rows_per_part))  # group_parts packs parts until a group has >= per rows
    n_parts = -(-total_rows // rows_per_part)
    groups = -(-n_parts // parts_per_group)
    rows_per_group = parts_per_group * rows_per_part
    return groups * max(1, -(-min(rows_per_group, total_rows) // MAX_ROWS_PER_FRAGMENT))


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[tuple[str, str, str]] = []  # (quantity, value, source)

    def row(q: str, v: str, s: str) -> None:
        rows.append((q, v, s))

    cells, fields, chans, px = (SCREEN[k][0] for k in ("cells", "fields", "channels", "field_px"))
    for k, (v, s) in SCREEN.items():
        row(f"screen: {k}", f"{v:,.0f}", s)
    row("screen: cells per field", f"{cells / fields:.0f}", "cells / fields")

    cost = model_cost()
    cpu = cpu_costs(int(px))
    tiles_ch = cpu["tiles_per_channel"]
    tile_inputs = fields * chans * tiles_ch
    cell_inputs = cells * chans
    cmd = "measured here: python jobs/estimate_screen.py"
    row(
        "tile mode: 224 tiles per channel of a field",
        f"{tiles_ch:.0f}",
        f"msnoop tile_starts({px:.0f}, 224, overlap 0.1)^2 ({cmd})",
    )
    row("tile mode: one-channel inputs", f"{tile_inputs:.3g}", "fields x channels x tiles")
    row("cells mode: one-channel inputs (one 224 crop per cell and channel)", f"{cell_inputs:.3g}", "cells x channels")
    row(
        "microsnoop_cnn embed: GFLOP per 224x224 one-channel tile",
        f"{cost['flops'] / 1e9:.2f}",
        f"torch FlopCounterMode on the encoder + pooling ({cmd})",
    )
    row(
        "microsnoop_cnn embed: MB moved per tile (bf16, unfused upper bound)",
        f"{cost['bytes_bf16'] / 1e6:.1f}",
        f"forward hooks on every encoder layer ({cmd})",
    )
    intensity = cost["flops"] / cost["bytes_bf16"]
    row("arithmetic intensity (FLOP/byte)", f"{intensity:.0f}", "the two rows above")

    gpu_rates: dict[str, float] = {}
    for name, g in GPUS.items():
        t_compute = cost["flops"] / (g["bf16_tflops"] * 1e12)
        t_memory = cost["bytes_bf16"] / (g["hbm_tb_s"] * 1e12)
        bound = "memory" if t_memory > t_compute else "compute"
        rate = args.eta / max(t_compute, t_memory)
        gpu_rates[name] = rate
        row(
            f"{name}: peak bf16 / HBM bandwidth",
            f"{g['bf16_tflops']:.0f} TFLOPS / {g['hbm_tb_s']:.2f} TB/s",
            g["source"],
        )
        row(
            f"{name}: tiles/s per GPU actor (ESTIMATE, {bound}-bound roofline x eta {args.eta})",
            f"{rate:,.0f}",
            "max(FLOPs/peak, bytes/bandwidth) / eta; eta assumed (--eta)",
        )

    emb = load("bench_embed.json").get("throughput", {})
    bf16 = load("bench_embed_bf16.json").get("throughput", {})
    cpu_tiles_s = emb.get("ray_images_per_s", float("nan")) * emb.get("channels", 2)
    cpu_tiles_s_bf16 = bf16.get("ray_images_per_s", float("nan")) * bf16.get("channels", 2)
    row(
        "CPU actor, 2 cores: tiles/s (float32 / bf16)",
        f"{cpu_tiles_s:.1f} / {cpu_tiles_s_bf16:.1f}",
        "measured here: python jobs/bench_embed.py (results/bench_embed.json, results/bench_embed_bf16.json; "
        "Ray images/s x 2 channels)",
    )
    row(
        "CPU: decode + tile + normalise, s per 224 tile",
        f"{cpu['cpu_s_per_tile'] * 1e3:.1f} ms",
        f"{cmd} (BBBC013 field mirror-padded to {px:.0f}^2; decode scaled by pixels)",
    )
    row("CPU: pad + normalise one cell crop (224)", f"{cpu['cpu_s_per_crop'] * 1e3:.1f} ms", cmd)
    seg = load("bench_segmentation.json").get("overall", {})
    seg_px = 1030 * 1349  # the gnf images; ic100 are 1024x1344
    seg_s = seg.get("ms_per_image_cpu", float("nan")) / 1e3 * (px * px) / seg_px
    row(
        "CPU: built-in nucleus segmentation per field",
        f"{seg_s * 1e3:.0f} ms",
        "measured here: python jobs/bench_segmentation.py (results/bench_segmentation.json, 83.8 ms per "
        "1030x1349 image), scaled by pixels",
    )

    # hours
    h100 = gpu_rates["H100 SXM"]
    a100 = gpu_rates["A100 SXM 80GB"]
    table: dict[str, dict[str, float]] = {}
    for mode, n_inputs, cpu_per_input, extra_cpu in (
        ("tile", tile_inputs, cpu["cpu_s_per_tile"], 0.0),
        ("cells", cell_inputs, cpu["cpu_s_per_crop"], fields * (seg_s + chans * cpu["decode_s_per_channel"])),
    ):
        cpu_total = n_inputs * cpu_per_input + extra_cpu
        table[mode] = {
            "inputs": n_inputs,
            "h100_gpu_hours": n_inputs / h100 / 3600,
            "a100_gpu_hours": n_inputs / a100 / 3600,
            "cpu_core_hours_preprocess": cpu_total / 3600,
            "cpu_only_2core_hours": n_inputs / cpu_tiles_s_bf16 / 3600,
            "cores_per_h100": cpu_total / (n_inputs / h100),
        }
        t = table[mode]
        row(
            f"{mode} mode: GPU-hours H100 / A100 (ESTIMATE)",
            f"{t['h100_gpu_hours']:,.0f} / {t['a100_gpu_hours']:,.0f}",
            "inputs / tiles per s",
        )
        row(
            f"{mode} mode: CPU core-hours to decode and preprocess" + (" (incl. segmentation)" if extra_cpu else ""),
            f"{t['cpu_core_hours_preprocess']:,.0f}",
            "inputs x measured CPU s per input",
        )
        row(
            f"{mode} mode: CPU cores per H100 actor to keep it fed",
            f"{t['cores_per_h100']:.0f}",
            "CPU s per input x GPU inputs/s",
        )
        row(
            f"{mode} mode: the whole screen on this 2-core machine instead (bf16 CPU actor)",
            f"{t['cpu_only_2core_hours'] / 24 / 365:,.1f} years",
            "inputs / measured CPU tiles/s",
        )
    g = args.gpus
    nodes = max(1, g // args.gpus_per_node)
    row(
        "cluster (assumed)",
        f"{g} GPUs = {g} EmbedActors, {nodes} nodes, {args.cpus_per_gpu} CPU cores per GPU",
        "--gpus, --gpus-per-node, --cpus-per-gpu; runtime.actors: auto gives one actor per GPU",
    )
    embed_h: dict[str, float] = {}
    for mode, t in table.items():
        gpu_wall = t["h100_gpu_hours"] / g
        cpu_wall = t["cpu_core_hours_preprocess"] / (g * args.cpus_per_gpu)
        embed_h[mode] = max(gpu_wall, cpu_wall)
        row(
            f"{mode} mode: embedding wall hours on {g} H100 (ESTIMATE)",
            f"{embed_h[mode]:,.2f} ({'CPU' if cpu_wall > gpu_wall else 'GPU'}-bound; GPU {gpu_wall:,.2f}, "
            f"CPU {cpu_wall:,.2f})",
            "the slower of the GPU and the CPU side (they overlap in the Ray Data pipeline)",
        )
        low = t["h100_gpu_hours"] * args.eta / 0.1
        row(
            f"{mode} mode: H100 GPU-hours if eta were 0.1 instead of {args.eta}",
            f"{low:,.0f}",
            "sensitivity of the ESTIMATE to the assumed efficiency",
        )

    # input images on object storage
    in_bytes = fields * chans * px * px * 2
    get_requests = fields * chans * 2  # msnoop's reader: HEAD (size) + GET per image file
    node_bytes_s = args.node_gbps * 1e9 / 8
    row(
        "input: pixels to read (16-bit, uncompressed; assumed)",
        f"{in_bytes / 1e12:,.1f} TB in {fields * chans:,.0f} files",
        "fields x channels x 1080^2 x 2 B",
    )
    row(
        "input: read time at the assumed per-node S3 throughput",
        f"{in_bytes / (nodes * node_bytes_s) / 60:,.0f} min ({args.node_gbps:g} Gbit/s x {nodes} nodes)",
        "--node-gbps (assumed); S3 itself scales with prefixes",
    )
    row(
        "input: S3 requests (HEAD + GET per file)",
        f"{get_requests:,.0f}; {get_requests / 5500 / 60:,.0f} min at 5,500/s on a single prefix",
        "AWS: 'at least 5,500 GET/HEAD requests per second per partitioned prefix' "
        "(https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html); plates are separate "
        "prefixes",
    )

    # object store: blocks of float32 tiles between the read tasks and the GPU actors
    tile_bytes = 224 * 224 * 4
    block_tile = args.images_per_block * chans * tiles_ch * tile_bytes
    block_cells = args.images_per_block * (cells / fields) * chans * tile_bytes
    row(
        f"object store: one block of {args.images_per_block} fields, tile / cells mode",
        f"{block_tile / 2**20:,.0f} / {block_cells / 2**20:,.0f} MiB",
        "images_per_block x channels x inputs per field x 224^2 x 4 B (float32 tiles)",
    )
    need = 3 * g * max(block_tile, block_cells)
    row(
        f"object store: runtime.inflight_mb for 3 blocks per actor ({g} actors)",
        f"{need / 2**20:,.0f} MiB (default 512)",
        "3 x actors x block; the default would keep about one block in flight for the whole cluster",
    )

    # outputs
    dim = 256 * chans
    row_bytes = dim * 4
    n_parts = fields / args.images_per_block
    row("output: embedding dim (5 x 256)", f"{dim}", "Microsnoop concatenates one 256-d vector per channel")
    row(
        "output: Parquet parts, image table (one per block) / cells table",
        f"{n_parts:,.0f} / {n_parts:,.0f}",
        f"fields / images_per_block ({args.images_per_block}); cells mode writes a cells part per block too",
    )
    row(
        "output: vectors, image table / cells table",
        f"{fields * row_bytes / 1e9:,.1f} GB / {cells * row_bytes / 1e9:,.0f} GB",
        "rows x dim x 4 B (float32, before metadata)",
    )
    cluster_cpus = g * args.cpus_per_gpu
    frag_img = lance_fragments(int(fields), args.images_per_block, cluster_cpus)
    frag_cells = lance_fragments(int(cells), int(args.images_per_block * cells / fields), cluster_cpus)
    row(
        f"LanceDB fragments, image / cells table ({cluster_cpus} cluster CPUs)",
        f"{frag_img:,} / {frag_cells:,}",
        "msnoop.store.lance_ray: rows per fragment = clamp(rows / CPUs, 10^4, 2^20)",
    )
    lance = load("bench_lance_commit.json").get("local_1000000x256", {})
    secs = lance.get("results", {}).get("ray", {}).get("seconds", float("nan"))
    mb_per_cpu_s = 1e6 * 256 * 4 / secs / lance.get("num_cpus", 2) / 1e6
    row(
        "LanceDB build rate per CPU",
        f"{mb_per_cpu_s:.0f} MB/s",
        f"measured here: python jobs/bench_lance_commit.py --dim 256 (10^6 x 256 in {secs} s on 2 CPUs)",
    )
    row(
        f"LanceDB build, cells table, {cluster_cpus} CPUs",
        f"{cells * row_bytes / 1e6 / mb_per_cpu_s / cluster_cpus / 60:,.1f} min",
        "vector bytes / (rate x CPUs), one commit",
    )
    lat = args.s3_latency_ms / 1e3
    row("S3 request latency (assumed)", f"{args.s3_latency_ms:.0f} ms", S3_LATENCY_SOURCE)
    for what, n_req, how in (
        ("Parquet footers before the LanceDB build", 3, "msnoop.store.lance_ray: HEAD + footer, 16 threads"),
        ("ids of every part, totals check (and again to resume)", 3, "msnoop.core.parts.read_column_per_part"),
    ):
        row(
            f"driver: {what}, {n_parts:,.0f} parts",
            f"{n_parts * n_req * lat / 16 / 60:,.1f} min",
            f"parts x {n_req} requests x latency / 16 threads ({how})",
        )
    row(
        "driver: standardisation pass over the cells table's vectors (streamed, O(dim) memory)",
        f"{cells * row_bytes / (args.driver_gb_s * 1e9) / 60:,.0f} min at {args.driver_gb_s:g} GB/s",
        "msnoop.store.publish.fit_postprocessing reads every vector once on the driver; read rate assumed "
        "(--driver-gb-s); output.postprocess: raw skips it",
    )
    pass_min = n_parts * 3 * lat / 16 / 60  # one driver pass over one folder's parts (footers or ids)
    read_min = in_bytes / (nodes * node_bytes_s) / 60
    for mode, passes, rows_out in (("tile", 2, fields), ("cells", 4, fields + cells)):
        # tile: Lance footers + totals ids; cells: also the cells parts' footers (Lance) and row count
        driver_min = passes * pass_min + rows_out * row_bytes / (args.driver_gb_s * 1e9) / 60
        lance_min = rows_out * row_bytes / 1e6 / mb_per_cpu_s / cluster_cpus / 60
        row(
            f"{mode} mode: driver's steps after embedding (ESTIMATE)",
            f"{driver_min:,.0f} min",
            f"{passes} passes over {n_parts:,.0f} parts + one standardisation read of {rows_out:,.0f} vectors",
        )
        total_h = max(embed_h[mode], read_min / 60) + (driver_min + lance_min) / 60
        row(
            f"{mode} mode: end to end on {g} H100 (ESTIMATE)",
            f"{total_h:,.1f} h",
            "max(embedding, input read) + the driver's steps + LanceDB build",
        )
    from msnoop.core.runtime import provenance

    made = {"date": time.strftime("%Y-%m-%d"), "git": provenance()["git"]}
    return {"rows": rows, "modes": table, "model": cost, "cpu": cpu, "args": vars(args), **made}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# A 10^8-cell, five-channel screen on a GPU cluster: an estimate",
        "",
        "`python jobs/estimate_screen.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in result["args"].items() if k != "out")
        + f"` on {result['date']} at commit {result['git']}. ESTIMATE rows derive GPU time from measured FLOPs and bytes, cited peaks and an assumed efficiency "
        "(no GPU was measured).",
        "",
        "| quantity | value | source |",
        "|---|---|---|",
    ]
    lines += [f"| {q} | {v} | {s} |" for q, v, s in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=64, help="GPU actors in the cluster (one per GPU)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--node-gbps", type=float, default=100.0, help="S3 read throughput per node, Gbit/s (assumed)")
    ap.add_argument("--cpus-per-gpu", type=int, default=16, help="CPU cores per GPU for reading and preprocessing")
    ap.add_argument("--eta", type=float, default=0.5, help="fraction of the roofline bound reached (assumed)")
    ap.add_argument("--images-per-block", type=int, default=8, help="runtime.images_per_block (fields per block)")
    ap.add_argument("--s3-latency-ms", type=float, default=30.0, help="per-request latency for driver reads")
    ap.add_argument("--driver-gb-s", type=float, default=1.0, help="driver's read rate from S3 (assumed)")
    ap.add_argument("--out", default=str(RESULTS / "estimate_screen.json"))
    args = ap.parse_args()
    result = estimate(args)
    md = markdown(result)
    write_results(args.out, result, md)
    print(md)


if __name__ == "__main__":
    main()
