"""The README's results table, generated from the benchmark result files under ``results/``.

Every row reads one JSON file that a benchmark under ``jobs/`` (or ``msnoop bench``) wrote, compares
msnoop's number with the reference (best baseline, published value or goal) and says whether the goal
is met. A file that is absent gives a row that says so; nothing is typed in by hand.

    python jobs/bench_all.py            # runs the benchmarks, then rewrites the README section
    python jobs/bench_all.py --readme-only

The section sits between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md; the same
rows, dated and with the commit, go to ``results/headline.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START, END = "<!-- results:start -->", "<!-- results:end -->"

__all__ = ["END", "START", "Row", "headline_rows", "markdown", "replace_section", "write_csv"]


@dataclass(frozen=True)
class Row:
    """One headline number."""

    area: str
    measure: str
    msnoop: str
    reference: str
    goal: str
    met: bool | None  # None: not applicable or not measured
    source: str


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def _vs_goal(x: float, goal: float, nd: int = 2) -> str:
    """``x`` with enough decimals (up to 4) that it does not print as the goal it misses, e.g. 0.8998 vs 0.9."""
    while nd < 4 and (round(x, nd) >= goal) != (x >= goal):
        nd += 1
    return f"{x:.{nd}f}"


def _bench_rows(res: Path, name: str, tasks: list[tuple[str, str, float | None]]) -> list[Row]:
    """kNN rows of one ``msnoop bench`` result: the default model against every other row."""
    src = f"results/bench/{name}/results.json"
    d = _load(res / "bench" / name / "results.json")
    if d is None:
        return [Row(name, "kNN balanced accuracy", "not run", "", "", None, src)]
    when = f"{src} ({d.get('date', '?')}, {d.get('provenance', {}).get('git', '?')})"
    rows_by = {r["features"]: r for r in d["rows"]}
    default = rows_by.get("default")
    out = []
    for task, title, goal in tasks:
        key = f"{task}_balanced_accuracy"
        others = {f: r[key] for f, r in rows_by.items() if f != "default" and key in r}
        if default is None or key not in default or not others:
            continue
        best_name, best = max(others.items(), key=lambda kv: kv[1])
        ours = default[key]
        beats_all = ours > best
        goal_text = "above every other row" + (f", >= {goal}" if goal is not None else "")
        met = beats_all and (goal is None or ours >= goal)
        out.append(
            Row(
                name,
                f"{title}: {task} balanced accuracy",
                f"{_fmt(ours)} (default model)",
                f"{_fmt(best)} ({best_name})",
                goal_text,
                met,
                when,
            )
        )
    return out


def _bbbc021(res: Path) -> list[Row]:
    src = "results/bench_bbbc021_profiles.json"
    d = _load(res / "bench_bbbc021_profiles.json")
    cond = (d or {}).get("conditions", {}).get("zca-cor-knee-global (Microsnoop)")
    if cond is None:
        return [Row("bbbc021_profiles", "NSC / NSCB", "not run", "", "", None, src)]
    nsc, nscb = cond["NSC"]["accuracy"], cond["NSCB_week"]["accuracy"]
    return [
        Row(
            "bbbc021_profiles",
            "CellProfiler profiles sphered on DMSO: NSC / NSCB (week), 1-NN cosine",
            f"{_fmt(nsc)} / {_fmt(nscb)}",
            "0.922 / 0.772 (Microsnoop's protocol, published)",
            "about the published values",
            abs(nsc - 0.922) <= 0.03 and abs(nscb - 0.772) <= 0.03,
            src,
        )
    ]


def _segmentation(res: Path) -> list[Row]:
    src = "results/bench_segmentation.json"
    d = _load(res / "bench_segmentation.json")
    if d is None:
        return [Row("coelho2009_nuclei", "AP@0.5", "not run", "", "", None, src)]
    ap = d["overall"]["mean_ap@0.5"]
    sets = ", ".join(f"{k} {_fmt(v['mean_ap@0.5'])}" for k, v in d.get("sets", {}).items())
    rows = [
        Row(
            "coelho2009_nuclei",
            f"built-in nucleus segmentation, mean AP@0.5 over {d['overall']['n_images']} images",
            f"{_fmt(ap)} ({sets})",
            "hand-drawn masks",
            ">= 0.85",
            ap >= 0.85,
            src,
        )
    ]
    seg = _load(res / "segtrain.json")
    if seg is not None:
        cp, bi = seg["holdout"]["cellpose"], seg["holdout"]["builtin"]
        rows.append(
            Row(
                "coelho2009_nuclei",
                f"cellpose 3.1 trained by `msnoop segtrain` ({seg['train_minutes']:.0f} min, {seg['device']}), "
                f"held-out mean AP@0.5 ({seg['n_holdout']} images)",
                _fmt(cp["mean_ap@0.5"]),
                f"{_fmt(bi['mean_ap@0.5'])} (built-in, same images)",
                "above the built-in backend to ship",
                bool(seg["beats_builtin"]),
                "results/segtrain.json",
            )
        )
    return rows


#: The readout declared for BBBC013 (jobs/bench_bbbc013.py): the share of a well's cells that a classifier trained
#: on the control wells' cells calls positive.
BBBC013_READOUT = "cell classifier, P(positive)"


def _cells_per_well(row: dict[str, Any]) -> float | None:
    """The median cells per well of a per-cell readout row (``None`` for other rows)."""
    return (row.get("cells_per_well") or {}).get("median")


def _z_rho(row: dict[str, Any]) -> str:
    """``Z' / rho A-D / rho E-H`` of a BBBC013 result row."""
    return f"{row['z_prime']:.2f} / {_fmt(row['rho']['A-D'], 2)} / {_fmt(row['rho']['E-H'], 2)}"


