"""CPU inference settings, tight canvases batched by size, and the float32 reference path they must not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msnoop.core.runtime import (
    CPU_BATCH_PIXELS,
    CPU_MAX_BATCH,
    GPU_BATCH_SIZE,
    InferenceSettings,
    inference_settings,
)
from msnoop.embed.embedder import Embedder
from msnoop.models.checkpoint import resolve_model
from msnoop.preprocess.presets import Preprocessing, prepare_channel, tight_canvas


@pytest.fixture(scope="module")
def tight_model():
    """The small test network with the tight-canvas preprocessing."""
    model = resolve_model("random:test_cnn:0")
    model.preprocess = Preprocessing(mode="tight")
    return model


def _images(sizes: list[tuple[int, int]], channels: int = 2, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.gamma(2.0, 30.0, (h, w)).astype(np.float32) for _ in range(channels)] for h, w in sizes]


# ----------------------------------------------------------------------------------------------- settings
def test_cpu_batches_hold_a_pixel_budget_and_a_gpu_keeps_large_batches():
    cpu = inference_settings("cpu", amp="cuda")
    assert (cpu.batch_size, cpu.channels_last, cpu.bf16) == (None, True, False)
    for side in (16, 48, 64, 96, 128, 160, 224, 448):
        n = cpu.tiles_per_batch(side)
        assert 1 <= n <= CPU_MAX_BATCH
        assert n == CPU_MAX_BATCH or n * side * side <= CPU_BATCH_PIXELS < (n + 1) * side * side or n == 1
    assert cpu.tiles_per_batch(224) < cpu.tiles_per_batch(64)  # large canvases fall out of the caches sooner
    assert cpu.tiles_per_batch(100, 50) == cpu.tiles_per_batch(50, 100)
    gpu = inference_settings("cuda:0")
    assert gpu.tiles_per_batch(224) == gpu.tiles_per_batch(64) == GPU_BATCH_SIZE and not gpu.channels_last
    assert gpu.bf16  # amp 'cuda': bf16 autocast on GPUs, as before
    fixed = inference_settings("cpu", batch_size=5, memory_format="contiguous")
    assert fixed.tiles_per_batch(224) == fixed.tiles_per_batch(64) == 5 and not fixed.channels_last
    assert inference_settings("cuda", memory_format="channels_last").channels_last
    assert inference_settings("cpu", amp="off").record() == {
        "device": "cpu",
        "batch_size": "auto",
        "channels_last": True,
        "bf16": False,
        "backend": "torch",
    }


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, "batch_size must be"),
        ({"batch_size": "big"}, "batch_size must be"),
        ({"batch_size": True}, "batch_size must be"),
        ({"amp": "bf16"}, "amp must be"),
        ({"memory_format": "nhwc"}, "memory_format must be"),
    ],
)
def test_inference_settings_refuse_unknown_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inference_settings("cpu", **kwargs)


def test_embedder_takes_its_settings_from_the_device():
    emb = Embedder(resolve_model("random:test_cnn:0"), device="cpu", amp="off")
    assert emb.settings == InferenceSettings(device="cpu", batch_size=None, channels_last=True, bf16=False)
    conv = emb.net.encoder.down[1].conv[0][2].weight  # [16, 8, 3, 3]: the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


# ----------------------------------------------------------------------------------------------- bucketing
def test_embed_tiles_batches_each_canvas_apart_and_keeps_the_order(tight_model):
    emb = Embedder(tight_model, device="cpu", batch_size=2)
    rng = np.random.default_rng(1)
    groups = [rng.uniform(size=(n, s, s)).astype(np.float32) for n, s in ((3, 64), (1, 128), (2, 64), (0, 80), (4, 96))]
    seen: list[tuple[int, ...]] = []
    hook = emb.net.encoder.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    out = emb.embed_tiles(groups)
    hook.remove()
    assert out.shape == (10, emb.embed_dim)
    # every forward pass holds one canvas, at most batch_size tiles: 64 px x 5 -> 2+2+1, 128 x 1, 96 x 4 -> 2+2
    assert sorted(seen) == sorted(
        [(2, 1, 64, 64), (2, 1, 64, 64), (1, 1, 64, 64), (1, 1, 128, 128)] + [(2, 1, 96, 96)] * 2
    )
    alone = np.concatenate([emb.embed_tiles(g) for g in groups if len(g)])
    np.testing.assert_allclose(out, alone, atol=1e-5)
    assert emb.embed_tiles([]).shape == (0, emb.embed_dim)


def test_an_image_gets_the_same_vector_alone_or_batched_with_others_of_any_size(tight_model):
    """Generated mixes of sizes (several canvases per call, tiled images among them), in seeded random orders."""
    emb = Embedder(tight_model, device="cpu")
    rng = np.random.default_rng(2)
    for trial in range(3):
        sizes = [tuple(map(int, rng.integers(8, 130, 2))) for _ in range(int(rng.integers(3, 7)))] + [(230, 90)]
        sizes = [sizes[i] for i in rng.permutation(len(sizes))]
        images = _images(sizes, seed=trial)
        together = emb.embed_images(images)
        alone = np.concatenate([emb.embed_images([img]) for img in images])
        assert together.shape == (len(images), 2 * emb.embed_dim)
        np.testing.assert_allclose(together, alone, atol=1e-5, err_msg=f"sizes {sizes}")
        canvases = {tight_canvas(h, w) if max(h, w) <= 224 else 224 for h, w in sizes}
        assert len(canvases) >= 2, f"the generated mix {sizes} should span several canvases"


def test_tight_vectors_are_the_network_on_the_tight_canvas(tight_model):
    """With the option on, a small image is the network's readout of its own canvas, not of a 224 canvas."""
    emb = Embedder(tight_model, device="cpu", memory_format="contiguous", amp="cuda")  # float32, as the direct call
    (img,) = _images([(50, 70)], channels=1, seed=3)
    tiles = prepare_channel(img[0], tight_model.preprocess)
    assert tiles.shape == (1, 80, 80)
    with torch.inference_mode():
        direct = tight_model.net.embed(torch.from_numpy(tiles)[:, None]).numpy()
    np.testing.assert_allclose(emb.embed_images([img])[0], direct[0], atol=1e-6)


