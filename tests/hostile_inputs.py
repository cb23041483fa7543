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


# ---------------------------------------------------------------------------------------------------------------
# One multi-channel image in every container msnoop reads: the same pixels must give the same planes and vectors.

#: Containers of a ``(C, H, W)`` image: how the file (or files) is written and how each channel is picked.
CONTAINERS = [
    "tiff_chw",  # plain (C, H, W) TIFF, picked by index
    "tiff_hwc",  # (H, W, C) TIFF written from a bare array (tifffile: shaped metadata, axes unknown)
    "tiff_hwc_axes",  # (H, W, C) TIFF with axes metadata YXC
    "ome_tiff",  # OME-TIFF, picked by channel name
    "imagej",  # ImageJ hyperstack (C, Y, X)
    "npy_chw",
    "npy_hwc",
    "zarr_v04",  # OME-Zarr v0.4, picked by label
    "zarr_v05_nosuffix",  # OME-Zarr v0.5 in a folder without the .zarr suffix
    "separate",  # one single-channel TIFF per channel
]


def write_container(folder: Path, planes: np.ndarray, names: list[str], container: str) -> dict[str, tuple[str, Any]]:
    """Write ``planes`` (``[C, H, W]``) in ``container`` under ``folder``; returns ``{name: (path, selector)}``.

    ``selector`` is what ``read_channels`` takes for that channel: a plane index, a channel name, or None (the
    file holds one plane).
    """
    folder.mkdir(parents=True, exist_ok=True)
    c = len(planes)
    hwc = np.ascontiguousarray(np.moveaxis(planes, 0, -1))
    by_index = {n: (k, k) for k, n in enumerate(names)}
    if container == "tiff_chw":
        path = folder / "img.tif"
        tifffile.imwrite(path, planes, photometric="minisblack")
    elif container == "tiff_hwc":
        path = folder / "img.tif"
        tifffile.imwrite(path, hwc)
    elif container == "tiff_hwc_axes":
        path = folder / "img.tif"
        tifffile.imwrite(path, hwc, metadata={"axes": "YXC"})
    elif container == "ome_tiff":
        path = write_ome_tiff(folder / "img.ome.tif", planes, names)
        return {n: (str(path), n) for n in names}
    elif container == "imagej":
        path = folder / "img.tif"
        tifffile.imwrite(
            path,
            planes.astype(np.float32) if planes.dtype.kind == "f" else planes,
            imagej=True,
            metadata={"axes": "CYX"},
        )
    elif container == "npy_chw":
        path = folder / "img.npy"
        np.save(path, planes)
    elif container == "npy_hwc":
        path = folder / "img.npy"
        np.save(path, hwc)
    elif container in ("zarr_v04", "zarr_v05_nosuffix"):
        version = "0.4" if container == "zarr_v04" else "0.5"
        path = write_ome_zarr_image(folder / ("img.zarr" if version == "0.4" else "img"), planes, "cyx", names, version)
        return {n: (str(path), n) for n in names}
    elif container == "separate":
        out = {}
        for k, n in enumerate(names):
            p = folder / f"img_{n}.tif"
            tifffile.imwrite(p, planes[k])
            out[n] = (str(p), None)
        return out
    else:
        raise ValueError(container)
    assert c == len(names)
    return {n: (str(path), k) for n, (k, _) in by_index.items()}


def multichannel(rng: np.random.Generator, *, dtype: Any = None) -> tuple[np.ndarray, list[str]]:
    """A random ``[C, H, W]`` image (C 2-5, sides 9-40 px, channel-last safe: C < min(H, W)) and channel names."""
    c = int(rng.integers(2, 6))
    h, w = (int(v) for v in rng.integers(9, 41, 2))
    dtype = dtype or rng.choice([np.uint8, np.uint16, np.float32])
    planes = np.stack([image(rng, (h, w), np.uint16) for _ in range(c)]).astype(dtype)
    if np.dtype(dtype) == np.uint8:
        planes = (planes % 250 + 1).astype(np.uint8)
    return planes, [f"ch{k}" for k in range(c)]


def write_multi_series_tiff(path: Path, rng: np.random.Generator) -> Path:
    """A TIFF holding two images (series) appended one after the other, as acquisition software writes them."""
    tifffile.imwrite(path, image(rng, (20, 18)))
    tifffile.imwrite(path, image(rng, (12, 10)), append=True)
    return path


