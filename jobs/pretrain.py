"""Entry point: ``python jobs/pretrain.py CONFIG [--set key=value ...]`` (same as ``msnoop pretrain``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from msnoop.core.config import ConfigError
from msnoop.cli.training import load_pretrain_job
from msnoop.train.pretrain import run_pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path, help="pretrain YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. train.steps=200")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = load_pretrain_job(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = run_pretrain(job)
    print(f"Wrote model: {res.model_path.resolve()}")
    print(f"Wrote model card: {res.card_path.resolve()}")
    if res.figure_path:
        print(f"Wrote reconstruction figure: {res.figure_path.resolve()}")
    loss = f"{res.final_loss:.5f}" if res.final_loss is not None else "n/a"
    print(f"Steps: {res.steps} ({res.stop_reason}), final loss {loss}, {res.elapsed_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
