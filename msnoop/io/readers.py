"""Image readers: decode one file into a 2-D float32 array, or fail with a message naming the file.

Files may hold more than one plane: colour samples (``YXS`` or planar ``SYX``), channels (OME-TIFF,
ImageJ hyperstacks, plain ``(C, H, W)`` stacks), z-planes and time points. :func:`read_image` returns one
``[H, W]`` plane by these rules:

* singleton axes are dropped;
* an axis whose planes are all identical (grey saved as RGB, in either layout) is reduced to one plane;
* ``Z`` and ``T`` axes follow the ``z`` policy: ``"refuse"`` (default: an error naming the shape),
  ``"max"`` (maximum projection) or an ``int`` (that z-plane; the first time point);
* the one remaining channel-like axis (``C``, ``S`` or tifffile's unknown ``Q``/``I``) is indexed by
  ``channel``: an ``int`` (plane index) or a ``str`` (OME channel ``Name``).

Axis names come from tifffile's series axes (OME-XML, ImageJ or shaped metadata with axes) or the OME-Zarr
``multiscales`` metadata. An array without axis metadata (NPY, PNG, a TIFF written from a bare array) gets
:func:`plain_axes`: ``YX``; channel-last ``YXC`` when the last axis is short (at most :data:`MAX_CHANNELS_LAST`)
and both others are longer; otherwise ``Q`` (unknown, channel-like) for each leading axis. A layout that cannot
be told apart (a long last axis shorter than both others, e.g. ``(512, 512, 100)``) is refused, naming the file,
instead of being read as strips. Compressed TIFFs (LZW, JPEG, deflate, zstd, ...) are decoded through
``imagecodecs``.

Refused, in one line naming the file: a TIFF holding several series (images of different shapes, or appended
images; only one image per file is read), and picking a channel by a name that several OME channels share.

Formats plug in here: a decoder registered with :func:`register_reader` under its suffixes (and, for formats
that are folders, a ``sniff`` test) is used by every reader of msnoop (the embedding job, queries, baselines,
pretraining, segtrain's image listing). A decoder takes a path (or a binary file object for objects fetched
from object storage) and returns ``(array, axes, OME channel names or None)``; ``axes`` may be
:func:`plain_axes` of the array when the format has no axis metadata.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msnoop.core import storage as st
from msnoop.core.storage import is_uri
from msnoop.io.config import ZPolicy

CHANNEL_AXES = "CSQI"  # axes that can hold channels (tifffile: S samples, Q unknown, I image sequence)
#: An array without axis metadata whose last axis is at most this long (and shorter than both others) is
#: channel-last ``(H, W, C)``: a plane narrower than this is not an image.
MAX_CHANNELS_LAST = 8
#: Suffixes of two parts that name one image format; an image's id drops the whole suffix (``a.ome.tif`` -> ``a``).
COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")

#: What a decoder returns: the array, its axes (tifffile letters) and the OME channel names (or None).
Decoded = tuple[np.ndarray, str, list[str] | None]


class ImageReadError(ValueError):
    """An image could not be read or is not what the job expects."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _ome_channel_names(ome_xml: str | None) -> list[str] | None:
    """``Name`` of each ``Channel`` of the first OME ``Image`` (None without OME-XML)."""
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for image in root.iter():
        if image.tag.endswith("}Image") or image.tag == "Image":
            names = [c.get("Name") or "" for c in image.iter() if c.tag.endswith("Channel")]
            return names or None
    return None


@dataclass(frozen=True)
class ImageReader:
    """One image format: its decoder and how a path is recognised.

    Attributes:
        name: The format's name (in messages).
        read: ``read(source) -> (array, axes, OME channel names or None)``; ``source`` is a local
            :class:`~pathlib.Path`, or a binary file object holding the whole file (an object fetched from object
            storage) when ``local_only`` is False.
        suffixes: Lower-case suffixes of its files (``".tif"``).
        sniff: ``sniff(path) -> bool`` for local paths the suffix does not identify (e.g. an OME-Zarr folder);
            tried before the suffixes.
        local_only: The format is read from local paths only (folders, chunked stores).
    """

    name: str
    read: Callable[[Any], Decoded]
    suffixes: tuple[str, ...] = ()
    sniff: Callable[[Path], bool] | None = None
    local_only: bool = False


