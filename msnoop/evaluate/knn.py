"""k-nearest-neighbour classification of profiles with FAISS, using Microsnoop's voting rule.

Search: ``metric="cosine"`` L2-normalises copies of the vectors and uses inner products (Microsnoop's
own cosine path normalised a temporary and indexed raw vectors; this does not); ``metric="l2"`` uses
squared Euclidean distances. ``index="exact"`` is a FAISS flat index (``IndexFlatIP`` / ``IndexFlatL2``),
on the GPU when ``faiss.get_num_gpus() > 0``. ``index="ivf"`` is an inverted-file search (lists from
k-means in a 64-d PCA space, exact distances inside the ``nprobe`` lists nearest to each query, every
list scored against all its queries in one matrix product), for large CPU runs where the flat search is
quadratic (100,000 x 768 leave-one-out: minutes exact, under a minute IVF). ``index="auto"`` takes the flat index on a GPU and for small problems, IVF when
``n_indexed * n_queries * dim`` exceeds :data:`IVF_WORK_THRESHOLD` on CPU. IVF results are approximate:
``jobs/bench_search.py`` measures their agreement with the exact search.

Vote (Microsnoop ``eval.knn_classify``): if any label occurs more than once among the ``k`` neighbours,
predict the most common label; a tie between most common labels goes to the **smallest label**
(Microsnoop used ``scipy.stats.mode``, which returns the smallest value; labels are ordered as by
``numpy.unique``, i.e. numerically or lexicographically). If all ``k`` labels differ, predict the label of
the nearest neighbour. For ``k=1`` this is plain 1-NN. Unlike scikit-learn's majority vote, e.g. for
neighbour labels ``[b, c, a]`` (all distinct) the prediction is ``b`` (nearest), not ``a``.

Protocols (``cv``):

* ``"loo"``: leave-one-out on the whole set; ``k + 1`` neighbours are searched and the query's own
  index is removed (not simply the first hit, so exact duplicates are handled), as in Microsnoop.
* ``"kfold:<n>"``: stratified ``n``-fold cross-validation (shuffled with ``seed``).
* ``"group:<column>"``: leave-one-group-out: a row's neighbours never share its group (field, plate,
  compound...).

Equidistant neighbours are ordered by FAISS; results can depend on that order only through exact ties.

Installation: exactly one faiss build, ``msnoop[cpu]`` (faiss-cpu) or ``msnoop[gpu]`` (faiss-gpu-cu12);
:func:`faiss_build` checks this before faiss is first imported here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from msnoop.vectors.distance import Metric, check_metric, normalize_rows

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: kNN search kinds: exact (a FAISS flat index), IVF, or chosen by problem size.
SearchKind = Literal["auto", "exact", "ivf"]
SEARCH_KINDS: tuple[str, ...] = get_args(SearchKind)
COARSE_DIM = 64  # dimensions of the PCA space in which the IVF lists are built

IVF_WORK_THRESHOLD = 1e12
"""``n_indexed * n_queries * dim`` above which ``index="auto"`` uses IVF on CPU (about 20 s of flat search
on 2 cores; 100,000 x 100,000 x 768 is 7.7e12)."""


# --- which faiss build is installed -------------------------------------------------------------------------------

#: Distributions that install the ``faiss`` module without GPU code (PyPI, the ``cpu`` extra).
FAISS_CPU_DISTS = ("faiss-cpu",)
#: Prefix of the distributions with GPU code: ``faiss-gpu`` (PyPI, CUDA 12.6), ``faiss-gpu-cu12`` (the ``gpu``
#: extra), ``faiss-gpu-cu11``, ...
FAISS_GPU_PREFIX = "faiss-gpu"
_FAISS_INSTALL_HINT = "pip install 'msnoop[cpu]' (faiss-cpu) or, on a CUDA 12 machine, pip install 'msnoop[gpu]'"


def _installed_distributions() -> list[str]:
    """Names of the installed Python distributions, normalised (lower case, ``_``/``.`` -> ``-``)."""
    import importlib.metadata
    import re

    names = (d.metadata["Name"] for d in importlib.metadata.distributions())
    return [re.sub(r"[-_.]+", "-", n).lower() for n in names if n]


_gpu_warning_logged = False


def faiss_build(distributions: Sequence[str] | None = None, *, count_gpus: bool = True) -> Literal["cpu", "gpu"]:
    """Which faiss build this environment holds: ``"cpu"`` or ``"gpu"``; refuses a mixed install.

    ``faiss-cpu`` and the ``faiss-gpu*`` wheels install the same ``faiss`` module, so with both installed
    the one installed last silently wins (pip does not see them as conflicting). msnoop's extras are
    ``msnoop[cpu]`` (faiss-cpu) and ``msnoop[gpu]`` (faiss-gpu-cu12); install exactly one. With no known
    distribution (faiss built from source, conda), the module itself decides (``faiss.StandardGpuResources``
    exists only in GPU builds). A GPU build on a machine where ``faiss.get_num_gpus() == 0`` logs one warning
    (searches then run on the CPU).

    Args:
        distributions: Installed distribution names (default: read with ``importlib.metadata``).
        count_gpus: Ask faiss how many GPUs it sees (for the warning). ``False`` where no NVIDIA driver is
            loaded, e.g. a ``docker build``: faiss's GPU build aborts the process in ``get_num_gpus()`` when
            CUDA reports a missing driver (``CUDA_VERIFY`` in ``faiss/gpu/utils/DeviceUtils.cu``).

    Returns:
        ``"cpu"`` or ``"gpu"``.

    Raises:
        ImportError: If both a CPU and a GPU faiss distribution are installed (the message names them and
            the fix), if a GPU distribution is installed but the ``faiss`` module has no GPU code, or if no
            faiss is installed (the message names the extras).
    """
    global _gpu_warning_logged
    found = _installed_distributions() if distributions is None else distributions
    names = sorted({n.lower().replace("_", "-") for n in found})
    cpu = [n for n in names if n in FAISS_CPU_DISTS]
    gpu = [n for n in names if n.startswith(FAISS_GPU_PREFIX)]
    if cpu and gpu:
        raise ImportError(
            f"both a CPU and a GPU faiss are installed ({', '.join(cpu + gpu)}); they install the same `faiss` "
            f"module and the one installed last wins. On a GPU machine run `pip uninstall {' '.join(cpu)}` and "
            f"reinstall {gpu[0]} (`pip install --force-reinstall {gpu[0]}`); on a CPU machine "
            f"`pip uninstall {' '.join(gpu)}` and `pip install --force-reinstall faiss-cpu`"
        )
    try:
        import faiss
    except ImportError as exc:
        detail = f" (installed: {', '.join(cpu + gpu)}, but `import faiss` failed: {exc})" if cpu or gpu else ""
        raise ImportError(f"faiss is not installed{detail}; install it with {_FAISS_INSTALL_HINT}") from exc
    has_gpu_code = hasattr(faiss, "StandardGpuResources")
    if gpu and not has_gpu_code:
        raise ImportError(
            f"{gpu[0]} is installed but the `faiss` module ({getattr(faiss, '__file__', '?')}) has no GPU code "
            f"(files of a CPU build left behind); run `pip install --force-reinstall --no-deps {gpu[0]}`"
        )
    build: Literal["cpu", "gpu"] = "gpu" if gpu or (not cpu and has_gpu_code) else "cpu"
    if build == "gpu" and count_gpus and not _gpu_warning_logged and faiss.get_num_gpus() == 0:
        _gpu_warning_logged = True
        logger.warning(
            "faiss GPU build (%s) but faiss sees no GPU: searches run on the CPU (check the driver and "
            "CUDA_VISIBLE_DEVICES, or install msnoop[cpu] on CPU machines)",
            ", ".join(gpu) or "faiss built with GPU support",
        )
    return build


@lru_cache(maxsize=1)
def _checked_faiss() -> Any:
    """The ``faiss`` module, after :func:`faiss_build` has checked the installation (once per process)."""
    faiss_build()
    import faiss

    return faiss


@lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    faiss = _checked_faiss()

    return faiss.StandardGpuResources()


def _use_gpu() -> bool:
    faiss = _checked_faiss()

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _prepare(X: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous copy; rows L2-normalised for cosine (zero rows stay zero)."""
    check_metric(metric)
    X = np.array(X, dtype=np.float32, order="C", copy=True)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D [N, D] array, found shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("expected finite vectors, found NaN/inf; clean the features before kNN")
    if metric == "cosine":
        X = np.ascontiguousarray(normalize_rows(X, warn_zero=True))
    return X


