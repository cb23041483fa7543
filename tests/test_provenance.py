"""The commit that result files record: ``-dirty`` exactly when tracked files outside ``results/`` were changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from msnoop.core.runtime import git_sha

UNDER_RESULTS = ["results", "results/bench/yeast"]
FOLDERS = ["", "msnoop/core", "jobs", "docs", "configs", *UNDER_RESULTS]
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True)


@pytest.mark.parametrize("seed", range(24))
def test_dirty_exactly_when_tracked_code_outside_results_changed(tmp_path, seed) -> None:
    rng = np.random.default_rng(seed)
    repo = tmp_path / "repo"
    # half the files under results/, so that some cases change results/ alone
    folders = [rng.choice(UNDER_RESULTS) if rng.random() < 0.5 else rng.choice(FOLDERS) for _ in range(8)]
    files = [repo / folders[i] / f"f{i}.txt" for i in range(int(rng.integers(2, 8)))]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("a\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "c")
    expected = False
    for f in files:
        action = rng.choice(["keep", "edit", "stage", "delete"], p=[0.7, 0.1, 0.1, 0.1])
        if action == "keep":
            continue
        if action == "delete":
            f.unlink()
        else:
            f.write_text("b\n")
            if action == "stage":
                _git(repo, "add", str(f))
        expected |= not f.relative_to(repo).as_posix().startswith("results/")
    for i in range(int(rng.integers(0, 3))):  # untracked files never count
        new = repo / rng.choice(FOLDERS) / f"new{i}.txt"
        new.parent.mkdir(parents=True, exist_ok=True)
        new.write_text("n\n")
    where = repo / rng.choice([d for d in FOLDERS if (repo / d).is_dir()])  # asked from any folder of the checkout
    sha = git_sha(where)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert sha == head.stdout.strip() + ("-dirty" if expected else ""), (seed, expected)


def test_outside_a_checkout_there_is_no_commit(tmp_path) -> None:
    assert git_sha(tmp_path) is None
