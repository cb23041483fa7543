"""Small jobs as a new user runs them: where the seconds go, and whether they meet their targets.

Each case is a fresh ``msnoop embed`` process on synthetic two-channel cells (``msnoop.data.synthetic``), run under
a pseudo-terminal so that the progress bar draws as it does on a terminal:

* ``embed6``: 6 images into a new folder, end to end (wall seconds from the process start to its exit);
  target <= 15 s;
* ``resume6``: the same command again, nothing left to do; target <= 5 s;
* ``embed6`` and ``ray80`` (80 images with ``runtime.ray_min_images=0``, so a local Ray cluster starts):
  seconds from the process start to its first progress output (the bar's first line); target <= 10 s.

A breakdown runs the 6-image job again in one process with its stages timed (imports, model, manifest scan,
embedding, LanceDB table, totals), and the 80-image job's Ray start-up. Every case is repeated (``--repeats``) and
the median is reported, with the machine's load average before each run (other jobs share these cores).

Usage::

    python jobs/bench_small_jobs.py [--repeats 3] [--out results/bench_small_jobs]

Writes ``results/bench_small_jobs.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

from harness import RESULTS, ROOT, run_record, write_results

#: Targets of the cases, in seconds.
TARGETS = {"embed6_wall_s": 15.0, "resume6_wall_s": 5.0, "first_progress_s": 10.0}
#: The start of the progress bar's line (``embedding:  17%|...``).
PROGRESS_MARK = b"embedding:"


def make_data(folder: Path, n_per_class: int) -> Path:
    """Synthetic cells (4 classes x ``n_per_class``) as 16-bit TIFFs and their manifest; returns the manifest."""
    from msnoop.data.synthetic import write_dataset

    return write_dataset(folder, n_per_class=n_per_class, seed=0)


def msnoop_command() -> list[str]:
    """The ``msnoop`` console script beside this interpreter (as a user runs it), else ``python -m msnoop``."""
    script = Path(sys.executable).with_name("msnoop")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "msnoop"]


def run_in_pty(args: list[str], *, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal.

    Returns:
        ``{"wall_s", "first_progress_s" (None if the bar never drew), "rc", "output" (the last 2,000 characters)}``.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a 120 x 30 terminal window
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    out = bytearray()
    first = None
    while True:
        ready, _, _ = select.select([master], [], [], 0.05)
        chunk = b""
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                chunk = b""
            out += chunk
            if first is None and PROGRESS_MARK in out:
                first = time.perf_counter() - t0
        if not chunk and proc.poll() is not None:
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
    proc.wait()
    wall = time.perf_counter() - t0
    os.close(master)
    text = out.decode(errors="replace")
    return {"wall_s": wall, "first_progress_s": first, "rc": proc.returncode, "output": text[-2000:]}


def embed_args(manifest: Path, out: Path, *sets: str) -> list[str]:
    """The user's command: ``msnoop embed --manifest M --channels dna,protein --out O`` (the shipped model), with
    ``--set`` overrides."""
    command = [*msnoop_command(), "embed", "--manifest", str(manifest), "--channels", "dna,protein", "--out", str(out)]
    return command + [x for s in sets for x in ("--set", s)]


BREAKDOWN = r"""
import json, sys, time
t0 = time.perf_counter()
stages = {}
import msnoop.cli  # noqa: F401
stages["import msnoop.cli"] = time.perf_counter() - t0
t = time.perf_counter()
import msnoop.core.runtime as R
import msnoop.embed.pipeline as P
import msnoop.store.publish as S
from msnoop.job_kinds import load_config, run_embed_job
stages["import the embedding stages (torch)"] = time.perf_counter() - t
def timed(module, name, label):
    fn = getattr(module, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            stages[label] = stages.get(label, 0.0) + time.perf_counter() - t
    setattr(module, name, wrapper)
for module, name, label in [
    (P, "prepare_model", "load the model"),
    (P, "scan_ids", "scan the manifest's ids"),
    (P, "run_in_process", "embed (in this process)"),
    (R, "init_ray", "start Ray"),
    (P, "build_dataset", "plan the Ray Data pipeline"),
    (P, "_stream_counts", "embed (Ray Data)"),
    (P, "check_totals", "check the totals"),
    (S, "publish_embeddings", "LanceDB table (import lancedb, fit, write)"),
]:
    timed(module, name, label)
manifest, out, ray_min = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(None, job="embed", overrides=[
    ("input.manifest", manifest), ("input.channels", ["dna", "protein"]), ("output.dir", out),
    ("runtime.ray_min_images", ray_min if ray_min == "auto" else int(ray_min))])
t = time.perf_counter()
run_embed_job(cfg)
stages["run (all stages)"] = time.perf_counter() - t
stages["total in Python"] = time.perf_counter() - t0
print("BREAKDOWN " + json.dumps(stages))
"""


def breakdown(manifest: Path, out: Path, ray_min_images: str = "auto") -> dict[str, float]:
    """Seconds per stage of one embedding job run in a fresh process (see :data:`BREAKDOWN`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-c", BREAKDOWN, str(manifest), str(out), ray_min_images],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
        timeout=900,
    )
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("BREAKDOWN "))
    return {k: round(v, 2) for k, v in json.loads(line[len("BREAKDOWN ") :]).items()}