def choose_index(n_indexed: int, n_queries: int, dim: int, index: str = "auto") -> str:
    """``"exact"`` or ``"ivf"`` for a search of ``n_queries`` against ``n_indexed`` vectors of ``dim``."""
    if index not in SEARCH_KINDS:
        raise ValueError(f"expected index 'auto', 'exact' or 'ivf', found {index!r}")
    if index != "auto":
        return index
    if _use_gpu() or n_indexed < 4096 or float(n_indexed) * n_queries * dim <= IVF_WORK_THRESHOLD:
        return "exact"
    return "ivf"


def ivf_params(n_indexed: int, nlist: int | None = None, nprobe: int | None = None) -> tuple[int, int]:
    """Default IVF sizes: ``nlist = 4 sqrt(N)`` lists (at least 16), ``nprobe = nlist / 48`` (at least 8)."""
    nl = int(nlist) if nlist else max(16, int(round(4 * np.sqrt(n_indexed))))
    nl = min(nl, max(1, n_indexed // 39))  # FAISS wants >= 39 training points per list
    npb = int(nprobe) if nprobe else max(8, nl // 48)
    return nl, min(npb, nl)


def _ivf_search(
    xb: np.ndarray, xq: np.ndarray, k: int, metric: str, nlist: int, nprobe: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Inverted-file search with exact distances inside the probed lists, scanned list by list with BLAS.

    Like a FAISS ``IndexIVFFlat``, but each list is scored against all queries that probe it in one
    matrix product: 3x faster on CPU than FAISS's per-query scan when every row is also a query
    (leave-one-out, 100,000 x 768). Queries whose probed lists hold fewer than ``k`` vectors keep index
    ``-1`` in the missing places.
    """
    faiss = _checked_faiss()

    # coarse quantiser: k-means in a 64-d PCA space of a sample (the partition only steers the search;
    # distances inside the probed lists are exact), ~10x cheaper than k-means in 768-d
    rng = np.random.default_rng(seed)
    n_train = min(len(xb), 40 * nlist)
    sample = xb[rng.choice(len(xb), n_train, replace=False)] if n_train < len(xb) else xb
    mean = sample.mean(axis=0)
    dp = min(COARSE_DIM, xb.shape[1])
    _, vecs = np.linalg.eigh(np.cov(sample - mean, rowvar=False).astype(np.float64))
    proj = np.ascontiguousarray(vecs[:, ::-1][:, :dp], dtype=np.float32)  # [D, dp] leading components
    km = faiss.Kmeans(dp, nlist, niter=10, seed=seed, verbose=False)
    km.train(np.ascontiguousarray((sample - mean) @ proj))
    assign = km.index.search(np.ascontiguousarray((xb - mean) @ proj), 1)[1][:, 0]  # [N] list of each row
    probe = km.index.search(np.ascontiguousarray((xq - mean) @ proj), nprobe)[1]  # [M, nprobe] lists per query
    members = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[members], np.arange(nlist + 1))
    flat = probe.ravel()
    q_order = np.argsort(flat, kind="stable")
    q_bounds = np.searchsorted(flat[q_order], np.arange(nlist + 1))
    q_of = q_order // nprobe  # query row of each (query, probe) pair, grouped by list
    best_s = np.full((len(xq), k), -np.inf, dtype=np.float32)  # larger is better (IP, or -squared L2)
    best_i = np.full((len(xq), k), -1, dtype=np.int64)
    b_sq = (xb * xb).sum(axis=1) if metric == "l2" else None
    q_sq = (xq * xq).sum(axis=1) if metric == "l2" else None
    for j in range(nlist):
        rows = members[bounds[j] : bounds[j + 1]]
        qs = q_of[q_bounds[j] : q_bounds[j + 1]]
        if len(rows) == 0 or len(qs) == 0:
            continue
        sc = xq[qs] @ xb[rows].T  # [q, r]
        if metric == "l2":
            sc = 2 * sc - q_sq[qs, None] - b_sq[None, rows]  # type: ignore[index]
        kk = min(k, len(rows))
        top = (
            np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
            if kk < len(rows)
            else np.broadcast_to(np.arange(len(rows)), (len(qs), len(rows)))
        )
        cand_s = np.concatenate([best_s[qs], np.take_along_axis(sc, top, axis=1)], axis=1)
        cand_i = np.concatenate([best_i[qs], rows[top]], axis=1)
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s[qs] = np.take_along_axis(cand_s, keep, axis=1)
        best_i[qs] = np.take_along_axis(cand_i, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
    if metric == "l2":
        best_s = -best_s
    return best_s, best_i


def knn_search(
    train: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    metric: Metric = "cosine",
    index: SearchKind = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-nearest-neighbour search with FAISS: exact (flat) or an IVF index (see module docstring).

    Args:
        train: ``[N, D]`` indexed vectors.
        query: ``[M, D]`` query vectors.
        k: Neighbours per query, ``1 <= k <= N``.
        metric: ``"cosine"`` (inner product of L2-normalised copies) or ``"l2"``.
        index: ``"auto"``, ``"exact"`` or ``"ivf"``.
        nlist: IVF lists (default ``4 sqrt(N)``).
        nprobe: IVF lists visited per query (default ``nlist / 48``, at least 8).

    Returns:
        ``(scores, indices)``, both ``[M, k]``, nearest first: cosine similarities (decreasing) or squared
        Euclidean distances (increasing), and row indices into ``train``. Queries whose IVF lists hold
        fewer than ``k`` vectors are searched exactly.

    Raises:
        ValueError: If ``k`` is out of range, the dimensions differ or ``index`` is unknown.
    """

    xb = _prepare(train, metric)
    xq = _prepare(query, metric)
    if xb.shape[1] != xq.shape[1]:
        raise ValueError(f"expected train and query with the same dimension, found {xb.shape[1]} and {xq.shape[1]}")
    if not 1 <= k <= len(xb):
        raise ValueError(f"expected 1 <= k <= {len(xb)} (the number of indexed vectors), found k={k}")
    d = xb.shape[1]
    kind = choose_index(len(xb), len(xq), d, index)
    if kind == "ivf":
        nl, npb = ivf_params(len(xb), nlist, nprobe)
        logger.info("kNN search: IVF index, %d lists, %d probed, %d x %d vectors", nl, npb, len(xb), d)
        scores, idx = _ivf_search(xb, xq, k, metric, nl, npb)
        short = (idx < 0).any(axis=1)
        if short.any():
            scores[short], idx[short] = _flat_search(xb, xq[short], k, metric)
        return scores, idx.astype(np.int64)
    scores, idx = _flat_search(xb, xq, k, metric)
    return scores, idx.astype(np.int64)


def _flat_search(xb: np.ndarray, xq: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    faiss = _checked_faiss()

    flat = faiss.IndexFlatIP(xb.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(xb.shape[1])
    if _use_gpu():
        flat = faiss.index_cpu_to_gpu(_gpu_resources(), 0, flat)
    flat.add(xb)
    return flat.search(xq, k)


def encode_labels(labels: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for labels, ordered as ``numpy.unique`` orders them.

    Args:
        labels: ``[N]`` labels (numbers or strings; mixed types are compared as strings).

    Returns:
        ``(classes, codes)``: ``[C]`` sorted unique labels and ``[N]`` int64 codes.

    Raises:
        ValueError: If a label is missing (None/NaN).
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of labels, found shape {arr.shape}")
    if arr.dtype == object:
        if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in arr):
            raise ValueError("expected a label for every row, found missing labels (None/NaN); drop those rows")
        try:
            classes, codes = np.unique(arr, return_inverse=True)
        except TypeError:
            classes, codes = np.unique(arr.astype(str), return_inverse=True)
    else:
        if arr.dtype.kind == "f" and np.isnan(arr).any():
            raise ValueError("expected a label for every row, found NaN labels; drop those rows")
        classes, codes = np.unique(arr, return_inverse=True)
    return classes, codes.astype(np.int64).reshape(-1)


def microsnoop_vote(neighbor_codes: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Microsnoop's vote over neighbour labels (see module docstring).

    Args:
        neighbor_codes: ``[M, k]`` integer label codes of the neighbours, nearest first.
        n_classes: Number of classes (default ``max + 1``).

    Returns:
        ``[M]`` predicted codes: the most common code if any code repeats (ties -> smallest code),
        else the nearest neighbour's code.
    """
    codes = np.asarray(neighbor_codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"expected [M, k] neighbour codes with k >= 1, found shape {codes.shape}")
    m = codes.shape[0]
    c = int(codes.max()) + 1 if n_classes is None else int(n_classes)
    counts = np.bincount((codes + c * np.arange(m)[:, None]).ravel(), minlength=m * c).reshape(m, c)
    mode = counts.argmax(axis=1)  # first maximum = smallest code
    return np.where(counts.max(axis=1) >= 2, mode, codes[:, 0])


def knn_predict(
    train_X: np.ndarray,
    train_codes: np.ndarray,
    query_X: np.ndarray,
    *,
    k: int,
    metric: Metric = "cosine",
    n_classes: int | None = None,
    index: SearchKind = "auto",
) -> np.ndarray:
    """Predict label codes of queries from a labelled training set.

    Args:
        train_X: ``[N, D]`` training vectors.
        train_codes: ``[N]`` integer label codes.
        query_X: ``[M, D]`` query vectors.
        k: Neighbours.
        metric: ``"cosine"`` or ``"l2"``.
        n_classes: Number of classes.
        index: ``"auto"``, ``"exact"`` or ``"ivf"`` (see :func:`knn_search`).

    Returns:
        ``[M]`` predicted codes.
    """
    _, idx = knn_search(train_X, query_X, k, metric=metric, index=index)
    return microsnoop_vote(np.asarray(train_codes)[idx], n_classes)


def _loo_neighbors(
    X: np.ndarray, k: int, metric: Metric, index: SearchKind = "auto", rows: np.ndarray | None = None
) -> np.ndarray:
    """The ``k`` nearest other rows of each row of ``X`` (of the given ``rows`` only, if set)."""
    n = len(X)
    if n < k + 1:
        raise ValueError(f"leave-one-out with k={k} needs at least {k + 1} rows, found {n}")
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    _, idx = knn_search(X, X[rows], k + 1, metric=metric, index=index)
    not_self = idx != rows[:, None]
    # keep the first k hits that are not the query itself (if the query was not returned, e.g. among
    # exact duplicates, the (k+1)-th hit is dropped instead)
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1)


def parse_cv(cv: str) -> tuple[str, int | str | None]:
    """Parse ``"loo"``, ``"kfold[:n]"`` or ``"group[:column]"`` into ``(kind, arg)``."""
    kind, _, arg = cv.partition(":")
    kind = kind.strip().lower()
    if kind == "loo" and not arg:
        return "loo", None
    if kind == "kfold":
        try:
            n = int(arg) if arg else 5
        except ValueError:
            n = -1
        if n < 2:
            raise ValueError(f"expected cv='kfold:<n>' with an integer n >= 2, found {cv!r}")
        return "kfold", n
    if kind == "group":
        return "group", arg or None
    raise ValueError(f"expected cv 'loo', 'kfold:<n>' or 'group:<column>', found {cv!r}")


def cv_groups(df: pd.DataFrame, cv: str) -> np.ndarray | None:
    """The group of every row for ``cv="group:<column>"`` (the column as text), else None.

    Raises:
        ValueError: ``cv`` is not a protocol :func:`parse_cv` accepts, or names no column of ``df``.
    """
    kind, arg = parse_cv(cv)
    if kind != "group":
        return None
    if not arg or arg not in df.columns:
        raise ValueError(f"cv={cv!r}: expected 'group:<column>' naming a column of the table")
    return df[arg].astype(str).to_numpy()


def knn_cross_predict(
    X: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    k: int = 11,
    cv: str = "loo",
    groups: Sequence[Any] | np.ndarray | None = None,
    metric: Metric = "cosine",
    seed: int = 0,
    index: SearchKind = "auto",
) -> np.ndarray:
    """Out-of-sample kNN predictions for every row under a cross-validation protocol.

    Args:
        X: ``[N, D]`` profiles.
        labels: ``[N]`` labels.
        k: Neighbours.
        cv: ``"loo"``, ``"kfold:<n>"`` or ``"group:<column>"`` (see module docstring).
        groups: ``[N]`` group of each row, required for ``"group"``.
        metric: ``"cosine"`` or ``"l2"``.
        seed: Shuffling seed for ``kfold``.
        index: ``"auto"``, ``"exact"`` or ``"ivf"`` (see :func:`knn_search`).

    Returns:
        ``[N]`` predicted labels (same values as ``labels``).

    Raises:
        ValueError: On shape mismatches, a bad ``cv``, missing groups, or too few rows for ``k``.
    """
    X = np.asarray(X)
    classes, codes = encode_labels(labels)
    if len(codes) != len(X):
        raise ValueError(f"expected one label per row, found {len(codes)} labels for {len(X)} rows")
    if k < 1:
        raise ValueError(f"expected k >= 1, found {k}")
    n_classes = len(classes)
    kind, arg = parse_cv(cv)
    pred = np.full(len(X), -1, dtype=np.int64)
    if kind == "loo":
        nb = _loo_neighbors(X, k, metric, index)
        pred = microsnoop_vote(codes[nb], n_classes)
    elif kind == "kfold":
        from sklearn.model_selection import StratifiedKFold

        skf = StratifiedKFold(n_splits=int(arg), shuffle=True, random_state=seed)  # type: ignore[arg-type]
        for train, test in skf.split(X, codes):
            pred[test] = knn_predict(
                X[train], codes[train], X[test], k=k, metric=metric, n_classes=n_classes, index=index
            )
    else:
        if groups is None:
            raise ValueError(f"cv={cv!r} needs groups (one group value per row, e.g. the column's values)")
        g = np.asarray(groups)
        if len(g) != len(X):
            raise ValueError(f"expected one group per row, found {len(g)} groups for {len(X)} rows")
        _, gcodes = encode_labels(g)
        for gi in np.unique(gcodes):
            test = gcodes == gi
            train = ~test
            if int(train.sum()) < k:
                raise ValueError(
                    f"leave-one-group-out: only {int(train.sum())} rows outside group {g[test][0]!r}, expected >= k={k}"
                )
            pred[test] = knn_predict(
                X[train], codes[train], X[test], k=k, metric=metric, n_classes=n_classes, index=index
            )
    return classes[pred]


def classification_metrics(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, MCC, macro-F1, per-class accuracy and confusion matrix.

    Undefined terms (a class never predicted, a constant prediction) count as 0, without warnings.

    Args:
        y_true: ``[N]`` true labels.
        y_pred: ``[N]`` predicted labels.

    Returns:
        JSON-serialisable dict: ``n``, ``labels`` (str, sorted), ``accuracy``, ``balanced_accuracy``,
        ``mcc``, ``macro_f1``, ``per_class_accuracy`` (recall of each true class),
        ``per_class_f1``, ``confusion_matrix`` (rows true, columns predicted, order of ``labels``).
    """
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        matthews_corrcoef,
    )

    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    classes, codes = encode_labels(np.concatenate([yt, yp]))
    t, p = codes[: len(yt)], codes[len(yt) :]
    present = np.unique(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        cm = confusion_matrix(t, p, labels=np.arange(len(classes)))
        f1 = f1_score(t, p, labels=present, average=None, zero_division=0)
        out = {
            "n": len(t),
            "labels": [str(c) for c in classes],
            "accuracy": float(accuracy_score(t, p)),
            "balanced_accuracy": float(balanced_accuracy_score(t, p)),
            "mcc": float(matthews_corrcoef(t, p)),
            "macro_f1": float(f1_score(t, p, labels=present, average="macro", zero_division=0)),
        }
    row = cm.sum(axis=1)
    out["per_class_accuracy"] = {str(classes[i]): float(cm[i, i] / row[i]) for i in present}
    out["per_class_f1"] = {str(classes[i]): float(v) for i, v in zip(present, f1, strict=True)}
    out["confusion_matrix"] = cm.astype(int).tolist()
    return out


def knn_evaluate(
    X: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    k: int = 11,
    cv: str = "loo",
    groups: Sequence[Any] | np.ndarray | None = None,
    metric: Metric = "cosine",
    seed: int = 0,
    index: SearchKind = "auto",
) -> dict[str, Any]:
    """kNN classification metrics under a cross-validation protocol (Microsnoop vote).

    Args:
        X: ``[N, D]`` profiles.
        labels: ``[N]`` labels.
        k: Neighbours (Microsnoop: 11 for CyCLOPS, 1 for TissueNet/LIVECell/BBBC021).
        cv: ``"loo"``, ``"kfold:<n>"`` or ``"group:<column>"``.
        groups: ``[N]`` group values for ``"group"``.
        metric: ``"cosine"`` or ``"l2"`` (Microsnoop's CyCLOPS/TissueNet runs used Euclidean).
        seed: Shuffling seed for ``kfold``.
        index: ``"auto"``, ``"exact"`` or ``"ivf"`` (see :func:`knn_search`).

    Returns:
        :func:`classification_metrics` plus ``k``, ``cv``, ``metric``, ``seed``, ``n_classes``,
        ``vote`` and ``chance`` (1 / number of classes); JSON-serialisable.
    """
    pred = knn_cross_predict(X, labels, k=k, cv=cv, groups=groups, metric=metric, seed=seed, index=index)
    res = classification_metrics(labels, pred)
    n_classes = len(np.unique(np.asarray(labels).astype(str)))
    res.update(
        {
            "k": int(k),
            "cv": cv,
            "metric": metric,
            "seed": int(seed),
            "index": index,
            "n_classes": n_classes,
            "chance": 1.0 / n_classes,
            "vote": "microsnoop (mode if any label repeats, ties -> smallest label; else nearest)",
        }
    )
    logger.info(
        "kNN k=%d cv=%s metric=%s: accuracy %.4f, macro-F1 %.4f", k, cv, metric, res["accuracy"], res["macro_f1"]
    )
    return res


# --- a table's kNN evaluation (msnoop knn, msnoop.knn) -------------------------------------------------------------


@dataclass
class KnnResult:
    """kNN classification of a table's rows by a label column (:func:`knn_table`).

    Attributes:
        table: The table evaluated (a path, or ``"DataFrame"``).
        label: The label column.
        metrics: Everything :func:`knn_evaluate` returns (JSON-serialisable), plus ``table``, ``label``,
            ``n_features`` and ``postprocess``.
    """

    table: str
    label: str
    metrics: dict[str, Any]

    @property
    def accuracy(self) -> float:
        """Fraction of rows whose predicted label is their own."""
        return float(self.metrics["accuracy"])

    @property
    def balanced_accuracy(self) -> float:
        """Mean of the per-class accuracies (chance: 1 / classes)."""
        return float(self.metrics["balanced_accuracy"])

    @property
    def per_class(self) -> Any:
        """A ``pandas.DataFrame`` with one row per class: ``label``, ``n``, ``accuracy``, ``f1``."""
        import pandas as pd

        m = self.metrics
        return pd.DataFrame(
            {
                "label": list(m["per_class_accuracy"]),
                "n": [m["class_counts"][c] for c in m["per_class_accuracy"]],
                "accuracy": list(m["per_class_accuracy"].values()),
                "f1": [m["per_class_f1"].get(c, 0.0) for c in m["per_class_accuracy"]],
            }
        )

    def lines(self) -> list[str]:
        """The summary ``msnoop knn`` prints."""
        m = self.metrics
        out = [
            f"kNN on {self.table}: n={m['n']}  features={m['n_features']}  label={self.label}  "
            f"classes={m['n_classes']} (chance {m['chance']:.3f})  k={m['k']}  cv={m['cv']}  metric={m['metric']}  "
            f"postprocess={m['postprocess']['method']}"
        ]
        for key, name in (
            ("accuracy", "accuracy"),
            ("balanced_accuracy", "balanced accuracy"),
            ("mcc", "MCC"),
            ("macro_f1", "macro-F1"),
        ):
            out.append(f"  {name:<18} {m[key]:.4f}")
        out.append("  per-class accuracy:")
        for name, acc in m["per_class_accuracy"].items():
            out.append(f"    {name:<30} {acc:.4f}  (n={m['class_counts'][name]})")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def knn_table(
    table: Any,
    label: str,
    *,
    k: int = 11,
    cv: str = "loo",
    metric: Metric = "cosine",
    seed: int = 0,
    exclude: str | None = None,
    index: SearchKind = "auto",
    postprocess: str | None = None,
) -> KnnResult:
    """kNN classification of any table's rows by ``label`` (Microsnoop vote), after the table's post-processing.

    Args:
        table: Anything :func:`msnoop.core.tables.read_table` reads (an output folder, ``cells/``, a ``.lance``
            table, Parquet/CSV; local or a URI), or a ``pandas.DataFrame`` (``Metadata_*`` + feature columns).
        label: The class column, e.g. ``Metadata_protein``.
        k, cv, metric, seed, index: As :func:`knn_evaluate` (``cv="group:<column>"`` names a column of the table).
        exclude: SQL condition of rows to leave out first, e.g. ``"Metadata_Compound = 'DMSO'"``.
        postprocess: ``"standardize"`` or ``"raw"``; None: the table's own
            (:func:`msnoop.vectors.postprocess.table_postprocess`).

    Returns:
        A :class:`KnnResult` (``str()`` of it is what ``msnoop knn`` prints).

    Raises:
        FileNotFoundError: ``table`` does not exist.
        ValueError: Unreadable table, a missing label or group column, missing labels, an invalid ``exclude``
            filter or one that leaves no row, no features, or bad ``cv``.
    """
    import pandas as pd

    from msnoop.core.filters import filter_mask
    from msnoop.evaluate.features import read_features, table_features

    if isinstance(table, pd.DataFrame):
        from msnoop.vectors.postprocess import DEFAULT_POSTPROCESS

        df, method, name = table.reset_index(drop=True), postprocess or DEFAULT_POSTPROCESS, "DataFrame"
    else:
        df, method = read_features(table, postprocess_method=postprocess)
        name = str(table).rstrip("/").rsplit("/", 1)[-1]
    if exclude:
        df = df[~filter_mask(df, exclude)].reset_index(drop=True)  # FilterError is a ValueError
        if df.empty:
            raise ValueError(f"--exclude {exclude!r} leaves no row of {table}")
    if label not in df.columns:
        meta = [c for c in df.columns if str(c).startswith("Metadata_")]
        raise ValueError(f"label column {label!r} is not in {name}; metadata columns: {meta}")
    if df[label].isna().any():
        raise ValueError(
            f"label column {label!r} has {int(df[label].isna().sum())} missing value(s); drop them with --exclude"
        )
    groups = cv_groups(df, cv)
    feats = table_features(df, method=method, drop=[label])
    res = knn_evaluate(feats.X, df[label].to_numpy(), k=k, cv=cv, groups=groups, metric=metric, seed=seed, index=index)
    counts = df[label].astype(str).value_counts()
    res.update(
        {
            "table": str(table) if name != "DataFrame" else name,
            "label": label,
            "n_features": int(feats.X.shape[1]),
            "postprocess": feats.postprocess,
            "class_counts": {c: int(counts.get(c, 0)) for c in res["per_class_accuracy"]},
        }
    )
    return KnnResult(table=name, label=label, metrics=res)
