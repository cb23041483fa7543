"""Generators of small hostile inputs as real screens have them (written under a test's tmp_path).

Each writer returns what it wrote, so tests can compare what msnoop reads with what was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile

TIFF_COMPRESSIONS = ["zlib", "lzw", "jpeg", "zstd", "packbits", None]


def image(rng: np.random.Generator, shape: tuple[int, ...] = (24, 20), dtype: Any = np.uint16) -> np.ndarray:
    """A non-constant image (JPEG-safe values for uint8)."""
    hi = 250 if np.dtype(dtype) == np.uint8 else 4000
    return rng.integers(1, hi, shape).astype(dtype)


def write_tiff(path: Path, arr: np.ndarray, compression: str | None, *, tiled: bool = False) -> Path:
    kw: dict[str, Any] = {"compression": compression}
    if compression == "jpeg":
        kw["compressionargs"] = {"level": 100}
    if tiled:
        kw["tile"] = (16, 16)
    tifffile.imwrite(path, arr, photometric="minisblack", **kw)
    return path


def write_ome_tiff(path: Path, planes: np.ndarray, names: list[str], axes: str = "CYX") -> Path:
    tifffile.imwrite(path, planes, ome=True, metadata={"axes": axes, "Channel": {"Name": names}})
    return path


def _write_ngff_image(group: Any, arr: np.ndarray, axes: str, labels: list[str] | None, version: str) -> None:
    group.create_array("0", data=arr, chunks=arr.shape)
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    ms = {
        "version": version,
        "axes": [{"name": a, "type": kinds[a]} for a in axes.lower()],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * arr.ndim}]}],
    }
    meta: dict[str, Any] = {"multiscales": [ms]}
    if labels:
        meta["omero"] = {"channels": [{"label": lab} for lab in labels]}
    if version == "0.5":
        ms.pop("version")
        group.attrs["ome"] = {"version": "0.5", **meta}
    else:
        group.attrs.update(meta)


def write_ome_zarr_image(
    path: Path, arr: np.ndarray, axes: str = "cyx", labels: list[str] | None = None, version: str = "0.4"
) -> Path:
    """An NGFF image (v0.4 as Zarr v2, v0.5 as Zarr v3) with one resolution level."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    _write_ngff_image(root, arr, axes, labels, version)
    return path


def write_ome_zarr_plate(
    path: Path,
    fields: dict[tuple[str, str], list[np.ndarray]],
    labels: list[str],
    name: str = "P1",
    version: str = "0.4",
    axes: str = "cyx",
) -> Path:
    """An NGFF HCS plate: ``fields[(row, column)]`` lists each field's array (``axes``, default ``[C, Y, X]``)."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    rows = sorted({r for r, _ in fields})
    cols = sorted({c for _, c in fields}, key=int)
    wells = []
    for (r, c), images in fields.items():
        well = root.require_group(r).require_group(c)
        for k, arr in enumerate(images):
            _write_ngff_image(well.require_group(str(k)), arr, axes, labels, version)
        wmeta = {"images": [{"path": str(k)} for k in range(len(images))]}
        if version == "0.5":
            well.attrs["ome"] = {"version": "0.5", "well": wmeta}
        else:
            well.attrs["well"] = {**wmeta, "version": version}
        wells.append({"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)})
    plate = {
        "name": name,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in cols],
        "wells": wells,
        "field_count": max(len(v) for v in fields.values()),
    }
    if version == "0.5":
        root.attrs["ome"] = {"version": "0.5", "plate": plate}
    else:
        root.attrs["plate"] = {**plate, "version": version}
    return path


def sparse_text_manifest(
    root: Path, n: int, rng: np.random.Generator, *, images: bool = True, prefix: str = "img"
) -> pd.DataFrame:
    """A manifest whose text columns are as users write them: blanks for controls, zero-padded ids.

    Columns: ``dna`` (relative path), ``Metadata_Gene`` (blank except one row), ``Metadata_Plate``
    (``'0001'``), ``Metadata_Site`` (``'01'``...), ``Metadata_Barcode`` (``'000123'``), ``Metadata_Note``
    (blank everywhere), ``Metadata_Dose`` (decimal text).
    """
    rows = []
    sub = root / "images"
    sub.mkdir(parents=True, exist_ok=True)
    gene_row = int(rng.integers(0, n))
    for i in range(n):
        name = f"{prefix}{i:03d}.tif"
        if images:
            tifffile.imwrite(sub / name, image(rng))
        rows.append(
            {
                "dna": f"images/{name}",
                "Metadata_Gene": "TP53" if i == gene_row else "",
                "Metadata_Plate": "0001",
                "Metadata_Site": f"{i % 9 + 1:02d}",
                "Metadata_Barcode": f"{123 + i:06d}",
                "Metadata_Note": "",
                "Metadata_Dose": f"{0.5 * i:.2f}",
            }
        )
    return pd.DataFrame(rows)


def written_text(df: pd.DataFrame) -> pd.DataFrame:
    """What a CSV of ``df`` holds, as msnoop must give it back: text as written, blanks as None."""
    return df.astype(str).map(lambda v: None if v == "" else v)
