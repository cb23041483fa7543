"""The encoder on ONNX Runtime's CPU provider: the same float32 vectors as PyTorch, faster on CPUs.

An optional backend of :class:`msnoop.embed.embedder.Embedder` (``runtime.backend: onnxruntime``; install with
``pip install 'msnoop[onnx]'``). PyTorch stays the reference path: the network is exported from the loaded
PyTorch model at start (``net.embed``, batch and canvas dynamic), so both run the same weights. Measured with
``jobs/bench_cpu.py`` (stage ``runtimes``, 2 AVX-512 cores, shipped model): about 1.4x the tiles per CPU-second
of PyTorch eager in float32 on 224 and 64 px tiles, vectors within 1e-7 of PyTorch's. Its graph optimiser fuses
the pre-activation BatchNorm/ReLU passes and residual additions that PyTorch eager runs one by one over the
feature maps. ONNX Runtime's CPU provider has no bf16 convolutions, so bf16 autocast stays on PyTorch.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

import numpy as np

INSTALL_HINT = "pip install 'msnoop[onnx]' (onnxruntime and onnx)"


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (needed by the exporter) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


class OnnxRuntimeEncoder:
    """``net.embed`` of a PyTorch network, exported to ONNX and run by an ONNX Runtime CPU session.

    Args:
        net: A network with ``embed([N, 1, H, W]) -> [N, D]`` (e.g. :class:`msnoop.models.cnn.MicrosnoopCNN`),
            in eval mode, on the CPU.
        threads: ONNX Runtime intra-op threads (the embedding actor's torch threads).

    Raises:
        ImportError: onnxruntime or onnx is not installed (the message says how to install them).
        RuntimeError: The network cannot be exported to ONNX (the exporter's message is kept as the cause).
    """

    def __init__(self, net: Any, *, threads: int) -> None:
        if not onnxruntime_available():
            raise ImportError(f"runtime.backend 'onnxruntime' needs onnxruntime and onnx: {INSTALL_HINT}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        # threads sleep rather than spin between operators: on a small shared machine spinning threads take cores
        # from everything else (the same reason the embedding actors run OpenMP with OMP_WAIT_POLICY=PASSIVE)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(export_embed(net), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``[N, 1, H, W]`` float32 -> ``[N, D]`` float32 (the network's ``embed``)."""
        x = np.ascontiguousarray(tiles, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]


def export_embed(net: Any) -> bytes:
    """The ONNX graph (bytes) of ``net.embed`` with dynamic batch, height and width.

    Raises:
        RuntimeError: The exporter failed.
    """
    import torch

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.embed(x)

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # the TorchScript-based exporter (torch 2.13 keeps it, deprecated): the torch.export-based one needs
            # onnxscript as a further dependency and a declared shape range for every canvas
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                Embed().eval(),
                (torch.zeros(2, 1, 64, 64),),
                buf,
                input_names=["tiles"],
                output_names=["embedding"],
                dynamic_axes={"tiles": {0: "n", 2: "height", 3: "width"}, "embedding": {0: "n"}},
                dynamo=False,
                opset_version=17,
            )
    except Exception as exc:  # the exporter raises many types; the caller gets one, with the cause
        raise RuntimeError(
            f"the network could not be exported to ONNX for runtime.backend 'onnxruntime': {exc}"
        ) from exc
    return buf.getvalue()
