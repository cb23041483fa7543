"""Microsnoop's patch masking: a random subset of 16x16 patches is zero-filled, the shape is kept.

Microsnoop's only public training code is ``models_utils.random_masking_keep_shape`` (microsnoop-publish):
per sample, the patches are ranked by uniform noise (MAE's argsort trick) and the last
``L - int(L * (1 - r))`` of the ranking are set to 0 instead of being dropped, so a CNN can consume the
masked image. This module ports that function and wraps it for ``[N, 1, H, W]`` images.

``select="content"`` is msnoop's variant for small images in a zero canvas: the same fraction is drawn
among the patches that carry image content (not constant), so a 64 px cell padded to 224 px gets about 4
of its 16 patches masked instead of 49 patches that are mostly empty canvas.
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


def content_patches(x: torch.Tensor) -> torch.Tensor:
    """``[N, L, D]`` patches -> ``[N, L]`` bool, True where a patch is not constant.

    Zero padding stays constant through ``normalize99`` and intensity jitter, so the canvas around a small
    image is excluded; a patch that straddles the image border counts as content.
    """
    return x.amax(-1) > x.amin(-1)


def random_masking_keep_shape(
    x: torch.Tensor,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-fill a random subset of patches of each sample (Microsnoop's ``random_masking_keep_shape``).

    Args:
        x: ``[N, L, D]`` patchified images.
        mask_ratio: Fraction ``r`` of patches to mask; exactly ``L - int(L * (1 - r))`` per sample.
        generator: Source of the per-sample noise (for reproducible masks).
        eligible: Optional ``[N, L]`` bool: mask only among these patches, exactly ``E - int(E * (1 - r))``
            of the ``E`` eligible patches of each sample (``None``: all patches, as Microsnoop).

    Returns:
        ``(x_masked, mask)``, both ``[N, L, D]``; ``mask`` is 1 on masked patches, 0 on kept ones.
    """
    n, length, d = x.shape
    noise = torch.rand(n, length, generator=generator, device="cpu").to(x.device)  # [N, L] in [0, 1)
    if eligible is None:
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        keep = torch.zeros(n, length, device=x.device, dtype=torch.bool)
        keep.scatter_(1, ids_shuffle[:, :len_keep], True)  # [N, L]
        masked = ~keep
    else:
        counts = eligible.sum(1).tolist()
        to_mask = torch.tensor([n_masked(c, mask_ratio) for c in counts], device=x.device)  # [N]
        noise = torch.where(eligible.to(x.device), noise, torch.full_like(noise, -1.0))  # ineligible rank last
        order = torch.argsort(noise, dim=1, descending=True)  # large noise is masked, as above
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(length, device=x.device).expand(n, length))  # [N, L]
        masked = rank < to_mask[:, None]
    mask = masked.to(x.dtype)[:, :, None].expand(n, length, d).contiguous()  # [N, L, D], 1 = masked
    return x * (1 - mask), mask


def mask_images(
    imgs: torch.Tensor,
    mask_ratio: float,
    patch_size: int = 16,
    *,
    generator: torch.Generator | None = None,
    select: str = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask square patches of whole images, keeping the shape.

    Args:
        imgs: ``[N, C, H, W]``, H and W multiples of ``patch_size``.
        mask_ratio: Fraction of patches zero-filled per image.
        patch_size: Patch side (Microsnoop: 16).
        generator: Source of randomness.
        select: ``all`` (Microsnoop: any patch) or ``content`` (only patches that are not constant).

    Returns:
        ``(masked, mask)``, both ``[N, C, H, W]``; ``mask`` is 1 on masked pixels.
    """
    _, _, h, w = imgs.shape
    if select not in ("all", "content"):
        raise ValueError(f"mask select must be 'all' or 'content', got {select!r}")
    patches = patchify(imgs, patch_size)  # [N, L, p*p*C]
    eligible = content_patches(patches) if select == "content" else None
    masked, mask = random_masking_keep_shape(patches, mask_ratio, generator=generator, eligible=eligible)
    return unpatchify(masked, patch_size, h, w), unpatchify(mask, patch_size, h, w)
