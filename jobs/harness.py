"""What the benchmark and job scripts under ``jobs/`` share: where the data and the results are, timing, memory,
bootstrap intervals and the result files.

Every script imports it first (``from harness import ...``; a script's own folder is on ``sys.path`` when it runs
as ``python jobs/<script>.py``). Importing it also puts the repository root on ``sys.path``, so the scripts use the
checkout's ``msnoop`` even where the package is not installed.

* Data: :func:`data_dir` (``$MSNOOP_SHARED_DATA``, else ``../shared/data`` beside the repository);
* results: :data:`RESULTS` and :func:`write_results` (``<name>.json`` and, given a Markdown text, ``<name>.md``)
  with :func:`run_record` (date and commit) in every record;
* measuring: :class:`Stopwatch` (wall and CPU seconds of this process), :class:`PeakRSS` (peak resident memory),
  :func:`bootstrap_rows` and :func:`bootstrap_ratio` (resampling intervals).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any, Self

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = [
    "RESULTS",
    "ROOT",
    "PeakRSS",
    "Stopwatch",
    "bootstrap_ratio",
    "bootstrap_rows",
    "data_dir",
    "git_commit",
    "run_record",
    "write_results",
]


def data_dir(name: str | None = None) -> Path:
    """The shared data folder (``$MSNOOP_SHARED_DATA``, else ``../shared/data`` beside the repository), or its
    sub-folder ``name``; the path may not exist (scripts say so and skip)."""
    base = Path(os.environ.get("MSNOOP_SHARED_DATA") or ROOT.parent / "shared" / "data")
    return base / name if name else base


def git_commit() -> str | None:
    """The checkout's short commit, ``-dirty`` when tracked code differs from it (``msnoop.core.runtime.git_sha``)."""
    from msnoop.core.runtime import git_sha

    return git_sha()


def run_record() -> dict[str, Any]:
    """``{"date": ISO date, "commit": short sha}`` for the top of every result file."""
    return {"date": date.today().isoformat(), "commit": git_commit()}


def _json_value(obj: Any) -> Any:
    """NumPy scalars and arrays as Python numbers and lists; anything else JSON cannot hold as its text."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    return str(obj)


def write_results(path: str | Path, record: dict[str, Any], markdown: str | None = None) -> list[Path]:
    """Write ``record`` as ``<path>.json`` (indented; NumPy values as numbers, other non-JSON values as text) and
    ``markdown`` as ``<path>.md``.

    ``path`` may end in ``.json`` or have no suffix; folders are created. Returns the files written.
    """
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".json", ".md") else path
    base.parent.mkdir(parents=True, exist_ok=True)
    out = [base.with_name(base.name + ".json")]
    out[0].write_text(json.dumps(record, indent=2, default=_json_value) + "\n")
    if markdown is not None:
        out.append(base.with_name(base.name + ".md"))
        out[1].write_text(markdown.rstrip("\n") + "\n")
    return out


class Stopwatch:
    """Wall and CPU seconds of this process over a ``with`` block (``.wall``, ``.cpu``; also while running)."""

    def __enter__(self) -> Self:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        self._wall: float | None = None
        self._cpu: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._wall, self._cpu = time.perf_counter() - self.w0, time.process_time() - self.c0

    @property
    def wall(self) -> float:
        """Wall seconds of the block (so far, while it runs)."""
        return self._wall if self._wall is not None else time.perf_counter() - self.w0

    @property
    def cpu(self) -> float:
        """CPU seconds of this process in the block (so far, while it runs)."""
        return self._cpu if self._cpu is not None else time.process_time() - self.c0


class PeakRSS:
    """Peak resident memory over a ``with`` block, sampled every ``interval`` seconds in a thread.

    Args:
        interval: Seconds between samples.
        children: Sum the RSS of this process and all its children (a Ray cluster started from here), or this
            process alone.

    Attributes:
        base: Bytes at the start of the block; ``peak``: the largest sample (bytes).
    """

    def __init__(self, interval: float = 0.2, *, children: bool = True) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.children = children
        self.base = self.peak = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self.proc, *(self.proc.children(recursive=True) if self.children else [])]:
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001 - a child that exits between the listing and the read
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())

    @property
    def mib(self) -> float:
        """Peak above the level at the start, in MiB (one decimal)."""
        return round((self.peak - self.base) / 2**20, 1)


def bootstrap_rows(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` int64 row indices drawn with replacement (one resample per row), from ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of ``median(a) / median(b)`` over paired resamples of ``(a[i], b[i])``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"expected two non-empty paired samples, found lengths {len(a)} and {len(b)}")
    idx = bootstrap_rows(len(a), n_boot, seed)
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)
