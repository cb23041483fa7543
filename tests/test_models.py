from __future__ import annotations

import numpy as np
import pytest
import torch

from msnoop.embed.embedder import Embedder, combine_tiles
from msnoop.models.checkpoint import CheckpointError, load_checkpoint, resolve_model, save_checkpoint
from msnoop.models.registry import create_model, list_models
from msnoop.preprocess.presets import Preprocessing


def test_microsnoop_cnn_matches_published_architecture():
    net = create_model("microsnoop_cnn")
    n_params = sum(p.numel() for p in net.parameters())
    n_encoder = sum(p.numel() for p in net.encoder.parameters())
    assert n_params == pytest.approx(6.60e6, rel=0.01)  # Microsnoop's CNN: encoder ~2.79 M, total ~6.60 M
    assert n_encoder == pytest.approx(2.79e6, rel=0.01)
    assert net.depths == (32, 64, 128, 256) and net.embed_dim == 256


def test_feature_maps_shapes_and_reconstruction_shape():
    net = create_model("test_cnn").eval()
    x = torch.randn(2, 1, 64, 64)
    maps = net.encoder(x)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 64, 64), (2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
    assert net(x).shape == (2, 1, 64, 64)


def test_embedding_is_l2_normalised_global_average_of_deepest_map():
    torch.manual_seed(0)
    net = create_model("test_cnn").eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        emb = net.embed(x)
        deepest = net.encoder(x)[-1]
    pooled = deepest.mean(dim=(2, 3))
    torch.testing.assert_close(emb, pooled / pooled.norm(dim=1, keepdim=True))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_registry_errors_list_valid_names():
    assert {"microsnoop_cnn", "test_cnn"} <= set(list_models())
    with pytest.raises(KeyError, match="Unknown architecture 'resnet9'.*microsnoop_cnn"):
        create_model("resnet9")


def test_checkpoint_roundtrip_half_precision_and_weights_only(tmp_path):
    torch.manual_seed(0)
    net = create_model("test_cnn").eval()
    path = save_checkpoint(
        tmp_path / "m.pt", net, arch="test_cnn", preprocess=Preprocessing(), meta={"steps": 3}, half=True
    )
    raw = torch.load(path, weights_only=True)
    assert raw["state_dict"]["encoder.down.0.proj.1.weight"].dtype == torch.float16
    loaded = load_checkpoint(path)
    assert loaded.meta == {"steps": 3} and loaded.arch == "test_cnn" and len(loaded.sha256) == 64
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net.embed(x), net.embed(x), atol=5e-3, rtol=0)


def test_checkpoint_refuses_other_preprocessing(tmp_path):
    path = save_checkpoint(
        tmp_path / "m.pt", create_model("test_cnn"), arch="test_cnn", preprocess=Preprocessing(preset="cytoimagenet")
    )
    with pytest.raises(CheckpointError, match="trained with preprocessing preset 'cytoimagenet'"):
        load_checkpoint(path, preprocess=Preprocessing(preset="microsnoop"))
    assert (
        load_checkpoint(path, preprocess=Preprocessing(preset="cytoimagenet", mode="rescale")).preprocess.mode
        == "rescale"
    )


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected format 'msnoop-checkpoint/1'"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown architecture 'nope'"):
        resolve_model("random:nope")


def test_random_models_are_seeded():
    a = resolve_model("random:test_cnn:3").net.state_dict()
    b = resolve_model("random:test_cnn:3").net.state_dict()
    c = resolve_model("random:test_cnn:4").net.state_dict()
    key = "encoder.down.0.conv.0.2.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_embedder_concatenates_channels_and_averages_tiles():
    emb = Embedder(resolve_model("random:test_cnn"), batch_size=3)
    rng = np.random.default_rng(0)
    small, large = rng.uniform(size=(40, 50)).astype(np.float32), rng.uniform(size=(300, 300)).astype(np.float32)
    out = emb.embed_images([[small, large], [large, small]])
    assert out.shape == (2, 64)
    tiles_small, _ = emb.prepare([small])
    tiles_large, _ = emb.prepare([large])
    assert len(tiles_large) == 4
    np.testing.assert_allclose(out[0, :32], emb.embed_tiles(tiles_small)[0], atol=1e-6)
    np.testing.assert_allclose(out[0, 32:], emb.embed_tiles(tiles_large).mean(0), atol=1e-6)
    np.testing.assert_allclose(out[1], np.concatenate([out[0, 32:], out[0, :32]]), atol=1e-6)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_embedder_bf16_autocast_by_default_on_cpus_with_native_bf16_and_close_to_fp32(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    import msnoop.core.runtime

    monkeypatch.setattr(msnoop.core.runtime, "cpu_has_native_bf16", lambda: native_bf16)  # emulated: same numerics
    assert Embedder(resolve_model("random:test_cnn"), device="cpu").use_amp is native_bf16  # the default, amp auto
    if not native_bf16:
        return
    model = resolve_model("random:test_cnn")
    cells = [[np.random.default_rng(i).uniform(size=(48, 48)).astype(np.float32)] for i in range(4)]
    fp32, bf16 = Embedder(model, device="cpu", amp="cuda"), Embedder(model, device="cpu")
    assert not fp32.use_amp and bf16.use_amp
    dtypes: list[torch.dtype] = []
    hook = model.net.encoder.register_forward_hook(lambda _m, _i, out: dtypes.append(out[-1].dtype))
    a = fp32.embed_images(cells)
    fp32_dtypes, dtypes[:] = set(dtypes), []
    b = bf16.embed_images(cells)
    hook.remove()
    assert fp32_dtypes == {torch.float32} and set(dtypes) == {torch.bfloat16} and b.dtype == np.float32
    cosine = (a * b).sum(1)  # rows are L2-normalised
    assert cosine.min() > 0.99 and not np.array_equal(a, b)


def test_combine_tiles_layout():
    tiles = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    out = combine_tiles(tiles, [np.array([1, 2]), np.array([1, 1])])
    np.testing.assert_array_equal(out, [[0, 1, 3, 4], [6, 7, 8, 9]])


def test_shipped_default_model_loads_matches_its_card_and_embeds():
    import hashlib
    import re

    from msnoop.embed.embedder import Embedder
    from msnoop.models.checkpoint import BUILTIN, resolve_model

    path = BUILTIN["default"]
    assert path.is_file(), "the package ships msnoop/weights/msnoop_default.pt"
    assert path.stat().st_size <= 30 * 2**20
    card = (path.parent / "MODEL_CARD.md").read_text()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert re.search(r"sha256\*\*: `([0-9a-f]{64})`", card).group(1) == sha
    model = resolve_model("default")
    assert model.arch == "microsnoop_cnn" and model.preprocess.preset == "microsnoop"
    assert model.sha256 == sha
    rng = np.random.default_rng(0)
    cells = [[rng.gamma(2.0, 50.0, (64, 64)).astype(np.float32) for _ in range(3)] for _ in range(2)]
    emb = Embedder(model).embed_images(cells)
    assert emb.shape == (2, 3 * 256) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb[:, :256], axis=1), 1.0, atol=1e-4)
    # trained weights, not a fresh initialisation
    random = resolve_model("random:microsnoop_cnn:0")
    assert not np.allclose(Embedder(random).embed_images(cells), emb, atol=1e-3)
