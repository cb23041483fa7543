"""Manifests as users write them: metadata kept as written, paths resolved once, ids from each row alone.

Pure functions over many generated manifests (no Ray); the pipeline-level properties are in
test_inputs_pipeline.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hostile_inputs import sparse_text_manifest, written_text

from msnoop.core.rundir import RunDir
from msnoop.core.config import ConfigError
from msnoop.io.config import InputConfig
from msnoop.io.manifest import ID_COLUMN, image_id, load_image_table, metadata_arrow, resolve_path, table_schema

ID = ID_COLUMN
META = ["Metadata_Gene", "Metadata_Plate", "Metadata_Site", "Metadata_Barcode", "Metadata_Note", "Metadata_Dose"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fmt", ["csv", "csv.gz"])
def test_csv_metadata_comes_back_as_written(tmp_path, seed, fmt):
    rng = np.random.default_rng(seed)
    df = sparse_text_manifest(tmp_path, int(rng.integers(1, 12)), rng, images=False)
    df["Metadata_Compound"] = ["NA", "null", "None", "nan", "TRUE", "1e5"][seed]  # names, not missing values
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    df.to_csv(tmp_path / f"m.{fmt}", index=False)
    t = load_image_table(InputConfig(manifest=tmp_path / f"m.{fmt}", channels=["dna"]))
    expected = written_text(df.drop(columns=["dna"]))
    pd.testing.assert_frame_equal(t[expected.columns].astype(object), expected.astype(object), check_dtype=False)
    assert t["Metadata_Plate"].tolist() == ["0001"] * len(df)  # identifiers are never numbers
    schema = table_schema(t)
    assert all(schema.field(c).type == pa.string() for c in t.columns)  # blank-everywhere Note too
    arrow = metadata_arrow(t, schema)
    assert arrow.column("Metadata_Note").null_count == len(df)
    assert arrow.column("Metadata_Gene").to_pylist() == expected["Metadata_Gene"].tolist()


@pytest.mark.parametrize("seed", range(5))
def test_schema_of_the_run_does_not_depend_on_which_rows_a_block_has(tmp_path, seed):
    """Any block (subset, any order) written with the run's schema gives the same column types."""
    rng = np.random.default_rng(seed)
    df = sparse_text_manifest(tmp_path, 9, rng, images=False)
    df.to_csv(tmp_path / "m.csv", index=False)
    t = load_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna"]))
    schema = table_schema(t)
    for size in (1, 2, 3, len(t)):
        order = rng.permutation(len(t))
        blocks = [metadata_arrow(t.iloc[order[i : i + size]], schema) for i in range(0, len(t), size)]
        assert {b.schema for b in blocks} == {schema}
        whole = pa.concat_tables(blocks).sort_by(ID_COLUMN)
        assert whole.equals(metadata_arrow(t, schema).sort_by(ID_COLUMN))


def test_declared_dtypes_convert_and_bad_values_are_named(tmp_path):
    df = pd.DataFrame(
        {
            "dna": ["a.tif", "b.tif", "c.tif"],
            "Dose": ["0.5", "", "10"],
            "Count": ["1", "2", ""],
            "Ctrl": ["yes", "no", ""],
        }
    )
    df.to_csv(tmp_path / "m.csv", index=False)
    cfg = InputConfig(
        manifest=tmp_path / "m.csv", channels=["dna"], dtypes={"Metadata_Dose": "float", "Count": "int", "Ctrl": "bool"}
    )
    t = load_image_table(cfg)
    schema = table_schema(t)
    assert schema.field("Metadata_Dose").type == pa.float64()
    assert schema.field("Metadata_Count").type == pa.int64()
    assert schema.field("Metadata_Ctrl").type == pa.bool_()
    arrow = metadata_arrow(t, schema)
    assert arrow.column("Metadata_Dose").to_pylist() == [0.5, None, 10.0]
    assert arrow.column("Metadata_Count").to_pylist() == [1, 2, None]
    assert arrow.column("Metadata_Ctrl").to_pylist() == [True, False, None]
    df.assign(Count=["1", "x", ""]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConfigError, match=r"column 'Count' declared int"):
        load_image_table(cfg.model_copy(update={"manifest": tmp_path / "bad.csv"}))
    with pytest.raises(ConfigError, match=r"input.dtypes names column 'Nope'"):
        load_image_table(cfg.model_copy(update={"dtypes": {"Nope": "int"}}))


