"""The Python API (load_model, embed_images, run), AnnData export, part provenance and the one SQL filter dialect."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import msnoop
from msnoop.core import parts
from msnoop.core.config import ConfigError
from msnoop.core.filters import FilterError, filter_mask
from msnoop.core.rundir import RunDir
from msnoop.data.synthetic import write_dataset


def _images(n=3, c=2, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, (n, c, size, size)).astype(np.uint16)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "list-CHW", "list-HWC"])
def test_embed_images_gives_the_same_vectors_whatever_the_channel_layout(layout):
    model = msnoop.load_model("random:test_cnn:0")
    imgs = _images()
    ref = msnoop.embed_images(imgs, channel_axis=1, model=model)
    given = {
        "NCHW": (imgs, 1),
        "NHWC": (np.moveaxis(imgs, 1, -1), -1),
        "list-CHW": (list(imgs), 0),
        "list-HWC": ([np.moveaxis(im, 0, -1) for im in imgs], -1),
    }[layout]
    out = msnoop.embed_images(given[0], channel_axis=given[1], model=model)
    assert out.dtype == np.float32 and out.shape == (3, 2 * model.net.embed_dim)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_embed_images_equals_one_channel_embeddings_concatenated():
    model = msnoop.load_model("random:test_cnn:0")
    imgs = _images(n=2, c=3)
    full = msnoop.embed_images(imgs, channel_axis=1, model=model)
    d = model.net.embed_dim
    for c in range(3):
        one = msnoop.embed_images(imgs[:, c], model=model)  # (N, H, W): one channel
        np.testing.assert_allclose(full[:, c * d : (c + 1) * d], one, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, rtol=1e-5)


def test_embed_images_refuses_bad_input_with_a_message():
    model = msnoop.load_model("random:test_cnn:0")
    with pytest.raises(ValueError, match="constant"):
        msnoop.embed_images(np.zeros((1, 1, 16, 16)), channel_axis=1, model=model)
    with pytest.raises(ValueError, match="channel_axis=0 is the image axis"):
        msnoop.embed_images(_images(), channel_axis=0, model=model)
    with pytest.raises(ValueError, match=r"found shape \(2, 3, 8, 8\), expected 3 axes"):
        msnoop.embed_images([np.ones((2, 3, 8, 8))], channel_axis=0, model=model)


def test_load_model_default_has_the_shipped_preprocessing():
    model = msnoop.load_model()
    assert model.sha256 and model.preprocess.preset == "microsnoop" and model.preprocess.input_size == 224


def test_run_validates_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'inptu'"):
        msnoop.run({"job": "embed", "inptu": {}, "model": "default", "output": {"dir": str(tmp_path)}})
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("api")
    manifest = write_dataset(root / "data", n_per_class=3, size=40, seed=2)
    result = msnoop.run(
        {
            "job": "embed",
            "name": "api",
            "input": {"manifest": str(manifest), "channels": ["dna", "protein"]},
            "model": "random:test_cnn:0",
            "output": {"dir": str(root / "out")},
            "runtime": {"images_per_block": 4, "progress": False},
        }
    )
    return root / "out", result


@pytest.mark.ray
def test_run_embeds_any_config_and_parts_carry_their_provenance(embedded):
    out, result = embedded
    assert result.n_rows_total == 12 and result.table == "api"
    run = RunDir(out).read_info()
    for f in parts.part_files(out / RunDir.EMBEDDINGS):
        prov = parts.read_part_provenance(f)
        assert prov["model"] == "random:test_cnn:0" and prov["channels"] == ["dna", "protein"]
        assert prov["preprocess"] == run["preprocess"] and prov["embed_dim"] == run["embed_dim"]


@pytest.mark.ray
def test_anndata_round_trip_keeps_metadata_vectors_and_provenance(embedded, tmp_path):
    import anndata as ad

    out, _ = embedded
    path = tmp_path / "x" / "api.h5ad"
    msnoop.to_anndata(out, path)
    back = ad.read_h5ad(path)
    df = parts.read_frame(out / RunDir.EMBEDDINGS).set_index("Metadata_ImageID").loc[back.obs_names]
    emb = [c for c in df.columns if c.startswith("emb_")]
    np.testing.assert_array_equal(back.X, df[emb].to_numpy(np.float32))
    assert list(back.var_names) == emb
    assert back.obs["Metadata_Class"].astype(str).tolist() == df["Metadata_Class"].astype(str).tolist()
    assert back.uns["msnoop"]["model"] == "random:test_cnn:0" and list(back.uns["msnoop"]["channels"]) == [
        "dna",
        "protein",
    ]


@pytest.mark.ray
def test_export_command_writes_h5ad_and_refuses_other_suffixes(embedded, tmp_path):
    from msnoop.cli import app

    out, _ = embedded
    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "e.h5ad")])
    assert ok.exit_code == 0, ok.output
    assert "12 rows x" in ok.output
    bad = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "e.csv")])
    assert bad.exit_code == 2 and "expected a .h5ad" in bad.output


@pytest.mark.parametrize("seed", range(5))
def test_sql_filters_agree_with_the_equivalent_pandas_mask(seed):
    """Property: for generated tables (nulls, numbers, strings) a SQL condition selects the rows pandas would."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    df = pd.DataFrame(
        {
            "Metadata_Plate": rng.choice(["P1", "P2", "0001", None], n),
            "Metadata_Dose": np.where(rng.random(n) < 0.2, np.nan, rng.random(n) * 10),
            "emb_0000": rng.standard_normal(n).astype(np.float32),
        }
    )
    cases = {
        "Metadata_Plate = 'P1'": df["Metadata_Plate"].eq("P1"),
        "Metadata_Plate = '0001' OR Metadata_Dose > 5": df["Metadata_Plate"].eq("0001") | df["Metadata_Dose"].gt(5),
        "Metadata_Plate IN ('P1', 'P2') AND Metadata_Dose <= 5": df["Metadata_Plate"].isin(["P1", "P2"])
        & df["Metadata_Dose"].le(5),
        "Metadata_Plate IS NULL": df["Metadata_Plate"].isna(),
        "NOT (Metadata_Plate = 'P2')": df["Metadata_Plate"].notna() & df["Metadata_Plate"].ne("P2"),
    }
    for where, expected in cases.items():
        np.testing.assert_array_equal(
            filter_mask(df.sample(frac=1, random_state=seed), where),
            expected.sample(frac=1, random_state=seed).fillna(False).to_numpy(bool),
            err_msg=where,
        )