#: Registered formats, in registration order (see :func:`register_reader`).
READERS: list[ImageReader] = []


def register_reader(
    name: str, *, suffixes: tuple[str, ...] = (), sniff: Callable[[Path], bool] | None = None, local_only: bool = False
) -> Callable[[Callable[[Any], Decoded]], Callable[[Any], Decoded]]:
    """Register the decorated decoder for ``suffixes`` (and/or paths ``sniff`` accepts) under ``name``.

    Raises:
        ValueError: ``name`` is registered already, or a suffix is claimed by another format.
    """

    def add(read: Callable[[Any], Decoded]) -> Callable[[Any], Decoded]:
        taken = {sfx: r.name for r in READERS for sfx in r.suffixes}
        clash = [f"{sfx} ({taken[sfx]})" for sfx in suffixes if sfx in taken]
        if any(r.name == name for r in READERS) or clash:
            raise ValueError(f"image reader {name!r}: already registered or suffixes taken: {', '.join(clash)}")
        READERS.append(ImageReader(name, read, tuple(s.lower() for s in suffixes), sniff, local_only))
        return read

    return add


def readable_suffixes() -> tuple[str, ...]:
    """Every suffix a registered reader decodes, in registration order (``(".tif", ".tiff", ".png", ...)``)."""
    return tuple(sfx for r in READERS for sfx in r.suffixes)


def reader_for(path: str | Path, *, local: bool = True) -> ImageReader | None:
    """The reader of ``path``: the first whose ``sniff`` accepts it (local paths only), else by suffix; or None."""
    path = Path(path)
    if local:
        for r in READERS:
            if r.sniff is not None and r.sniff(path):
                return r
    suffix = path.suffix.lower()
    return next((r for r in READERS if suffix in r.suffixes and (local or not r.local_only)), None)


def plain_axes(arr: np.ndarray) -> str:
    """Axes of an array from a format without axis metadata (tifffile letters).

    ``YX`` for 2-D; ``...YXS`` when the last axis has 3-4 samples (RGB, RGBA) and ``...YXC`` when it is any other
    axis of at most :data:`MAX_CHANNELS_LAST` planes shorter than both axes before it (channel-last); otherwise
    ``Q`` (unknown, channel-like) for each leading axis. :func:`select_plane` refuses the layouts this cannot
    tell apart.
    """
    if arr.ndim >= 3:
        last, rows, cols = arr.shape[-1], arr.shape[-3], arr.shape[-2]
        if last in (3, 4) and last < min(rows, cols):
            return "Q" * (arr.ndim - 3) + "YXS"
        if last <= MAX_CHANNELS_LAST and last < min(rows, cols):
            return "Q" * (arr.ndim - 3) + "YXC"
    return "Q" * max(arr.ndim - 2, 0) + "YX"[-min(arr.ndim, 2) :] if arr.ndim else ""


def is_zarr_group(location: str | Path, storage: Any = None) -> bool:
    """Whether ``location`` (a local folder or a URI prefix) is a Zarr group, recognised by its metadata file
    (``zarr.json`` for Zarr v3, ``.zgroup``/``.zattrs`` for v2), whatever its name."""
    if is_uri(location):
        try:
            return any(st.exists(st.join(location, name), storage) for name in ("zarr.json", ".zgroup", ".zattrs"))
        except (OSError, ValueError):
            return False
    path = Path(location)
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs"))


@register_reader("OME-Zarr", sniff=is_zarr_group, local_only=True)
def _read_zarr(path: Path) -> Decoded:
    from msnoop.io.omezarr import read_zarr_image

    return read_zarr_image(path)


#: Names tifffile gives the series of a whole-slide file that picture the slide, not the sample.
_AUXILIARY_SERIES = ("thumbnail", "label", "macro", "overview")


