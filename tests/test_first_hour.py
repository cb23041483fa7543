"""A newcomer's first hour: the shipped model by default, quiet commands with one progress bar, small jobs without
Ray's start-up, no-op re-runs, every verb on every folder msnoop writes, batches for NSCB, AnnData ready for scanpy,
readable report colours, a notebook API, one-line filter errors, --version and examples."""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.core.parts import emb_columns
from msnoop.core.rundir import RunDir
from msnoop.data.synthetic import write_dataset
from msnoop.job_kinds import build_config, load_config, run_embed_job

runner = CliRunner()
MODEL = "random:test_cnn:0"


def _embed_cfg(manifest: Path, out: Path, channels: list[str], **extra):
    data = {
        "job": "embed",
        "name": "t",
        "input": {"manifest": str(manifest), "channels": channels},
        "model": MODEL,
        "output": {"dir": str(out)},
        "runtime": {"images_per_block": 4, "batch_size": 16, "progress": False},
        **extra,
    }
    return build_config(data)


def _field(centres, rng, shape=(160, 160), radius=8):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dna, gfp = rng.normal(100, 5, shape), rng.normal(20, 3, shape)
    for cy, cx in centres:
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        dna[d2 <= radius**2] += 800
        gfp[(d2 > radius**2) & (d2 <= (2 * radius) ** 2)] += rng.uniform(40, 120)
    return np.clip(dna, 0, None).astype(np.uint16), np.clip(gfp, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """A small whole-image embed output (16 synthetic cells, 4 classes), run in this process."""
    root = tmp_path_factory.mktemp("whole")
    manifest = write_dataset(root / "data", n_per_class=4, size=32, seed=2)
    cfg = _embed_cfg(manifest, root / "out", ["dna", "protein"])
    run_embed_job(cfg)
    return cfg.output.dir


@pytest.fixture(scope="module")
def cells_run(tmp_path_factory):
    """A cells-mode embed output of four synthetic fields (a few nuclei each), run in this process."""
    root = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    layouts = {
        "a": [(30, 30), (30, 100), (80, 60), (120, 40)],
        "b": [(40, 40), (40, 120), (110, 80)],
        "c": [(30, 50), (80, 80), (130, 40), (60, 130)],
        "d": [(50, 50), (100, 100), (120, 40)],
    }
    rows = []
    for name, centres in layouts.items():
        dna, gfp = _field(centres, rng)
        tifffile.imwrite(root / f"{name}_dna.tif", dna)
        tifffile.imwrite(root / f"{name}_gfp.tif", gfp)
        rows.append({"dna": f"{name}_dna.tif", "gfp": f"{name}_gfp.tif", "Group": "x" if name in "ab" else "y"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    cells = {"segmentation": {"channel": "dna", "diameter": 16}, "ratio": 2.0}
    cfg = _embed_cfg(root / "manifest.csv", root / "out", ["dna", "gfp"], cells=cells)
    run_embed_job(cfg)
    return cfg.output.dir


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    """A profile job's output: 4 plates in 2 weeks, DMSO on every plate, 6 compounds of 3 MOAs on two plates each
    (no two on the same pair, so each treatment's joined plate string is its own), and a plate map of the weeks."""
    root = tmp_path_factory.mktemp("profile")
    rng = np.random.default_rng(1)
    moas = {"c1": "m1", "c2": "m1", "c3": "m2", "c4": "m2", "c5": "m3", "c6": "m3"}
    layout = {"c1": "p1 p2", "c2": "p1 p3", "c3": "p1 p4", "c4": "p2 p3", "c5": "p2 p4", "c6": "p3 p4"}
    centres = {m: rng.normal(size=6) * 3 for m in ("m1", "m2", "m3")}
    week = {"p1": "W1", "p2": "W1", "p3": "W2", "p4": "W2"}
    rows = []
    for compound, plates in {"DMSO": "p1 p2 p3 p4", **layout}.items():
        for plate in plates.split():
            centre = centres.get(moas.get(compound, ""), np.zeros(6)) + (week[plate] == "W2")  # a week effect
            features = centre + rng.normal(scale=0.3, size=6)
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Compound": compound,
                    "Metadata_moa": moas.get(compound, "control"),
                    **{f"f{i}": v for i, v in enumerate(features)},
                }
            )
    table = root / "wells.parquet"
    pd.DataFrame(rows).to_parquet(table, index=False)
    res = runner.invoke(
        app,
        [
            "profile",
            str(table),
            "--control",
            "Metadata_Compound = 'DMSO'",
            "--method",
            "none",
            "--batch-column",
            "Metadata_Plate",
            "--treatment-columns",
            "Metadata_Compound",
            "--join",
            "Metadata_moa",
            "--out",
            str(root / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    platemap = root / "platemap.csv"
    pd.DataFrame({"Metadata_Plate": list(week), "Metadata_Week": list(week.values())}).to_csv(platemap, index=False)
    return root / "out", platemap


# --- the shipped model is the default ---------------------------------------------------------------------------


def test_embed_without_a_model_uses_the_shipped_one(tmp_path):
    cfg = load_config(
        None, job="embed", overrides=[("input.manifest", "m.csv"), ("input.channels", ["a"]), ("output.dir", "o")]
    )
    assert cfg.model == "default"
    (tmp_path / "job.yaml").write_text("job: embed\ninput: {manifest: m.csv, channels: [a]}\noutput: {dir: o}\n")
    res = runner.invoke(app, ["validate", str(tmp_path / "job.yaml")])
    assert res.exit_code == 0 and "model: default" in res.output, res.output


# --- small jobs: in this process, the same rows as on Ray; nothing redone when nothing is left -------------------


def test_in_process_is_for_small_jobs_without_a_cluster_to_join(monkeypatch, tmp_path):
    from msnoop.core import local_cluster, runtime
    from msnoop.embed import pipeline
    from msnoop.embed.pipeline import in_process

    monkeypatch.setattr(runtime, "ray_session_here", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MSNOOP_HOME", str(tmp_path))
    cfg = _embed_cfg(Path("m.csv"), tmp_path / "o", ["a"])
    limit = pipeline.ray_min_images(cfg, remote_inputs=False)
    assert in_process(cfg, limit - 1) and not in_process(cfg, limit)
    assert not in_process(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"address": "x:1"})}), 10)
    assert not in_process(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"ray_min_images": 0})}), 0)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not in_process(cfg, 10)
    monkeypatch.delenv("RAY_ADDRESS")
    fake = local_cluster.LocalCluster("127.0.0.1:1", "http://127.0.0.1:2", "/tmp/x", None, "ray start")
    monkeypatch.setattr(local_cluster, "recorded_cluster", lambda: fake)
    assert not in_process(cfg, 10)  # a running `msnoop cluster` is used


