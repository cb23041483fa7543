"""Dispatch a validated job config to its runner (used by ``msnoop run`` and Ray job entrypoints)."""

from __future__ import annotations

from typing import Any

from msnoop.config import EmbedJob


def run_job(cfg: Any) -> str:
    """Run ``cfg`` according to its ``job`` kind; returns a one-paragraph summary."""
    if isinstance(cfg, EmbedJob):
        from msnoop.embed.pipeline import run_embed

        r = run_embed(cfg)
        return (
            f"embedded {r.n_embedded} images ({r.n_errors} errors, {r.n_skipped} already done) in {r.seconds:.1f} s; "
            f"totals {r.n_rows_total} + {r.n_errors_total} errors = {r.n_input}; output {r.out_dir.resolve()}"
        )
    from msnoop.train.config import PretrainJob

    if isinstance(cfg, PretrainJob):
        from msnoop.train.ray_train import run_pretrain

        res = run_pretrain(cfg)
        return f"pretraining finished: {res}"
    from msnoop.evaluate.bench import BenchJob

    if isinstance(cfg, BenchJob):
        from msnoop.evaluate.bench import markdown, run_bench

        rec = run_bench(cfg)
        if "skipped" in rec:
            return f"skipped: {rec['skipped']}"
        return f"bench {cfg.name}: results in {cfg.output.dir.resolve()}\n" + markdown(rec)
    from msnoop.correct.job import ProfileJob

    if isinstance(cfg, ProfileJob):
        from msnoop.correct.job import run_profile, summary

        return summary(cfg, run_profile(cfg))
    from msnoop.segment.train import SegTrainJob

    if isinstance(cfg, SegTrainJob):
        from msnoop.segment.train import run_segtrain
        from msnoop.segment.train import summary as seg_summary

        return seg_summary(cfg, run_segtrain(cfg))
    from msnoop.evaluate.screen_job import ScreenJob

    if isinstance(cfg, ScreenJob):
        from msnoop.evaluate.screen_job import run_screen
        from msnoop.evaluate.screen_job import summary as screen_summary

        return screen_summary(cfg, run_screen(cfg))
    raise ValueError(f"no runner for job kind {getattr(cfg, 'job', type(cfg).__name__)!r}")
