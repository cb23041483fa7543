"""Networks: the architecture registry (architectures register in their own module), the protocol a network
satisfies, checkpoints, and loading a model with the preprocessing it embeds with.
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "EmbeddingNetwork": "protocol",
    "LoadedModel": "checkpoint",
    "MicrosnoopCNN": "cnn",
    "PretrainableNetwork": "protocol",
    "check_network": "protocol",
    "create_model": "registry",
    "list_models": "registry",
    "load_checkpoint": "checkpoint",
    "load_for_embedding": "loading",
    "load_recorded": "loading",
    "register_model": "registry",
    "resolve_model": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
