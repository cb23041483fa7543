"""Each concept has one home: the output folder's layout, the post-processing registry, the plug-in points.

The structural checks read the package's source (as tests/test_layers.py does); the behavioural ones use the
extension points the way a contributor would: a new image format, a new architecture, a fitted transform
saved and loaded, an evaluation reading a table's own post-processing.
"""

from __future__ import annotations

import ast
import json
import sys
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from msnoop.core.rundir import RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "msnoop"
#: Names of places in a job's output folder: only msnoop/core/rundir.py may spell them out.
LAYOUT_NAMES = {
    RunDir.EMBEDDINGS,
    RunDir.ERRORS,
    RunDir.CELLS,
    RunDir.MASKS,
    RunDir.RUN_FILE,
    RunDir.CONFIG_FILE,
    RunDir.LANCEDB,
    RunDir.PART_INDEX,
    RunDir.PROFILES,
    RunDir.TREATMENTS,
    RunDir.CORRECTION,
    RunDir.WELLS,
    RunDir.SCREEN,
    RunDir.SCREEN_PLOT,
}


def layout_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of string literals naming a place of the output folder, outside docstrings and outside
    record or config keys (``info["cells"]``, ``d.get("cells")``, ``"cells" in info``, ``{"lancedb": uri}``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body:
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        if isinstance(node, ast.Subscript):
            skip.add(id(node.slice))
        if isinstance(node, ast.Dict):
            skip |= {id(k) for k in node.keys if k is not None}
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("get", "pop") and node.args:
            skip.add(id(node.args[0]))
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            skip.add(id(node.left))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("_KEYS") for t in node.targets):
            skip |= {id(n) for n in ast.walk(node.value)}
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_NOISY" for t in node.targets):
            skip |= {id(n) for n in ast.walk(node.value)}  # logger names
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Field" and node.args:
            skip.add(id(node.args[0]))  # a field's default value, e.g. the job name "embeddings"
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in LAYOUT_NAMES and id(n) not in skip
    ]


def test_the_output_folder_layout_is_spelled_out_once():
    found = {
        str(p.relative_to(PACKAGE.parent)): hits
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "rundir.py" and (hits := layout_literals(p))
    }
    # segtrain's input folders are called images/ and masks/: its own input layout, not an output folder's
    found.pop("msnoop/segment/segtrain.py", None)
    assert found == {}, "name places of the output folder through msnoop.core.rundir.RunDir"


def test_the_layout_check_sees_a_spelled_out_folder(tmp_path):
    """The checker itself: a joined path string outside rundir.py is reported (the test above can fail)."""
    mod = tmp_path / "m.py"
    mod.write_text('def f(out):\n    """run.json."""\n    return out / "errors", {"lancedb": 1}["lancedb"]\n')
    assert layout_literals(mod) == [(3, "errors")]


def test_run_dir_layout_and_record(tmp_path):
    run = RunDir(tmp_path / "out")
    assert (
        run.embeddings == tmp_path / "out" / "embeddings"
        and run.sub("embeddings", "m").location == run.embeddings / "m"
    )
    assert run.lancedb_uri() == str(tmp_path / "out" / "lancedb") and run.lancedb_uri("s3://b/db") == "s3://b/db"
    assert not run.exists()
    with pytest.raises(FileNotFoundError, match="not an msnoop output folder"):
        run.read_info()
    run.write_info({"job": "embed", "lancedb": "elsewhere/db"})
    assert run.exists() and run.read_info()["job"] == "embed"
    assert run.recorded_lancedb_uri(run.read_info()) == run.lancedb_uri()  # a relative path that is not there
    uri = RunDir("s3://bucket/run1")
    assert uri.is_uri and uri.errors == "s3://bucket/run1/errors" and uri.absolute() == "s3://bucket/run1"


def test_post_processing_names_are_typed_once_and_every_one_is_registered():
    from msnoop.embed.config import OutputConfig
    from msnoop.evaluate.bench import BenchJob
    from msnoop.vectors import postprocess as pp

    names = set(typing.get_args(pp.PostprocessMethod)) | set(typing.get_args(pp.SpherizeMethod))
    assert names == set(pp.REGISTRY)
    for name in names:
        assert issubclass(pp.postprocessor_class(name), pp.PostProcessor)
    for field in (OutputConfig.model_fields["postprocess"], BenchJob.model_fields["postprocess"]):
        assert field.annotation is pp.PostprocessMethod
    with pytest.raises(ValueError, match="unknown post-processing 'whiten'; expected one of standardize"):
        pp.create_postprocessor("whiten")


