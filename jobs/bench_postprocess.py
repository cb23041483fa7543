"""How should an embedding be post-processed before any distance? Declared arms, measured on every dev set.

    python jobs/bench_postprocess.py                       # embed (cached) + evaluate every dataset
    python jobs/bench_postprocess.py --stage embed         # only fill the cache of raw vectors
    python jobs/bench_postprocess.py --stage eval          # only evaluate from the cache

Arms (declared before any result; nothing below is tuned on labels):

* ``A raw``: Microsnoop's readout as shipped (per tile L2-normalised global average pool of the deepest
  map, tiles averaged per channel, channels concatenated), cosine.
* ``B0 pool-centred``: subtract a per-model centre ``mu`` (256-d) estimated on the unlabelled pretraining
  pool (one-channel images, same preprocessing), applied to every 256-d channel block; cosine.
* ``B pool-standardised``: ``(x - mu) / sd`` per 256-d block, ``mu``/``sd`` from the pool; cosine. A
  property of the model (could be stored in the checkpoint), no fit on the dataset.
* ``C dataset-standardised``: StandardScaler (mean/std per dimension) fitted on the dataset's own
  embeddings, no labels (pycytominer's ``normalize``, as the baselines); cosine. ``B then C`` equals ``C``
  exactly (both are per-dimension affine maps with positive scale), checked numerically at run time.
* ``D dataset PCA-whitened``: PCA with whitening fitted on the dataset's embeddings (no labels),
  ``min(64, N - 1)`` components (64 as the malaria pixel floor's PCA64); cosine.

Baselines (``msnoop bench``'s ``pixels_pca`` and ``intensity``, computed from the same files) are
reported as ``msnoop bench`` computes them and with ``C`` (StandardScaler) on top.

Protocols: yeast 11-NN leave-one-field-out (protein, localisation); hpa_toy 5-NN stratified 5-fold
(seed 0); malaria_nih 11-NN, 5 folds grouped by patient (``StratifiedGroupKFold(5, shuffle=True,
random_state=0)`` as the data README's ``baselines.py``), on a seeded label-stratified subset
(``--malaria-n``). Search and vote: ``msnoop.evaluate.knn`` (FAISS cosine, Microsnoop's vote).
Spread: 2.5-97.5 % bootstrap interval over cells of the balanced accuracy (``--bootstrap`` resamples of
the out-of-fold predictions) and a paired bootstrap interval of the difference to arm A of the same
model; malaria also per-fold mean +- sd. Collinearity: median cosine distance to the 10 nearest
neighbours and median pairwise cosine distance, per arm.

Embedding uses the library ``Embedder`` (no Ray: the same preprocessing and forward pass as the
pipeline, ``amp`` left at msnoop's default ``cuda``, i.e. float32 on CPU). Raw vectors are cached as
``.npy`` under ``--cache``; pool statistics are written to ``results/pool_stats_<model>.npz``.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harness import bootstrap_rows, data_dir, write_results

DATA = data_dir()
MODELS = ["default", "random:microsnoop_cnn:0"]
DATASETS = ["hpa_toy", "yeast", "malaria_nih"]
ARMS = ["A", "B0", "B", "C", "D"]
ARM_NAMES = {
    "A": "A raw",
    "B0": "B0 pool-centred",
    "B": "B pool-standardised",
    "C": "C dataset-standardised",
    "D": "D dataset PCA-whitened (64)",
}


def model_slug(model: str) -> str:
    return model.replace(":", "_")


# ----------------------------------------------------------------------------------------------- datasets
def stratified_subset(strata: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded subset of ``n`` rows, drawn in proportion to each stratum's size."""
    rng = np.random.default_rng(seed)
    keys, inv, counts = np.unique(strata, return_inverse=True, return_counts=True)
    quota = np.floor(counts * n / len(strata)).astype(int)
    for j in np.argsort(-(counts * n / len(strata) - quota))[: n - quota.sum()]:
        quota[j] += 1
    keep = [rng.choice(np.flatnonzero(inv == j), quota[j], replace=False) for j in range(len(keys))]
    return np.sort(np.concatenate(keep))


