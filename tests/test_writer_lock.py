"""One writer per output folder, on a local disk and on object storage (moto on 127.0.0.1); readers say when a
folder is being written or unfinished; repeated rows are repaired whatever wrote them.

No Ray: the lock, the readers and the repair are exercised directly; the CLI checks run against folders whose
lock is held by this process, another process, or a claim of another host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.rundir import FolderBusyError, RunDir, RunStateError
from msnoop.core.tables import read_table
from msnoop.embed.totals import check_totals, repair_repeats

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _folder(request, tmp_path):
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return RunDir(s3.fresh(), s3.config)
    return RunDir(tmp_path / "out")


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    return _folder(request, tmp_path)


def _fake_claim(run: RunDir, *, host: str = "elsewhere", pid: int = 4242, age_s: float = 0.0) -> str:
    """A claim written by another writer (another host by default), its heartbeat ``age_s`` old (local only)."""
    token = f"0-{os.urandom(6).hex()}"
    holder = {
        "host": host,
        "pid": pid,
        "user": "someone",
        "command": "msnoop embed job.yaml",
        "since": "2026-01-01T00:00:00+00:00",
    }
    claim = run.path(RunDir.LOCK, f"claim-{token}.json")
    st.write_text(claim, json.dumps(holder), run.storage)
    if age_s and not run.is_uri:
        os.utime(claim, (time.time() - age_s, time.time() - age_s))
    return token


def test_one_writer_at_a_time_naming_the_holder_and_since_when(folder):
    with folder.writer_lock("msnoop embed a.yaml") as lock:
        with folder.writer_lock() as again:  # the same process may re-enter
            assert again is lock
        assert folder.lock_holder() is None  # its own lock is not another writer
        # a second writer (a claim that is not this process's) is refused while the first holds it
        token = _fake_claim(folder, host=socket.gethostname(), pid=os.getpid())
        assert "process" in (folder.lock_holder() or "")
        st.remove(folder.path(RunDir.LOCK, f"claim-{token}.json"), folder.storage)
    assert not st.list_files(folder.path(RunDir.LOCK), "*", folder.storage)  # released: nothing left
    _fake_claim(folder)
    busy = r"is being written by `msnoop embed job.yaml` \(process 4242 on host elsewhere, user someone\) since 2026"
    with pytest.raises(FolderBusyError, match=busy), folder.writer_lock():
        pass


def test_a_claim_whose_process_is_gone_is_taken_over(tmp_path):
    """A writer killed without releasing (same host): the next one takes the folder at once, with a warning."""
    run = RunDir(tmp_path / "out")
    code = textwrap.dedent(
        f"""
        import os
        from msnoop.core.rundir import RunDir
        lock = RunDir({str(run.location)!r}).writer_lock("msnoop embed killed.yaml")
        lock.__enter__()
        os._exit(0)  # killed: no release
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    assert len(st.list_files(run.path(RunDir.LOCK), "claim-*", None)) == 1
    assert run.lock_holder() is None  # its process is gone
    with run.writer_lock():
        pass


def test_stale_heartbeats_of_another_host_are_taken_over_and_fresh_ones_are_not(tmp_path, s3):
    run = RunDir(tmp_path / "out")
    _fake_claim(run, age_s=3600)
    with run.writer_lock():  # an hour without heartbeat: stale
        pass
    remote = RunDir(s3.fresh(), s3.config)
    _fake_claim(remote)
    with pytest.raises(FolderBusyError, match="host elsewhere"), remote.writer_lock():
        pass
    time.sleep(2.1)  # object storage keeps times to the second
    with remote.writer_lock(stale_after_s=1.0):
        pass


def test_claimants_racing_for_one_folder_never_both_hold_it(tmp_path):
    """Four processes claim one folder at once: exactly one holds it, the others are refused naming a holder."""
    run = RunDir(tmp_path / "out")
    run.makedirs()
    code = textwrap.dedent(
        f"""
        import sys, time
        from msnoop.core.rundir import RunDir, FolderBusyError
        start = float(sys.argv[1])
        time.sleep(max(0.0, start - time.time()))
        try:
            with RunDir({str(run.location)!r}).writer_lock():
                print("HOLD", flush=True)
                time.sleep(3)
        except FolderBusyError as exc:
            print("BUSY", exc, flush=True)
        """
    )
    start = time.time() + 4
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(start)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    held = [o for o in outs if o.startswith("HOLD")]
    assert len(held) == 1, outs
    assert all("is being written by" in o for o in outs if o.startswith("BUSY"))