# ----------------------------------------------------------------------------------------------- reference path
def test_new_cpu_defaults_give_the_float32_reference_vectors_of_the_shipped_model(shared_data):
    """Options off (native 224 canvas, amp cuda: float32 on CPUs): auto batches + channels-last = one contiguous
    float32 call of the network; with the default amp (bf16 on CPUs with native bf16) within bf16 rounding."""
    import pandas as pd

    from msnoop.io.readers import read_image

    yeast = shared_data("yeast")
    table = pd.read_csv(yeast / "yeast_labels.csv").iloc[[0, 400, 900]]
    images = [[read_image(str(yeast / row[c])) for c in ("gfp_path", "rfp_path")] for _, row in table.iterrows()]
    model = resolve_model("default")
    assert model.preprocess.mode == "native"
    got = Embedder(model, device="cpu", amp="cuda").embed_images(images)
    default = Embedder(model, device="cpu").embed_images(images)
    tiles = np.stack([prepare_channel(ch, model.preprocess)[0] for img in images for ch in img])
    assert tiles.shape == (6, 224, 224)
    net = resolve_model("default").net.eval()  # a fresh copy in the default layout, all tiles in one call
    with torch.inference_mode():
        ref = net.embed(torch.from_numpy(tiles)[:, None]).numpy().reshape(3, 2 * 256)
    assert np.abs(got - ref).max() < 1e-5
    blocks = (default * ref).reshape(3, 2, 256).sum(-1)  # cosine per channel block (unit vectors)
    assert blocks.min() > 0.9995


