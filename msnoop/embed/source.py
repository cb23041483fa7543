"""The first stage of the embedding pipeline: the image table, streamed from the manifest by a Ray read task.

The driver never holds the manifest: it plans the image table from the header (one schema for the run,
:func:`msnoop.io.table_stream.plan_image_table`), checks the ids in one streaming pass (16 bytes per row,
:func:`msnoop.io.table_stream.scan_ids`), and hands Ray Data a datasource (:func:`manifest_dataset`) whose one read task
streams the manifest again and yields blocks of ``runtime.images_per_block`` images still to embed (ids already
written are dropped there, against an :class:`~msnoop.core.idset.IdSet` in the object store).

A block carries what the read stage needs as plain columns (``Metadata_ImageID``, the ``Metadata_Path_*``
columns, the mask column in cells mode, the manifest row in ``_row``) and every row's metadata, with the run's
schema, in :data:`META`: the row as an Arrow IPC record batch message (:func:`encode_rows`). Ray Data converts
blocks between Arrow, pandas and NumPy between stages and infers column types per block; bytes stay bytes, so
the write tasks decode each row's metadata with the run's schema (:func:`decode_rows`) and values and types are
the manifest's whatever the block. Encoding cost 35-70 us and 1.2-1.9 KB per row of 10-13 text columns on the
2-core development machine (the read task reads 10^4-10^5 rows/s; the embedding stages take milliseconds per image).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from msnoop.core import storage as st
from msnoop.core.idset import IdSet, hash_ids
from msnoop.embed.dataset import ROW
from msnoop.io.config import ID_COLUMN, path_column
from msnoop.io.table_stream import ImageTableSource

#: Column of a block holding each row's metadata (Arrow IPC bytes of a one-row record batch, the run's schema).
META = "_meta"


def wire_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with dictionary columns as their value type (an IPC record batch message cannot carry a
    dictionary; :func:`decode_rows` encodes them again)."""
    return pa.schema([pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema])


def encode_rows(table: pa.Table) -> np.ndarray:
    """``[N]`` object array: row ``i`` of ``table`` as the bytes of an Arrow IPC record batch message.

    The message holds no schema (the run's is known to the writer): about 1.2 KB and 60 us per row of 10 columns
    (pyarrow 26, measured on the development machine). Dictionary columns travel as their values.
    """
    wire = wire_schema(table.schema)
    table = table.cast(wire) if wire != table.schema else table
    batches = table.combine_chunks().to_batches()
    rb = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=wire)
    out = np.empty(table.num_rows, dtype=object)
    for i in range(table.num_rows):
        out[i] = rb.slice(i, 1).serialize().to_pybytes()
    return out


def decode_rows(values: Any, schema: pa.Schema) -> pa.Table:
    """Inverse of :func:`encode_rows`: the rows (bytes, in order) as one table with exactly ``schema``."""
    wire = wire_schema(schema)
    table = pa.Table.from_batches([pa.ipc.read_record_batch(pa.py_buffer(v), wire) for v in values], schema=wire)
    if wire == schema:
        return table
    cols = [
        table.column(f.name).dictionary_encode().cast(f.type)
        if pa.types.is_dictionary(f.type)
        else table.column(f.name)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: columns only an earlier run had are nulls (resume)."""
    n = table.num_rows
    have = dict(zip(table.column_names, table.columns, strict=True))  # by name once: wide tables stay linear
    cols = [have[f.name] if f.name in have else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def read_blocks(
    source: ImageTableSource,
    *,
    schema: pa.Schema,
    done: Any,
    block_rows: int,
    mask_column: str | None = None,
) -> Iterator[pa.Table]:
    """The read task: blocks of at most ``block_rows`` images still to embed, in manifest order.

    Args:
        source: The planned image table.
        schema: The run's metadata schema (the image table's, plus columns of an earlier run when resuming).
        done: The ids already written (an :class:`IdSet`, or its Ray object ref): those rows are skipped.
        block_rows: ``runtime.images_per_block``.
        mask_column: Cells mode: the mask-path column to carry as a plain column too.

    Yields:
        Arrow tables with ``Metadata_ImageID``, ``Metadata_Path_<channel>`` per channel, the mask column,
        :data:`ROW` (int64) and :data:`META` (binary).
    """
    if not isinstance(done, IdSet):
        import ray

        done = ray.get(done)
    plain = [ID_COLUMN, *[path_column(ch) for ch in source.channels], *([mask_column] if mask_column else [])]
    for first, batch in source.batches(max(block_rows, 4096)):
        todo = ~done.contains(hash_ids(batch.column(ID_COLUMN)))
        rows = np.flatnonzero(todo)
        batch = batch.filter(pa.array(todo))
        for start in range(0, batch.num_rows, block_rows):
            part = batch.slice(start, block_rows)
            block = {c: part.column(c) for c in plain}
            block[ROW] = pa.array(first + rows[start : start + block_rows], pa.int64())
            block[META] = pa.array(encode_rows(conform(part, schema)), pa.binary())
            yield pa.table(block)


def manifest_dataset(source: ImageTableSource, n_rows: int, *, ray_remote_args: dict[str, Any], **kwargs: Any) -> Any:
    """A Ray dataset of the blocks of :func:`read_blocks` (``kwargs`` are its arguments), read by one task.

    One task reads the whole manifest, in order and in bounded memory (one batch at a time; Ray Data's
    backpressure pauses it while later stages are busy), on the driver's node for a local manifest. Reading a manifest costs a few microseconds per row
    against milliseconds per image for the stages after it, so one reader keeps them fed. ``n_rows`` (rows to
    embed) is only Ray Data's estimate for progress; ``ray_remote_args`` are the read task's Ray options
    (``num_cpus``, ``runtime_env``: named arguments of :func:`ray.data.read_datasource`).
    """
    import ray
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ManifestDatasource(Datasource):
        def get_name(self) -> str:
            return "Manifest"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        @property
        def supports_distributed_reads(self) -> bool:
            # a local manifest is read on the driver's node (other nodes may not see the driver's files)
            return source.kind == "table" or st.is_uri(source.location)

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=n_rows, size_bytes=None, exec_stats=None, input_files=None)
            # The plan and the run's schema grow with the manifest's width (thousands of columns: megabytes), so
            # they travel through the object store and the task holds a reference only; Ray Data also names the
            # read function in its messages, so it is a plain function, not a partial.
            plan = ray.put((source, kwargs))

            def read_manifest() -> Iterator[pa.Table]:
                planned, options = ray.get(plan)
                yield from read_blocks(planned, **options)

            return [ReadTask(read_manifest, meta, per_task_row_limit=per_task_row_limit)]

    return ray.data.read_datasource(ManifestDatasource(), **ray_remote_args)  # num_cpus, runtime_env
