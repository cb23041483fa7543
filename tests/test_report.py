"""HTML reports: figures written and valid, metrics on the page, galleries only when there are images."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from msnoop.cli.evaluate import report_command
from msnoop.core.parts import emb_columns
from msnoop.data.synthetic import CHANNELS, write_dataset
from msnoop.evaluate.report import build_report, describe_cv, embed_2d, format_distances, map_2d, thumbnail

DIM = 16


@pytest.fixture(scope="module")
def image_table(tmp_path_factory) -> tuple[pd.DataFrame, str]:
    """A synthetic image set with hand-made 16-d embeddings: one cluster per class, two fields."""
    root = tmp_path_factory.mktemp("report_data")
    manifest = pd.read_csv(write_dataset(root, n_per_class=10, size=32, seed=0))
    rng = np.random.default_rng(0)
    classes = sorted(manifest["Metadata_Class"].unique())
    centres = {c: rng.normal(size=DIM) * 2 for c in classes}
    emb = np.stack([centres[c] + rng.normal(size=DIM) for c in manifest["Metadata_Class"]]).astype(np.float32)
    df = pd.DataFrame(
        {
            "Metadata_ImageID": [f"img{i:03d}" for i in range(len(manifest))],
            "Metadata_Class": manifest["Metadata_Class"],
            "Metadata_Field": manifest["Metadata_Field"].astype(str),
            **{f"Metadata_Path_{ch}": [str(root / p) for p in manifest[ch]] for ch in CHANNELS},
        }
    )
    df = pd.concat([df, pd.DataFrame(emb, columns=emb_columns(DIM))], axis=1)
    path = root / "embeddings.parquet"
    df.to_parquet(path, index=False)
    return df, str(path)


def _check_png(path, min_side: int = 200) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= min_side
        arr = np.asarray(img.convert("L"), dtype=float)
    assert arr.std() > 5  # not a blank canvas


def test_report_with_images(image_table, tmp_path):
    _, path = image_table
    page = build_report(
        path, label="Metadata_Class", batch="Metadata_Field", out_dir=tmp_path / "rep", k=3, n_queries=2, n_neighbours=4
    )
    assert page == tmp_path / "rep" / "report.html"
    text = page.read_text()
    for name in ("map.png", "confusion.png", "neighbours.png"):
        _check_png(tmp_path / "rep" / name)
        assert f'src="{name}"' in text
    srcs = re.findall(r'src="([^"]+)"', text)
    assert all((tmp_path / "rep" / s).is_file() for s in srcs)
    assert "http" not in text  # self-contained apart from the PNGs beside it
    for name in ("accuracy", "balanced accuracy", "macro-F1", "MCC", "t-SNE", "Metadata_Field", "dna = blue"):
        assert name in text
    assert "leave-one-out (LOO)" in text
    import json

    summary = json.loads((tmp_path / "rep" / "report.json").read_text())
    m = summary["metrics"]
    assert f"{m['accuracy']:.4f}" in text and f"{m['macro_f1']:.4f}" in text
    assert m["accuracy"] > 0.9  # well-separated clusters
    assert len(summary["galleries"]) == 2 and len(summary["galleries"][0]["neighbours"]) == 4
    assert summary["protocol"] == "leave-one-out (LOO)" and summary["map_method"] == "t-SNE"


def _capture_figures(monkeypatch) -> dict[str, object]:
    """Figures the report saves, by file name (to read their titles and axis labels)."""
    from msnoop.evaluate import report

    figs: dict[str, object] = {}
    real_save = report.save

    def save(fig, path, **kw):
        figs[path.name] = fig
        return real_save(fig, path, **kw)

    monkeypatch.setattr(report, "save", save)
    return figs


@pytest.mark.parametrize(
    ("method", "cv", "axis", "protocol"),
    [
        ("pca", "kfold:2", r"PCA 1 \(\d+\.\d % var\)", "stratified 2-fold"),
        ("tsne", "group:Metadata_Field", r"t-SNE 1", "leave-group-out by Metadata_Field"),
        # the first UMAP of a process compiles umap-learn's numba kernels (about 16 s of CPU)
        pytest.param("umap", "loo", r"UMAP 1", "leave-one-out (LOO)", marks=pytest.mark.slow),
    ],
)
def test_figures_name_method_axes_and_protocol(image_table, tmp_path, monkeypatch, method, cv, axis, protocol):
    df, _ = image_table
    figs = _capture_figures(monkeypatch)
    page = build_report(
        df, label="Metadata_Class", batch="Metadata_Field", out_dir=tmp_path, k=3, cv=cv, map_method=method
    )
    name = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[method]
    for ax in figs["map.png"].axes:  # both panels: method in the title, method on both axes
        assert ax.get_title().startswith(f"{name}, coloured by Metadata_")
        assert re.fullmatch(axis, ax.get_xlabel()) and re.fullmatch(axis.replace("1", "2"), ax.get_ylabel())
    title = figs["confusion.png"].axes[0].get_title()
    assert "k=3" in title and protocol in title
    assert protocol in page.read_text()
    _check_png(tmp_path / "map.png")


def test_report_without_paths(image_table, tmp_path):
    df, _ = image_table
    profiles = df.drop(columns=[c for c in df.columns if c.startswith("Metadata_Path_")])
    csv = tmp_path / "profiles.csv"
    profiles.to_csv(csv, index=False)
    page = build_report(csv, label="Metadata_Class", batch=None, out_dir=tmp_path / "rep", k=3, cv="kfold:2")
    text = page.read_text()
    assert "No image galleries" in text and "neighbours.png" not in text
    assert not (tmp_path / "rep" / "neighbours.png").exists()
    _check_png(tmp_path / "rep" / "map.png")
    _check_png(tmp_path / "rep" / "confusion.png")
    assert "balanced accuracy" in text


def test_thumbnail_composite(image_table):
    df, _ = image_table
    rgb = thumbnail(df.iloc[0], ["Metadata_Path_dna", "Metadata_Path_protein"])
    assert rgb.shape == (32, 32, 3) and rgb.min() >= 0 and rgb.max() <= 1 and rgb.max() > 0.5
    grey = thumbnail(df.iloc[0], ["Metadata_Path_dna"])
    np.testing.assert_allclose(grey[..., 0], grey[..., 1])


def test_map_auto_switches_tsne_umap_pca_by_size(monkeypatch):
    from msnoop.evaluate import report

    X = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    xy, how = embed_2d(X)
    assert xy.shape == (60, 2) and "t-SNE" in how
    monkeypatch.setattr(report, "TSNE_MAX_ROWS", 50)
    m = map_2d(X)
    assert m.method == "UMAP" and m.axes == ("UMAP 1", "UMAP 2") and m.xy.shape == (60, 2)
    assert "n_neighbors 15" in m.caption and np.isfinite(m.xy).all()
    monkeypatch.setattr(report, "UMAP_MAX_ROWS", 55)
    xy, how = embed_2d(X)
    assert xy.shape == (60, 2) and how.startswith("rows L2-normalised, PCA")
    m = map_2d(X, method="pca")
    ev = float(re.search(r"PCA 1 \((\d+\.\d) % var\)", m.axes[0]).group(1))
    assert 0 < ev < 100
    with pytest.raises(ValueError, match="map method"):
        map_2d(X, method="mds")


@pytest.mark.parametrize("n", [4, 6, 17])
def test_umap_on_tiny_tables(n):
    X = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
    m = map_2d(X, method="umap", seed=1)
    assert m.xy.shape == (n, 2) and np.isfinite(m.xy).all()
    assert f"n_neighbors {min(15, n - 1)}" in m.caption


def test_describe_cv():
    assert describe_cv("loo") == "leave-one-out (LOO)"
    assert describe_cv("kfold:5") == "stratified 5-fold"
    assert describe_cv("group:Metadata_Plate") == "leave-group-out by Metadata_Plate"
    with pytest.raises(ValueError):
        describe_cv("bootstrap")


@pytest.mark.parametrize("seed", range(25))
def test_distances_print_with_enough_digits_to_differ(seed):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-7, 3)
    base = rng.uniform(0.1, 2.0) * scale
    # neighbour distances as FAISS gives them (float32), some nearly equal, some equal
    vals = np.float32(base) + np.float32(scale) * rng.choice([0, 1e-6, 3e-5, 1e-3, 0.2], size=6).astype(np.float32)
    vals = np.sort(vals.astype(np.float32)).astype(float).tolist()
    out = format_distances(vals)
    assert len(set(out)) == len(set(vals))  # different distances print differently
    for text, v in zip(out, vals, strict=True):
        assert float(text) == pytest.approx(v, rel=5e-4)  # at least 4 significant digits
        digits = re.sub(r"e.*$", "", text).replace("-", "").replace(".", "").lstrip("0")
        assert len(digits) >= 4 or v == 0
    assert format_distances([0.0001953, 0.5]) == ["1.953e-04", "0.5000"]


def test_bad_label_column(image_table, tmp_path):
    df, _ = image_table
    with pytest.raises(ValueError, match="Metadata_Nope"):
        build_report(df, label="Metadata_Nope", out_dir=tmp_path)


def test_report_command(image_table, tmp_path):
    _, path = image_table
    app = typer.Typer()
    app.command()(report_command)
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, [path, "--label", "Metadata_Class", "--out", str(out), "--k", "3", "--queries", "1"])
    assert res.exit_code == 0, res.output
    assert str(out / "report.html") in res.output
    assert (out / "report.html").is_file()
    res = CliRunner().invoke(app, [path, "--label", "Metadata_Nope", "--out", str(out)])
    assert res.exit_code == 2 and "Metadata_Nope" in res.output


def test_report_leaves_the_callers_matplotlib_alone(image_table, tmp_path):
    """In a notebook the report must not switch the interactive backend or leave figures open in pyplot."""
    import os
    import subprocess
    import sys

    _, path = image_table
    code = (
        "import sys, matplotlib\n"
        "from msnoop.evaluate.report import build_report\n"
        f"build_report({path!r}, label='Metadata_Class', out_dir={str(tmp_path / 'rep')!r}, k=3, "
        "n_queries=1, n_neighbours=2)\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-2:] == ["svg", "False"]
    _check_png(tmp_path / "rep" / "neighbours.png")
