"""What msnoop writes is complete or absent, every metadata type round-trips or is refused in one line, and the
Python API refuses layouts it cannot read exactly (no Ray).
"""

from __future__ import annotations

import datetime
import decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import msnoop
from msnoop.cli import app
from msnoop.core import storage as st
from msnoop.core.tables import write_table

runner = CliRunner()

#: Metadata types that .h5ad stores and reads back, with values (None = blank).
ROUND_TRIP = {
    "text": (pa.string(), ["a", None, "0001", ""]),
    "text_all_blank": (pa.string(), [None, None, None, None]),
    "bool": (pa.bool_(), [True, None, False, True]),
    "int64": (pa.int64(), [1, None, -3, 2**40]),
    "int8": (pa.int8(), [1, None, -3, 4]),
    "uint16": (pa.uint16(), [1, None, 3, 65535]),
    "float32": (pa.float32(), [0.5, None, -1.0, 2.0]),
    "float64": (pa.float64(), [0.5, None, 1e300, 2.0]),
    "category": (pa.dictionary(pa.int32(), pa.string()), ["x", None, "y", "x"]),
    "null": (pa.null(), [None, None, None, None]),
}
#: Types that .h5ad cannot store.
REFUSED = {
    "date": (pa.date32(), [datetime.date(2020, 1, 1), None, None, None]),
    "timestamp": (pa.timestamp("us"), [datetime.datetime(2020, 1, 1), None, None, None]),
    "list": (pa.list_(pa.int64()), [[1], None, [2, 3], []]),
    "struct": (pa.struct([("a", pa.int64())]), [{"a": 1}, None, {"a": 2}, {"a": 3}]),
    "binary": (pa.binary(), [b"x", None, b"y", b"z"]),
    "decimal": (pa.decimal128(5, 2), [decimal.Decimal("1.10"), None, None, None]),
}


def _table(columns: dict) -> pa.Table:
    arrays = {"Metadata_ImageID": pa.array([f"img{i}" for i in range(4)])}
    for name, (typ, values) in columns.items():
        arrays[f"Metadata_{name}"] = pa.array(values, type=typ)
    arrays["emb_0000"] = pa.array(np.arange(4, dtype=np.float32))
    arrays["emb_0001"] = pa.array(np.ones(4, dtype=np.float32))
    return pa.table(arrays)


def _same(got, want) -> bool:
    if want is None:
        return got is None or got is pd.NA or (isinstance(got, float) and np.isnan(got))
    return got == want