def _bbbc013(res: Path) -> list[Row]:
    """The shipped default's declared readout (with the most cells per well it was run on) against the N/C ratio."""
    src = "results/bench_bbbc013.json"
    d = _load(res / "bench_bbbc013.json")
    if d is None:
        return [Row("bbbc013", "Z'", "not run", "", "", None, src)]
    emb = [r for r in d["rows"] if r.get("model")]
    ref = [r for r in d["rows"] if not r.get("model")]
    if not emb:
        return []
    default = [r for r in emb if r["model"] == "default"]
    declared = [r for r in default if r.get("readout") == BBBC013_READOUT]
    if declared:
        row = max(declared, key=lambda r: _cells_per_well(r) or 0)
        what = f"shipped default, {row['readout']}, {_cells_per_well(row) or 0:.0f} cells/well"
    else:  # a result file from before the per-cell readout: the best row of any model
        row = max(default or emb, key=lambda r: r["z_prime"])
        what = f"{row['features']}, {row.get('readout', 'control axis')}, {row['sphering']}, {row['model']}"
    nc = max(ref, key=lambda r: r["z_prime"]) if ref else None
    # the random network read out the same way on as many cells: the baseline an embedding has to beat
    random = [
        r
        for r in emb
        if str(r["model"]).startswith("random")
        and r.get("readout") == row.get("readout")
        and _cells_per_well(r) == _cells_per_well(row)
    ]
    refs = [
        f"{_z_rho(r)} ({label})"
        for r, label in (
            (nc, nc["features"] if nc else ""),
            (random[0] if random else None, "random network, same readout and cells"),
        )
        if r is not None
    ]
    return [
        Row(
            "bbbc013",
            "translocation plate end to end: Z' / rho A-D / rho E-H",
            f"{_z_rho(row)} ({what})",
            "; ".join(refs),
            "Z' >= 0.70, rho >= 0.90",
            row["z_prime"] >= 0.70 and min(row["rho"].values()) >= 0.90,
            src,
        )
    ]


#: msnoop's whole embedding job against a bare PyTorch loop over the same images: Ray may cost at most 5 %.
RAY_OVER_BARE_GOAL = 0.95


def _embed_row(e: dict[str, Any], large: dict[str, Any] | None) -> Row:
    """The whole embedding job against the bare loop. With ``large`` (``bench_embed_1000.json``: a job big enough that
    a CPU runs it on Ray by default, ``runtime.ray_min_images: auto``) and the in-process arm of ``e`` (256 images,
    which a CPU runs in the command's process), the goal is judged on the path each size takes; Ray Data forced onto
    the small job is shown beside them. Otherwise on Ray Data at ``e``'s size, as measured before the in-process arm."""
    t = e["throughput"]
    steady = t.get("ratio_ray_over_bare_steady")
    if large is None or t.get("ratio_in_process_over_bare") is None:
        return Row(
            "performance",
            f"embedding, Ray Data / bare PyTorch loop ({e.get('device', '?')})",
            f"{_vs_goal(t['ratio_ray_over_bare'], RAY_OVER_BARE_GOAL)} ({t['ray_images_per_s']:.2f} vs "
            f"{t['bare_images_per_s']:.2f} img/s)"
            + (f"; {steady:.3f} from the first part written to the last" if steady is not None else ""),
            "",
            f">= {RAY_OVER_BARE_GOAL}",
            t["ratio_ray_over_bare"] >= RAY_OVER_BARE_GOAL,
            "results/bench_embed.json",
        )
    big, small = large["throughput"], t["ratio_in_process_over_bare"]
    return Row(
        "performance",
        f"embedding, whole job / bare PyTorch loop ({e.get('device', '?')})",
        f"Ray Data, {big['images']} images: {_vs_goal(big['ratio_ray_over_bare'], RAY_OVER_BARE_GOAL)} "
        f"({big['ray_images_per_s']:.2f} vs {big['bare_images_per_s']:.2f} img/s); in process, {t['images']} "
        f"images: {_vs_goal(small, RAY_OVER_BARE_GOAL)}",
        f"Ray Data forced onto {t['images']} images: {t['ratio_ray_over_bare']:.2f}",
        f">= {RAY_OVER_BARE_GOAL}",
        min(big["ratio_ray_over_bare"], small) >= RAY_OVER_BARE_GOAL,
        "results/bench_embed_1000.json, results/bench_embed.json",
    )


