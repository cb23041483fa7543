"""The typer CLI end to end on a tiny synthetic dataset (test_cnn), plus `msnoop submit` to a real head node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.data.synthetic import write_dataset

pytestmark = pytest.mark.ray
runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return write_dataset(root, n_per_class=4, size=48, seed=1)


@pytest.fixture(scope="module")
def embedded(synthetic, tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("cli") / "results"
    result = runner.invoke(
        app,
        [
            "embed",
            "--manifest",
            str(synthetic),
            "--channels",
            "dna,protein",
            "--model",
            "random:test_cnn",
            "--out",
            str(out),
            "--name",
            "syn",
            "--set",
            "runtime.images_per_block=8",
            "--set",
            "runtime.progress=false",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_embed_without_yaml_writes_outputs_and_resolved_config(embedded):
    out, output = embedded
    assert "Embedded 16 images (0 errors, 0 already done)" in output
    assert "Totals: 16 embedded + 0 errors = 16 input images" in output
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["input"]["channels"] == ["dna", "protein"] and resolved["runtime"]["images_per_block"] == 8
    df = pd.read_parquet(out / "embeddings")
    assert len(df) == 16 and {"Metadata_Class", "emb_0063"} <= set(df.columns)


def test_info(embedded):
    out, _ = embedded
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "rows       16" in result.output and "64 = 2 channels x 32" in result.output
    assert "dna, protein" in result.output and "random:test_cnn" in result.output


def test_search_by_id_with_filter_and_json(embedded):
    out, _ = embedded
    result = runner.invoke(app, ["search", str(out), "--id", "images/nuclear_0000_dna", "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert len(hits) == 3 and all(h["Metadata_ImageID"] != "images/nuclear_0000_dna" for h in hits)
    assert [h["_distance"] for h in hits] == sorted(h["_distance"] for h in hits)
    result = runner.invoke(
        app, ["search", str(out), "--id", "images/nuclear_0000_dna", "--where", "Metadata_Class = 'membrane'", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert {h["Metadata_Class"] for h in json.loads(result.output)} == {"membrane"}


def test_search_by_new_image_finds_itself(embedded, synthetic):
    out, _ = embedded
    root = synthetic.parent
    result = runner.invoke(
        app,
        [
            "search",
            str(out),
            "--image",
            str(root / "images/punctate_0002_dna.tif"),
            "--image",
            str(root / "images/punctate_0002_protein.tif"),
            "--json",
            "--k",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)[0]
    assert top["Metadata_ImageID"] == "images/punctate_0002_dna" and top["_distance"] < 1e-5


def test_search_errors_are_clear(embedded):
    out, _ = embedded
    result = runner.invoke(app, ["search", str(out), "--id", "nope"])
    assert result.exit_code == 2 and "no image with Metadata_ImageID = 'nope'" in result.output
    result = runner.invoke(app, ["search", str(out), "--image", "a.tif"])
    assert result.exit_code == 2 and "give one --image per channel" in result.output
    result = runner.invoke(app, ["search", str(out)])
    assert result.exit_code == 2


def test_invalid_config_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "job: embed\ninput: {manifest: m.csv, channels: [a]}\nmodel: x\noutput: {dir: o}\nruntime: {batchsize: 3}\n"
    )
    result = runner.invoke(app, ["embed", str(bad)])
    assert result.exit_code == 2 and "bad.yaml" in result.output and "unknown key 'runtime.batchsize'" in result.output
    assert not (tmp_path / "o").exists()
    result = runner.invoke(app, ["validate", str(bad), "--set", "runtime={}"])
    assert result.exit_code == 0 and "valid embed config" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A real `ray start --head` on 127.0.0.1 with the dashboard (Jobs API), stopped afterwards."""
    gcs, dash, agent, agent_grpc, metrics, runtime_env, client = (_free_port() for _ in range(7))
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            "--num-cpus=1",
            # every port explicit, so this head can run beside the session's local cluster
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--ray-client-server-port={client}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    import urllib.error
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (e.g. 401 with token auth) means it is up
            break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail(f"ray head did not start; see {log.name}")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.mark.slow