def _embedded_folder(run: RunDir, ids: list[str], status: str | None = "complete") -> None:
    table = pa.table({"Metadata_ImageID": ids, "emb_0000": np.ones(len(ids), np.float32)})
    parts.write_part(table, run.embeddings, storage=run.storage)
    info = {"job": "embed", "table": "t", "channels": ["dna"], "identity": {}}
    if status:
        info["status"] = status
    run.write_info(info)
    st.write_text(run.config_file, "job: embed\n", run.storage)


def test_readers_refuse_a_folder_being_written_or_left_unfinished(tmp_path):
    run = RunDir(tmp_path / "out")
    _embedded_folder(run, ["a", "b"])
    assert len(read_table(run.location)) == 2
    token = _fake_claim(run)
    for args in (
        ["export", str(run.location), "--out", str(tmp_path / "x.h5ad")],
        ["knn", str(run.location), "--label", "Metadata_ImageID"],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: cannot read") and "being written by" in lines[0]
    assert not (tmp_path / "x.h5ad").exists()
    res = runner.invoke(app, ["info", str(run.location)])
    assert "being written by" in res.output or res.exit_code == 2
    st.remove(run.path(RunDir.LOCK, f"claim-{token}.json"))
    run.write_info({**run.read_info(), "status": "running"})  # killed mid-run: nobody holds it
    with pytest.raises(
        RunStateError, match=r"unfinished: its last run stopped before the end .*`msnoop embed .*resolved_config.yaml`"
    ):
        read_table(run.location)
    legacy = RunDir(tmp_path / "legacy")
    _embedded_folder(legacy, ["a"], status=None)  # written before runs recorded their status: complete
    assert len(read_table(legacy.location)) == 1


def test_an_embed_into_a_folder_being_written_is_one_error_line_before_any_work(tmp_path):
    run = RunDir(tmp_path / "out")
    _fake_claim(run)
    (tmp_path / "m.csv").write_text("dna\nimg.tif\n")
    res = runner.invoke(
        app,
        [
            "embed",
            "--manifest",
            str(tmp_path / "m.csv"),
            "--channels",
            "dna",
            "--model",
            "random:test_cnn:0",
            "--out",
            str(run.location),
        ],
    )
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is being written by `msnoop embed job.yaml`" in lines[0], res.output
    assert not run.exists() and not parts.part_files(run.embeddings)


@pytest.mark.parametrize("seed", range(8))
def test_every_id_once_whatever_blocks_and_writers_left_behind(tmp_path, seed):
    """Property: rows written by writers with different block sizes and orders (retries, a writer that lost its
    lock, a run interrupted and resumed) are repaired to one row per id, with its values, and the totals hold."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    ids = [f"plate/{i:03d}" for i in range(n)]
    values = {i: float(k) for k, i in enumerate(ids)}
    bad = set(rng.choice(ids, size=int(rng.integers(0, n // 3 + 1)), replace=False))
    run = RunDir(tmp_path / "out")
    for _writer in range(int(rng.integers(2, 4))):
        order = list(rng.permutation(ids))[: int(rng.integers(1, n + 1))]  # interrupted writers stop early
        block = int(rng.integers(1, 9))
        for start in range(0, len(order), block):
            chunk = order[start : start + block]
            good = [i for i in chunk if i not in bad]
            errs = [i for i in chunk if i in bad or rng.random() < 0.1]  # a transient error beside a success
            if good:
                t = pa.table({"Metadata_ImageID": good, "emb_0000": pa.array([values[i] for i in good], pa.float32())})
                parts.write_part(t, run.embeddings, key=parts.block_key(good))
            if errs:
                e = pa.table(
                    {"Metadata_ImageID": errs, "path": errs, "reason": ["x"] * len(errs)}, schema=parts.ERRORS_SCHEMA
                )
                parts.write_part(e, run.errors, key=parts.block_key(errs))
    written = set(parts.read_ids(run.embeddings)) | set(parts.read_ids(run.errors))
    repair_repeats(run)
    emb = parts.read_frame(run.embeddings)
    assert emb["Metadata_ImageID"].is_unique
    assert all(values[i] == v for i, v in zip(emb["Metadata_ImageID"], emb["emb_0000"], strict=True))
    err = parts.read_frame(run.errors)
    assert not set(err.get("Metadata_ImageID", pd.Series([], dtype=object))) & set(emb["Metadata_ImageID"])
    n_emb, n_err = check_totals(run, sorted(written))
    assert n_emb + n_err == len(written)
