"""Microsnoop patch masking: exact count, patch alignment, zero fill, reproducibility, MAE reference."""

from __future__ import annotations

import pytest
import torch

from msnoop.train.masking import mask_images, n_masked, patchify, random_masking_keep_shape, unpatchify


def _reference_keep_shape(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's random_masking written the long way (ids_restore + gather), zero-filling instead of dropping."""
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)[:, :, None].expand(n, length, d)
    return x * (1 - mask), mask


def test_n_masked_matches_microsnoop() -> None:
    assert n_masked(196, 0.25) == 49  # 224 px, 16 px patches
    assert n_masked(16, 0.25) == 4
    assert n_masked(10, 0.33) == 10 - int(10 * 0.67)


@pytest.mark.parametrize(
    ("h", "w", "ratio"), [(32, 32, 0.25), (64, 48, 0.25), (224, 224, 0.25), (64, 64, 0.5), (48, 80, 0.1)]
)
def test_exact_masked_fraction_and_alignment(h: int, w: int, ratio: float) -> None:
    p = 16
    imgs = torch.rand(5, 1, h, w) + 0.5  # strictly positive, so zero means masked
    masked, mask = mask_images(imgs, ratio, p, generator=torch.Generator().manual_seed(0))
    assert masked.shape == imgs.shape and mask.shape == imgs.shape
    length = (h // p) * (w // p)
    patch_mask = patchify(mask, p)  # [N, L, p*p]
    # every patch is fully masked or fully kept (aligned to the 16 px grid)
    assert torch.all(patch_mask.amin(-1) == patch_mask.amax(-1))
    per_image = patch_mask[:, :, 0].sum(1)
    assert per_image.tolist() == [n_masked(length, ratio)] * 5
    assert float(mask.mean()) == pytest.approx(n_masked(length, ratio) / length)
    # zero-filled where masked, untouched elsewhere
    assert torch.all(masked[mask == 1] == 0)
    assert torch.equal(masked[mask == 0], imgs[mask == 0])


def test_reproducible_with_a_seed_and_independent_per_sample() -> None:
    imgs = torch.rand(4, 1, 64, 64)
    _, m1 = mask_images(imgs, 0.25, generator=torch.Generator().manual_seed(7))
    _, m2 = mask_images(imgs, 0.25, generator=torch.Generator().manual_seed(7))
    _, m3 = mask_images(imgs, 0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    assert not torch.equal(m1[0], m1[1])  # each image gets its own permutation


def test_matches_mae_reference_on_the_same_noise() -> None:
    x = torch.rand(3, 16, 256)
    ours, mask = random_masking_keep_shape(x, 0.25, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    ref, ref_mask = _reference_keep_shape(x, 0.25, noise)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(ours, ref)


def test_patchify_round_trip_and_errors() -> None:
    imgs = torch.rand(2, 1, 48, 32)
    assert torch.equal(unpatchify(patchify(imgs, 16), 16, 48, 32), imgs)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.rand(1, 1, 40, 32), 16)


def test_content_select_masks_only_the_image_not_its_zero_canvas() -> None:
    """A 64 px cell centred in a 224 px zero canvas: 25 % of its 16 patches are masked, none of the canvas."""
    p = 16
    imgs = torch.zeros(3, 1, 224, 224)
    imgs[:, :, 80:144, 80:144] = torch.rand(3, 1, 64, 64) + 0.5  # on the 16 px grid: 4x4 content patches
    masked, mask = mask_images(imgs, 0.25, p, generator=torch.Generator().manual_seed(0), select="content")
    patch_mask = patchify(mask, p)[:, :, 0]  # [N, L]
    content = patchify(imgs, p).amax(-1) > 0  # [N, L]
    assert patch_mask.sum(1).tolist() == [n_masked(16, 0.25)] * 3  # 4 of 16, not 49 of 196
    assert torch.all(patch_mask[~content] == 0)
    assert torch.all(masked[mask == 1] == 0)
    assert torch.equal(masked[mask == 0], imgs[mask == 0])
    # reproducible, and the Microsnoop default still spreads 49 masks over the whole canvas
    _, again = mask_images(imgs, 0.25, p, generator=torch.Generator().manual_seed(0), select="content")
    assert torch.equal(mask, again)
    _, spread = mask_images(imgs, 0.25, p, generator=torch.Generator().manual_seed(0))
    assert patchify(spread, p)[:, :, 0].sum(1).tolist() == [49] * 3


def test_content_select_equals_microsnoop_when_every_patch_has_content() -> None:
    imgs = torch.rand(4, 1, 64, 64) + 0.5
    _, ours = mask_images(imgs, 0.25, generator=torch.Generator().manual_seed(5), select="content")
    _, ref = mask_images(imgs, 0.25, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="'all' or 'content'"):
        mask_images(imgs, 0.25, select="foreground")