@pytest.mark.parametrize("method", ["raw", "standardize", "ZCA", "PCA-cor"])
def test_every_fitted_transform_saves_and_loads(method):
    """fit -> to_dict (through JSON) -> load_postprocessor transforms new rows exactly as the fitted object does."""
    from msnoop.vectors.postprocess import create_postprocessor, load_postprocessor

    rng = np.random.default_rng(0)
    X, new = rng.normal(size=(40, 5)), rng.normal(size=(7, 5))
    params = {"epsilon": 1e-3} if method not in ("raw", "standardize") else {}
    proc = create_postprocessor(method, **params).fit(X)
    back = load_postprocessor(json.loads(json.dumps(proc.to_dict())))
    assert type(back) is type(proc) and back.n in (0, proc.n)
    np.testing.assert_array_equal(back.transform(new), proc.transform(new))


def test_a_streamed_fit_equals_a_fit_on_all_rows():
    from msnoop.vectors.postprocess import Raw, Standardizer

    X = np.random.default_rng(1).random((50, 4)) * 3
    streamed, whole = Standardizer().fit_batches(np.array_split(X, 4)), Standardizer().fit(X)
    np.testing.assert_allclose(streamed.transform(X), whole.transform(X), rtol=1e-5, atol=1e-5)
    assert Standardizer().fit_batches([]).n == 0 and Raw().fit_batches([X]).n == 50


