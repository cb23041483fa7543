"""What a network must provide to msnoop: the embedding, its dimension and the forward pass pretraining calls.

Every registered architecture (:func:`msnoop.models.registry.register_model`) builds a network that satisfies
:class:`PretrainableNetwork`; :func:`msnoop.models.registry.create_model` checks it with :func:`check_network`.
Networks that only embed (the ImageNet teacher of ``imagenet:`` references) satisfy :class:`EmbeddingNetwork`.

Shapes: every channel of every image is embedded on its own, so networks take one-channel tiles
``[N, 1, H, W]`` float32 (normalised by the preprocessing preset); ``H`` and ``W`` are multiples of 8.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

__all__ = ["EmbeddingNetwork", "PretrainableNetwork", "check_network"]

#: Keyword arguments of the training forward (see :meth:`PretrainableNetwork.forward`).
TRAINING_FORWARD_ARGS = ("skip_keep", "view2")


@runtime_checkable
class EmbeddingNetwork(Protocol):
    """A network msnoop can embed with (the embedding job, queries, the Python API)."""

    @property
    def embed_dim(self) -> int:
        """Length ``D`` of one tile's embedding."""
        ...

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` float32 tiles -> ``[N, D]`` float32 embeddings, the readout the network defines
        (the Microsnoop CNN's is L2-normalised); msnoop averages the tiles of a channel and concatenates channels."""
        ...


@runtime_checkable
class PretrainableNetwork(EmbeddingNetwork, Protocol):
    """A network masked-reconstruction pretraining can train (:func:`msnoop.train.loop.train_step`)."""

    def forward(
        self, x: torch.Tensor, skip_keep: torch.Tensor | None = None, view2: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reconstruction of ``x`` ``[N, 1, H, W]`` as ``[N, 1, H, W]``.

        Args:
            x: The masked tiles.
            skip_keep: ``[N, 1, H, W]`` 0/1 map; where it is 0 the skip connections carry nothing (the decoder only
                sees what reached the deepest map).
            view2: ``[N, 1, H, W]`` a second view of the same images, encoded in the same call.

        Returns:
            The reconstruction; with ``view2`` a tuple ``(reconstruction, z1 [N, C], z2 [N, C])`` of the two
            views' pooled deepest maps.
        """
        ...


def check_network(net: object, name: str = "network") -> None:
    """Raise unless ``net`` provides what :class:`PretrainableNetwork` asks for.

    Raises:
        TypeError: Naming every missing member (``embed``, ``embed_dim``, the ``forward`` keywords).
    """
    missing = [m for m in ("embed", "embed_dim") if not hasattr(net, m)]
    forward = getattr(net, "forward", None)
    if forward is None:
        missing.append("forward")
    else:
        params = inspect.signature(forward).parameters
        missing += [f"forward(..., {a}=None)" for a in TRAINING_FORWARD_ARGS if a not in params]
    if missing:
        raise TypeError(
            f"{name} ({type(net).__name__}) does not provide {', '.join(missing)}: every registered architecture "
            "must satisfy msnoop.models.protocol.PretrainableNetwork"
        )