@pytest.mark.parametrize("seed", range(4))
def test_every_metadata_type_round_trips_through_h5ad(tmp_path, seed):
    import anndata as ad

    rng = np.random.default_rng(seed)
    names = list(rng.choice(sorted(ROUND_TRIP), size=int(rng.integers(2, len(ROUND_TRIP) + 1)), replace=False))
    table = _table({n: ROUND_TRIP[n] for n in names})
    pq.write_table(table, tmp_path / "t.parquet")
    msnoop.to_anndata(tmp_path / "t.parquet", tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    for name in names:
        want = ROUND_TRIP[name][1]
        got = back.obs[f"Metadata_{name}"].tolist()
        assert all(_same(g, w) for g, w in zip(got, want, strict=True)), (name, got, want)
    np.testing.assert_array_equal(back.X[:, 0], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_type_h5ad_cannot_store_is_one_error_line_and_no_file(tmp_path, kind):
    table = _table({"Dose": ROUND_TRIP["float64"], kind: REFUSED[kind]})
    pq.write_table(table, tmp_path / "t.parquet")
    out = tmp_path / "sub" / "t.h5ad"
    res = runner.invoke(app, ["export", str(tmp_path / "t.parquet"), "--out", str(out)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"metadata column 'Metadata_{kind}' has type" in lines[0] and "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.rglob("*.h5ad"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_file_is_complete_or_absent_when_its_writer_fails(tmp_path, request, monkeypatch, where):
    """A writer that fails half-way (disk full, a bad value found late) leaves no file and no temporary."""
    import anndata as ad

    if where == "s3":
        s3 = request.getfixturevalue("s3")
        base, cfg = s3.fresh(), s3.config
    else:
        base, cfg = str(tmp_path / "out"), None
    target = st.join(base, "x.h5ad")
    with pytest.raises(RuntimeError, match="disk full"), st.atomic_path(target, cfg) as tmp:
        tmp.write_bytes(b"half an h5ad file")
        raise RuntimeError("disk full")
    assert not st.exists(target, cfg)
    assert not [p for p in st.walk_files(base, cfg) if "tmp" in p] if st.exists(base, cfg) else True

    def broken(self, filename, **kw):
        with open(filename, "wb") as fh:
            fh.write(b"\x89HDF\r\n half")
        raise OSError("No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    pq.write_table(_table({"Dose": ROUND_TRIP["float64"]}), tmp_path / "t.parquet")
    res = runner.invoke(app, ["export", str(tmp_path / "t.parquet"), "--out", str(target)])
    assert res.exit_code == 2 and res.output.startswith("error:") and "No space left" in res.output
    assert not st.exists(target, cfg)
    if where == "local":
        assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
        df = pd.DataFrame({"a": [1, 2]})

        def half_written(self, path, **kw):
            Path(path).write_bytes(b"PAR1 half")
            raise ZeroDivisionError("a value found late")

        monkeypatch.setattr(pd.DataFrame, "to_parquet", half_written)
        with pytest.raises(ZeroDivisionError):
            write_table(df, tmp_path / "out" / "t.parquet")
        assert not list((tmp_path / "out").glob("*t.parquet*"))


def test_h5ad_written_to_object_storage(tmp_path, s3, monkeypatch):
    import anndata as ad

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    pq.write_table(_table({"Flag": ROUND_TRIP["bool"]}), tmp_path / "t.parquet")
    target = f"{s3.fresh()}/exports/t #1.h5ad"
    res = runner.invoke(app, ["export", str(tmp_path / "t.parquet"), "--out", target])
    assert res.exit_code == 0, res.output
    (tmp_path / "back.h5ad").write_bytes(st.read_bytes(target))
    assert ad.read_h5ad(tmp_path / "back.h5ad").obs["Metadata_Flag"].tolist()[:1] == [True]


# --------------------------------------------------------------------------------------------- the Python API


def _model():
    return msnoop.load_model("random:test_cnn:0")


@pytest.mark.parametrize("seed", range(4))
def test_embed_images_accepts_exactly_the_documented_layouts(seed):
    """Property: a random (N, C, H, W) batch gives the same (N, C * D) vectors in every accepted layout; an empty
    batch gives (0, C * D)."""
    rng = np.random.default_rng(seed)
    model = _model()
    d = model.net.embed_dim
    n, c = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    h, w = (int(v) for v in rng.integers(8, 40, 2))
    x = rng.integers(0, 4000, (n, c, h, w)).astype(rng.choice([np.uint16, np.float32]))
    ref = msnoop.embed_images(x, channel_axis=1, model=model)
    assert ref.shape == (n, c * d) and ref.dtype == np.float32
    for images, axis in (
        (np.moveaxis(x, 1, -1), -1),
        (np.moveaxis(x, 1, -1), 3),
        (list(x), 0),
        ([np.moveaxis(i, 0, -1) for i in x], -1),
    ):
        np.testing.assert_allclose(
            msnoop.embed_images(images, channel_axis=axis, model=model), ref, rtol=1e-5, atol=1e-6
        )
    assert msnoop.embed_images(x[:0], channel_axis=1, model=model).shape == (0, c * d)
    assert msnoop.embed_images(x[:0, 0], model=model).shape == (0, d)
    assert msnoop.embed_images([], model=model).shape == (0, d)


@pytest.mark.parametrize("seed", range(4))
def test_impossible_or_ambiguous_layouts_raise_saying_what_is_accepted(seed):
    rng = np.random.default_rng(seed)
    model = _model()
    h, w = (int(v) for v in rng.integers(16, 64, 2))
    c = int(rng.integers(2, 4))
    hwc = rng.integers(0, 4000, (h, w, c)).astype(np.uint16)
    cases = [
        (
            hwc,
            None,
            r"planes of \d+ x \d+ px are not images \(a side under 4 px; an \(H, W, C\) image\? give a batch axis and channel_axis=-1\)",
        ),
        (hwc[None], 1, r"with channel_axis=1: planes of \d+ x \d+ px are not images"),  # the wrong axis
        (hwc[None], 5, r"channel_axis=5 is out of range .*-4 to 3"),
        (hwc[None], -5, r"channel_axis=-5 is out of range"),
        (hwc[None], 0, r"channel_axis=0 is the image axis"),
        (hwc, 1, r"found an array of shape .* with channel_axis=1; accepted layouts"),
        (hwc[None, None], None, r"without channel_axis; accepted layouts"),
        ([hwc, hwc[..., :1]], -1, r"different numbers of channels"),
        ([hwc], 3, r"channel_axis=3 is out of range for image 0"),
        ([hwc], None, r"image 0: found shape .*expected 2 axes"),
        (hwc.astype(complex), -1, r"expected a numeric array, found dtype complex"),
        ([], 0, r"an empty list with channel_axis"),
    ]
    for images, axis, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            msnoop.embed_images(images, channel_axis=axis, model=model)
        with pytest.raises(ValueError, match="accepted layouts|out of range|different numbers|numeric|empty list"):
            msnoop.embed_images(images, channel_axis=axis, model=model)


def test_an_export_never_renames_repeated_ids_of_an_output_folder(tmp_path):
    """A folder two writers left with an id twice is refused (to be repaired by a re-run), not exported with row
    numbers in place of its ids."""
    from msnoop.core import parts
    from msnoop.core.rundir import RunDir

    run = RunDir(tmp_path / "out")
    for ids in (["a", "b"], ["b", "c"]):
        parts.write_part(pa.table({"Metadata_ImageID": ids, "emb_0000": np.ones(2, np.float32)}), run.embeddings)
    run.write_info({"job": "embed", "status": "complete"})
    res = runner.invoke(app, ["export", str(run.location), "--out", str(tmp_path / "x.h5ad")])
    assert res.exit_code == 2 and "holds 1 repeated image id(s) (e.g. 'b')" in res.output and "re-run" in res.output
    assert not (tmp_path / "x.h5ad").exists()


def test_evaluation_tables_on_object_storage(tmp_path, s3, monkeypatch):
    """knn, nsc and map read Parquet and CSV tables from object storage, as they read output folders there."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    rng = np.random.default_rng(0)
    n = 24
    df = pd.DataFrame(
        {
            "Metadata_moa": np.repeat(["a", "b", "c"], n // 3),
            "Metadata_Compound": [f"cpd{i % 6}" for i in range(n)],
            **{f"f{j}": rng.normal(size=n) + np.repeat([0.0, 3.0, 6.0], n // 3) for j in range(5)},
        }
    )
    base = s3.fresh()
    for name, data in (("t.parquet", df.to_parquet(index=False)), ("t.csv", df.to_csv(index=False).encode())):
        st.write_bytes(f"{base}/tables #1/{name}", data)
        uri = f"{base}/tables #1/{name}"
        for args in (
            ["knn", uri, "--label", "Metadata_moa", "--k", "3"],
            ["nsc", uri],
            ["map", uri, "--positive", "Metadata_moa", "--null-size", "100"],
        ):
            res = runner.invoke(app, args)
            assert res.exit_code == 0, (args, res.output)
