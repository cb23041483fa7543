"""Masked-reconstruction pretraining on Ray Train (``job: pretrain``): data pool, masking, loop, model card."""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "PretrainJob": "config",
    "PretrainResult": "pretrain",
    "build_state": "loop",
    "mask_images": "masking",
    "run_pretrain": "pretrain",
    "train_step": "loop",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
