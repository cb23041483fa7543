"""OME-Zarr (NGFF v0.4 / v0.5) images and HCS plates, read with ``zarr``, on a local disk or object storage.

An image is a group whose ``multiscales`` metadata lists its resolution levels; msnoop reads level 0
(full resolution) with the axes the metadata names (``t``, ``c``, ``z``, ``y``, ``x``) and the channel
labels of its ``omero`` block. A plate is a group with ``plate`` metadata: wells ``<row>/<column>``,
each with ``well`` metadata listing its fields (images).

A group is recognised by its metadata (``zarr.json``, ``.zgroup``, ``.zattrs``), not by its name: a plate folder
published without the ``.zarr`` suffix reads the same. Plates as they are published may list wells or fields that
are not on disk: each becomes a row whose image cannot be read (an error row of the run, naming what is
missing), and the rest is embedded.

Locations may be object storage URIs (``s3://bucket/plate.zarr``): the Zarr store is the storage layer's
filesystem (:mod:`msnoop.core.storage`, pyarrow) seen through fsspec, so endpoints and credentials are those of
every other input.

We read the NGFF metadata with ``zarr`` directly rather than through ``ome-zarr-py``: the few keys used
here are the spec's (ngff.openmicroscopy.org), and ome-zarr-py would add dask and aiohttp to every
install for what is a dictionary lookup.
"""

from __future__ import annotations

import logging
import posixpath
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msnoop.core import storage as st
from msnoop.core.config import ConfigError
from msnoop.io.config import InputConfig, path_column

logger = logging.getLogger(__name__)


def _attrs(group: Any) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))  # v0.5 nests everything under "ome"


def _open(location: str | Path, storage: Any = None) -> Any:
    """The Zarr group at a local folder or an object storage URI (read-only).

    Raises:
        FileNotFoundError: Nothing is there (or it is not a Zarr group).
    """
    import zarr

    if not st.is_uri(location):
        try:
            return zarr.open_group(str(location), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise FileNotFoundError(f"{location}: no Zarr group there ({type(exc).__name__})") from None
    from fsspec.implementations.arrow import ArrowFSWrapper
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from zarr.storage import FsspecStore

    class StorageFS(ArrowFSWrapper):  # fsspec's wrapper names an instance after an HDFS host; pyarrow S3 has none
        @property
        def fsid(self) -> str:
            return f"msnoop-{self.fs.type_name}-{id(self.fs):x}"

    fs, path = st.resolve(location, storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns about wrapping a synchronous filesystem: that is the point
        store = FsspecStore(AsyncFileSystemWrapper(StorageFS(fs), asynchronous=True), read_only=True, path=path)
    try:
        return zarr.open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise FileNotFoundError(f"{location}: no Zarr group there ({type(exc).__name__})") from None


def read_zarr_image(path: str | Path, *, storage: Any = None) -> tuple[np.ndarray, str, list[str] | None]:
    """Level 0 of an OME-Zarr image: ``(array, axes such as 'TCZYX', channel labels or None)``.

    ``path`` is a local folder or an object storage URI (``storage``: its settings).

    Raises:
        FileNotFoundError: No Zarr group at ``path``.
        ValueError: The group has no ``multiscales`` metadata (a plate, a well or a plain Zarr group).
    """
    group = _open(path, storage)
    meta = _attrs(group)
    scales = meta.get("multiscales")
    if not scales:
        kind = next((k for k in ("plate", "well", "bioformats2raw.layout") if k in meta), None)
        what = f"an OME-Zarr {kind.split('.')[0]}" if kind else "a Zarr group without OME-Zarr image metadata"
        raise ValueError(
            f"expected an OME-Zarr image ('multiscales' metadata), found {what}"
            + ("; give the plate as input.ome_zarr" if kind == "plate" else "")
        )
    ms = scales[0]
    axes = "".join(
        (a["name"] if isinstance(a, dict) else str(a))[0].upper() for a in ms.get("axes", ["t", "c", "z", "y", "x"])
    )
    arr = np.asarray(group[ms["datasets"][0]["path"]][...])
    channels = (meta.get("omero") or {}).get("channels") or []
    names = [c.get("label", "") for c in channels] or None
    return arr, axes, names


def _join(base: str, *names: str) -> str:
    return posixpath.join(base, *names) if st.is_uri(base) else str(Path(base).joinpath(*names))


def ome_zarr_table(cfg: InputConfig, *, storage: Any = None) -> pd.DataFrame:
    """Rows of an OME-Zarr source: one per field of a plate, or one for a single image.

    Columns: ``Metadata_Plate``, ``Metadata_Well`` (row name + column name as written, e.g. ``B3``),
    ``Metadata_Site`` (the field's path, e.g. ``0``) for plates, and one ``Metadata_Path_<ch>`` per channel
    holding the image path (``plate.zarr/B/3/0``), the same for every channel. A well listed in the plate's
    metadata but missing on disk, or listing no fields, is one row with the well's path and a blank
    ``Metadata_Site`` (its image cannot be read: an error row of the run); a listed field that is missing is a
    row like any other (its image cannot be read either).

    Raises:
        ConfigError: The location is missing or is neither an OME-Zarr image nor a plate.
    """
    location = cfg.ome_zarr
    assert location is not None
    base = str(location).rstrip("/") if st.is_uri(location) else str(Path(location).absolute())
    if not st.exists(base, storage):
        raise ConfigError(f"input.ome_zarr {location} does not exist")
    try:
        meta = _attrs(_open(base, storage))
    except FileNotFoundError:
        raise ConfigError(
            f"input.ome_zarr {location}: not a Zarr group (no zarr.json, .zgroup or .zattrs in it)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a folder that is not a group
        raise ConfigError(f"input.ome_zarr {location}: not a Zarr group ({type(exc).__name__}: {exc})") from None
    rows: list[dict[str, Any]] = []
    if "plate" in meta:
        plate = meta["plate"]
        leaf = base.rstrip("/").rsplit("/", 1)[-1]
        name = plate.get("name") or leaf.removesuffix(".zarr").removesuffix(".ome")
        missing = 0
        for well in plate.get("wells", []):
            wpath = str(well["path"]).strip("/")
            r, c = wpath.split("/")[-2:] if "/" in wpath else (wpath, "")
            try:
                images = _attrs(_open(_join(base, wpath), storage)).get("well", {}).get("images", [])
            except FileNotFoundError:
                images, missing = [], missing + 1
            fields = [str(image["path"]) for image in images] or [None]
            for field in fields:
                path = _join(base, wpath, field) if field is not None else _join(base, wpath)
                row: dict[str, Any] = {"Metadata_Plate": name, "Metadata_Well": f"{r}{c}", "Metadata_Site": field}
                row.update({path_column(ch): path for ch in cfg.channels})
                rows.append(row)
        if missing:
            logger.warning(
                "input.ome_zarr %s: %d well(s) listed in the plate metadata are missing; they are error rows",
                location,
                missing,
            )
        if not rows:
            raise ConfigError(f"input.ome_zarr {location}: the plate metadata lists no wells")
    elif "multiscales" in meta:
        rows.append({path_column(ch): base for ch in cfg.channels})
    else:
        found = sorted(meta)[:6]
        raise ConfigError(
            f"input.ome_zarr {location}: expected an OME-Zarr image ('multiscales') or plate ('plate') metadata, "
            f"found {'keys ' + str(found) if found else 'no OME metadata'}"
        )
    return pd.DataFrame(rows)
