"""An HTML report on an embedding (or profile) table: 2-D map, kNN confusion matrix, neighbour galleries.

:func:`build_report` writes ``report.html`` and, beside it, the PNG figures it shows and
``report.json`` (the numbers). The page has no external resources other than those PNGs.

* **Map**: rows L2-normalised (``metric="cosine"``), then ``map_method``: ``"tsne"`` (PCA to 50 dimensions,
  then scikit-learn's t-SNE), ``"umap"`` (umap-learn, cosine metric on the normalised rows, PCA to 50
  dimensions first), ``"pca"`` (first two principal components, their share of the variance on the axes) or
  ``"auto"``: t-SNE up to :data:`TSNE_MAX_ROWS` rows, UMAP (when umap-learn is installed; else t-SNE to 5,000
  rows) up to :data:`UMAP_MAX_ROWS`, PCA beyond. Below :data:`TSNE_MAX_ROWS` rows t-SNE is kept because UMAP's
  first fit in a process compiles its code (measured on 2 busy cores: 7 s import and 25 s for 60 rows, against
  0.1 s for t-SNE); ``--map umap`` asks for it anyway. Axes
  are named after the method ("UMAP 1", "PCA 1 (12.3 % var)"); coloured by ``label``, and in a second panel
  by ``batch`` when given.
* **kNN**: :func:`msnoop.evaluate.knn.knn_cross_predict` (Microsnoop vote) +
  :func:`~msnoop.evaluate.knn.classification_metrics`: the metrics table, the row-normalised confusion
  matrix (its title names k and the protocol: leave-one-out, stratified k-fold, leave-group-out by a
  column) and the per-class accuracy.
* **Galleries**: for ``n_queries`` random rows, the query image and its ``n_neighbours`` nearest rows
  (same metric, the query itself excluded), read from the ``Metadata_Path_<channel>`` columns, each channel
  scaled between its 1st and 99.8th percentiles and coloured by its name (:func:`channel_colours`: DNA, DAPI,
  Hoechst blue; GFP, FITC green; RFP, mCherry magenta; a single channel grey), with the colour key drawn on
  the figure. A neighbour whose label matches the query's is marked with a tick and a solid frame, a
  different one with a cross and a dashed frame (Okabe-Ito blue and vermillion: not told apart by red/green
  alone). Rows of a cell table (``Metadata_CentroidY``/``X``) show a window around the cell. Tables without
  path columns (CellProfiler profiles) get a note instead.
* **Segmentation** (cells-mode embed outputs): a few images' nucleus channel with the outlines of the nuclei
  found (the run's saved masks, else its segmentation run again) and the cells that were embedded marked.

Figures are drawn on their own Agg canvases (:mod:`msnoop.core.plotting`), so pyplot's backend is left alone.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msnoop.core import storage as st
from msnoop.core.plotting import save, subplots
from msnoop.core.tables import read_table
from msnoop.evaluate.features import table_features, table_postprocess
from msnoop.evaluate.knn import classification_metrics, cv_groups, knn_cross_predict, knn_search, parse_cv
from msnoop.vectors.distance import normalize_rows, similarity_to_distance

logger = logging.getLogger(__name__)

PATH_PREFIX = "Metadata_Path_"
#: ``map_method="auto"`` uses t-SNE up to this many rows (UMAP's start-up costs more than it saves below).
TSNE_MAX_ROWS = 2000
#: Without umap-learn, ``"auto"`` keeps t-SNE up to this many rows.
TSNE_FALLBACK_ROWS = 5000
#: ``map_method="auto"`` uses UMAP from :data:`TSNE_MAX_ROWS` up to this many rows, PCA beyond.
UMAP_MAX_ROWS = 100_000
MAP_METHODS = ("auto", "tsne", "umap", "pca")
#: Fewest significant digits of a neighbour distance in the galleries (more where neighbours would tie).
DISTANCE_DIGITS = 4
#: At most this many points are drawn on the map (a random subset beyond it).
MAP_MAX_POINTS = 50_000
THUMB = 128
_CENTROID = ("Metadata_CentroidY", "Metadata_CentroidX")


#: Below this many rows the numerical work runs on one thread: parallel start-up costs more than it
#: saves, and OpenMP workers spinning on a busy machine made a 60-row t-SNE take 10-20 s instead of 0.1 s.
SINGLE_THREAD_ROWS = 2000


def _threads_for(n_rows: int) -> Any:
    """Context limiting BLAS/OpenMP (scikit-learn, FAISS) to one thread for small tables."""
    from contextlib import nullcontext

    if n_rows >= SINGLE_THREAD_ROWS:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


#: Okabe & Ito's colour-blind-safe palette (black left out: the map's background is white).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")
#: Marker shapes cycled with the colours, so classes differ in shape too.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: Gallery marks: a neighbour with the query's label, and one with another label.
SAME, DIFFERENT = ("\u2713", OKABE_ITO[4], "solid"), ("\u2717", OKABE_ITO[5], "dashed")


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


@dataclass(frozen=True)
class Map2D:
    """2-D coordinates of a table's rows with what a reader needs to know about them.

    Attributes:
        xy: ``[N, 2]`` coordinates.
        method: ``"t-SNE"``, ``"UMAP"``, ``"PCA"`` or ``"features"`` (too few rows/features to reduce).
        axes: The two axis labels, e.g. ``("UMAP 1", "UMAP 2")`` or ``("PCA 1 (12.3 % var)", ...)``.
        caption: A sentence saying how the map was computed.
    """

    xy: np.ndarray
    method: str
    axes: tuple[str, str]
    caption: str


def map_2d(X: np.ndarray, *, seed: int = 0, metric: str = "cosine", method: str = "auto") -> Map2D:
    """2-D map of the rows of ``X`` by t-SNE, UMAP or PCA (see the module docstring for ``"auto"``).

    t-SNE: PCA to ``min(50, D, N)`` dimensions, perplexity ``min(30, (N - 1) / 3)``. UMAP (umap-learn):
    PCA to ``min(50, D, N - 1)`` dimensions, ``n_neighbors = min(15, N - 1)``, ``min_dist=0.1``, cosine metric
    when ``metric="cosine"``. PCA: the first two principal components.

    Args:
        X: ``[N, D]`` features.
        seed: Random state of PCA, t-SNE and UMAP.
        metric: ``"cosine"`` (rows L2-normalised first) or ``"l2"``.
        method: ``"auto"``, ``"tsne"``, ``"umap"`` or ``"pca"``.

    Raises:
        ValueError: Unknown ``method``.
    """
    from sklearn.decomposition import PCA

    if method not in MAP_METHODS:
        raise ValueError(f"expected map method one of {MAP_METHODS}, found {method!r}")
    Z = normalize_rows(X) if metric == "cosine" else np.asarray(X, dtype=np.float32)
    prefix = "rows L2-normalised, " if metric == "cosine" else ""
    n, d = Z.shape
    if n < 3 or d < 2:
        pad = np.zeros((n, 2), dtype=np.float32)
        pad[:, : min(d, 2)] = Z[:, :2]
        return Map2D(
            pad, "features", ("feature 1", "feature 2"), f"{prefix}first two features (too few rows or features)"
        )
    if method == "auto":
        method = "tsne" if n <= TSNE_MAX_ROWS else "umap" if n <= UMAP_MAX_ROWS else "pca"
        if method == "umap" and not _umap_installed():
            method = "tsne" if n <= TSNE_FALLBACK_ROWS else "pca"
        why = (
            f"; auto: t-SNE up to {TSNE_MAX_ROWS:,} rows, UMAP up to {UMAP_MAX_ROWS:,}, PCA beyond"
            if method != "tsne"
            else ""
        )
    else:
        why = ""
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(Z)
        ev = pca.explained_variance_ratio_ * 100
        axes = (f"PCA 1 ({ev[0]:.1f} % var)", f"PCA 2 ({ev[1]:.1f} % var)")
        return Map2D(
            pca.transform(Z),
            "PCA",
            axes,
            f"{prefix}PCA: first two principal components ({ev[0]:.1f} % and {ev[1]:.1f} % of the variance){why}",
        )
    m = min(50, d, n - 1)
    with _threads_for(n):
        Zp = PCA(n_components=m, random_state=seed).fit_transform(Z) if m < d else Z
        reduced = f"PCA to {m} dimensions, then " if m < d else ""
        if method == "tsne":
            from sklearn.manifold import TSNE

            perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
            xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(Zp)
            how = f"{reduced}t-SNE (perplexity {perplexity:g}, seed {seed})"
            return Map2D(xy, "t-SNE", ("t-SNE 1", "t-SNE 2"), f"{prefix}{how}{why}")
        import umap

        nn = int(min(15, n - 1))
        dist = "cosine" if metric == "cosine" else "euclidean"
        model = umap.UMAP(n_components=2, n_neighbors=nn, min_dist=0.1, metric=dist, random_state=seed, n_jobs=1)
        xy = model.fit_transform(np.ascontiguousarray(Zp, dtype=np.float32))
    how = f"{reduced}UMAP ({dist}, n_neighbors {nn}, min_dist 0.1, seed {seed})"
    return Map2D(np.asarray(xy), "UMAP", ("UMAP 1", "UMAP 2"), f"{prefix}{how}{why}")


def _umap_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def embed_2d(X: np.ndarray, *, seed: int = 0, metric: str = "cosine", method: str = "auto") -> tuple[np.ndarray, str]:
    """``(xy, caption)`` of :func:`map_2d`: ``[N, 2]`` coordinates and how they were computed."""
    m = map_2d(X, seed=seed, metric=metric, method=method)
    return m.xy, m.caption


def _scatter(ax: Any, xy: np.ndarray, values: pd.Series, title: str, axes: tuple[str, str]) -> None:
    cats = pd.Series(values).astype(str).to_numpy()
    names, codes = np.unique(cats, return_inverse=True)
    cols = _colours(len(names))
    size = float(np.clip(3000 / max(len(xy), 1), 1, 30))
    for i, name in enumerate(names):
        sel = codes == i
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            s=size,
            color=cols[i],
            marker=MARKERS[i % len(MARKERS)],
            label=f"{name} ({int(sel.sum())})",
            alpha=0.8,
            linewidths=0,
        )
    ax.set_title(title)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_xticks([])
    ax.set_yticks([])
    if len(names) <= 25:
        ax.legend(
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=8,
            markerscale=max(1.0, 6 / math.sqrt(size)),
            frameon=False,
        )


def plot_map(
    xy: np.ndarray | Map2D, df: pd.DataFrame, label: str, batch: str | None, path: Path, seed: int = 0
) -> Path:
    """Scatter of the map coloured by ``label`` (and by ``batch`` in a second panel); method and axes labelled."""
    m = xy if isinstance(xy, Map2D) else Map2D(np.asarray(xy), "2-D map", ("dimension 1", "dimension 2"), "")
    xy = m.xy
    idx = np.arange(len(xy))
    if len(idx) > MAP_MAX_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), MAP_MAX_POINTS, replace=False))
    cols = [c for c in (label, batch) if c]
    fig, axes = subplots(1, len(cols), figsize=(6.5 * len(cols), 5.2), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        _scatter(ax, xy[idx], df[col].iloc[idx], f"{m.method}, coloured by {col}", m.axes)
    return save(fig, path, dpi=110)


def describe_cv(cv: str) -> str:
    """Readable name of a cross-validation protocol: ``"loo"`` -> ``"leave-one-out (LOO)"``,
    ``"kfold:5"`` -> ``"stratified 5-fold"``, ``"group:Metadata_Plate"`` -> ``"leave-group-out by Metadata_Plate"``.

    Raises:
        ValueError: ``cv`` is not a protocol :func:`msnoop.evaluate.knn.parse_cv` accepts.
    """
    kind, arg = parse_cv(cv)
    if kind == "loo":
        return "leave-one-out (LOO)"
    if kind == "kfold":
        return f"stratified {arg}-fold"
    return f"leave-group-out by {arg}" if arg else "leave-group-out"


def format_distances(values: Sequence[float], digits: int = DISTANCE_DIGITS) -> list[str]:
    """Distances as text with at least ``digits`` significant digits, more until different values print
    differently (up to 9; float32 distances hold about 7).

    Args:
        values: Distances (any finite floats; tiny ones print in scientific notation, e.g. ``1.953e-04``).
        digits: Fewest significant digits.

    Returns:
        One string per value.
    """
    vals = [float(v) for v in values]
    n_distinct = len(set(vals))
    for p in range(digits, 10):
        out = [_sig(v, p) for v in vals]
        if len(set(out)) == n_distinct:
            return out
    return [repr(v) for v in vals]


def _sig(v: float, p: int) -> str:
    """``v`` with ``p`` significant digits, plain for 1e-3 <= |v| < 1e4, scientific otherwise."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        decimals = max(p - 1 - math.floor(math.log10(abs(v))), 0)
        return f"{v:.{decimals}f}"
    return f"{v:.{p - 1}e}"


