"""Run every real-data benchmark in sequence and collect their tables into one dated Markdown file.

    python jobs/bench_all.py                  # data benchmarks (reuses embeddings already computed)
    python jobs/bench_all.py --perf           # also the speed/memory benchmarks (slow on 2 cores)

Steps, each skipped with a message when its folder of ../shared/data is absent:
``msnoop bench configs/benchmarks/*.yaml`` (yeast, hpa_toy), BBBC021 profiles (sphering, NSC/NSCB, mAP),
Coelho nuclei segmentation AP, BBBC013 end to end (tile and cells embeddings, then the readout). With
``--perf``: embedding throughput and memory, search and kNN, pretraining overhead. Every step is a
subprocess; a failing step is recorded and the others still run.

Writes ``results/BENCHMARKS.md`` (commit, date, per step: command, status, wall time, its printed
tables) and ``results/bench_all.json``, then regenerates the README's results table (between
``<!-- results:start -->`` and ``<!-- results:end -->``) from the result files
(``jobs/headline.py``); ``--readme-only`` does only that, ``--no-readme`` skips it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import date
from pathlib import Path

from harness import RESULTS, ROOT, Stopwatch, data_dir, run_record, write_results

DATA = data_dir()
PY = sys.executable
MSNOOP = [PY, "-m", "msnoop"]

STEPS: list[tuple[str, list[str], list[list[str]], bool]] = [
    # (name, data folders needed, commands, perf-only)
    (
        "kNN benchmarks (msnoop bench)",
        ["yeast", "hpa_toy"],
        [
            [
                *MSNOOP,
                "bench",
                *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/benchmarks").glob("*.yaml")),
                "--summary",
                "results/bench/summary.md",
            ]
        ],
        False,
    ),
    ("BBBC021 profiles", ["bbbc021_profiles"], [[PY, "jobs/bench_bbbc021_profiles.py"]], False),
    ("Coelho nuclei segmentation", ["coelho2009_nuclei"], [[PY, "jobs/bench_segmentation.py"]], False),
    (
        "BBBC013 end to end",
        ["bbbc013"],
        [
            # the random network's reference rows (the user configs embed with the shipped default)
            [*MSNOOP, "embed", "configs/bbbc013.yaml", "--set", "model=random:microsnoop_cnn:0"],
            [*MSNOOP, "embed", "configs/bbbc013_cells.yaml", "--set", "model=random:microsnoop_cnn:0"],
            [
                *MSNOOP,
                "embed",
                "configs/bbbc013_cells.yaml",
                "--set",
                "model=default",
                "--set",
                "cells.max_cells_per_image=32",  # twice the random network's 16: Z' still rises at 16 (README)
                "--set",
                "output.dir=results/bbbc013_cells_default",
                "--set",
                "output.on_mismatch=replace",  # a retrained default is embedded again
            ],
            *(
                [
                    *MSNOOP,
                    "embed",
                    "configs/bbbc013_cells.yaml",
                    *("--set", f"model={model}", "--set", "cells.max_cells_per_image=64"),
                    *("--set", f"output.dir=results/{folder}", "--set", "output.on_mismatch=replace"),
                ]
                # 64 cells per well, the default and the random network alike: the per-cell readout still gains
                # from 32 to 64 (README); all ~190 cells are a GPU budget
                for model, folder in (
                    ("default", "bbbc013_cells_default64"),
                    ("random:microsnoop_cnn:0", "bbbc013_cells64"),
                )
            ),
            [
                PY,
                "jobs/bench_bbbc013.py",
                *("--emb", "tile=results/bbbc013", "--emb", "cells=results/bbbc013_cells"),
                *("--emb", "cells_default=results/bbbc013_cells_default"),
                *(
                    "--emb",
                    "cells64=results/bbbc013_cells64",
                    "--emb",
                    "cells_default64=results/bbbc013_cells_default64",
                ),
            ],
            [*MSNOOP, "screen", "configs/bbbc013_screen.yaml"],
        ],
        False,
    ),
    (
        "embedding throughput and memory",
        [],
        [
            [PY, "jobs/bench_embed.py", "--in-process"],  # 256 images: Ray Data and in process against a bare loop
            # the smallest job a CPU runs on Ray by default (runtime.ray_min_images: auto)
            [PY, "jobs/bench_embed.py", "--n", "1000", "--repeats", "4", "--only", "throughput"]
            + ["--out", "results/bench_embed_1000.json"],
        ],
        True,
    ),
    ("search and kNN", [], [[PY, "jobs/bench_search.py", "--n", "200000", "--knn-n", "100000"]], True),
    ("pretraining overhead", [], [[PY, "jobs/bench_pretrain.py", "--threads", "2"]], True),
]


def table_lines(text: str) -> str:
    """The Markdown table rows (and the line after each table) of a command's output."""
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith("|"):
            out.append(line)
            keep = True
        elif keep:
            out.append(line)
            keep = False
    return "\n".join(out).strip()