def test_distances_are_those_of_lancedb():
    from msnoop.vectors.distance import cosine_similarity, distances, normalize_rows

    X = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=np.float32)
    q = np.array([1.0, 1.0], dtype=np.float32)
    np.testing.assert_allclose(distances(X, q, "cosine"), [1 - 2**-0.5, 1 - 2**-0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(distances(X, q, "l2"), [1.0, 2.0, 2.0])
    np.testing.assert_allclose(distances(X, q, "dot"), [0.0, -1.0, 1.0])
    assert normalize_rows(X).dtype == np.float32 and np.allclose(normalize_rows(X)[2], 0)
    np.testing.assert_allclose(cosine_similarity(X.astype(np.float64))[0], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="expected metric 'cosine', 'l2' or 'dot', found 'ip'"):
        distances(X, q, "ip")


def test_a_new_image_format_plugs_in_by_suffix(tmp_path):
    """One decorated decoder: read_image reads the format and segtrain's image listing sees it."""
    from msnoop.io import readers
    from msnoop.segment.segtrain import find_pairs

    @readers.register_reader("test format", suffixes=(".msnooptest",))
    def _read(source):
        arr = np.load(source, allow_pickle=False)
        return arr, readers.plain_axes(arr), None

    try:
        arr = np.arange(24, dtype=np.uint16).reshape(4, 6)
        for sub in ("images", "masks"):
            (tmp_path / sub).mkdir()
            with open(tmp_path / sub / "a.msnooptest", "wb") as fh:
                np.save(fh, arr)
        np.testing.assert_array_equal(readers.read_image(tmp_path / "images" / "a.msnooptest"), arr)
        pairs, _ = find_pairs(tmp_path / "images", tmp_path / "masks")
        assert [p.name for p, _ in pairs] == ["a.msnooptest"]
        with pytest.raises(ValueError, match="suffixes taken: .tif"):
            readers.register_reader("another TIFF", suffixes=(".tif",))(_read)
    finally:
        readers.READERS[:] = [r for r in readers.READERS if r.name != "test format"]


class _EmbedOnly(nn.Module):
    embed_dim = 4

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1)).repeat(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_an_architecture_registers_in_its_own_module_and_must_provide_the_training_forward():
    from msnoop.models import registry
    from msnoop.models.protocol import EmbeddingNetwork, PretrainableNetwork

    assert "microsnoop_cnn" in registry.list_models()  # registered in msnoop/models/cnn.py, found by the registry
    net = registry.create_model("test_cnn")
    assert isinstance(net, PretrainableNetwork) and type(net).__module__ == "msnoop.models.cnn"

    def embed_only_test_arch() -> nn.Module:
        return _EmbedOnly()

    registry.register_model(embed_only_test_arch)
    try:
        assert isinstance(_EmbedOnly(), EmbeddingNetwork)
        with pytest.raises(TypeError, match=r"forward\(\.\.\., skip_keep=None\), forward\(\.\.\., view2=None\)"):
            registry.create_model("embed_only_test_arch")
    finally:
        registry._MODELS.pop("embed_only_test_arch")


def test_evaluations_use_the_table_s_own_post_processing(tmp_path):
    from msnoop.evaluate.features import postprocessed_table, table_postprocess

    df = pd.DataFrame({"Metadata_Class": list("aabb"), "f0": [1.0, 2.0, 3.0, 5.0], "f1": [0.0, 1.0, 0.0, 1.0]})
    df.to_csv(tmp_path / "plain.csv", index=False)
    profiles = RunDir(tmp_path / "profiles_out")
    profiles.write_info({"job": "profile"})
    df.to_parquet(profiles.profiles)
    embedded = RunDir(tmp_path / "embed_out")
    embedded.write_info({"job": "embed", "postprocess": {"method": "raw"}})
    (tmp_path / "t.lance").mkdir()
    assert table_postprocess(tmp_path / "plain.csv") == "standardize"
    assert table_postprocess(profiles.profiles) == "raw"  # sphered on its controls: used as it is
    assert table_postprocess(embedded.location) == "raw"
    assert table_postprocess(tmp_path / "t.lance") == "raw"
    out, record = postprocessed_table(df, method="standardize")
    assert record == {"method": "standardize", "n": 4} and list(out.columns) == list(df.columns)
    np.testing.assert_allclose(out[["f0", "f1"]].mean(), 0, atol=1e-6)
    assert postprocessed_table(df, method="raw")[0] is df


def test_nsc_applies_the_post_processing_it_reports(tmp_path):
    """nsc now honours post-processing: the command records it and its neighbours follow it."""
    import typer
    from typer.testing import CliRunner

    from msnoop.cli.evaluate import nsc_command

    # by cosine on the raw features every treatment's nearest other compound has the other MOA; standardised
    # (each feature centred over the four rows), every one has its own
    df = pd.DataFrame(
        {
            "Metadata_moa": ["m1", "m2", "m1", "m2"],
            "Metadata_Compound": ["c1", "c2", "c3", "c4"],
            "f0": [13.2, 11.3, 14.6, 8.7],
            "f1": [1.1, 1.2, 1.7, 0.3],
        }
    )
    path = tmp_path / "treatments.csv"
    df.to_csv(path, index=False)
    app = typer.Typer()
    app.command()(nsc_command)
    results = {}
    for method in ("raw", "standardize"):
        out = tmp_path / f"{method}.json"
        res = CliRunner().invoke(app, [str(path), "--postprocess", method, "--json", str(out)])
        assert res.exit_code == 0, res.output
        results[method] = json.loads(out.read_text())
    assert results["raw"]["postprocess"] == {"method": "raw"}
    assert results["standardize"]["postprocess"] == {"method": "standardize", "n": 4}
    assert results["raw"]["NSC"]["accuracy"] == 0.0 and results["standardize"]["NSC"]["accuracy"] == 1.0


def test_the_jobs_harness_writes_result_files(tmp_path):
    sys.path.insert(0, str(PACKAGE.parent / "jobs"))
    try:
        from harness import PeakRSS, Stopwatch, bootstrap_ratio, write_results
    finally:
        sys.path.remove(str(PACKAGE.parent / "jobs"))
    files = write_results(tmp_path / "r" / "bench.json", {"x": np.float32(0.5), "a": np.arange(2)}, "| a |\n")
    assert [f.name for f in files] == ["bench.json", "bench.md"]
    assert json.loads(files[0].read_text()) == {"x": 0.5, "a": [0, 1]} and files[1].read_text() == "| a |\n"
    with Stopwatch() as clock, PeakRSS(0.01, children=False) as mem:
        block = np.ones(4_000_000)
    assert clock.wall > 0 and mem.peak >= mem.base and block.sum() == 4_000_000
    lo, hi = bootstrap_ratio(np.full(8, 2.0), np.full(8, 1.0), n_boot=50)
    assert lo == hi == 2.0