def test_parquet_manifest_keeps_its_types(tmp_path):
    df = pd.DataFrame(
        {
            "dna": ["a.tif", "b.tif", "c.tif"],
            "Metadata_Dose": [0.5, np.nan, 2.0],
            "Metadata_Count": pd.array([1, None, 3], dtype="Int64"),
            "Metadata_Plate": ["0001", None, "0002"],
        }
    )
    df.to_parquet(tmp_path / "m.parquet")
    t = load_image_table(InputConfig(manifest=tmp_path / "m.parquet", channels=["dna"]))
    arrow = metadata_arrow(t, table_schema(t))
    assert arrow.schema.field("Metadata_Dose").type == pa.float64()
    assert arrow.schema.field("Metadata_Count").type == pa.int64()
    assert arrow.column("Metadata_Count").to_pylist() == [1, None, 3]
    assert arrow.column("Metadata_Plate").to_pylist() == ["0001", None, "0002"]
    with pytest.raises(ConfigError, match="Parquet and keeps its own column types"):
        load_image_table(
            InputConfig(manifest=tmp_path / "m.parquet", channels=["dna"], dtypes={"Metadata_Dose": "int"})
        )


@pytest.mark.parametrize("seed", range(8))
def test_ids_depend_on_each_row_alone(tmp_path, seed):
    """Adding rows (another plate, another folder, outside the root) and shuffling never changes an id."""
    rng = np.random.default_rng(seed)
    first = [f"plate1/{'ABCDEFGH'[i % 8]}{i:02d}_s1.tif" for i in range(int(rng.integers(1, 6)))]
    added = [f"plate2/sub/x{i}.ome.tif" for i in range(int(rng.integers(1, 4)))]
    added += [str(tmp_path.parent / f"outside{seed}" / "y.tif"), "s3://bucket/screen/z.tiff"]
    pd.DataFrame({"dna": first}).to_csv(tmp_path / "m.csv", index=False)
    before = load_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna"]))
    grown = pd.DataFrame({"dna": first + added}).sample(frac=1, random_state=seed)
    grown.to_csv(tmp_path / "m.csv", index=False)
    after = load_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna"]))
    ids = dict(zip(after["Metadata_Path_dna"], after[ID_COLUMN], strict=True))
    for p, i in zip(before["Metadata_Path_dna"], before[ID_COLUMN], strict=True):
        assert ids[p] == i
    assert set(before[ID_COLUMN]) == {Path(p).with_suffix("").as_posix() for p in first}
    assert ids[str(tmp_path / "plate2/sub/x0.ome.tif")] == "plate2/sub/x0"
    assert ids[str(tmp_path.parent / f"outside{seed}" / "y.tif")] == str(tmp_path.parent / f"outside{seed}" / "y")
    assert ids["s3://bucket/screen/z.tiff"] == "s3://bucket/screen/z"


def test_mixed_relative_absolute_home_and_uri_paths_resolve_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    paths = [
        "rel/a.tif",
        str(tmp_path / "abs" / "b.tif"),
        "~/c.tif",
        (tmp_path / "d d.tif").as_uri(),
        "s3://bucket/e.tif",
        "https://host/f.tif?x=1",
        "../up/g.tif",
        "",
    ]
    sub = tmp_path / "manifests"
    sub.mkdir()
    pd.DataFrame({"dna": paths, "Metadata_Well": list("ABCDEFGH")}).to_csv(sub / "m.csv", index=False)
    t = load_image_table(InputConfig(manifest=sub / "m.csv", channels=["dna"]))
    assert t["Metadata_Path_dna"].tolist() == [
        str(sub / "rel/a.tif"),
        str(tmp_path / "abs" / "b.tif"),
        str(tmp_path / "home" / "c.tif"),
        str(tmp_path / "d d.tif"),
        "s3://bucket/e.tif",
        "https://host/f.tif?x=1",
        str(tmp_path / "up/g.tif"),
        None,
    ]
    assert t[ID_COLUMN].iloc[-1] == "row7"  # no path: an error row with a positional id
    root = tmp_path / "elsewhere"
    t2 = load_image_table(InputConfig(manifest=sub / "m.csv", channels=["dna"], root=root))
    assert t2["Metadata_Path_dna"].iloc[0] == str(root / "rel/a.tif")


