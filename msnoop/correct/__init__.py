"""Batch correction: sphering a feature table on its negative controls, and the batch-experiment job (``job: profile``).

The transform itself (fit / transform / save / load) is :class:`msnoop.vectors.sphering.Spherize`; here it is
applied to tables: :func:`spherize_profiles` fits it on the rows a control query selects, :func:`run_profile`
runs a whole plate experiment (plate map, aggregation, sphering, treatments).
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "ProfileJob": "profile",
    "join_metadata": "profile",
    "run_profile": "profile",
    "spherize_profiles": "sphering",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