def test_ray_min_images_auto_starts_ray_sooner_for_a_gpu_or_remote_images(monkeypatch, tmp_path):
    import torch

    from msnoop.embed import pipeline

    cfg = _embed_cfg(Path("m.csv"), tmp_path / "o", ["a"])
    assert cfg.runtime.ray_min_images == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipeline.ray_min_images(cfg, remote_inputs=False) == pipeline.RAY_MIN_IMAGES_CPU
    assert pipeline.ray_min_images(cfg, remote_inputs=True) == pipeline.RAY_MIN_IMAGES_PARALLEL_READS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pipeline.ray_min_images(cfg, remote_inputs=False) == pipeline.RAY_MIN_IMAGES_PARALLEL_READS
    no_gpu = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"use_gpu": "no"})})
    assert pipeline.ray_min_images(no_gpu, remote_inputs=False) == pipeline.RAY_MIN_IMAGES_CPU
    fixed = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"ray_min_images": 7})})
    assert pipeline.ray_min_images(fixed, remote_inputs=True) == 7


@pytest.mark.parametrize("n", [5, 33, 70])
def test_in_process_blocks_hold_at_least_32_images_and_every_row_once(tmp_path, monkeypatch, n):
    import pyarrow.parquet as pq

    from msnoop.core import runtime
    from msnoop.embed import pipeline

    monkeypatch.setattr(runtime, "ray_session_here", lambda: False)  # the suite's Ray session may be open
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MSNOOP_HOME", str(tmp_path))  # no recorded `msnoop cluster`

    manifest = write_dataset(tmp_path / "data", n_per_class=(n + 3) // 4, size=24, seed=n)
    pd.read_csv(manifest).head(n).to_csv(manifest, index=False)
    cfg = _embed_cfg(manifest, tmp_path / "out", ["dna", "protein"], runtime={"images_per_block": 64, "batch_size": 4})
    assert pipeline.in_process(cfg, n)
    run_embed_job(cfg)
    parts = sorted((tmp_path / "out" / "embeddings").glob("part-*.parquet"))
    assert len(parts) == -(-n // pipeline.IN_PROCESS_MIN_BLOCK)
    ids = [i for p in parts for i in pq.read_table(p, columns=["Metadata_ImageID"]).column(0).to_pylist()]
    assert len(ids) == len(set(ids)) == n


@pytest.mark.parametrize("seed", range(20))
def test_read_ahead_yields_every_block_once_in_order_and_raises_at_the_failing_block(seed):
    import threading

    from msnoop.embed.pipeline import read_ahead

    rng = np.random.default_rng(seed)
    blocks = list(rng.integers(0, 1000, size=int(rng.integers(0, 12))))
    fail_at = int(rng.integers(0, len(blocks))) if blocks and rng.random() < 0.5 else None
    main = threading.get_ident()
    in_flight = []  # blocks read but not yet handed out: never more than two (this one and the next)

    def read(b):
        assert threading.get_ident() != main  # reading happens beside the caller
        if fail_at is not None and b is blocks[fail_at]:
            raise ValueError(f"unreadable {b}")
        in_flight.append(b)
        return int(b) * 2

    got = []
    if fail_at is None:
        for x in read_ahead(iter(blocks), read):
            assert len(in_flight) <= 2
            in_flight.pop(0)
            got.append(x)
        assert got == [int(b) * 2 for b in blocks]
    else:
        with pytest.raises(ValueError, match="unreadable"):
            for x in read_ahead(iter(blocks), read):
                in_flight.pop(0)
                got.append(x)
        assert got == [int(b) * 2 for b in blocks[:fail_at]]


@pytest.mark.ray
def test_in_process_and_ray_write_the_same_rows(tmp_path, monkeypatch, ray_cluster):
    from msnoop.embed import pipeline

    manifest = write_dataset(tmp_path / "data", n_per_class=2, size=32, seed=3)
    frames = {}
    for local in (True, False):
        monkeypatch.setattr(pipeline, "in_process", lambda cfg, n, local=local: local)
        cfg = _embed_cfg(manifest, tmp_path / f"out_{local}", ["dna", "protein"])
        result = run_embed_job(cfg)
        assert result.n_embedded == 8 and result.n_errors == 0
        frames[local] = pd.read_parquet(cfg.output.dir / RunDir.EMBEDDINGS).sort_values("Metadata_ImageID")
    a, b = frames[True], frames[False]
    assert list(a["Metadata_ImageID"]) == list(b["Metadata_ImageID"])
    np.testing.assert_allclose(a[emb_columns(64)].to_numpy(), b[emb_columns(64)].to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_rerun_with_nothing_new_does_not_rebuild_the_table(tmp_path, monkeypatch):
    from msnoop.store import lance

    manifest = write_dataset(tmp_path / "data", n_per_class=1, size=32, seed=4)
    cfg = _embed_cfg(manifest, tmp_path / "out", ["dna", "protein"])
    run_embed_job(cfg)
    built = []
    real = lance.build_table
    monkeypatch.setattr(lance, "build_table", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    import msnoop.store.publish as publish

    monkeypatch.setattr(publish, "build_table", lance.build_table)
    again = run_embed_job(cfg)
    assert again.n_embedded == 0 and again.table == "t" and built == []  # nothing new: the table stays
    renamed = cfg.model_copy(update={"output": cfg.output.model_copy(update={"table": "t2"})})
    run_embed_job(renamed)
    assert built == ["t2"]  # another table: built
    more = write_dataset(tmp_path / "data", n_per_class=2, size=32, seed=4)
    run_embed_job(renamed.model_copy(update={"input": renamed.input.model_copy(update={"manifest": more})}))
    assert built == ["t2", "t2"]  # new rows: rebuilt


# --- one progress bar, only on a terminal; quiet commands ---------------------------------------------------------


def test_progress_is_drawn_on_a_terminal_only(monkeypatch):
    from msnoop.core.progress import PROGRESS_ENV, progress_enabled

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert not progress_enabled()  # pytest captures stderr: not a terminal
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_enabled() and not progress_enabled(False)
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not progress_enabled(True)

    code = (
        "from msnoop.core.progress import progress_bar\n"
        "import time\nwith progress_bar(3, 'embedding', unit='img') as bar:\n    time.sleep(0.6)\n    bar.update(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_ENV}
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert piped.stderr == ""  # a pipe or a log: nothing
    master, slave = pty.openpty()  # a terminal that reports no size (0 x 0), as `script` and some CI give
    proc = subprocess.run([sys.executable, "-c", code], stdout=slave, stderr=slave, env=env, check=True)
    os.close(slave)
    out = os.read(master, 65536).decode()
    os.close(master)
    assert proc.returncode == 0 and "embedding:" in out and "3/3" in out and "img/s" in out


def test_commands_print_only_their_summary(tmp_path):
    manifest = write_dataset(tmp_path / "data", n_per_class=1, size=32, seed=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MSNOOP_"))}
    env["MSNOOP_HOME"] = str(tmp_path / "home")
    base = [sys.executable, "-m", "msnoop"]
    embed = [
        "embed",
        "--manifest",
        str(manifest),
        "--channels",
        "dna,protein",
        "--model",
        MODEL,
        "--out",
        str(tmp_path / "o"),
    ]
    res = subprocess.run([*base, *embed], capture_output=True, text=True, env=env, check=False, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and "Embedded 4 images" in res.stdout
    knn = subprocess.run(
        [*base, "knn", str(tmp_path / "o"), "--label", "Metadata_Class", "--k", "1"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert knn.returncode == 0 and knn.stderr == "" and "balanced accuracy" in knn.stdout, knn.stderr
    loud = subprocess.run([*base, "-v", *embed], capture_output=True, text=True, env=env, check=False, timeout=600)
    assert loud.returncode == 0 and " DEBUG msnoop" in loud.stderr and " INFO msnoop" in loud.stderr


def test_version_and_every_help_has_an_example():
    from msnoop import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"msnoop {__version__}"
    for command in app.registered_commands:
        res = runner.invoke(app, [command.name, "--help"], terminal_width=200)
        assert res.exit_code == 0 and "Example: msnoop" in res.output, command.name


# --- every verb takes every folder or table msnoop writes ---------------------------------------------------------


def test_tables_resolve_from_every_folder(whole_run, cells_run, profile_run, tmp_path):
    from msnoop.core.tables import read_table, resolve_table

    out, _ = profile_run
    cases = {
        whole_run: ("parts", whole_run / RunDir.EMBEDDINGS),
        whole_run / RunDir.EMBEDDINGS: ("parts", whole_run / RunDir.EMBEDDINGS),
        cells_run / RunDir.CELLS: ("parts", cells_run / RunDir.CELLS),
        whole_run / RunDir.LANCEDB: ("lance", whole_run / RunDir.LANCEDB / "t.lance"),
        cells_run / RunDir.LANCEDB / "t_cells.lance": ("lance", cells_run / RunDir.LANCEDB / "t_cells.lance"),
        out: ("file", out / RunDir.TREATMENTS),
        out / RunDir.PROFILES: ("file", out / RunDir.PROFILES),
    }
    for folder, (kind, location) in cases.items():
        source = resolve_table(folder)
        assert (source.kind, Path(source.location)) == (kind, location), folder
        assert len(read_table(folder)) > 0
    assert len(read_table(cells_run / RunDir.CELLS)) > len(read_table(cells_run))  # cells, not images
    (tmp_path / RunDir.WELLS).write_bytes((out / RunDir.PROFILES).read_bytes())
    assert resolve_table(tmp_path).location == tmp_path / RunDir.WELLS  # a screen's folder: its wells
    bench = tmp_path / "bench"
    (bench / RunDir.EMBEDDINGS / "default").mkdir(parents=True)
    (bench / RunDir.EMBEDDINGS / "default" / RunDir.RUN_FILE).write_text("{}")
    with pytest.raises(ValueError, match="one embedding run per model"):
        resolve_table(bench)
    with pytest.raises(ValueError, match="cannot read a table from folder"):
        resolve_table(tmp_path / "bench" / RunDir.EMBEDDINGS)


def test_every_verb_takes_the_folders(whole_run, cells_run, profile_run, tmp_path):
    out, _ = profile_run
    for args in (
        ["knn", str(cells_run / RunDir.CELLS), "--label", "Metadata_Group", "--k", "3"],
        ["knn", str(whole_run / RunDir.LANCEDB), "--label", "Metadata_Class", "--k", "3"],
        ["nsc", str(out), "--batch", "Metadata_Plate"],
        ["map", str(out), "--positive", "Metadata_moa", "--null-size", "100"],
        ["export", str(cells_run / RunDir.CELLS), "--out", str(tmp_path / "cells.h5ad")],
        ["export", str(out), "--out", str(tmp_path / "profiles.h5ad")],
        ["search", str(cells_run / RunDir.CELLS), "--id", "a_dna", "--k", "2"],
        [
            "report",
            str(cells_run / RunDir.CELLS),
            "--label",
            "Metadata_Group",
            "--out",
            str(tmp_path / "rep"),
            "--k",
            "3",
        ],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "None" not in info.output, info.output
    assert "kind       treatments" in info.output and "correction" in info.output
    for folder in (cells_run / RunDir.CELLS, out / RunDir.PROFILES):
        res = runner.invoke(app, ["info", str(folder)])
        assert res.exit_code == 0 and "rows" in res.output and "None" not in res.output, res.output


# --- NSCB: a batch that names the batch, and a warning when it excludes nothing ---------------------------------


def test_a_plate_map_names_the_batch_of_joined_plates():
    from msnoop.evaluate.nsc import apply_batch_map

    df = pd.DataFrame({"Metadata_Plate": ["W1_a,W1_b", "W2_c", "W1_a,W2_c"], "f": [1.0, 2.0, 3.0]})
    plates = pd.DataFrame({"Metadata_Plate": ["W1_a", "W1_b", "W2_c"], "Metadata_Week": ["W1", "W1", "W2"]})
    out = apply_batch_map(df, plates, ["Metadata_Week"])
    assert list(out["Metadata_Week"]) == ["W1", "W2", "W1,W2"] and "Metadata_Week" not in df
    with pytest.raises(ValueError, match="no row for Metadata_Plate"):
        apply_batch_map(df.assign(Metadata_Plate=["W9_z", "W2_c", "W2_c"]), plates, ["Metadata_Week"])
    with pytest.raises(ValueError, match="neither in the treatment table nor in the plate map"):
        apply_batch_map(df, plates, ["Metadata_Batch"])


def test_nscb_warns_when_the_batch_excludes_nothing(profile_run, caplog):
    out, platemap = profile_run
    with caplog.at_level(logging.WARNING, logger="msnoop.evaluate.nsc"):
        res = runner.invoke(app, ["nsc", str(out), "--batch", "Metadata_Plate", "--json", str(out.parent / "p.json")])
    assert res.exit_code == 0, res.output
    by_plate = json.loads((out.parent / "p.json").read_text())["NSCB[Metadata_Plate]"]
    assert by_plate["batch_excluded_pairs"] == 0 and "NSCB equals NSC" in caplog.text  # one plate string each
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="msnoop.evaluate.nsc"):
        res = runner.invoke(
            app,
            [
                "nsc",
                str(out),
                "--batch",
                "Metadata_Week",
                "--batch-map",
                str(platemap),
                "--batch-match",
                "overlap",
                "--json",
                str(out.parent / "w.json"),
            ],
        )
    assert res.exit_code == 0, res.output
    assert "NSCB[Metadata_Week]" in res.output and "NSCB equals NSC" not in caplog.text
    assert json.loads((out.parent / "w.json").read_text())["NSCB[Metadata_Week]"]["batch_excluded_pairs"] > 0


# --- AnnData: what msnoop compares, ready for scanpy --------------------------------------------------------------


def test_anndata_holds_the_compared_vectors(whole_run, profile_run):
    from msnoop.store.anndata import OBSM_KEY, UNS_KEY, to_anndata
    from msnoop.vectors.postprocess import postprocess

    adata = to_anndata(whole_run)
    expected, _ = postprocess(np.asarray(adata.X), "standardize")
    np.testing.assert_allclose(adata.obsm[OBSM_KEY], expected, rtol=1e-5, atol=1e-5)
    assert json.loads(adata.uns[UNS_KEY]["postprocess"])["method"] == "standardize"
    sphered = to_anndata(profile_run[0])  # a profile output is compared as it is
    np.testing.assert_array_equal(sphered.obsm[OBSM_KEY], sphered.X)


# --- the report: colours by channel name, marks that do not rely on red/green, a segmentation overlay ------------


def test_channels_are_coloured_by_their_names():
    from msnoop.evaluate.report import channel_colours, channel_legend

    assert channel_colours(["gfp", "dna"]) == ["green", "blue"]
    assert channel_colours(["Metadata_Path_DAPI", "Metadata_Path_mCherry", "Metadata_Path_FITC"]) == [
        "blue",
        "magenta",
        "green",
    ]
    assert channel_colours(["rfp", "gfp"]) == ["magenta", "green"]
    assert channel_colours(["green", "blue", "red"]) == ["green", "blue", "magenta"]  # HPA names its channels by colour
    assert channel_colours(["a", "b", "c"]) == ["green", "magenta", "cyan"]
    assert channel_colours(["dna", "hoechst"]) == ["blue", "green"]  # one colour per channel
    assert channel_colours(["protein"]) == ["grey"]
    assert channel_legend(["Metadata_Path_gfp", "Metadata_Path_dna"]) == "gfp = green, dna = blue"


def test_report_of_a_cells_run_has_a_segmentation_overlay(cells_run, whole_run, tmp_path):
    from msnoop.evaluate.report import build_report

    page = build_report(cells_run / RunDir.CELLS, label="Metadata_Group", out_dir=tmp_path / "cells", k=3)
    record = json.loads((page.parent / "report.json").read_text())
    assert (page.parent / "segmentation.png").is_file() and "segmentation.png" in page.read_text()
    assert record["segmentation"] and all(r["nuclei"] >= r["embedded"] > 0 for r in record["segmentation"])
    text = page.read_text()
    assert "tick" in text and "dashed" in text and "dna = blue" in text
    plain = build_report(whole_run, label="Metadata_Class", out_dir=tmp_path / "whole", k=3)
    assert "segmentation.png" not in plain.read_text()
    assert json.loads((plain.parent / "report.json").read_text())["segmentation"] == []


# --- the notebook API ----------------------------------------------------------------------------------------------


def test_the_api_returns_frames_and_typed_results(whole_run):
    import msnoop
    from msnoop.evaluate.knn import KnnResult
    from msnoop.query.info import TableInfo

    assert dir(msnoop) == sorted(msnoop.__all__) and {"search", "knn", "info"} <= set(dir(msnoop))
    hits = msnoop.search(whole_run, image_id="images/nuclear_0000_dna", k=3)
    assert isinstance(hits, pd.DataFrame) and len(hits) == 3 and "_distance" in hits.columns
    assert "images/nuclear_0000_dna" not in set(hits["Metadata_ImageID"])
    res = msnoop.knn(whole_run, "Metadata_Class", k=3)
    assert isinstance(res, KnnResult) and 0 <= res.balanced_accuracy <= 1
    assert list(res.per_class.columns) == ["label", "n", "accuracy", "f1"] and res.per_class["n"].sum() == 16
    described = msnoop.info(whole_run)
    assert isinstance(described, TableInfo) and described.n_rows == 16 and described.channels == ["dna", "protein"]
    assert "dimensions 64 = 2 channels x 32" in str(described)
    with pytest.raises(ValueError, match="exactly one"):
        msnoop.search(whole_run, k=3)


# --- filters: a number compared with a text column -----------------------------------------------------------------


def test_a_number_against_a_text_column_is_one_clear_line(whole_run):
    res = runner.invoke(
        app, ["search", str(whole_run), "--id", "images/nuclear_0000_dna", "--where", "Metadata_Field = 1"]
    )
    assert res.exit_code == 2
    assert "Metadata_Field is a text column" in res.output and "Metadata_Field = '1'" in res.output
    assert ".rs:" not in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["search", str(whole_run), "--match", 'Metadata_Class = "punctate"'])
    assert res.exit_code == 2 and "single quotes" in res.output and ".rs:" not in res.output
    ok = runner.invoke(
        app, ["search", str(whole_run), "--id", "images/nuclear_0000_dna", "--where", "Metadata_Field = '1'"]
    )
    assert ok.exit_code == 0, ok.output
