"""Microsnoop's patch masking: a random subset of 16x16 patches is zero-filled, the shape is kept.

Microsnoop's only public training code is ``models_utils.random_masking_keep_shape`` (ANCHORS 1.4):
per sample, the patches are ranked by uniform noise (MAE's argsort trick) and the last
``L - int(L * (1 - r))`` of the ranking are set to 0 instead of being dropped, so a CNN can consume the
masked image. This module ports that function and wraps it for ``[N, 1, H, W]`` images.
"""

from __future__ import annotations

import torch


def n_masked(num_patches: int, mask_ratio: float) -> int:
    """Number of masked patches, exactly as Microsnoop: ``L - int(L * (1 - r))``."""
    return num_patches - int(num_patches * (1 - mask_ratio))


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping square patches, row-major over the patch grid.

    Args:
        imgs: ``[N, C, H, W]`` with H and W multiples of ``patch_size``.
        patch_size: Side ``p`` of a patch.

    Returns:
        ``[N, L, p*p*C]`` with ``L = (H/p) * (W/p)``.

    Raises:
        ValueError: H or W is not a multiple of ``patch_size``.
    """
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(
            f"image side {h}x{w} is not a multiple of the patch size {p}; use crops that are multiples of {p}"
        )
    x = imgs.reshape(n, c, h // p, p, w // p, p)  # [N, C, gh, p, gw, p]
    x = torch.einsum("nchpwq->nhwpqc", x)  # [N, gh, gw, p, p, C]
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[N, L, p*p*C] -> [N, C, H, W]``."""
    n, _, d = x.shape
    p = patch_size
    c = d // (p * p)
    gh, gw = height // p, width // p
    x = x.reshape(n, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, gh, p, gw, p]
    return x.reshape(n, c, gh * p, gw * p)


def random_masking_keep_shape(
    x: torch.Tensor, mask_ratio: float, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-fill a random subset of patches of each sample (Microsnoop's ``random_masking_keep_shape``).

    Args:
        x: ``[N, L, D]`` patchified images.
        mask_ratio: Fraction ``r`` of patches to mask; exactly ``L - int(L * (1 - r))`` per sample.
        generator: Source of the per-sample noise (for reproducible masks).

    Returns:
        ``(x_masked, mask)``, both ``[N, L, D]``; ``mask`` is 1 on masked patches, 0 on kept ones.
    """
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, generator=generator, device="cpu").to(x.device)  # [N, L] in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    keep = torch.zeros(n, length, device=x.device, dtype=torch.bool)
    keep.scatter_(1, ids_shuffle[:, :len_keep], True)  # [N, L]
    mask = (~keep).to(x.dtype)[:, :, None].expand(n, length, d).contiguous()  # [N, L, D], 1 = masked
    return x * (1 - mask), mask


def mask_images(
    imgs: torch.Tensor, mask_ratio: float, patch_size: int = 16, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask square patches of whole images, keeping the shape.

    Args:
        imgs: ``[N, C, H, W]``, H and W multiples of ``patch_size``.
        mask_ratio: Fraction of patches zero-filled per image.
        patch_size: Patch side (Microsnoop: 16).
        generator: Source of randomness.

    Returns:
        ``(masked, mask)``, both ``[N, C, H, W]``; ``mask`` is 1 on masked pixels.
    """
    _, _, h, w = imgs.shape
    patches = patchify(imgs, patch_size)  # [N, L, p*p*C]
    masked, mask = random_masking_keep_shape(patches, mask_ratio, generator=generator)
    return unpatchify(masked, patch_size, h, w), unpatchify(mask, patch_size, h, w)