class _SeveralSeries(ValueError):
    """A TIFF file holds several images (series); which one is meant cannot be known."""


@register_reader("TIFF", suffixes=(".tif", ".tiff"))
def _read_tiff(source: Any) -> Decoded:
    import tifffile

    with tifffile.TiffFile(source) as tif:
        # whole-slide formats add small pictures of the slide beside the image: not images of the sample
        images = [s for s in tif.series if (s.name or "").strip().lower() not in _AUXILIARY_SERIES]
        if len(images) > 1:
            shapes = ", ".join(f"{tuple(s.shape)} ({s.axes})" for s in images[:4])
            more = f" and {len(images) - 4} more" if len(images) > 4 else ""
            raise _SeveralSeries(
                f"expected one image per file, found {len(images)} series: {shapes}{more}; msnoop reads one "
                "image per file: save each series as its own file (or as channels/planes of one series)"
            )
        series = images[0] if images else tif.series[0]
        arr = series.asarray()
        names = _ome_channel_names(tif.ome_metadata) if tif.is_ome else None
        axes = series.axes
        if set(axes) - set("YX") <= {"Q"}:  # shaped metadata without axes: a bare array, as NPY
            axes = plain_axes(arr)
        return arr, axes, names


@register_reader("PIL", suffixes=(".png", ".jpg", ".jpeg", ".bmp"))
def _read_pil(source: Any) -> Decoded:
    from PIL import Image

    with Image.open(source) as img:
        img.load()
        arr = np.asarray(img)
    return arr, plain_axes(arr), None


@register_reader("NumPy", suffixes=(".npy",))
def _read_npy(source: Any) -> Decoded:
    arr = np.load(source, allow_pickle=False)
    return arr, plain_axes(arr), None


def _unsupported(path: str | Path) -> ImageReadError:
    known = "/".join(readable_suffixes())
    suffix = Path(str(path).rstrip("/")).suffix.lower()
    return ImageReadError(
        path, f"unsupported file type {suffix or '(no suffix)'!r}; expected one of {known} or an OME-Zarr"
    )


def _read_raw(path: Path, data: Any = None) -> tuple[np.ndarray, str, list[str] | None, str]:
    """``(array, axes, OME channel names or None, format name)``; ``data`` (a binary file object) is decoded
    instead of ``path``, whose suffix then only says the format."""
    reader = reader_for(path, local=data is None)
    if reader is None:
        if data is None and path.is_dir():
            raise ImageReadError(path, "is a folder but not a Zarr group (no zarr.json, .zgroup or .zattrs in it)")
        raise _unsupported(path)
    arr, axes, names = reader.read(path if data is None else data)
    return arr, axes, names, reader.name


def _planes(
    arr: np.ndarray, axes: str, names: list[str] | None, fmt: str, where: str | Path, channels: list[Any], z: ZPolicy
) -> list[np.ndarray]:
    out = []
    for channel in channels:
        plane = select_plane(np.asarray(arr), axes, where, channel=channel, names=names, z=z, fmt=fmt)
        if plane.dtype.kind not in "uifb":
            raise ImageReadError(where, f"expected a numeric image, found dtype {plane.dtype}")
        out.append(plane.astype(np.float32, copy=False))
    return out