def binary_mask(
    rng: np.random.Generator, shape: tuple[int, int] = (64, 64), value: int = 255
) -> tuple[np.ndarray, int]:
    """A mask with one value for every object (``value``, e.g. 255; ``True`` for bool) and how many separate objects
    it holds (2-5 squares, never touching)."""
    mask = np.zeros(shape, dtype=bool if value is True else np.uint8)
    n = int(rng.integers(2, 6))
    for k in range(n):
        r, c = 4 + 12 * (k // 4), 4 + 14 * (k % 4)
        side = int(rng.integers(4, 8))
        mask[r : r + side, c : c + side] = value
    return mask, n


def gappy_plate(path: Path, rng: np.random.Generator, labels: list[str]) -> tuple[Path, set[str], set[str]]:
    """An HCS plate as published with gaps: wells and fields listed in the metadata but missing on disk.

    Returns ``(path, ids of fields on disk, ids of rows that must be errors)`` (ids relative to the plate's parent).
    """
    import shutil

    fields = {
        (r, c): [image(rng, (len(labels), 16, 16)) for _ in range(int(rng.integers(1, 3)))]
        for r in "AB"
        for c in ("1", "2", "3")
    }
    write_ome_zarr_plate(path, fields, labels, axes="cyx")
    keys = sorted(fields)
    gone_well = keys[int(rng.integers(0, len(keys)))]
    shutil.rmtree(path / gone_well[0] / gone_well[1])
    rest = [k for k in keys if k != gone_well and len(fields[k]) > 1]
    gone_field = rest[0] if rest else None
    if gone_field is not None:
        shutil.rmtree(path / gone_field[0] / gone_field[1] / "1")
    name = path.name
    ok, bad = set(), {f"{name}/{gone_well[0]}/{gone_well[1]}"}
    for (r, c), imgs in fields.items():
        if (r, c) == gone_well:
            continue
        for k in range(len(imgs)):
            (bad if (r, c) == gone_field and k == 1 else ok).add(f"{name}/{r}/{c}/{k}")
    return path, ok, bad


#: What operating systems and tools leave in image folders (never images).
SYSTEM_FILES = [
    ".DS_Store",
    "._{name}",
    "Thumbs.db",
    "desktop.ini",
    "__MACOSX/._{name}",
    ".ipynb_checkpoints/{name}",
    "~$notes.docx",
]


def folder_with_system_files(root: Path, rng: np.random.Generator, channels: list[str]) -> tuple[int, int]:
    """Sites ``<plate>/<well>_s<site>_<channel>.tif`` plus the system files users' folders hold beside them.

    Returns ``(sites, system files written)``.
    """
    n_sites = int(rng.integers(2, 5))
    junk = 0
    for s in range(n_sites):
        for ch in channels:
            name = f"A0{s}_s1_{ch}.tif"
            (root / "P1").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / "P1" / name, image(rng))
            for pattern in rng.choice(SYSTEM_FILES, size=int(rng.integers(1, 3)), replace=False):
                target = root / "P1" / str(pattern).format(name=name)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
                    junk += 1
    return n_sites, junk


def yaml_with_a_repeat(rng: np.random.Generator, base: dict[str, Any]) -> tuple[str, str, int, int]:
    """``base`` as YAML text with one key written twice at a random depth (a key or a whole section).

    Returns ``(text, repeated key, line of the first, line of the second)`` (1-based).
    """
    import yaml

    lines = yaml.safe_dump(base, sort_keys=False).splitlines()
    keyed = [(i, ln) for i, ln in enumerate(lines) if ":" in ln and not ln.lstrip().startswith("-")]
    i, line = keyed[int(rng.integers(0, len(keyed)))]
    indent = len(line) - len(line.lstrip())
    end = i + 1  # the key's block: following lines indented deeper (a section) or list items under it
    while end < len(lines) and (
        len(lines[end]) - len(lines[end].lstrip()) > indent
        or lines[end].lstrip().startswith("- ")
        and len(lines[end]) - len(lines[end].lstrip()) >= indent
    ):
        end += 1
    block = lines[i:end]
    out = lines[:end] + block + lines[end:]
    key = line.strip().split(":", 1)[0]
    return "\n".join(out) + "\n", key, i + 1, end + 1
