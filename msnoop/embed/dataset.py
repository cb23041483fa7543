"""The read stage of the embedding pipeline: image rows -> checked, normalised tiles (Ray Data CPU tasks).

Every channel file of every image is read and checked (finite, not constant, channel shapes agree) and
turned into normalised input tiles. A bad image becomes a row with an ``error`` instead of tiles (or
raises :class:`StrictModeError`, in strict mode). In cells mode the tiles are the image's cell crops
(:mod:`msnoop.embed.cells`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from msnoop.core.parts import ID_COLUMN
from msnoop.embed.cells import CELL_COUNT, CELLS_FOUND, prepare_cells
from msnoop.io.manifest import PATH_PREFIX
from msnoop.io.readers import ImageReadError, check_image, read_channels
from msnoop.preprocess.presets import Preprocessing, prepare_channel

if TYPE_CHECKING:
    from msnoop.embed.config import EmbedJob

#: Position of an image in the run's metadata table (metadata never travels through Ray).
ROW = "_row"


class StrictModeError(RuntimeError):
    """Raised in strict mode at the first bad image; the message is the image's error."""


def load_image(
    row: pd.Series,
    channels: list[str],
    *,
    storage: Any = None,
    selectors: dict[str, int | str | None] | None = None,
    z: Any = "refuse",
) -> list[np.ndarray]:
    """Read and check all channels of one image row; raises ImageReadError naming the file.

    Args:
        row: An image-table row (``Metadata_Path_<ch>`` per channel).
        channels: Channel names, in embedding order.
        selectors: Per channel, the plane of a multi-channel file (index or OME channel name); None =
            the file holds the one channel (see :func:`msnoop.io.readers.select_plane`).
        z: The ``input.z`` policy for z-stacks and time series.
    """
    selectors = selectors or {}
    by_path: dict[str, list[str]] = {}
    for ch in channels:
        path = row[f"{PATH_PREFIX}{ch}"]
        if not isinstance(path, str) or not path:
            raise ImageReadError(row[ID_COLUMN], f"no file for channel {ch!r}")
        by_path.setdefault(path, []).append(ch)
    planes: dict[str, np.ndarray] = {}
    for path, chans in by_path.items():  # a file holding several channels is decoded once
        for ch, img in zip(
            chans, read_channels(path, [selectors.get(ch) for ch in chans], z=z, storage=storage), strict=True
        ):
            check_image(img, path if selectors.get(ch) is None else f"{path} [channel {selectors[ch]!r}]")
            planes[ch] = img
    images = [planes[ch] for ch in channels]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        found = ", ".join(f"{ch}={im.shape}" for ch, im in zip(channels, images, strict=True))
        raise ImageReadError(row[f"{PATH_PREFIX}{channels[0]}"], f"channels differ in shape: {found}")
    return images


def channel_selectors(cfg: EmbedJob) -> dict[str, int | str | None]:
    """Plane of each channel in multi-channel files: ``input.channel_index``, OME names, or None (one per file)."""
    inp = cfg.input
    if inp.channel_index is not None:
        return {ch: int(inp.channel_index[ch]) for ch in inp.channels}
    if inp.channel_names or inp.ome_zarr is not None:
        return {ch: ch for ch in inp.channels}
    return {ch: None for ch in inp.channels}


def read_and_prepare(
    batch: pd.DataFrame,
    *,
    channels: list[str],
    spec: dict[str, Any],
    strict: bool,
    cells: dict[str, Any] | None = None,
    masks_dir: str | None = None,
    selectors: dict[str, int | str | None] | None = None,
    z: Any = "refuse",
    storage: Any = None,
) -> dict[str, Any]:
    """Stage 1: image rows -> tiles per image (variable count), tile counts per channel, errors.

    ``selectors`` and ``z`` say how multi-plane files are read (see :func:`load_image`). ``storage`` (a
    :class:`msnoop.core.storage.StorageConfig`) is used for image paths that are object storage URIs.

    In cells mode (``cells`` given: ``CellsConfig.model_dump()`` plus ``channels`` and
    ``nucleus_channel``) the tiles are the image's cell crops (see :func:`prepare_cells`), and the
    output also has ``cell_table`` (per image ``[N, 4]`` float64: cell id, centroid y, centroid x, area),
    ``Metadata_CellCount`` and ``Metadata_CellsFound``.
    """
    pre = Preprocessing(**spec)
    size = pre.input_size
    tiles: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    errors: list[str] = []
    cell_tables: list[np.ndarray] = []
    found: list[int] = []
    for _, row in batch.iterrows():
        try:
            images = load_image(row, channels, selectors=selectors, z=z, storage=storage)
            if cells is None:
                per_channel = [prepare_channel(im, pre) for im in images]
                tiles.append(np.concatenate(per_channel))
                counts.append(np.array([len(t) for t in per_channel], dtype=np.int64))
            else:
                nuc_path = str(row[f"{PATH_PREFIX}{cells['nucleus_channel']}"])
                mask_col = cells.get("mask_column")
                cell_tiles, table, n_found = prepare_cells(
                    images,
                    str(row[ID_COLUMN]),
                    cells=cells,
                    pre=pre,
                    path=nuc_path,
                    masks_dir=masks_dir,
                    mask_path=row[mask_col] if mask_col and isinstance(row[mask_col], str) else None,
                    storage=storage,
                )
                tiles.append(cell_tiles)
                counts.append(np.full(len(channels), len(table), dtype=np.int64))
                cell_tables.append(
                    table[["cell_id", "centroid_y", "centroid_x", "area"]].to_numpy(dtype=np.float64).reshape(-1, 4)
                )
                found.append(n_found)
            errors.append("")
        except ImageReadError as exc:
            if strict:
                raise StrictModeError(str(exc)) from exc
            tiles.append(np.zeros((0, size, size), dtype=np.float32))
            counts.append(np.zeros(len(channels), dtype=np.int64))
            errors.append(str(exc))
            cell_tables.append(np.zeros((0, 4), dtype=np.float64))
            found.append(0)
    out: dict[str, Any] = {c: batch[c].to_numpy() for c in batch.columns}
    out["tiles"] = _ragged(tiles)
    out["counts"] = np.stack(counts) if counts else np.zeros((0, len(channels)), dtype=np.int64)
    out["error"] = np.array(errors, dtype=object)
    if cells is not None:
        out["cell_table"] = _ragged(cell_tables)
        out[CELL_COUNT] = np.array([len(t) for t in cell_tables], dtype=np.int64)
        out[CELLS_FOUND] = np.array(found, dtype=np.int64)
    return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    obj = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        obj[i] = a
    return obj