def _read_channels_uri(uri: str, channels: list[int | str | None], *, z: ZPolicy, storage: Any) -> list[np.ndarray]:
    """:func:`read_channels` for an object storage URI: one GET of the whole object, decoded from memory; an
    OME-Zarr (a prefix holding Zarr metadata) is read chunk by chunk through the storage layer."""
    import io

    from msnoop.core.storage import read_bytes

    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if reader_for(Path(name), local=False) is None:
        if is_zarr_group(uri, storage):
            from msnoop.io.omezarr import read_zarr_image

            try:
                arr, axes, names = read_zarr_image(uri, storage=storage)
            except Exception as exc:  # zarr raises many types for a broken store
                raise ImageReadError(uri, f"could not read the OME-Zarr image ({type(exc).__name__}: {exc})") from exc
            return _planes(arr, axes, names, "OME-Zarr", uri, channels, z)
        if not st.exists(uri, storage):
            raise ImageReadError(uri, "file not found")
        raise _unsupported(uri)
    try:
        data = read_bytes(uri, storage)
    except FileNotFoundError:
        raise ImageReadError(uri, "file not found") from None
    except (OSError, ValueError) as exc:  # the SDK's network / permission errors; StorageError: unknown scheme
        raise ImageReadError(uri, f"could not read ({exc})") from None
    try:
        arr, axes, names, fmt = _read_raw(Path(name), io.BytesIO(data))
    except ImageReadError:
        raise
    except _SeveralSeries as exc:
        raise ImageReadError(uri, str(exc)) from None
    except Exception as exc:  # decoders raise many types for corrupt/truncated data
        raise ImageReadError(uri, f"could not decode ({type(exc).__name__}: {exc})") from exc
    return _planes(arr, axes, names, fmt, uri, channels, z)


def _drop(arr: np.ndarray, axes: str, i: int, index: int | None = None) -> tuple[np.ndarray, str]:
    """Remove axis ``i``: take plane ``index``, or the first (identical planes / singleton)."""
    return np.take(arr, 0 if index is None else index, axis=i), axes[:i] + axes[i + 1 :]


def _identical(arr: np.ndarray, i: int) -> bool:
    first = np.take(arr, 0, axis=i)
    return all(np.array_equal(first, np.take(arr, k, axis=i)) for k in range(1, arr.shape[i]))