def _perf(res: Path) -> list[Row]:
    rows = []
    e = _load(res / "bench_embed.json")
    if e is not None:
        m = e["memory"]
        rows.append(_embed_row(e, _load(res / "bench_embed_1000.json")))
        rows.append(
            Row(
                "performance",
                f"peak memory, {m['n_large']} / {m['n_small']} images",
                f"{m['ratio_large_over_small']:.2f}",
                "",
                "flat (<= 1.3)",
                m["ratio_large_over_small"] <= 1.3,
                "results/bench_embed.json",
            )
        )
    s = _load(res / "bench_search.json")
    run = (s or {}).get("search_runs", {}).get("1000000x768")
    if run is not None:
        a = run["ann"]
        rows.append(
            Row(
                "performance",
                "ANN search, 1M x 768: recall@10, median latency",
                f"{a['recall_at_10']:.3f}, {a['median_ms']:.1f} ms",
                f"exact: faiss flat {run['faiss_flat']['median_ms']:.0f} ms",
                "recall >= 0.95",
                a["recall_at_10"] >= 0.95,
                "results/bench_search.json",
            )
        )
    knn = (s or {}).get("knn_loo")
    if knn is not None:
        rows.append(
            Row(
                "performance",
                f"kNN leave-one-out, {knn['n']:,} x {knn['dim']} ({knn['index']})",
                f"{knn['wall_s']:.1f} s, accuracy {knn['accuracy']:.3f}",
                f"exact about {knn['exact_wall_s_estimate']:.0f} s",
                "< 30 s",
                knn["wall_s"] < 30,
                "results/bench_search.json",
            )
        )
    p = _load(res / "bench_pretrain.json")
    if p is not None:
        rows.append(
            Row(
                "performance",
                "pretraining samples/s, Ray Train / bare loop",
                f"{p['ratio_ray_over_bare']:.3f} ({p['ray_samples_per_s']} vs {p['bare_samples_per_s']})",
                "",
                f">= {p.get('goal_ratio', 0.9)}",
                p["ratio_ray_over_bare"] >= p.get("goal_ratio", 0.9),
                "results/bench_pretrain.json",
            )
        )
    return rows


SECTIONS: list[Callable[[Path], list[Row]]] = [
    lambda r: _bench_rows(
        r, "yeast", [("protein", "yeast single cells, 11-NN by field", 0.60), ("localisation", "yeast", 0.85)]
    ),
    lambda r: _bench_rows(r, "hpa_toy", [("gene", "HPA toy, 3 channels, 5-NN 5-fold (smoke)", None)]),
    _bbbc013,
    _bbbc021,
    _segmentation,
    _perf,
]


def headline_rows(results: str | Path) -> list[Row]:
    """All headline rows from the result files in ``results``."""
    res = Path(results)
    return [row for section in SECTIONS for row in section(res)]


def markdown(rows: list[Row], *, commit: str, date: str) -> str:
    """The README block: a note on where it came from, then the table."""
    mark = {True: "yes", False: "**no**", None: "-"}
    n_met = sum(r.met is True for r in rows)
    n_goal = sum(r.met is not None for r in rows)
    lines = [
        (
            f"Generated by `python jobs/bench_all.py` on {date} at commit {commit} from the result files under "
            f"`results/` (each row names its file). Goals met: {n_met} of {n_goal}."
        ),
        "",
        "| data | measure | msnoop | reference | goal | met | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.area, r.measure, r.msnoop, r.reference or "-", r.goal or "-", mark[r.met], r.source]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: str | Path, *, commit: str, date: str) -> Path:
    """The same rows as :func:`markdown`, one per line, with the date and commit on each (``met``: yes/no/-)."""
    import csv

    mark = {True: "yes", False: "no", None: "-"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "commit", "area", "measure", "msnoop", "reference", "goal", "met", "source"])
        for r in rows:
            w.writerow([date, commit, r.area, r.measure, r.msnoop, r.reference, r.goal, mark[r.met], r.source])
    return path


def replace_section(text: str, block: str) -> str:
    """``text`` with the part between the results markers replaced by ``block``.

    Raises:
        ValueError: The markers are missing or out of order.
    """
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"README has no results section: expected the lines {START} ... {END}")
    return text[: i + len(START)] + "\n" + block.strip() + "\n" + text[j:]
