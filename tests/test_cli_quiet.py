"""The CLI's stderr carries msnoop's own lines: no faiss loader INFO, no Ray C++ ERROR/INFO notices, no Ray
Data executor chatter; ``-v`` shows them again."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from msnoop.core.parts import emb_columns

FAISS_INFO = re.compile(r"INFO faiss|faiss\.loader")
RAY_CPP = re.compile(
    r"^(\x1b\[\d+m)?(\(\w+\)\s*)?(\x1b\[0m)?\s*\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\]"
)  # Ray C++ log line
CORE_WORKER_E = re.compile(r" E \d+ \d+\] core_worker")
RAY_DATA = re.compile(r"streaming_executor|Progress bars disabled|Token authentication is enabled")


def _msnoop(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MSNOOP_"))}
    code = "from msnoop.cli import app; app(prog_name='msnoop')"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def small_table(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 8)
    X = rng.normal(size=(len(labels), 8)).astype(np.float32) + (labels[:, None] == "a") * 3
    df = pd.concat([pd.DataFrame({"Metadata_Class": labels}), pd.DataFrame(X, columns=emb_columns(8))], axis=1)
    path = tmp_path_factory.mktemp("quiet") / "table.parquet"
    df.to_parquet(path, index=False)
    return str(path)


def test_knn_stderr_is_quiet_and_v_shows_more(small_table) -> None:
    quiet = _msnoop("knn", small_table, "--label", "Metadata_Class", "--k", "3")
    assert quiet.returncode == 0, quiet.stderr
    assert "accuracy" in quiet.stdout
    lines = quiet.stderr.splitlines()
    assert not [ln for ln in lines if FAISS_INFO.search(ln)], quiet.stderr
    assert not [ln for ln in lines if CORE_WORKER_E.search(ln) or RAY_CPP.search(ln)], quiet.stderr
    assert all(" msnoop." in ln for ln in lines), quiet.stderr  # only msnoop's own log lines
    loud = _msnoop("-v", "knn", small_table, "--label", "Metadata_Class", "--k", "3")
    assert loud.returncode == 0, loud.stderr
    assert [ln for ln in loud.stderr.splitlines() if FAISS_INFO.search(ln)], loud.stderr
    assert len(loud.stderr.splitlines()) > len(lines)


def test_forwarded_ray_level_notices_are_dropped() -> None:
    """Workers' 'Set ray log level' notices (caused by RAY_BACKEND_LOG_LEVEL) never reach the terminal."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from msnoop.core.runtime import _RAY_LEVEL_NOTICE, _drop_forwarded_lines

    got: list[dict] = []
    _drop_forwarded_lines(_RAY_LEVEL_NOTICE)
    _drop_forwarded_lines(_RAY_LEVEL_NOTICE)  # idempotent
    dispatcher.add_handler("ray_print_logs", got.append)
    try:
        notice = "[2026-11-30 06:12:56,781 I 9670 9670] logging.cc:303: Set ray log level from environment variable"
        dispatcher.emit({"lines": [notice + " RAY_BACKEND_LOG_LEVEL to 3"], "pid": 1, "is_err": True})
        dispatcher.emit({"lines": [notice + " RAY_BACKEND_LOG_LEVEL to 3", "worker says hi"], "pid": 2})
        dispatcher.emit({"lines": ["Traceback (most recent call last):"], "pid": 3})
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert [d["lines"] for d in got] == [["worker says hi"], ["Traceback (most recent call last):"]]
    assert got[0]["pid"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_embedding_run_has_no_ray_noise(tmp_path) -> None:
    """A real Ray run (embed on a local cluster started for it, LanceDB): nothing on stderr, none of Ray's core-worker
    ERROR lines, Ray Data INFO lines, token notice or the driver's 'Set ray log level' notice."""
    from msnoop.data.synthetic import write_dataset

    manifest = write_dataset(tmp_path / "data", n_per_class=2, size=32, seed=0)
    res = _msnoop(
        "embed", "--manifest", str(manifest), "--channels", "dna,protein", "--model", "random:test_cnn",
        "--out", str(tmp_path / "out"), "--set", "runtime.ray_min_images=0", timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Embedded 8 images" in res.stdout
    lines = res.stderr.splitlines()
    assert not [ln for ln in lines if CORE_WORKER_E.search(ln) or RAY_CPP.search(ln)], res.stderr
    assert not [ln for ln in lines if RAY_DATA.search(ln) or FAISS_INFO.search(ln)], res.stderr
    assert res.stderr == "", res.stderr