def select_plane(
    arr: np.ndarray,
    axes: str,
    path: str | Path,
    *,
    channel: int | str | None = None,
    names: list[str] | None = None,
    z: ZPolicy = "refuse",
    fmt: str | None = None,
) -> np.ndarray:
    """Reduce an ``axes``-labelled array to one ``[H, W]`` plane (rules in the module docstring).

    Args:
        arr: The decoded array.
        axes: Its axes, one tifffile letter per dimension (``T``, ``Z``, ``C``/``S``/``Q``/``I``, ``Y``, ``X``).
        path: The file, for messages.
        channel: Plane index or channel name (``names``) of a multi-channel file; None: one plane.
        names: The file's channel names (OME-TIFF ``Name``, OME-Zarr ``label``), or None.
        z: The ``input.z`` policy.
        fmt: The file's format (messages only).

    Raises:
        ImageReadError: The planes cannot be reduced as asked (ambiguous layout, unknown or repeated channel name,
            index out of range, several planes left); the message names the file, shape and axes.
    """
    shape0, axes0 = arr.shape, axes
    where = f"found an array of shape {tuple(shape0)} (axes {axes0})"
    if len(axes) != arr.ndim:
        axes = plain_axes(arr)
    for i in reversed(range(arr.ndim)):  # singleton axes
        if arr.shape[i] == 1 and arr.ndim > 2:
            arr, axes = _drop(arr, axes, i)
    if arr.ndim >= 3 and axes[-3] == "Q" and axes[-2:] == "YX" and arr.shape[-1] < min(arr.shape[-3], arr.shape[-2]):
        raise ImageReadError(
            path,
            f"cannot tell which axes are the image's: {where}, no axis metadata, and the last axis is the "
            f"shortest: {arr.shape[-3]} planes of {arr.shape[-2]} x {arr.shape[-1]} px, or {arr.shape[-1]} "
            f"channels of {arr.shape[-3]} x {arr.shape[-2]} px? Save it as (C, H, W), or with axes metadata "
            "(OME-TIFF, or tifffile's metadata={'axes': ...})",
        )
    # z-stacks and time series
    for ax in "TZ":
        if ax not in axes:
            continue
        i = axes.index(ax)
        if _identical(arr, i):
            arr, axes = _drop(arr, axes, i)
        elif z == "refuse":
            raise ImageReadError(
                path,
                f"expected one 2-D plane per channel, {where}: it has {arr.shape[i]} {'z-planes' if ax == 'Z' else 'time points'}"
                "; set input.z to 'max' (maximum projection) or a z-plane index",
            )
        elif z == "max":
            arr, axes = arr.max(axis=i), axes[:i] + axes[i + 1 :]
        elif ax == "T":
            arr, axes = _drop(arr, axes, i, 0)
        else:
            if not 0 <= int(z) < arr.shape[i]:
                raise ImageReadError(path, f"input.z = {z} is out of range: {where} with {arr.shape[i]} z-planes")
            arr, axes = _drop(arr, axes, i, int(z))
    chans = [i for i, a in enumerate(axes) if a in CHANNEL_AXES]
    if channel is None:
        for i in reversed(chans):  # grey saved as RGB (YXS or planar SYX), identical channels
            if _identical(arr, i):
                arr, axes = _drop(arr, axes, i)
        chans = [i for i, a in enumerate(axes) if a in CHANNEL_AXES]
        if len(chans) == 1 and z != "refuse" and "Z" not in axes0 and axes[chans[0]] in "QI":
            i = chans[0]  # an unlabelled stack with a z policy: the stack is the z axis
            arr = arr.max(axis=i) if z == "max" else np.take(arr, int(z), axis=i)
            axes = axes[:i] + axes[i + 1 :]
    elif len(chans) == 1:
        i = chans[0]
        if isinstance(channel, str):
            what = {"OME-Zarr": "OME-Zarr channel labels", "TIFF": "OME channel names"}.get(fmt or "", "channel names")
            if not names:
                lacks = {
                    "OME-Zarr": "this OME-Zarr image has no channel labels (no omero metadata)",
                    "TIFF": "this TIFF has no OME channel names (not an OME-TIFF)",
                }.get(fmt or "", f"this {fmt + ' ' if fmt else ''}file has no channel names")
                raise ImageReadError(
                    path, f"no channel named {channel!r}: {lacks}; pick planes by index with input.channel_index"
                )
            if channel not in names:
                raise ImageReadError(path, f"no channel named {channel!r}; {what}: {names}")
            if names.count(channel) > 1:
                at = [k for k, n in enumerate(names) if n == channel]
                raise ImageReadError(
                    path,
                    f"{len(at)} channels are named {channel!r} (planes {at}; {what}: {names}): which one is meant "
                    "cannot be known; pick planes by index with input.channel_index",
                )
            index = names.index(channel)
        else:
            index = int(channel)
        if not 0 <= index < arr.shape[i]:
            raise ImageReadError(path, f"channel index {index} is out of range: {where}")
        arr, axes = _drop(arr, axes, i, index)
    elif not chans and channel not in (0, None) and not (isinstance(channel, str) and names == [channel]):
        raise ImageReadError(path, f"channel {channel!r} asked for, but the file holds one plane ({where})")
    if arr.ndim != 2:
        hint = (
            "; one file holds several planes: pick them with input.channel_index (or input.z for z-stacks)"
            if channel is None and arr.ndim == 3
            else ""
        )
        raise ImageReadError(path, f"expected one 2-D channel per file, {where}{hint}")
    return arr


def _decode(path: Path, what: str) -> tuple[np.ndarray, str, list[str] | None, str]:
    """:func:`_read_raw` with every decoder failure turned into an :class:`ImageReadError` naming the file."""
    try:
        return _read_raw(path)
    except ImageReadError:
        raise
    except _SeveralSeries as exc:
        raise ImageReadError(path, str(exc)) from None
    except Exception as exc:  # decoders raise many types for corrupt/truncated data
        raise ImageReadError(path, f"could not decode{what} ({type(exc).__name__}: {exc})") from exc