def test_submit_follow_succeeds_and_failure_exits_nonzero(head_node, synthetic, tmp_path):
    cfg = {
        "job": "embed",
        "name": "sub",
        "input": {"manifest": str(synthetic), "channels": ["dna", "protein"], "limit": 6},
        "model": "random:test_cnn",
        "output": {"dir": str(tmp_path / "out")},
        "runtime": {"progress": False, "images_per_block": 3},
    }
    path = tmp_path / "sub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["submit", str(path), "--address", head_node, "--follow"])
    assert result.exit_code == 0, result.output
    assert "Submitted job msnoop-embed-" in result.output and "ray job submit --address" in result.output
    assert "SUCCEEDED" in result.output
    assert len(pd.read_parquet(tmp_path / "out" / "embeddings")) == 6

    (synthetic.parent / "images" / "nuclear_0000_dna.tif").rename(synthetic.parent / "images" / "moved.tif")
    try:
        cfg["output"]["dir"] = str(tmp_path / "strict")
        cfg["runtime"]["strict"] = True
        path.write_text(yaml.safe_dump(cfg))
        result = runner.invoke(app, ["submit", str(path), "--address", head_node, "--follow"])
        assert result.exit_code == 1, result.output
        assert "FAILED" in result.output and "nuclear_0000_dna.tif: file not found" in result.output
    finally:
        (synthetic.parent / "images" / "moved.tif").rename(synthetic.parent / "images" / "nuclear_0000_dna.tif")


def test_knn_and_report_on_an_embed_output(embedded, tmp_path):
    out, _ = embedded
    result = runner.invoke(
        app, ["knn", str(out), "--label", "Metadata_Class", "--k", "3", "--json", str(tmp_path / "knn.json")]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "knn.json").read_text())
    assert metrics["n_classes"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    result = runner.invoke(
        app, ["report", str(out), "--label", "Metadata_Class", "--out", str(tmp_path / "report"), "--k", "3"]
    )
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report" / "report.html").read_text()
    assert "confusion.png" in html and (tmp_path / "report" / "neighbours.png").stat().st_size > 10_000


def test_map_on_an_embed_output(embedded, tmp_path):
    out, _ = embedded
    result = runner.invoke(
        app,
        ["map", str(out), "--positive", "Metadata_Class", "--null-size", "200", "--json", str(tmp_path / "map.json")],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "map.json").read_text())
    assert summary["n_groups"] == 4 and summary["n_profiles"] == 16 and 0 < summary["mean_map"] <= 1
    assert set(summary["per_group"]) == {"cytoplasmic", "membrane", "nuclear", "punctate"}
    result = runner.invoke(app, ["map", str(out), "--positive", "Metadata_Nope"])
    assert result.exit_code == 2 and "Metadata_Nope" in result.output


def test_embed_summary_keeps_slow_rates_readable(capsys):
    # a cells-mode CPU run embeds ~0.04 images/s: the summary must not print 0.0, and it gives cells/s
    from dataclasses import replace

    from msnoop.cli.embed import print_embed_result as _print_embed_result
    from msnoop.embed.pipeline import EmbedResult

    res = EmbedResult(
        out_dir=Path("out"),
        n_input=96,
        n_skipped=0,
        n_embedded=96,
        n_errors=0,
        n_rows_total=96,
        n_errors_total=0,
        seconds=2157.0,
        table=None,
        errors_preview=[],
        n_cells=6144,
        n_cells_total=6144,
    )
    _print_embed_result(res)
    out = capsys.readouterr().out
    assert "(0.0445 images/s, 2.85 cells/s)" in out
    _print_embed_result(replace(res, n_cells=0, n_cells_total=0))
    assert "(0.0445 images/s)." in capsys.readouterr().out
