"""Batch correction: sphering a feature table on its negative controls, and the batch-experiment job (``job: profile``).

The transform itself (fit / transform / save / load) is :class:`msnoop.vectors.sphering.Spherize`; here it is
applied to tables: :func:`~msnoop.correct.sphering.spherize_profiles` fits it on the rows a control query
selects, :func:`~msnoop.correct.profile.run_profile` runs a whole plate experiment (plate map, aggregation,
sphering, treatments).
"""

__all__ = ["ProfileJob", "join_metadata", "run_profile", "spherize_profiles"]

_LAZY = {
    "ProfileJob": "msnoop.correct.profile",
    "join_metadata": "msnoop.correct.profile",
    "run_profile": "msnoop.correct.profile",
    "spherize_profiles": "msnoop.correct.sphering",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msnoop.correct' has no attribute {name!r}")