def test_resolve_path_and_image_id_properties(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(50):
        depth = int(rng.integers(0, 4))
        rel = "/".join(f"d{rng.integers(0, 3)}" for _ in range(depth)) + f"/f{rng.integers(0, 99)}.tif"
        rel = rel.lstrip("/")
        absolute = resolve_path(rel, tmp_path)
        assert absolute is not None and os.path.isabs(absolute) and absolute == str(tmp_path / rel)
        assert resolve_path(absolute, Path("/somewhere/else")) == absolute  # resolving twice changes nothing
        assert image_id(absolute, tmp_path) == rel[: -len(".tif")]


def test_loaddata_quirks(tmp_path):
    img = tmp_path / "img dir"
    df = pd.DataFrame(
        {
            "Metadata_Plate": ["0001", "0001", "0002", "0002"],
            "FileName_OrigDNA": ["a.tif", "sub/b.tif", (img / "c.tif").as_uri(), ""],
            "PathName_OrigDNA": [str(img), "", "", ""],
            "URL_OrigDNA": ["", "", "", "s3://bucket/plate/d.tif"],
        }
    )
    df.to_csv(tmp_path / "load_data.csv", index=False)
    t = load_image_table(InputConfig(loaddata=tmp_path / "load_data.csv", channels=["DNA"]))
    assert t["Metadata_Path_DNA"].tolist() == [
        str(img / "a.tif"),
        str(tmp_path / "sub/b.tif"),  # empty PathName: the FileName stands alone
        str(img / "c.tif"),  # file:// URL decoded (%20 -> space)
        "s3://bucket/plate/d.tif",  # other URLs kept as given
    ]
    assert t["Metadata_Plate"].tolist() == ["0001", "0001", "0002", "0002"]
    assert "Metadata_PathName_OrigDNA" not in t.columns and "Metadata_URL_OrigDNA" not in t.columns
    url_only = pd.DataFrame({"URL_OrigDNA": ["file:///data/x.tif", "https://h/y.tif"]})
    url_only.to_csv(tmp_path / "urls.csv", index=False)
    t = load_image_table(InputConfig(loaddata=tmp_path / "urls.csv", channels=["DNA"]))
    assert t["Metadata_Path_DNA"].tolist() == ["/data/x.tif", "https://h/y.tif"]


@pytest.mark.parametrize(
    ("columns", "pair"),
    [
        (["Plate", "Metadata_Plate"], ("Plate", "Metadata_Plate")),
        (["Metadata_Well", "Well"], ("Metadata_Well", "Well")),
        (["Path_dna", "Metadata_Path_dna"], ("Path_dna", "Metadata_Path_dna")),
    ],
)
def test_column_collisions_are_refused_naming_both(tmp_path, columns, pair):
    df = pd.DataFrame({"dna": ["a.tif"], **{c: ["x"] for c in columns}})
    df.to_csv(tmp_path / "m.csv", index=False)
    cfg = InputConfig(manifest=tmp_path / "m.csv", channels=["dna"], channel_columns={"dna": "dna"})
    with pytest.raises(ConfigError, match=rf"columns '{pair[0]}' and '{pair[1]}' would both become"):
        load_image_table(cfg)
    df.to_csv(tmp_path / "load_data.csv", index=False)
    ld = pd.DataFrame({"FileName_DNA": ["a.tif"], **{c: ["x"] for c in columns}})
    ld.to_csv(tmp_path / "load_data.csv", index=False)
    if not pair[0].startswith("Path_"):
        with pytest.raises(ConfigError, match="would both become"):
            load_image_table(InputConfig(loaddata=tmp_path / "load_data.csv", channels=["DNA"]))


def test_one_column_for_multichannel_files(tmp_path):
    pd.DataFrame({"path": ["a.ome.tif", "b.ome.tif"], "Metadata_Well": ["A1", "A2"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    cfg = InputConfig(manifest=tmp_path / "m.csv", channels=["DNA", "GFP"], channel_index={"DNA": 0, "GFP": 2})
    t = load_image_table(cfg)
    assert (
        t["Metadata_Path_DNA"].tolist()
        == t["Metadata_Path_GFP"].tolist()
        == [str(tmp_path / "a.ome.tif"), str(tmp_path / "b.ome.tif")]
    )
    assert t[ID_COLUMN].tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="no plane for channel"):
        InputConfig(manifest=tmp_path / "m.csv", channels=["DNA", "GFP"], channel_index={"DNA": 0})


def test_load_image_picks_planes_of_multichannel_files(tmp_path):
    from hostile_inputs import image, write_ome_tiff

    from msnoop.embed.dataset import load_image

    planes = image(np.random.default_rng(9), (3, 16, 16))
    write_ome_tiff(tmp_path / "a.ome.tif", planes, ["DNA", "ER", "GFP"])
    row = pd.Series(
        {ID: "a", "Metadata_Path_DNA": str(tmp_path / "a.ome.tif"), "Metadata_Path_GFP": str(tmp_path / "a.ome.tif")}
    )
    for selectors in ({"DNA": 0, "GFP": 2}, {"DNA": "DNA", "GFP": "GFP"}):
        dna, gfp = load_image(row, ["DNA", "GFP"], selectors=selectors)
        np.testing.assert_array_equal(dna, planes[0])
        np.testing.assert_array_equal(gfp, planes[2])


def _part(folder, ids, reason="r"):
    from msnoop.core import parts

    return parts.write_part(
        pa.Table.from_pydict({ID: ids, "path": ids, "reason": [reason] * len(ids)}, schema=parts.ERRORS_SCHEMA), folder
    )


@pytest.mark.parametrize("seed", range(6))
def test_drop_ids_rewrites_error_parts_without_those_rows(tmp_path, seed):
    from msnoop.core import parts

    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(int(rng.integers(1, 20)))]
    cuts = sorted(rng.choice(len(ids) + 1, size=min(3, len(ids)), replace=False).tolist())
    for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True):
        if b > a:
            _part(tmp_path / "errors", ids[a:b])
    drop = set(rng.choice(ids, size=int(rng.integers(0, len(ids) + 1)), replace=False).tolist())
    assert parts.drop_ids(tmp_path / "errors", drop) == len(drop)
    left = sorted(parts.read_frame(tmp_path / "errors")[ID]) if parts.part_files(tmp_path / "errors") else []
    assert left == sorted(set(ids) - drop)
    assert not list((tmp_path / "errors").glob(".*tmp"))


def test_totals_that_do_not_add_up_are_errors(tmp_path):
    from msnoop.embed.totals import TotalsError, check_totals

    _part(tmp_path / "embeddings", ["a", "b"])
    _part(tmp_path / "errors", ["c"])
    _part(tmp_path / "errors", ["other-manifest"])
    assert check_totals(RunDir(tmp_path), pd.Series(["a", "b", "c"])) == (2, 1)
    with pytest.raises(TotalsError, match=r"2 embedded \+ 1 errors != 4 input images: 1 id\(s\) have no output row"):
        check_totals(RunDir(tmp_path), pd.Series(["a", "b", "c", "d"]))
    _part(tmp_path / "errors", ["a"])
    with pytest.raises(TotalsError, match="both embedded and in errors"):
        check_totals(RunDir(tmp_path), pd.Series(["a", "b", "c"]))


def test_resuming_with_other_metadata_types_is_refused(tmp_path):
    from msnoop.core.rundir import OutputMismatchError
    from msnoop.core import parts

    before = pa.schema([(ID, pa.string()), ("Metadata_Dose", pa.string()), ("Metadata_Old", pa.int64())])
    RunDir(tmp_path).write_info({"metadata_schema": parts.schema_to_json(before)})
    _part(tmp_path / "errors", ["a"])
    grown = pa.schema([(ID, pa.string()), ("Metadata_Dose", pa.string()), ("Metadata_New", pa.string())])
    assert RunDir(tmp_path).resumed_schema(grown).names == [ID, "Metadata_Dose", "Metadata_Old", "Metadata_New"]
    declared = pa.schema([(ID, pa.string()), ("Metadata_Dose", pa.float64())])
    with pytest.raises(OutputMismatchError, match="Metadata_Dose: string there, double now"):
        RunDir(tmp_path).resumed_schema(declared)


def test_retry_errors_option_and_hint(tmp_path, capsys):
    from types import SimpleNamespace

    from msnoop.cli.embed import _embed_overrides
    from msnoop.cli.embed import print_embed_result as _print_embed_result

    assert ("runtime.retry_errors", True) in _embed_overrides(retry_errors=True)
    assert _embed_overrides(retry_errors=False) == []
    result = SimpleNamespace(
        n_embedded=3, n_errors=1, n_skipped=0, seconds=1.0, images_per_s=4.0, n_cells=0, out_dir=tmp_path,
        n_rows_total=3, n_errors_total=1, n_input=4, n_cells_total=0, table=None,
        errors_preview=[("a", "a.tif: file not found")],
    )  # fmt: skip
    _print_embed_result(result)
    out = capsys.readouterr().out
    assert "Totals: 3 embedded + 1 errors = 4 input images" in out and "--retry-errors" in out
