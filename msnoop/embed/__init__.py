"""The embedding job: images -> Parquet parts on Ray Data (read and prepare, an embedding actor pool, write).

The pipeline and its stages are described in :mod:`msnoop.embed.pipeline` (:func:`run_embed`); the parts go to
the output folder (:class:`msnoop.core.rundir.RunDir`) and the store stage builds the LanceDB table from them.
:class:`Embedder` is the same embedding without Ray, on in-memory images.
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "EmbedJob": "config",
    "EmbedResult": "pipeline",
    "Embedder": "embedder",
    "StrictModeError": "dataset",
    "TotalsError": "totals",
    "check_totals": "totals",
    "prepare_model": "pipeline",
    "run_embed": "pipeline",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