def test_the_actor_embeds_a_block_of_mixed_canvases_and_errors_like_the_embedder(tight_model):
    from msnoop.embed.actor import EmbedActor
    from msnoop.embed.dataset import _ragged

    images = _images([(40, 40), (100, 60), (300, 250), (64, 64)], seed=4)
    emb = Embedder(tight_model, device="cpu")
    prepared = [emb.prepare(img) for img in images]
    assert [t.shape[-1] for t, _ in prepared] == [64, 112, 224, 64]
    tiles = [t for t, _ in prepared]
    counts = [c for _, c in prepared]
    tiles.insert(2, np.zeros((0, 224, 224), np.float32))  # an image that could not be read
    counts.insert(2, np.zeros(2, np.int64))
    actor = EmbedActor(tight_model, batch_size="auto", device="cpu", torch_threads=None)
    out = actor({"tiles": _ragged(tiles), "counts": np.stack(counts), "error": np.array(["", "", "bad", "", ""])})
    expected = emb.embed_images(images)
    np.testing.assert_allclose(np.delete(out["embedding"], 2, axis=0), expected, atol=1e-5)
    assert not out["embedding"][2].any()


# ----------------------------------------------------------------------------------------------- onnxruntime
def test_onnxruntime_backend_gives_the_torch_vectors_on_every_canvas(tight_model):
    pytest.importorskip("onnxruntime", reason="the onnx extra (a dev dependency)")
    images = _images([(40, 40), (100, 60), (300, 250), (64, 64), (17, 200)], seed=5)
    ref = Embedder(tight_model, device="cpu", memory_format="contiguous", amp="cuda").embed_images(images)
    ort = Embedder(tight_model, device="cpu", backend="onnxruntime")  # the default amp: float32 all the same
    assert ort.settings.backend == "onnxruntime" and not ort.settings.bf16
    seen: list[int] = []
    hook = tight_model.net.encoder.register_forward_pre_hook(lambda _m, args: seen.append(1))
    got = ort.embed_images(images)
    hook.remove()
    assert not seen  # the PyTorch network did not run
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_onnxruntime_backend_runs_float32_on_cpus_only(monkeypatch):
    import msnoop.core.runtime

    monkeypatch.setattr(msnoop.core.runtime, "cpu_has_native_bf16", lambda: True)
    with pytest.raises(ValueError, match="CPUs only"):
        inference_settings("cuda", backend="onnxruntime")
    assert inference_settings("cpu", backend="torch", amp="auto").bf16
    assert not inference_settings("cpu", backend="onnxruntime", amp="auto").bf16
    with pytest.raises(ValueError, match="backend must be"):
        inference_settings("cpu", backend="openvino")


def test_onnxruntime_backend_missing_says_how_to_install(monkeypatch):
    import msnoop.embed.onnx_backend as ob

    monkeypatch.setattr(ob, "onnxruntime_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'msnoop\[onnx\]'"):
        Embedder(resolve_model("random:test_cnn:0"), device="cpu", backend="onnxruntime")


# ----------------------------------------------------------------------------------------------- resume identity
@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_settings_are_one_run_exactly_when_they_give_the_same_precision(monkeypatch, native_bf16):
    import msnoop.core.runtime
    from msnoop.embed.identity import amp_precision

    monkeypatch.setattr(msnoop.core.runtime, "cpu_has_native_bf16", lambda: native_bf16)
    cuda, auto, off = amp_precision("cuda"), amp_precision("auto"), amp_precision("off")
    assert cuda == {"cpu": "float32", "gpu": "bf16"} and off == {"cpu": "float32", "gpu": "float32"}
    assert auto == {"cpu": "bf16" if native_bf16 else "float32", "gpu": "bf16"}
    assert (auto == cuda) is (not native_bf16)  # 'auto' on a CPU without native bf16 is float32, as 'cuda'
    assert amp_precision("auto", "onnxruntime") == cuda  # onnxruntime runs float32 on CPUs