#: The 80-image case runs on a local Ray cluster whatever ``runtime.ray_min_images: auto`` would choose.
RAY_ALWAYS = ("runtime.ray_min_images=0",)


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 2) if kept else None


def run(repeats: int, work: Path) -> dict[str, Any]:
    """Every case ``repeats`` times; returns the result record."""
    six = make_data(work / "six", n_per_class=2)
    import pandas as pd

    pd.read_csv(six).head(6).to_csv(six, index=False)  # 6 images: 2 + 2 + 1 + 1 of the 4 classes
    eighty = make_data(work / "eighty", n_per_class=20)
    runs: dict[str, list[dict[str, Any]]] = {"embed6": [], "resume6": [], "ray80": []}
    for i in range(repeats):
        out6 = work / f"out6_{i}"
        for case, out, manifest, sets in (
            ("embed6", out6, six, ()),
            ("resume6", out6, six, ()),
            ("ray80", work / f"out80_{i}", eighty, RAY_ALWAYS),
        ):
            load = os.getloadavg()[0]
            res = run_in_pty(embed_args(manifest, out, *sets))
            if res["rc"] != 0:
                raise RuntimeError(f"{case} failed (exit {res['rc']}):\n{res['output']}")
            runs[case].append(
                {"wall_s": round(res["wall_s"], 2), "first_progress_s": res["first_progress_s"], "load": load}
            )
            print(f"{case} #{i}: {res['wall_s']:.1f} s (first progress {res['first_progress_s']}; load {load:.1f})")
    stages6 = breakdown(six, work / "breakdown6")
    stages80 = breakdown(eighty, work / "breakdown80", ray_min_images="0")
    summary = {
        "embed6_wall_s": median([r["wall_s"] for r in runs["embed6"]]),
        "resume6_wall_s": median([r["wall_s"] for r in runs["resume6"]]),
        # the later of the two cases' first output; a case whose bar never drew has no such time (target missed)
        "first_progress_s": None
        if any(r["first_progress_s"] is None for r in runs["embed6"] + runs["ray80"])
        else max(median([r["first_progress_s"] for r in runs[c]]) or 0.0 for c in ("embed6", "ray80")),
        "ray80_wall_s": median([r["wall_s"] for r in runs["ray80"]]),
    }
    met = {k: summary[k] is not None and summary[k] <= target for k, target in TARGETS.items()}
    return {
        **run_record(),
        "machine": {"cpus": os.cpu_count(), "load_before_runs": [r["load"] for rs in runs.values() for r in rs]},
        "command": " ".join(embed_args(Path("MANIFEST"), Path("OUT"))),
        "targets_s": TARGETS,
        "summary": summary,
        "met": met,
        "runs": runs,
        "breakdown_6_images_s": stages6,
        "breakdown_80_images_s": stages80,
    }


def markdown(rec: dict[str, Any]) -> str:
    s, t, met = rec["summary"], rec["targets_s"], rec["met"]
    loads = rec["machine"]["load_before_runs"]
    lines = [
        f"# Small jobs ({rec['date']}, {rec['commit']})",
        "",
        f"`{rec['command']}` on {rec['machine']['cpus']} cores, load average {min(loads):.1f}-{max(loads):.1f} "
        f"before the runs; medians of {len(rec['runs']['embed6'])} runs.",
        "",
        "| case | seconds | target | met |",
        "|---|---|---|---|",
        f"| 6 images, end to end | {s['embed6_wall_s']} | <= {t['embed6_wall_s']:g} | {met['embed6_wall_s']} |",
        f"| the same again (nothing to do) | {s['resume6_wall_s']} | <= {t['resume6_wall_s']:g} | {met['resume6_wall_s']} |",
        f"| first progress output (6 images; 80 with Ray) | {s['first_progress_s']} | <= {t['first_progress_s']:g} "
        f"| {met['first_progress_s']} |",
        f"| 80 images with Ray, end to end | {s['ray80_wall_s']} | - | - |",
        "",
        "Where the seconds go (one run in one process):",
        "",
        "| stage | 6 images (s) | 80 images (s) |",
        "|---|---|---|",
    ]
    b6, b80 = rec["breakdown_6_images_s"], rec["breakdown_80_images_s"]
    for stage in dict.fromkeys([*b6, *b80]):
        lines.append(f"| {stage} | {b6.get(stage, '-')} | {b80.get(stage, '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_small_jobs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="msnoop_small_"))
    try:
        rec = run(args.repeats, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for path in write_results(args.out, rec, markdown(rec)):
        print(f"wrote {path}")
    print(markdown(rec))


if __name__ == "__main__":
    main()