def read_channels(
    path: str | Path, channels: list[int | str | None], *, z: ZPolicy = "refuse", storage: Any = None
) -> list[np.ndarray]:
    """Several channels of one file (decoded once): one ``[H, W]`` float32 plane per entry of ``channels``.

    ``path`` may be an object storage URI (``s3://bucket/x.tif``, the key taken literally): the object is fetched
    whole through :mod:`msnoop.core.storage` (``storage``: its :class:`~msnoop.core.storage.StorageConfig`, default
    the environment) and decoded from memory; an OME-Zarr image (a local folder or a prefix holding Zarr metadata,
    whatever its name) is read through the same layer.

    Raises:
        ImageReadError: As :func:`read_image`.
    """
    if is_uri(path):
        return _read_channels_uri(str(path), channels, z=z, storage=storage)
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    arr, axes, names, fmt = _decode(path, "")
    return _planes(arr, axes, names, fmt, path, channels, z)


def read_image(path: str | Path, *, channel: int | str | None = None, z: ZPolicy = "refuse") -> np.ndarray:
    """Read one channel of one image as ``[H, W]`` float32.

    Args:
        path: An image file (TIFF/OME-TIFF, PNG, JPEG, BMP, NPY) or an OME-Zarr image (``.zarr`` path).
        channel: For files holding several channels: plane index or OME channel name; None = the file
            must reduce to one plane (grey saved as RGB or identical planes are reduced).
        z: Policy for z-stacks and time series: ``"refuse"``, ``"max"`` or a z-plane index.

    Raises:
        ImageReadError: Missing, unreadable, truncated or not reducible to 2-D; the message names the file.
    """
    return read_channels(path, [channel], z=z)[0]


def read_labels(path: str | Path, *, storage: Any = None) -> np.ndarray:
    """An existing label mask as ``[H, W]`` int32 (0 = background, one value per object).

    ``path`` is a local file or an object storage URI (``storage``: its settings). Singleton axes are dropped.
    A *binary* mask (boolean, or one non-zero value such as 255 for every object) is split into its connected
    components (8-connectivity, :func:`skimage.measure.label`), so each separate object is one label; a mask with
    several values is taken as labelled already.

    Raises:
        ImageReadError: Missing, unreadable, several planes, negative or non-integer values; the message names the file.
    """
    if is_uri(path):
        from msnoop.core.storage import read_bytes

        try:
            data = read_bytes(str(path), storage)
        except FileNotFoundError:
            raise ImageReadError(path, "mask file not found") from None
        except (OSError, ValueError) as exc:
            raise ImageReadError(path, f"could not read the mask ({exc})") from None
        import io

        try:
            arr, axes, names, fmt = _read_raw(Path(str(path).rsplit("/", 1)[-1]), io.BytesIO(data))
        except ImageReadError:
            raise
        except Exception as exc:  # decoders raise many types for corrupt/truncated data
            raise ImageReadError(path, f"could not decode mask ({type(exc).__name__}: {exc})") from exc
    else:
        path = Path(path)
        if not path.is_file():
            raise ImageReadError(path, "mask file not found")
        arr, axes, names, fmt = _decode(path, " mask")
    arr = select_plane(np.asarray(arr), axes, path, names=names, fmt=fmt)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and np.array_equal(arr, np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "ui" or (arr.size and (arr.min() < 0 or arr.max() >= 2**31)):
        found = f"dtype {arr.dtype}" if arr.dtype.kind not in "ui" else f"values {arr.min()} to {arr.max()}"
        raise ImageReadError(path, f"expected an integer label mask (0 = background), found {found}")
    values = np.unique(arr)
    if len(values[values != 0]) == 1:  # binary: one value for every object
        from skimage.measure import label

        return label(arr != 0, connectivity=2).astype(np.int32, copy=False)
    return arr.astype(np.int32, copy=False)


def check_image(image: np.ndarray, path: str | Path) -> None:
    """Reject images that cannot give a meaningful embedding (NaN/inf, constant).

    Raises:
        ImageReadError: naming the file and what was found.
    """
    if not np.isfinite(image).all():
        n_bad = int((~np.isfinite(image)).sum())
        raise ImageReadError(path, f"contains {n_bad} NaN/inf pixels")
    if image.size == 0:
        raise ImageReadError(path, "is empty (0 pixels)")
    if float(image.max()) == float(image.min()):
        raise ImageReadError(path, f"is constant (every pixel = {float(image.min())}); nothing to embed")