def plot_confusion(metrics: dict[str, Any], path: Path, counts: dict[str, int]) -> Path:
    """Row-normalised confusion matrix (rows true, columns predicted) with per-class accuracy bars."""
    labels = metrics["labels"]
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    c = len(labels)
    side = float(np.clip(2.5 + 0.45 * c, 4.5, 22))
    fig, (ax, bx) = subplots(1, 2, figsize=(side + 3.5, side), gridspec_kw={"width_ratios": [side, 3.0]})
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    fs = 9 if c <= 15 else 7 if c <= 30 else 5
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=fs)
    ax.set_yticklabels(labels, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(cm[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=fs - 1,
                        color="white" if frac[i, j] > 0.55 else "black",
                    )
    k = f"k={metrics['k']}, " if "k" in metrics else ""
    protocol = describe_cv(metrics["cv"]) if "cv" in metrics else "protocol not given"
    ax.set_title(f"kNN confusion ({k}{protocol})\nrow-normalised; accuracy {metrics['accuracy']:.3f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    acc = [metrics["per_class_accuracy"].get(name, 0.0) for name in labels]
    bx.barh(range(c), acc, color="#4c72b0")
    bx.set_yticks(range(c))
    bx.set_yticklabels([f"{name} (n={counts.get(name, 0)})" for name in labels], fontsize=fs)
    bx.set_ylim(c - 0.5, -0.5)
    bx.set_xlim(0, 1)
    bx.axvline(1 / max(c, 1), color="grey", ls="--", lw=1, label="chance")
    bx.set_title("per-class accuracy")
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), fontsize=8, frameon=False)
    for i, a in enumerate(acc):
        inside = a > 0.2
        bx.text(
            a - 0.02 if inside else a + 0.02,
            i,
            f"{a:.2f}",
            va="center",
            ha="right" if inside else "left",
            fontsize=fs,
            color="white" if inside else "black",
        )
    return save(fig, path, dpi=110)


def path_columns(df: pd.DataFrame) -> list[str]:
    """``Metadata_Path_<channel>`` columns, in table order."""
    return [str(c) for c in df.columns if str(c).startswith(PATH_PREFIX)]


def _percentile_scale(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1.0, 99.8])
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