def dataset_table(
    name: str, data: Path, malaria_n: int, yeast_n: int = 0, seed: int = 0
) -> tuple[pd.DataFrame, list[str], dict]:
    """Image table (``Metadata_Path_<ch>`` + label columns), channel list and the evaluation protocol."""
    from msnoop.io.config import InputConfig
    from msnoop.io.manifest import load_image_table

    if name == "yeast":
        t = load_image_table(InputConfig(manifest=data / "yeast/yeast_labels.csv", channels=["gfp", "rfp"]))
        if yeast_n and yeast_n < len(t):  # seeded subset stratified by protein x field
            strata = (t["Metadata_protein"].astype(str) + "/" + t["Metadata_field"].astype(str)).to_numpy()
            t = t.iloc[stratified_subset(strata, yeast_n, seed)].reset_index(drop=True)
        tasks = [
            ("protein", "Metadata_protein", 11, "group:Metadata_field"),
            ("localisation", "Metadata_localization_yeastgfp", 11, "group:Metadata_field"),
        ]
        return t, ["gfp", "rfp"], {"tasks": tasks, "pixel_channels": ["gfp"]}
    if name == "hpa_toy":
        t = load_image_table(InputConfig(manifest=data / "hpa_toy/hpa_labels.csv", channels=["green", "blue", "red"]))
        return t, ["green", "blue", "red"], {"tasks": [("gene", "Metadata_gene", 5, "kfold:5")], "pixel_channels": None}
    if name == "malaria_nih":
        root = data / "malaria_nih"
        lab = pd.read_csv(root / "labels.csv")
        if malaria_n and malaria_n < len(lab):  # seeded subset stratified by label
            lab = lab.iloc[stratified_subset(lab["label"].astype(str).to_numpy(), malaria_n, seed)]
            lab = lab.reset_index(drop=True)
        t = pd.DataFrame({f"Metadata_Path_{ch}": [str(root / p) for p in lab[f"path_{ch}"]] for ch in "rgb"})
        for col in ("label", "patient", "slide", "image"):
            t[f"Metadata_{col}"] = lab[col].astype(str).to_numpy()
        return (
            t,
            ["r", "g", "b"],
            {"tasks": [("infection", "Metadata_label", 11, "sgkfold:5:Metadata_patient")], "pixel_channels": None},
        )
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def pool_sample(data: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` pretraining-pool files balanced over sources: each source shuffled (seeded), taken round-robin."""
    man = pd.read_csv(data / "pretrain/manifest.csv")
    rng = np.random.default_rng(seed)
    queues = {
        s: list(rng.permutation(np.flatnonzero(man["source"].to_numpy() == s))) for s in sorted(man["source"].unique())
    }
    picked: list[int] = []
    while len(picked) < n and any(queues.values()):
        for s in list(queues):
            if queues[s] and len(picked) < n:
                picked.append(int(queues[s].pop()))
    out = man.iloc[sorted(picked)].reset_index(drop=True)
    out["abs_path"] = [str(data / "pretrain" / p) for p in out["path"]]
    return out


# ----------------------------------------------------------------------------------------------- embedding
def load_embedder(model: str):
    """An in-process embedder of ``model`` with the preprocessing an embedding job's default section gives it."""
    from msnoop.embed.embedder import Embedder
    from msnoop.models.loading import load_for_embedding

    loaded, _ = load_for_embedding(model)
    return Embedder(loaded, batch_size=64)


def embed_cached(model: str, key: str, images: list[list[str]], cache: Path, chunk: int = 16) -> np.ndarray:
    """Embed images (each a list of channel file paths) with ``model``; ``[N, C * 256]`` float32.

    The vectors are cached as ``<cache>/<key>.npy``; progress is saved every ``8 * chunk`` images
    (``<key>.partial.npy``), so an interrupted run resumes where it stopped.
    """
    from msnoop.io.readers import read_image

    path = cache / f"{key}.npy"
    if path.exists():
        return np.load(path)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{key}.partial.npy"
    rows = [np.load(partial)] if partial.exists() else []
    done = len(rows[0]) if rows else 0
    emb = load_embedder(model)
    t0 = time.perf_counter()
    start = done
    while done < len(images):
        batch = [[read_image(f) for f in img] for img in images[done : done + chunk]]
        rows.append(emb.embed_images(batch))
        done += len(batch)
        if done % (chunk * 8) == 0 or done == len(images):
            np.save(partial, np.concatenate(rows))
            el = time.perf_counter() - t0
            print(
                f"  {key}: {done}/{len(images)} images, {el:.0f} s, eta {el / (done - start) * (len(images) - done):.0f} s",
                flush=True,
            )
    X = np.concatenate(rows).astype(np.float32)
    np.save(path, X)
    partial.unlink(missing_ok=True)
    return X


def dataset_key(model: str, dataset: str, table: pd.DataFrame) -> str:
    return f"{dataset}_{len(table)}_{model_slug(model)}"


def dataset_images(table: pd.DataFrame, channels: list[str]) -> list[list[str]]:
    return [[row[f"Metadata_Path_{ch}"] for ch in channels] for _, row in table.iterrows()]


def pool_key(model: str, pool: pd.DataFrame) -> str:
    return f"pool_{len(pool)}_{model_slug(model)}"


def pool_stats(V: np.ndarray, pool: pd.DataFrame, model: str, results: Path) -> dict[str, np.ndarray]:
    """Mean and sd per dimension of the 256-d one-channel readout ``V [n_pool, 256]``; written to npz.

    Sources weigh equally (the sample is balanced, but small sources run out): weights ``1 / n_source``.
    """
    src = pool["source"].to_numpy()
    w = np.array([1.0 / (src == s).sum() for s in src])
    w /= w.sum()
    mu = (w[:, None] * V).sum(0)
    sd = np.sqrt((w[:, None] * (V - mu) ** 2).sum(0))
    sd = np.where(sd > 1e-8, sd, 1.0)
    stats = {
        "mean": mu.astype(np.float32),
        "scale": sd.astype(np.float32),
        "n_images": np.array(len(pool)),
        "sources": np.array(sorted(set(src))),
    }
    results.mkdir(parents=True, exist_ok=True)
    np.savez(results / f"pool_stats_{model_slug(model)}.npz", **stats)
    return stats


# ----------------------------------------------------------------------------------------------- arms
def apply_arm(arm: str, X: np.ndarray, stats: dict | None, block: int = 256) -> np.ndarray:
    """Post-process ``[N, C * block]`` embeddings with one declared arm (see module docstring)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    X = X.astype(np.float64)
    if arm == "A":
        return X
    if arm in ("B0", "B"):
        c = X.shape[1] // block
        mu = np.tile(stats["mean"], c)
        Y = X - mu
        if arm == "B":
            Y = Y / np.tile(stats["scale"], c)
        return Y
    if arm == "C":
        return StandardScaler().fit_transform(X)
    if arm == "D":
        n = min(64, X.shape[0] - 1, X.shape[1])
        return PCA(n_components=n, whiten=True, random_state=0).fit_transform(X)
    raise ValueError(arm)


# ----------------------------------------------------------------------------------------------- evaluation
def cross_predict(X: np.ndarray, labels: np.ndarray, k: int, cv: str, meta: pd.DataFrame):
    """Out-of-fold predictions and the fold of every row."""
    from msnoop.evaluate.knn import encode_labels, knn_cross_predict, knn_predict

    if cv.startswith("sgkfold:"):
        from sklearn.model_selection import StratifiedGroupKFold

        _, n, col = cv.split(":")
        classes, codes = encode_labels(labels)
        pred = np.empty(len(X), dtype=np.int64)
        fold = np.empty(len(X), dtype=np.int64)
        skf = StratifiedGroupKFold(int(n), shuffle=True, random_state=0)
        for f, (tr, te) in enumerate(skf.split(X, codes, meta[col].to_numpy())):
            pred[te] = knn_predict(X[tr], codes[tr], X[te], k=k, metric="cosine", n_classes=len(classes))
            fold[te] = f
        return classes[pred], fold
    groups = meta[cv.split(":", 1)[1]].astype(str).to_numpy() if cv.startswith("group:") else None
    pred = knn_cross_predict(X, labels, k=k, cv=cv, groups=groups, metric="cosine", seed=0)
    return pred, None


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, p))


def nn_cosine(X: np.ndarray, k: int = 10) -> dict[str, float]:
    """Median cosine distance to the ``k`` nearest other rows, and median pairwise cosine distance."""
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    D = 1.0 - Z @ Z.T
    np.fill_diagonal(D, np.inf)
    nn = np.sort(D, axis=1)[:, :k]
    iu = np.triu_indices(len(X), 1)
    return {"median_nn10_cosdist": float(np.median(nn)), "median_pair_cosdist": float(np.median(D[iu]))}


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--malaria-n", type=int, default=300, help="seeded label-stratified subset (0 = all 2,000)")
    ap.add_argument(
        "--yeast-n", type=int, default=600, help="seeded subset stratified by protein x field (0 = all 1,642)"
    )
    ap.add_argument("--pool-n", type=int, default=300, help="pretraining-pool images, balanced over sources")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/msnoop_postproc_cache"))
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", default="results/bench_postprocess")
    ap.add_argument("--stage", choices=["embed", "eval", "all"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    pool = pool_sample(args.data, args.pool_n)
    tables = {d: dataset_table(d, args.data, args.malaria_n, args.yeast_n) for d in args.datasets}
    # embedding order (CPU is scarce: what matters most first): the small set, then each model over the
    # dev sets, then the pool sample of the models whose pool vectors are not cached yet
    jobs: list[tuple[str, str, list[list[str]]]] = []
    pool_images = [[p] for p in pool["abs_path"]]
    jobs.append((args.models[0], pool_key(args.models[0], pool), pool_images))
    for d in ("hpa_toy",):
        if d in tables:
            jobs += [(m, dataset_key(m, d, tables[d][0]), dataset_images(*tables[d][:2])) for m in args.models]
    for m in args.models:
        jobs += [(m, dataset_key(m, d, t), dataset_images(t, ch)) for d, (t, ch, _) in tables.items() if d != "hpa_toy"]
    jobs += [(m, pool_key(m, pool), pool_images) for m in args.models[1:]]
    if args.stage != "eval":
        for m, key, images in jobs:
            print(f"embedding {key}: {len(images)} images x {len(images[0])} channels", flush=True)
            embed_cached(m, key, images, args.cache)
        print(f"embedded in {time.perf_counter() - t_start:.0f} s", flush=True)
        if args.stage == "embed":
            return
    stats, raw, missing = {}, {}, []
    for m in args.models:
        if (args.cache / f"{pool_key(m, pool)}.npy").exists():
            stats[m] = pool_stats(np.load(args.cache / f"{pool_key(m, pool)}.npy"), pool, m, args.results)
        else:
            missing.append(pool_key(m, pool))
        for d, (t, _, _) in tables.items():
            f = args.cache / f"{dataset_key(m, d, t)}.npy"
            if f.exists():
                raw[d, m] = np.load(f)
            else:
                missing.append(dataset_key(m, d, t))
    if missing:
        print(f"not embedded (rows left out): {missing}", flush=True)

    from sklearn.preprocessing import StandardScaler

    from msnoop.evaluate.baselines import intensity_features, pixels_pca

    rows, centres = [], []
    for (d, m), X in raw.items():  # does the pool centre match the dataset's own centre, per channel block?
        ch = tables[d][1]
        for c, name in enumerate(ch):
            B = X[:, c * 256 : (c + 1) * 256].astype(np.float64)
            mu_d = B.mean(0)
            entry = {
                "dataset": d,
                "model": m,
                "channel": name,
                "norm_dataset_mean": float(np.linalg.norm(mu_d)),  # vectors are unit norm: 1 = all identical
                "median_norm": float(np.median(np.linalg.norm(B, axis=1))),
            }
            if m in stats:
                mu_p = stats[m]["mean"].astype(np.float64)
                entry["cos_dataset_mean_pool_mean"] = float(mu_d @ mu_p / np.linalg.norm(mu_d) / np.linalg.norm(mu_p))
                entry["norm_dataset_mean_minus_pool_mean"] = float(np.linalg.norm(mu_d - mu_p))
                entry["median_abs_z_of_dataset_mean"] = float(np.median(np.abs((mu_d - mu_p) / stats[m]["scale"])))
            centres.append(entry)
            print("centre", entry, flush=True)
    for d, (table, channels, proto) in tables.items():
        feats: list[tuple[str, str, str, np.ndarray]] = []  # (features, arm, kind, X)
        for m in args.models:
            if (d, m) not in raw:
                continue
            X = raw[d, m]
            if m in stats:
                bc = StandardScaler().fit_transform(apply_arm("B", X, stats[m]))
                assert np.allclose(bc, apply_arm("C", X, None), atol=1e-6), "B then C should equal C"
            for arm in ARMS:
                if arm.startswith("B") and m not in stats:
                    continue
                feats.append((m, arm, "embedding", apply_arm(arm, X, stats.get(m))))
        pix = pixels_pca(table, proto["pixel_channels"] or channels)
        inten = intensity_features(table, channels)
        pname = f"pixels PCA32 ({'+'.join(proto['pixel_channels'] or channels)})"
        for name, X in ((pname, pix), ("intensity statistics", inten)):
            feats.append((name, "as bench", "baseline", X.astype(np.float64)))
            feats.append((name, "C", "baseline", StandardScaler().fit_transform(X)))
        for tname, col, k, cv in proto["tasks"]:
            y = table[col].astype(str).to_numpy()
            boots = bootstrap_rows(len(y), args.bootstrap, seed=0)
            preds = {}
            for name, arm, kind, X in feats:
                p, fold = cross_predict(X.astype(np.float32), y, k, cv, table)
                preds[name, arm] = p
                correct_ba = balanced_accuracy(y, p)
                bs = np.array([balanced_accuracy(y[b], p[b]) for b in boots])
                row = {
                    "dataset": d,
                    "task": tname,
                    "protocol": f"{k}-NN cosine, cv {cv}, n={len(y)}",
                    "features": name,
                    "kind": kind,
                    "arm": arm,
                    "dim": int(X.shape[1]),
                    "balanced_accuracy": correct_ba,
                    "ci95": [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))],
                    "chance": 1.0 / len(np.unique(y)),
                }
                if fold is not None:
                    per = [balanced_accuracy(y[fold == f], p[fold == f]) for f in np.unique(fold)]
                    row["per_fold_mean"] = float(np.mean(per))
                    row["per_fold_sd"] = float(np.std(per))
                ref = "A" if kind == "embedding" else "as bench"
                if arm != ref and (name, ref) in preds:
                    pa = preds[name, ref]
                    diff = np.array([balanced_accuracy(y[b], p[b]) - balanced_accuracy(y[b], pa[b]) for b in boots])
                    row["diff_vs_A"] = correct_ba - balanced_accuracy(y, pa)
                    row["diff_vs_A_ci95"] = [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]
                if tname == proto["tasks"][0][0]:
                    row.update(nn_cosine(X))
                rows.append(row)
                print(
                    f"{d:12s} {tname:13s} {name:26s} {arm:9s} bal.acc {correct_ba:.3f} "
                    f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]",
                    flush=True,
                )
    record = {
        "issue": 19,
        "arms": ARM_NAMES,
        "models": args.models,
        "malaria_n": args.malaria_n,
        "yeast_n": args.yeast_n,
        "pool_n": len(pool),
        "not_embedded": missing,
        "pool_sources": pool["source"].value_counts().to_dict(),
        "bootstrap": args.bootstrap,
        "embedding": "msnoop.embed.embedder.Embedder (no Ray), float32 on CPU, stored/default preprocessing",
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
        "centres": centres,
    }
    from msnoop.core.runtime import provenance

    record["provenance"] = provenance()
    write_results(args.out, record, markdown(record))
    print(markdown(record))


def _fmt(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def markdown(record: dict) -> str:
    lines = [
        "# Post-processing of embeddings before the distance",
        "",
        "Arms: " + "; ".join(f"**{k}** = {v}" for k, v in record["arms"].items()) + ".",
        (
            f"Balanced accuracy with a 95 % bootstrap interval over cells ({record['bootstrap']} resamples); "
            "`diff vs A`: paired bootstrap of the difference to arm A of the same model (for a baseline: to the baseline as `msnoop bench` computes it); "
            "`NN10 cos`: median cosine distance to the 10 nearest neighbours; `pair cos`: median pairwise cosine distance. "
            f"malaria_nih: {record['malaria_n']} cells (seeded label-stratified subset), per-fold mean +- sd as well; "
            f"yeast: {record['yeast_n'] or 'all'} cells (seeded subset stratified by protein x field; 0 = all 1,642)."
        ),
        "",
        "| dataset | task | features | arm | dim | bal. acc. [95 % CI] | per-fold | diff vs A [95 % CI] | NN10 cos | pair cos |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        ci = f"{r['balanced_accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        pf = f"{r['per_fold_mean']:.3f} +- {r['per_fold_sd']:.3f}" if "per_fold_mean" in r else ""
        dv = (
            f"{r['diff_vs_A']:+.3f} [{r['diff_vs_A_ci95'][0]:+.3f}, {r['diff_vs_A_ci95'][1]:+.3f}]"
            if "diff_vs_A" in r
            else ""
        )
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['features']} | {r['arm']} | {r['dim']} | {ci} | {pf} | {dv} | "
            f"{_fmt(r.get('median_nn10_cosdist'))} | {_fmt(r.get('median_pair_cosdist'))} |"
        )
    lines += [
        "",
        (
            "Centres per 256-d channel block (rows are unit vectors: a norm of the mean near 1 means nearly collinear"
            " rows; pool = the model's pool statistics):"
        ),
        "",
        (
            "| dataset | model | channel | norm of dataset mean | cos(dataset mean, pool mean) | norm(dataset mean - pool mean)"
            " | median abs z of dataset mean under pool stats |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for c in record.get("centres", []):
        lines.append(
            f"| {c['dataset']} | {c['model']} | {c['channel']} | {_fmt(c['norm_dataset_mean'])} | "
            f"{_fmt(c.get('cos_dataset_mean_pool_mean'))} | {_fmt(c.get('norm_dataset_mean_minus_pool_mean'))} | "
            f"{_fmt(c.get('median_abs_z_of_dataset_mean'))} |"
        )
    if record.get("not_embedded"):
        lines.append("")
        lines.append(f"Not embedded in this run (their rows are absent): {', '.join(record['not_embedded'])}.")
    lines.append("")
    lines.append(f"Run time {record['seconds']:.0f} s. {record['embedding']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
