"""OME-Zarr (NGFF v0.4 / v0.5) images and HCS plates, read with ``zarr``.

An image is a group whose ``multiscales`` metadata lists its resolution levels; msnoop reads level 0
(full resolution) with the axes the metadata names (``t``, ``c``, ``z``, ``y``, ``x``) and the channel
labels of its ``omero`` block. A plate is a group with ``plate`` metadata: wells ``<row>/<column>``,
each with ``well`` metadata listing its fields (images).

We read the NGFF metadata with ``zarr`` directly rather than through ``ome-zarr-py``: the few keys used
here are the spec's (ngff.openmicroscopy.org), and ome-zarr-py would add dask and aiohttp to every
install for what is a dictionary lookup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msnoop.core.config import ConfigError
from msnoop.io.config import InputConfig, path_column


def _attrs(group: Any) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))  # v0.5 nests everything under "ome"


def _open(path: str | Path) -> Any:
    import zarr

    return zarr.open_group(str(path), mode="r")


def read_zarr_image(path: str | Path) -> tuple[np.ndarray, str, list[str] | None]:
    """Level 0 of an OME-Zarr image: ``(array, axes such as 'TCZYX', channel labels or None)``.

    Raises:
        ValueError: The group has no ``multiscales`` metadata.
    """
    group = _open(path)
    meta = _attrs(group)
    scales = meta.get("multiscales")
    if not scales:
        raise ValueError("not an OME-Zarr image (no 'multiscales' metadata); for a plate use input.ome_zarr")
    ms = scales[0]
    axes = "".join(
        (a["name"] if isinstance(a, dict) else str(a))[0].upper() for a in ms.get("axes", ["t", "c", "z", "y", "x"])
    )
    arr = np.asarray(group[ms["datasets"][0]["path"]][...])
    channels = (meta.get("omero") or {}).get("channels") or []
    names = [c.get("label", "") for c in channels] or None
    return arr, axes, names


def ome_zarr_table(cfg: InputConfig) -> pd.DataFrame:
    """Rows of an OME-Zarr source: one per field of a plate, or one for a single image.

    Columns: ``Metadata_Plate``, ``Metadata_Well`` (row name + column name as written, e.g. ``B3``),
    ``Metadata_Site`` (the field's path, e.g. ``0``) for plates, and one ``Metadata_Path_<ch>`` per channel
    holding the image path (``plate.zarr/B/3/0``), the same for every channel.

    Raises:
        ConfigError: The path is missing or neither an image nor a plate.
    """

    root = Path(cfg.ome_zarr)  # type: ignore[arg-type]
    if not root.exists():
        raise ConfigError(f"input.ome_zarr {root} does not exist")
    try:
        meta = _attrs(_open(root))
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a folder that is not a group
        raise ConfigError(f"input.ome_zarr {root}: not a Zarr group ({type(exc).__name__}: {exc})") from None
    base = str(Path(root).absolute())
    rows: list[dict[str, Any]] = []
    if "plate" in meta:
        plate = meta["plate"]
        name = plate.get("name") or root.name.removesuffix(".zarr").removesuffix(".ome")
        for well in plate.get("wells", []):
            wpath = well["path"]
            r, c = wpath.split("/")[-2:]
            images = _attrs(_open(root / wpath)).get("well", {}).get("images", [])
            for image in images:
                path = f"{base}/{wpath}/{image['path']}"
                row: dict[str, Any] = {
                    "Metadata_Plate": name,
                    "Metadata_Well": f"{r}{c}",
                    "Metadata_Site": str(image["path"]),
                }
                row.update({path_column(ch): path for ch in cfg.channels})
                rows.append(row)
    elif "multiscales" in meta:
        rows.append({path_column(ch): base for ch in cfg.channels})
    else:
        raise ConfigError(f"input.ome_zarr {root}: neither an OME-Zarr image (multiscales) nor a plate (plate)")
    return pd.DataFrame(rows)
