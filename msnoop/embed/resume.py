"""Resume checks: a re-run skips ids already written, and refuses a folder whose embeddings were made differently."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from msnoop.core import parts

if TYPE_CHECKING:
    from msnoop.embed.config import EmbedJob


class OutputMismatchError(ValueError):
    """An output folder holds embeddings made by another model, preprocessing, channel list or mode."""


def _model_label(run: dict[str, Any]) -> str:
    sha = run.get("model_sha256")
    return f"{run.get('model_source')}" + (f" (sha256 {sha[:12]})" if sha else "")


def check_resumable(cfg: EmbedJob, out_dir: Path, info: dict[str, Any]) -> None:
    """Refuse to resume into a folder whose embeddings were made differently (one table would mix them).

    Compared with the folder's ``run.json``: whole-image vs cells mode, the model (by sha256 for a
    checkpoint, by name for a random network), the preprocessing and the channels.
    """
    if not parts.part_files(out_dir / parts.EMBEDDINGS):
        return
    try:
        before = parts.read_run_info(out_dir)
    except FileNotFoundError:
        return
    diffs = []
    was_cells, is_cells = "cells" in before, cfg.cells is not None
    if was_cells != is_cells:
        mode = {True: "cells mode", False: "whole-image mode"}
        diffs.append(f"it holds a {mode[was_cells]} run; this job is in {mode[is_cells]}")
    # a checkpoint is known by its sha256 (its path may differ between machines), a random network by its name
    identity = [run.get("model_sha256") or run.get("model_source") for run in (before, info)]
    if identity[0] is not None and identity[0] != identity[1]:
        diffs.append(f"model {_model_label(before)} there, {_model_label(info)} now")
    for key in ("preprocess", "channels"):
        if key in before and before[key] != info[key]:
            diffs.append(f"{key} {before[key]} there, {info[key]} now")
    if diffs:
        raise OutputMismatchError(
            f"{out_dir} holds embeddings made differently ({'; '.join(diffs)}): resuming would mix them in "
            "one table. Use another output.dir, remove the old outputs, or set output.on_mismatch: replace"
        )
