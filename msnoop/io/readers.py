"""Image readers: decode one file into a 2-D float32 array, or fail with a message naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TIFF_SUFFIXES = {".tif", ".tiff"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
NPY_SUFFIXES = {".npy"}


class ImageReadError(ValueError):
    """An image could not be read or is not what the job expects."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _read_raw(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile

        return tifffile.imread(path)
    if suffix in PIL_SUFFIXES:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            return np.asarray(img)
    if suffix in NPY_SUFFIXES:
        return np.load(path, allow_pickle=False)
    raise ImageReadError(path, f"unsupported file type {suffix!r}; expected one of .tif/.tiff/.png/.jpg/.bmp/.npy")


def read_image(path: str | Path) -> np.ndarray:
    """Read one channel of one image as ``[H, W]`` float32.

    RGB(A) files whose colour planes are identical (grey images saved as RGB) are reduced to one plane;
    singleton leading axes are squeezed.

    Raises:
        ImageReadError: Missing, unreadable, truncated or not 2-D; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    try:
        arr = _read_raw(path)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types for corrupt/truncated data
        raise ImageReadError(path, f"could not decode ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            arr = rgb[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected one 2-D channel per file, found an array of shape {arr.shape}")
    if arr.dtype.kind not in "uifb":
        raise ImageReadError(path, f"expected a numeric image, found dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


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