def _downsample(img: np.ndarray, size: int = THUMB * 2) -> np.ndarray:
    step = math.ceil(max(img.shape) / size)
    return img[::step, ::step] if step > 1 else img


def _window(img: np.ndarray, row: pd.Series) -> np.ndarray:
    """A window around the cell centroid of a cell-table row (else the whole image)."""
    if not all(c in row.index and pd.notna(row[c]) for c in _CENTROID):
        return img
    area = float(row["Metadata_Area"]) if "Metadata_Area" in row.index and pd.notna(row.get("Metadata_Area")) else 400.0
    half = int(np.clip(2.0 * math.sqrt(max(area, 1.0)), 16, 256))
    cy, cx = round(float(row[_CENTROID[0]])), round(float(row[_CENTROID[1]]))
    return img[max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half]


#: Composite colours (RGB weights) by name.
COLOURS: dict[str, tuple[float, float, float]] = {
    "blue": (0.0, 0.45, 1.0),  # a lighter blue than (0, 0, 1), which is too dark on black
    "green": (0.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "grey": (1.0, 1.0, 1.0),
}
#: A channel's colour by its name (a regular expression on the lower-cased name, first match wins).
CHANNEL_COLOURS: tuple[tuple[str, str], ...] = (
    (r"dna|dapi|hoechst|nucle|h2b|draq|blue", "blue"),
    (r"gfp|fitc|488|green|venus|yfp", "green"),
    (r"rfp|mcherry|tomato|tritc|cy3|568|594|red|scarlet", "magenta"),
)
#: Colours of the channels that no name rule matches, in order (distinct on black, colour-blind safe together).
_FREE_COLOURS = ("green", "magenta", "cyan", "yellow", "blue")


def channel_colours(channels: Sequence[str]) -> list[str]:
    """Colour names (keys of :data:`COLOURS`) for up to three channels, chosen by their names.

    A single channel is grey. Otherwise each channel whose name matches a rule of :data:`CHANNEL_COLOURS` gets
    that colour (DNA/DAPI/Hoechst blue, GFP/FITC green, RFP/mCherry magenta) unless an earlier channel took it;
    the others take the first free colour of green, magenta, cyan, yellow, blue. Channels are named as in the
    table's ``Metadata_Path_<channel>`` columns (with or without the prefix).
    """
    import re

    names = [str(c)[len(PATH_PREFIX) :] if str(c).startswith(PATH_PREFIX) else str(c) for c in channels]
    if len(names) == 1:
        return ["grey"]
    taken: list[str | None] = []
    for name in names:
        match = next((c for pattern, c in CHANNEL_COLOURS if re.search(pattern, name.lower())), None)
        taken.append(match if match not in taken else None)
    free = iter(c for c in _FREE_COLOURS if c not in taken)
    return [c if c is not None else next(free) for c in taken]


def thumbnail(row: pd.Series, columns: Sequence[str], *, root: Path | None = None) -> np.ndarray:
    """``[H, W, 3]`` float image of one row: up to 3 channels composited in the colours of
    :func:`channel_colours`, each percentile-scaled.

    Raises:
        msnoop.io.readers.ImageReadError: A file is missing or unreadable.
    """
    from msnoop.io.readers import read_image

    cols = list(columns)[:3]
    weights = [COLOURS[c] for c in channel_colours(cols)]
    planes = []
    for col in cols:
        p = Path(str(row[col]))
        if root is not None and not p.is_absolute():
            p = root / p
        planes.append(_downsample(_window(read_image(p), row)))
    h = min(pl.shape[0] for pl in planes)
    w = min(pl.shape[1] for pl in planes)
    rgb = np.zeros((h, w, 3), dtype=np.float32)
    for pl, wt in zip(planes, weights, strict=True):
        rgb += _percentile_scale(pl[:h, :w])[..., None] * np.asarray(wt, dtype=np.float32)
    return np.clip(rgb, 0, 1)


def channel_legend(columns: Sequence[str]) -> str:
    """How a gallery composites the channels of ``columns`` (``Metadata_Path_<channel>``), e.g. ``"dna = blue,
    gfp = green"``; at most three channels are shown."""
    cols = list(columns)[:3]
    return ", ".join(f"{c[len(PATH_PREFIX) :]} = {name}" for c, name in zip(cols, channel_colours(cols), strict=True))


def _gallery_key(fig: Any, columns: Sequence[str], label: str) -> None:
    """The colour key of the channels and the meaning of the marks, drawn above the gallery."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cols = list(columns)[:3]
    handles = [
        Patch(facecolor=COLOURS[c], edgecolor="black", label=f"{name[len(PATH_PREFIX) :]} ({c})")
        for name, c in zip(cols, channel_colours(cols), strict=True)
    ]
    handles += [
        Line2D([], [], color=colour, ls=style, lw=2, label=f"{mark} {what} {label}")
        for (mark, colour, style), what in ((SAME, "same"), (DIFFERENT, "other"))
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)


def plot_galleries(
    df: pd.DataFrame,
    X: np.ndarray,
    label: str,
    columns: Sequence[str],
    path: Path,
    *,
    n_queries: int,
    n_neighbours: int,
    metric: str,
    seed: int,
    root: Path | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """One figure row per random query: the query image and its nearest neighbours' images.

    Returns:
        ``(path, records)``: one record per query; if some images could not be read, a last record
        ``{"unreadable": [messages]}`` (their cells show "image unreadable").
    """
    n = len(df)
    nq = min(n_queries, n)
    nn = min(n_neighbours, n - 1)
    queries = np.sort(np.random.default_rng(seed).choice(n, nq, replace=False))
    scores, idx = knn_search(X, X[queries], nn + 1, metric=metric)  # type: ignore[arg-type]
    fig, axes = subplots(nq, nn + 1, figsize=(1.9 * (nn + 1), 2.25 * nq), squeeze=False)
    labels = df[label].astype(str).to_numpy()
    id_col = "Metadata_ImageID" if "Metadata_ImageID" in df.columns else None
    records: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for r, q in enumerate(queries):
        keep = [(int(j), float(s)) for j, s in zip(idx[r], scores[r], strict=True) if j != q][:nn]
        cells = [(int(q), None)] + [(j, similarity_to_distance(s, metric)) for j, s in keep]
        shown = dict(zip(range(1, len(cells)), format_distances([c[1] for c in cells[1:]]), strict=True))
        rec = {"query": str(df[id_col].iloc[q]) if id_col else int(q), "label": labels[q], "neighbours": []}
        for c, (j, dist) in enumerate(cells):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            try:
                ax.imshow(thumbnail(df.iloc[j], columns, root=root), interpolation="nearest")
            except (OSError, ValueError) as exc:  # ImageReadError is a ValueError
                ax.set_facecolor("#dddddd")
                ax.text(0.5, 0.5, "image\nunreadable", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                logger.warning("gallery: %s", exc)
                unreadable.append(str(exc))
            if dist is None:
                ax.set_title(f"query\n{labels[j]}", fontsize=8, fontweight="bold")
                for spine in ax.spines.values():
                    spine.set_edgecolor("black")
                    spine.set_linewidth(2.5)
            else:
                mark, colour, style = SAME if labels[j] == labels[q] else DIFFERENT
                ax.set_title(f"#{c} {mark} {labels[j]}\nd={shown[c]}", fontsize=8, color=colour)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linestyle(style)
                    spine.set_linewidth(2)
                rec["neighbours"].append(
                    {"row": str(df[id_col].iloc[j]) if id_col else j, "label": labels[j], "distance": float(dist)}
                )
        records.append(rec)
    _gallery_key(fig, columns, label)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the key above the rows
    fig.savefig(path, dpi=100)
    if unreadable:
        records.append({"unreadable": unreadable})
    return path, records


#: Colours of the segmentation overlay: nucleus outlines, and the centres of the cells that were embedded.
OUTLINE, EMBEDDED = OKABE_ITO[1], OKABE_ITO[0]


def _labels_of(row: pd.Series, image: np.ndarray, cells_info: dict[str, Any], masks_dir: Path | None) -> np.ndarray:
    """An image's nucleus labels: its saved mask, its mask file (backend ``mask``), else its segmentation again."""
    from msnoop.embed.cells import saved_mask_path
    from msnoop.io.readers import read_labels
    from msnoop.segment.config import SegmentationConfig

    seg = SegmentationConfig(**cells_info["segmentation"])
    saved = saved_mask_path(masks_dir, str(row["Metadata_ImageID"])) if masks_dir is not None else None
    if saved is not None and saved.is_file():
        return read_labels(saved)
    if seg.backend == "mask":
        return read_labels(str(row[seg.mask_column]))
    return np.asarray(seg.run(image))


def plot_segmentation(
    images: pd.DataFrame,
    cells: pd.DataFrame,
    cells_info: dict[str, Any],
    path: Path,
    *,
    masks_dir: Path | None = None,
    n_images: int = 3,
    seed: int = 0,
) -> tuple[Path, list[dict[str, Any]]]:
    """One panel per image of a cells-mode run: the nucleus channel (grey), the nuclei outlines, the cells embedded.

    Args:
        images: The run's image rows (``Metadata_ImageID``, ``Metadata_Path_<channel>``).
        cells: The run's cell rows (``Metadata_ImageID``, ``Metadata_CentroidY``/``X``).
        cells_info: The run record's ``cells`` entry (segmentation settings, ``nucleus_channel``).
        path: The PNG to write.
        masks_dir: The run's saved masks, if it saved them (else the segmentation is run again).
        n_images: Panels (random images, ``seed``).

    Returns:
        ``(path, records)``: per image its id, the nuclei found and the cells embedded.

    Raises:
        msnoop.io.readers.ImageReadError: An image or mask cannot be read.
        ValueError: The segmentation fails.
    """
    from matplotlib.colors import to_rgb
    from skimage.segmentation import find_boundaries

    from msnoop.io.readers import read_image

    column = f"{PATH_PREFIX}{cells_info['nucleus_channel']}"
    n = min(n_images, len(images))
    picked = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    fig, axes = subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    records = []
    for ax, i in zip(axes[0], picked, strict=True):
        row = images.iloc[int(i)]
        image = read_image(Path(str(row[column])))
        labels = _labels_of(row, image, cells_info, masks_dir)
        rgb = np.repeat(_percentile_scale(image)[..., None], 3, axis=2)
        rgb[find_boundaries(labels, mode="outer")] = np.asarray(to_rgb(OUTLINE))
        ax.imshow(rgb, interpolation="nearest")
        mine = cells[cells["Metadata_ImageID"] == row["Metadata_ImageID"]]
        ax.scatter(mine[_CENTROID[1]], mine[_CENTROID[0]], marker="+", s=60, color=EMBEDDED, linewidths=1.5)
        n_nuclei = int(np.count_nonzero(np.unique(labels)))
        ax.set_title(f"{row['Metadata_ImageID']}\n{n_nuclei} nuclei, {len(mine)} embedded", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        records.append({"image": str(row["Metadata_ImageID"]), "nuclei": n_nuclei, "embedded": len(mine)})
    from matplotlib.lines import Line2D

    key = [
        Line2D([], [], color=OUTLINE, lw=2, label=f"nucleus outline ({cells_info['nucleus_channel']})"),
        Line2D([], [], color=EMBEDDED, marker="+", ls="", markersize=9, label="cell embedded"),
    ]
    fig.legend(handles=key, loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    return path, records


def _segmentation_section(source: Any, out: Path, seed: int) -> tuple[str | None, str, list[dict[str, Any]]]:
    """``(figure name or None, note, records)`` of the segmentation overlay of a cells-mode run's table."""
    from msnoop.core import parts
    from msnoop.core.tables import resolve_table

    if isinstance(source, pd.DataFrame):
        return None, "", []
    try:
        run = resolve_table(source).run
        info = run.read_info() if run is not None else {}
    except (OSError, ValueError):
        return None, "", []
    if run is None or "cells" not in info or info.get("job", "embed") != "embed":
        return None, "", []
    images = parts.read_frame(run.embeddings)
    cells = parts.read_frame(run.cells, columns=["Metadata_ImageID", *_CENTROID])
    if images.empty:
        return None, "", []
    masks = Path(run.masks) if not run.is_uri else None
    try:
        fig, records = plot_segmentation(
            images, cells, info["cells"], out / "segmentation.png", masks_dir=masks, seed=seed
        )
    except (OSError, ValueError, ImportError) as exc:  # ImageReadError is a ValueError
        logger.warning("segmentation overlay: %s", exc)
        return None, f"No segmentation overlay: {exc}", []
    return fig.name, "", records


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _html_page(ctx: dict[str, Any]) -> str:
    e = html.escape
    m = ctx["metrics"]
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{_fmt(m[key])}</td></tr>"
        for key, name in [
            ("accuracy", "accuracy"),
            ("balanced_accuracy", "balanced accuracy"),
            ("macro_f1", "macro-F1"),
            ("mcc", "MCC"),
            ("chance", "chance (1 / classes)"),
        ]
    )
    per_class = "".join(
        f"<tr><td>{e(name)}</td><td>{ctx['counts'].get(name, 0)}</td><td>{_fmt(m['per_class_accuracy'].get(name, 0.0))}</td>"
        f"<td>{_fmt(m['per_class_f1'].get(name, 0.0))}</td></tr>"
        for name in m["labels"]
        if name in m["per_class_accuracy"]
    )
    if ctx["gallery"]:
        gallery = (
            f'<figure><img src="{e(ctx["gallery"])}" alt="nearest-neighbour galleries">'
            f"<figcaption>{ctx['n_queries']} random query rows (bold frame) and their {ctx['n_neighbours']} nearest "
            f"neighbours ({e(ctx['metric'])} distance d, the query excluded); titles give the neighbour's "
            f"{e(ctx['label'])}: a tick and a solid blue frame where it is the query's, a cross and a dashed "
            f"vermillion frame where it is not. Channels: {e(ctx['channels'])} (the key is on the figure), each "
            "scaled between its 1st and 99.8th percentiles.</figcaption></figure>"
        )
        if ctx["gallery_note"]:
            gallery += f"<p class=note>{e(ctx['gallery_note'])}</p>"
    else:
        gallery = f"<p class=note>{e(ctx['gallery_note'])}</p>"
    batch = f", batch column <code>{e(ctx['batch'])}</code>" if ctx["batch"] else ""
    segmentation = ""
    if ctx["segmentation"] or ctx["segmentation_note"]:
        segmentation = "<h2>Segmentation</h2>\n" + (
            f'<figure><img src="{e(ctx["segmentation"])}" alt="segmentation overlay"><figcaption>Random images of '
            "this cells-mode run: the nucleus channel, the outline of every nucleus found and a cross on each cell "
            "that was embedded (nuclei touching the border, or beyond max_cells_per_image, are not).</figcaption>"
            "</figure>"
            if ctx["segmentation"]
            else f"<p class=note>{e(ctx['segmentation_note'])}</p>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>msnoop report: {e(ctx["title"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1em 0 2em; }} img {{ max-width: 100%; }}
figcaption, .note {{ color: #555; font-size: 0.9em; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head><body>
<h1>msnoop report: {e(ctx["title"])}</h1>
<p>Table <code>{e(ctx["source"])}</code>: {ctx["n_rows"]:,} rows, {ctx["n_features"]:,} features;
label column <code>{e(ctx["label"])}</code> ({len(m["labels"])} classes){batch}.</p>
<h2>kNN classification</h2>
<p>k = {ctx["k"]}, cross-validation {e(ctx["protocol"])} (<code>{e(ctx["cv"])}</code>), {e(ctx["metric"])} distance,
Microsnoop vote
(the most common label among the neighbours if any repeats, else the nearest neighbour's).</p>
<table><tr><th>metric</th><th>value</th></tr>{rows}</table>
<figure><img src="{e(ctx["confusion"])}" alt="confusion matrix">
<figcaption>Confusion matrix of the out-of-sample kNN predictions, each row divided by the class size
(numbers in the cells are counts), and the accuracy of each true class.</figcaption></figure>
<table><tr><th>class</th><th>n</th><th>accuracy</th><th>F1</th></tr>{per_class}</table>
<h2>Map</h2>
<figure><img src="{e(ctx["map"])}" alt="2-D map">
<figcaption>{e(ctx["map_caption"])}.</figcaption></figure>
<h2>Nearest neighbours</h2>
{gallery}
{segmentation}
</body></html>
"""


def build_report(
    table: str | Path | pd.DataFrame,
    *,
    label: str,
    batch: str | None = None,
    out_dir: str | Path,
    k: int = 11,
    cv: str = "loo",
    n_queries: int = 4,
    n_neighbours: int = 6,
    seed: int = 0,
    metric: str = "cosine",
    image_root: str | Path | None = None,
    map_method: str = "auto",
    postprocess: str | None = None,
) -> Path:
    """Write ``out_dir/report.html`` with its figures (PNG) and ``report.json``; returns the HTML path.

    Args:
        table: Feature table (anything :func:`~msnoop.core.tables.read_table` reads) or a DataFrame.
        label: Class column (kNN target, map colours, gallery titles).
        batch: Optional batch column for a second map panel.
        out_dir: Output folder (created).
        k: kNN neighbours.
        cv: ``"loo"``, ``"kfold:<n>"`` or ``"group:<column>"``.
        n_queries: Gallery rows.
        n_neighbours: Neighbours per gallery row.
        seed: Seed of the t-SNE, the gallery queries and k-fold shuffling.
        metric: ``"cosine"`` or ``"l2"``.
        image_root: Folder that relative image paths are relative to (default: the table's folder).
        map_method: ``"auto"``, ``"tsne"``, ``"umap"`` or ``"pca"`` (see :func:`map_2d`).
        postprocess: ``"standardize"`` (features z-scored over the table, no labels) or ``"raw"``; ``None`` takes
            the table's own (:func:`msnoop.evaluate.features.table_postprocess`, as ``msnoop knn`` does). It
            applies to the kNN, the map and the galleries' distances alike.

    Raises:
        ValueError: Missing label/batch column, missing labels, no features, bad ``cv``, unknown
            ``map_method`` or too few rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(table, pd.DataFrame):
        df = table.reset_index(drop=True)
        root = Path(image_root) if image_root else None
    else:
        df = read_table(table).reset_index(drop=True)
        tp = Path(table)
        root = Path(image_root) if image_root else (tp if tp.is_dir() else tp.parent)
    for col, what in [(label, "label"), (batch, "batch")]:
        if col and col not in df.columns:
            meta = [c for c in df.columns if str(c).startswith("Metadata_")]
            raise ValueError(f"{what} column {col!r} is not in the table; metadata columns: {meta[:30]}")
    if df[label].isna().any():
        raise ValueError(
            f"label column {label!r} has {int(df[label].isna().sum())} missing value(s); drop those rows first"
        )
    method = postprocess or table_postprocess(table)
    feats = table_features(df, method=method, drop=[label, batch])
    X, post = feats.X, feats.postprocess
    labels = df[label].to_numpy()
    if map_method not in MAP_METHODS:
        raise ValueError(f"expected map method one of {MAP_METHODS}, found {map_method!r}")
    groups = cv_groups(df, cv)

    with _threads_for(len(df)):
        return _build(
            df,
            X,
            labels,
            groups,
            table,
            root,
            out,
            label=label,
            batch=batch,
            k=k,
            cv=cv,
            n_queries=n_queries,
            n_neighbours=n_neighbours,
            seed=seed,
            metric=metric,
            map_method=map_method,
            post=post,
        )


def _build(
    df: pd.DataFrame,
    X: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None,
    table: str | Path | pd.DataFrame,
    root: Path | None,
    out: Path,
    *,
    label: str,
    batch: str | None,
    k: int,
    cv: str,
    n_queries: int,
    n_neighbours: int,
    seed: int,
    metric: str,
    map_method: str = "auto",
    post: dict[str, Any] | None = None,
) -> Path:
    source = "DataFrame" if isinstance(table, pd.DataFrame) else str(table)
    pred = knn_cross_predict(X, labels, k=k, cv=cv, groups=groups, metric=metric, seed=seed)  # type: ignore[arg-type]
    metrics = classification_metrics(labels, pred)
    n_classes = len(metrics["per_class_accuracy"])
    metrics.update({"k": k, "cv": cv, "metric": metric, "n_classes": n_classes, "chance": 1.0 / max(n_classes, 1)})
    counts = {str(key): int(v) for key, v in df[label].astype(str).value_counts().items()}
    plot_confusion(metrics, out / "confusion.png", counts)

    m2 = map_2d(X, seed=seed, metric=metric, method=map_method)
    plot_map(m2, df, label, batch, out / "map.png", seed=seed)
    drawn = f" ({MAP_MAX_POINTS:,} random rows drawn)" if len(df) > MAP_MAX_POINTS else ""
    map_caption = f"{len(df):,} rows{drawn}; {m2.caption}; coloured by {label}" + (
        f" (left) and by {batch} (right)" if batch else ""
    )

    pcols = path_columns(df)
    gallery, gallery_note, records = None, "", []
    unreadable: list[str] = []
    if not pcols:
        gallery_note = (
            f"No image galleries: the table has no {PATH_PREFIX}<channel> columns (e.g. a CellProfiler profile "
            "table or an aggregated table), so there are no images to show."
        )
    elif n_queries < 1 or len(df) < 2:
        gallery_note = "No image galleries requested."
    else:
        gpath, records = plot_galleries(
            df,
            X,
            label,
            pcols,
            out / "neighbours.png",
            n_queries=n_queries,
            n_neighbours=n_neighbours,
            metric=metric,
            seed=seed,
            root=root,
        )
        gallery = gpath.name
        if records and "unreadable" in records[-1]:
            unreadable = records.pop()["unreadable"]
            gallery_note = f"{len(unreadable)} gallery image(s) could not be read (shown grey), e.g. {unreadable[0]}"

    seg_figure, seg_note, seg_records = _segmentation_section(table, out, seed)
    ctx = {
        "segmentation": seg_figure,
        "segmentation_note": seg_note,
        "title": Path(source).name if source != "DataFrame" else "DataFrame",
        "source": source,
        "n_rows": len(df),
        "n_features": X.shape[1],
        "label": label,
        "batch": batch,
        "k": k,
        "postprocess": post,
        "cv": cv,
        "protocol": describe_cv(cv),
        "map_method": m2.method,
        "metric": metric,
        "metrics": metrics,
        "counts": counts,
        "confusion": "confusion.png",
        "map": "map.png",
        "map_caption": map_caption,
        "gallery": gallery,
        "gallery_note": gallery_note,
        "n_queries": len(records),
        "n_neighbours": min(n_neighbours, len(df) - 1),
        "channels": channel_legend(pcols) if pcols else "",
    }
    page = out / "report.html"
    st.write_text(page, _html_page(ctx))  # complete or absent
    summary = {
        k_: ctx[k_]
        for k_ in (
            "source",
            "n_rows",
            "n_features",
            "label",
            "batch",
            "k",
            "cv",
            "protocol",
            "metric",
            "map_method",
            "map_caption",
        )
    }
    summary |= {"metrics": metrics, "galleries": records, "gallery_note": gallery_note or None}
    summary["segmentation"] = seg_records
    summary["unreadable_images"] = unreadable
    st.write_text(out / "report.json", json.dumps(summary, indent=2, default=str) + "\n")
    logger.info("report for %s written to %s", source, page)
    return page


__all__ = [
    "CHANNEL_COLOURS",
    "Map2D",
    "build_report",
    "channel_colours",
    "describe_cv",
    "embed_2d",
    "format_distances",
    "map_2d",
    "path_columns",
    "plot_segmentation",
    "thumbnail",
]
