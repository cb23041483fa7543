"""The ``input:`` section of a job config: where the images are and how channels are named."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from msnoop.core.config import StrictModel as _Strict


class InputConfig(_Strict):
    """Where the images are and how channels are named.

    Exactly one source: ``manifest`` (CSV/Parquet, one row per image, one path column per channel),
    ``loaddata`` (CellProfiler LoadData CSV with ``FileName_<Ch>``/``PathName_<Ch>``), or ``folder`` with a
    filename ``pattern`` such as ``"{Metadata_Protein}/{name}_{channel}.tif"`` whose ``{channel}`` field
    names the channel and whose other fields become ``Metadata_*`` columns.
    """

    manifest: Path | None = None
    loaddata: Path | None = None
    folder: Path | None = None
    pattern: str | None = Field(None, description="filename pattern for folder inputs, relative to the folder")
    channels: list[str] = Field(..., min_length=1, description="channel names, in the order they are embedded")
    channel_columns: dict[str, str] | None = Field(None, description="manifest column holding each channel's path")
    channel_values: dict[str, str] | None = Field(None, description="folder inputs: {channel} value of each channel")
    id_column: str | None = Field(None, description="column with a unique image id; default derived from paths")
    root: Path | None = Field(None, description="base folder for relative paths; default the manifest's folder")
    limit: int | None = Field(None, ge=1, description="embed only the first N images (smoke runs)")

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        given = [k for k in ("manifest", "loaddata", "folder") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of input.manifest, input.loaddata, input.folder; found {given or 'none'}"
            )
        if self.folder is not None and not self.pattern:
            raise ValueError("input.folder needs input.pattern, e.g. '{Metadata_Well}_{channel}.tif'")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"input.channels has duplicates: {self.channels}")
        return self