def update_readme(readme: Path, sha: str) -> None:
    """Rewrite the README's results table from the result files under results/."""
    from headline import headline_rows, markdown, replace_section, write_csv

    rows, today = headline_rows(RESULTS), date.today().isoformat()
    readme.write_text(replace_section(readme.read_text(), markdown(rows, commit=sha, date=today)))
    csv_path = write_csv(rows, RESULTS / "headline.csv", commit=sha, date=today)
    print(f"rewrote the results table in {readme} and {csv_path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--perf", action="store_true", help="also run the speed and memory benchmarks")
    ap.add_argument("--out", type=Path, default=RESULTS / "BENCHMARKS.md")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README whose results table is rewritten")
    ap.add_argument("--no-readme", action="store_true", help="do not touch the README")
    ap.add_argument("--readme-only", action="store_true", help="only regenerate the README table from results/")
    args = ap.parse_args()
    record: dict = {**run_record(), "data": str(DATA), "steps": []}
    sha = record["commit"] or ""
    if args.readme_only:
        update_readme(args.readme, sha)
        return 0
    md = [f"# msnoop benchmarks, {record['date']}, commit {sha}", ""]
    for name, needs, commands, perf in STEPS:
        if perf and not args.perf:
            continue
        missing = [d for d in needs if not (DATA / d).is_dir()]
        step = {"name": name, "commands": [" ".join(["python", *c[1:]] if c[0] == PY else c) for c in commands]}
        md += [f"## {name}", ""]
        if missing:
            step["status"] = f"skipped: {', '.join(str(DATA / d) for d in missing)} absent"
            print(f"{name}: {step['status']}", flush=True)
            md += [step["status"], ""]
            record["steps"].append(step)
            continue
        outputs, status = [], "ok"
        with Stopwatch() as clock:
            for cmd in commands:
                print(f"$ {' '.join(cmd)}", flush=True)
                res = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
                outputs.append(res.stdout)
                if res.returncode != 0:
                    last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
                    status = f"failed (exit {res.returncode}): {last}"
                    break
        step |= {"status": status, "wall_s": round(clock.wall, 1)}
        print(f"{name}: {status} in {step['wall_s']} s", flush=True)
        md += [f"`{'`; `'.join(step['commands'])}`: {status}, {step['wall_s']:.0f} s", ""]
        text = "\n".join(outputs)
        tables = table_lines(text)
        if tables:
            md += [tables, ""]
        elif text.strip():  # a script that prints no table: its last lines
            md += ["```", *text.strip().splitlines()[-15:], "```", ""]
        record["steps"].append(step)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md) + "\n")
    write_results(args.out.with_name("bench_all.json"), record)
    print(f"wrote {args.out}")
    if not args.no_readme:
        update_readme(args.readme, sha)
    return 1 if any(s["status"].startswith("failed") for s in record["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