def test_sql_filter_errors_name_the_filter_and_hint_at_sql():
    df = pd.DataFrame({"Metadata_Compound": ["DMSO", "taxol"]})
    with pytest.raises(FilterError, match="single quotes"):
        filter_mask(df, 'Metadata_Compound == "DMSO"')
    with pytest.raises(FilterError, match="Metadata_Nope"):
        filter_mask(df, "Metadata_Nope = 1")
    assert filter_mask(df, "Metadata_Compound == 'DMSO'").tolist() == [True, False]  # == is accepted as =


@pytest.mark.parametrize("seed", range(4))
def test_standardizer_from_streamed_sums_equals_a_direct_fit(seed):
    """Property: the publish step's one-pass moments give the same standardisation as fitting on all rows."""
    from msnoop.vectors.postprocess import Standardizer

    rng = np.random.default_rng(seed)
    X = rng.random((int(rng.integers(2, 300)), 16)) * rng.random(16) * 10 + rng.random(16)
    X[:, 3] = 0.5  # a constant dimension is only centred
    direct = Standardizer().fit(X)
    blocks = np.array_split(X, int(rng.integers(1, 7)))
    streamed = Standardizer.from_moments(len(X), sum(b.sum(0) for b in blocks), sum((b**2).sum(0) for b in blocks))
    np.testing.assert_allclose(streamed.transform(X), direct.transform(X), rtol=1e-4, atol=1e-4)
    Z = direct.transform(X)
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-5)
    assert np.allclose(np.delete(Z.std(0), 3), 1, atol=1e-4) and np.allclose(Z[:, 3], 0)
    back = Standardizer.from_dict(direct.to_dict())
    np.testing.assert_array_equal(back.transform(X), Z)


@pytest.mark.ray
def test_lancedb_vectors_are_standardised_parts_stay_raw_and_distances_vary(embedded):
    from msnoop.query.search import open_results, search_by_id

    out, _ = embedded
    ref = open_results(out)
    post = ref.info["postprocess"]
    assert post["method"] == "standardize" and post["n"] == 12
    vec = np.stack(ref.table.to_arrow().column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vec.mean(0), 0, atol=1e-4)
    raw = parts.read_frame(out / RunDir.EMBEDDINGS)
    emb = raw[[c for c in raw.columns if c.startswith("emb_")]].to_numpy()
    np.testing.assert_allclose(np.linalg.norm(emb[:, :32], axis=1), 1, rtol=1e-4)  # parts: Microsnoop's readout
    hits = search_by_id(ref, raw["Metadata_ImageID"].iloc[0], k=5)
    d = hits["_distance"].to_numpy()
    assert len(set(np.round(d, 4))) == len(d)  # neighbours at visibly different distances


def test_sql_filter_on_a_wide_fragmented_table_keeps_row_order_and_does_not_copy():
    """A CellProfiler-sized table built column by column (fragmented) is filtered in place, rows in order."""
    import warnings

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"Metadata_Plate": rng.choice(["P1", "P2"], 5000)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building the fragmented table warns; filtering it must not
        for i in range(120):
            df[f"Cells_F{i}"] = rng.random(5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = filter_mask(df, "Metadata_Plate = 'P2' AND Cells_F7 > 0.5")
    np.testing.assert_array_equal(mask, (df["Metadata_Plate"].eq("P2") & df["Cells_F7"].gt(0.5)).to_numpy())


def test_post_processing_choices_agree_between_the_embed_config_and_msnoop_correct():
    """The embed config takes its post-processing choices and default from the one registry of msnoop.vectors."""
    import typing

    from msnoop.embed.config import OutputConfig
    from msnoop.vectors.postprocess import DEFAULT_POSTPROCESS, POSTPROCESS_CHOICES

    field = OutputConfig.model_fields["postprocess"]
    assert typing.get_args(field.annotation) == POSTPROCESS_CHOICES and field.default == DEFAULT_POSTPROCESS
