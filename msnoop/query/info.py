"""What a table holds and how it was made: ``msnoop info`` and :func:`msnoop.info`.

Any table msnoop writes can be described: an output folder (embed, profile), a folder inside one (``embeddings/``,
``cells/``, ``lancedb/``), a LanceDB table (``.lance``), or a Parquet/CSV feature table. A LanceDB table is
described from its schema metadata (model, preprocessing, channels, post-processing or correction); a table file
from its rows and the record of the output folder it belongs to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msnoop.core.rundir import RunDir

__all__ = ["TableInfo", "describe"]


@dataclass
class TableInfo:
    """A table's description.

    Attributes:
        source: The table read (a LanceDB table as ``<uri>/<name>.lance``, else the file or folder).
        kind: ``"embeddings"`` (one vector per image), ``"cells"`` (one per cell), ``"profiles"`` /
            ``"treatments"`` (a profile job's sphered wells / treatments), or ``"features"`` (any other table).
        n_rows: Rows.
        n_features: Feature dimensions (vector length).
        metadata: The ``Metadata_*`` columns (image paths left out).
        channels: Channel names, in vector order (embeddings and cells).
        model: The model reference, its architecture and sha256 (embeddings and cells), else None.
        preprocess: The preprocessing the images were embedded with, else None.
        vectors: What distances compare: ``{"method": "standardize" | "raw" | ..., "n": rows fitted on}``.
        correction: A profile table's sphering: method, controls and features it was fitted on; else None.
        n_errors: Images recorded in the output folder's ``errors/``, or None (not an embed output).
        errors: That folder, or None.
        state: Why the output folder is not complete (being written, unfinished), or None
            (:meth:`msnoop.core.rundir.RunDir.state`).
    """

    source: str
    kind: str
    n_rows: int
    n_features: int
    metadata: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    model: dict[str, Any] | None = None
    preprocess: dict[str, Any] | None = None
    vectors: dict[str, Any] = field(default_factory=dict)
    correction: dict[str, Any] | None = None
    n_errors: int | None = None
    errors: str | None = None
    state: str | None = None

    def lines(self) -> list[str]:
        """The description as ``msnoop info`` prints it: one ``name  value`` line per fact."""
        rows = [("state", self.state)] if self.state else []
        rows += [("table", self.source), ("kind", self.kind), ("rows", f"{self.n_rows:,}")]
        if self.channels:
            per = self.n_features // max(len(self.channels), 1)
            rows.append(("dimensions", f"{self.n_features} = {len(self.channels)} channels x {per}"))
            rows.append(("channels", ", ".join(self.channels)))
        else:
            rows.append(("dimensions", f"{self.n_features} features"))
        if self.model:
            sha = str(self.model.get("sha256") or "")[:12]
            rows.append(
                ("model", f"{self.model.get('model')} ({self.model.get('arch')}" + (f", sha256 {sha})" if sha else ")"))
            )
        if self.preprocess:
            rows.append(("preprocess", json.dumps(self.preprocess)))
        if self.correction:
            c = self.correction
            method = c.get("method") or "none"
            fitted = " ".join(
                part
                for part in (
                    f"fitted on {c['n_controls']} control rows" if c.get("n_controls") is not None else "",
                    f"({c['control_query']})" if c.get("control_query") else "",
                )
                if part
            )
            features = f"{c['n_features']} features" if c.get("n_features") is not None else ""
            text = ", ".join(p for p in (f"{method} sphering {fitted}".strip(), features) if p)
            rows.append(("correction", text if method != "none" else "none (the rows are not sphered)"))
        if self.vectors:
            method = self.vectors.get("method", "raw")
            fitted = f" (fitted on {self.vectors['n']} rows, no labels)" if "n" in self.vectors else ""
            rows.append(("vectors", f"{method}{fitted}"))
        rows.append(("metadata", ", ".join(self.metadata) or "none"))
        if self.n_errors:
            rows.append((RunDir.ERRORS, f"{self.n_errors} (see {self.errors})"))
        return [f"{name:<10} {value}" for name, value in rows]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _metadata(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("Metadata_") and not n.startswith("Metadata_Path_")]


def _errors(run: Any) -> tuple[int | None, str | None]:
    from msnoop.core import parts
    from msnoop.core.partindex import PartIndex

    if run is None or not parts.part_files(run.errors, storage=run.storage):
        return None, None
    # from the run's part index (parts it does not describe are read): no request per part on object storage
    return sum(PartIndex.load(run).scan(RunDir.ERRORS).rows), str(run.errors)


def _from_lance(ref: Any, run: Any) -> TableInfo:
    meta = ref.info
    if meta.get("kind") == "profiles":
        record = meta.get("correction") or {}
        kind, correction = str(meta.get("level") or "profiles"), record.get("sphering")
    else:
        cells = RunDir.CELLS in meta and ref.name.endswith(f"_{RunDir.CELLS}")
        kind, correction = RunDir.CELLS if cells else RunDir.EMBEDDINGS, None
    vector = ref.table.schema.field("vector").type
    n_errors, errors = _errors(run) if kind == RunDir.EMBEDDINGS else (None, None)
    return TableInfo(
        source=f"{ref.uri}/{ref.name}.lance",
        kind=kind,
        n_rows=int(ref.table.count_rows()),
        n_features=int(getattr(vector, "list_size", 0) or 0),
        metadata=_metadata([f.name for f in ref.table.schema]),
        channels=list(meta.get("channels") or []),
        model=(
            {"model": meta.get("model"), "arch": meta.get("arch"), "sha256": meta.get("model_sha256")}
            if meta.get("model")
            else None
        ),
        preprocess=meta.get("preprocess"),
        vectors=dict(meta.get("postprocess") or {"method": "raw"}),
        correction=correction,
        n_errors=n_errors,
        errors=errors,
    )


def _from_table(target: str | Path) -> TableInfo:
    from msnoop.core.tables import feature_columns, read_table, resolve_table
    from msnoop.vectors.postprocess import table_postprocess

    source = resolve_table(target)
    df = read_table(target)
    record: dict[str, Any] = {}
    if source.run is not None:
        try:
            record = source.run.read_info()
        except (OSError, ValueError):
            record = {}
    embedded = source.kind == "parts" and record.get("job", "embed") == "embed"
    kind = "features"
    if embedded:
        kind = RunDir.CELLS if Path(str(source.location)).name == RunDir.CELLS else RunDir.EMBEDDINGS
    elif record.get("job") == "profile":
        kind = Path(str(source.location)).stem
    n_errors, errors = _errors(source.run) if kind == RunDir.EMBEDDINGS else (None, None)
    return TableInfo(
        source=str(source.location),
        kind=kind,
        n_rows=len(df),
        n_features=len(feature_columns(df)),
        metadata=_metadata([str(c) for c in df.columns]),
        channels=list(record.get("channels") or []) if embedded else [],
        model=(
            {"model": record.get("model"), "arch": record.get("arch"), "sha256": record.get("model_sha256")}
            if embedded and record.get("model")
            else None
        ),
        preprocess=record.get("preprocess") if embedded else None,
        vectors={"method": table_postprocess(target)},
        n_errors=n_errors,
        errors=errors,
    )


def describe(target: str | Path, table: str | None = None) -> TableInfo:
    """Describe any table msnoop writes (see the module docstring).

    Args:
        target: An output folder, a folder inside one, a LanceDB table folder (``.lance``), a LanceDB URI (with
            ``table``), or a Parquet/CSV table; a local path or an object storage URI of an output folder.
        table: A table name inside a LanceDB URI, or another table of an output folder's database.

    Returns:
        A :class:`TableInfo`; ``str()`` of it is what ``msnoop info`` prints.

    Raises:
        FileNotFoundError: ``target`` does not exist.
        ValueError: ``target`` holds no table msnoop can read (the message says what it expected).
        KeyError: The LanceDB has no table ``table``.
    """
    from msnoop.query.search import open_results

    try:
        ref = open_results(target, table, complete=False)  # describing a partial folder says so instead
    except ValueError:
        if table is not None:
            raise
        return _from_table(target)
    run = RunDir(target)
    described = _from_lance(ref, run if run.exists() else None)
    described.state = run.state()
    return described
