"""The README's first command: synthetic cells -> TIFFs + manifest -> embedding -> Parquet + LanceDB -> search."""

from __future__ import annotations

import logging
from pathlib import Path

from msnoop.data.synthetic import CHANNELS, write_dataset
from msnoop.embed.config import EmbedJob
from msnoop.embed.pipeline import EmbedResult
from msnoop.job_kinds import build_config
from msnoop.models.checkpoint import BUILTIN

logger = logging.getLogger(__name__)


def demo_model() -> str:
    """The shipped default model when installed, else a seeded random network (logged)."""
    if BUILTIN["default"].is_file():
        return "default"
    logger.warning(
        "no trained default model is installed; the demo uses a randomly initialised network (random:microsnoop_cnn:0)"
    )
    return "random:microsnoop_cnn:0"


def demo_config(out_dir: Path, *, n_per_class: int, model: str | None, num_cpus: int | None) -> EmbedJob:
    """Write the synthetic cells (``4 x n_per_class`` two-channel 16-bit TIFFs) under ``out_dir/data`` and return
    the embedding job over them, with its output in ``out_dir/results``."""
    manifest = write_dataset(out_dir / "data", n_per_class=n_per_class, seed=0)
    logger.info("wrote %d synthetic 2-channel cells as 16-bit TIFFs with %s", n_per_class * 4, manifest)
    cfg = build_config(
        {
            "job": "embed",
            "name": "demo",
            "input": {"manifest": str(manifest), "channels": list(CHANNELS)},
            "model": model or demo_model(),
            "output": {"dir": str(out_dir / "results")},
            "runtime": {"num_cpus": num_cpus, "images_per_block": 16},
        }
    )
    assert isinstance(cfg, EmbedJob)
    return cfg


def run_demo(
    out_dir: Path, *, n_per_class: int = 12, model: str | None = None, num_cpus: int | None = None
) -> tuple[EmbedResult, EmbedJob]:
    """Run the demo: synthetic cells embedded with Ray into Parquet and LanceDB; returns the result and the config."""
    cfg = demo_config(out_dir, n_per_class=n_per_class, model=model, num_cpus=num_cpus)
    from msnoop.job_kinds import run_embed_job

    return run_embed_job(cfg), cfg
