"""The ``input:`` section of a job config: where the images are and how channels are named."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from msnoop.core.config import StrictModel as _Strict
from msnoop.core.storage import Location

#: z-stacks and time series: refuse them (an error naming the shape), take the maximum projection, or one z-plane.
ZPolicy = Literal["refuse", "max"] | int


#: The image table's id column and the prefix of its per-channel path columns (``Metadata_Path_<channel>``).
ID_COLUMN = "Metadata_ImageID"
PATH_PREFIX = "Metadata_Path_"


def path_column(channel: str) -> str:
    """``Metadata_Path_<channel>``: the image-table column holding ``channel``'s file."""
    return f"{PATH_PREFIX}{channel}"


class InputConfig(_Strict):
    """Where the images are and how channels are named.

    Exactly one source: ``manifest`` (CSV/Parquet, one row per image, one path column per channel, or one
    column for files holding every channel with ``channel_index``), ``ome_zarr`` (an NGFF image or plate),
    ``loaddata`` (CellProfiler LoadData CSV with ``FileName_<Ch>``/``PathName_<Ch>``), or ``folder`` with a
    filename ``pattern`` such as ``"{Metadata_Protein}/{name}_{channel}.tif"`` whose ``{channel}`` field
    names the channel and whose other fields become ``Metadata_*`` columns.
    """

    manifest: Location | None = Field(None, description="CSV/Parquet manifest: a path or a URI (s3://bucket/m.csv)")
    loaddata: Location | None = Field(None, description="CellProfiler LoadData CSV: a path or a URI")
    folder: Location | None = Field(
        None, description="folder (or URI prefix) of images named by input.pattern; hidden and system files are ignored"
    )
    ome_zarr: Location | None = Field(
        None,
        description="an OME-Zarr (NGFF) image or HCS plate, a path or a URI, recognised by its metadata whatever its "
        "name: one row per image (plate: per field, with Metadata_Plate, Metadata_Well, Metadata_Site; wells or "
        "fields listed but missing are error rows); channels are picked by OME-Zarr channel label or "
        "input.channel_index",
    )
    pattern: str | None = Field(None, description="filename pattern for folder inputs, relative to the folder")
    channels: list[str] = Field(..., min_length=1, description="channel names, in the order they are embedded")
    channel_columns: dict[str, str] | None = Field(None, description="manifest column holding each channel's path")
    channel_values: dict[str, str] | None = Field(None, description="folder inputs: {channel} value of each channel")
    id_column: str | None = Field(None, description="column with a unique image id; default derived from paths")
    root: Location | None = Field(
        None, description="base folder (or URI) for relative paths; default the manifest's folder"
    )
    limit: int | None = Field(None, ge=1, description="embed only the first N images (smoke runs)")
    dtypes: dict[str, Literal["str", "int", "float", "bool"]] | None = Field(
        None,
        description="types of CSV metadata columns, e.g. {Metadata_Dose: float}; undeclared CSV columns stay "
        "text exactly as written ('0001' stays '0001'), blanks are nulls; Parquet manifests keep their own types",
    )
    channel_index: dict[str, int] | None = Field(
        None,
        description="multi-channel files: the plane of each channel in its file, e.g. {DNA: 0, GFP: 1}; "
        "all channels may then share one path column (input.channel_columns or a 'path' column)",
    )
    channel_names: bool = Field(
        False,
        description="multi-channel OME-TIFF files: pick each channel by its OME channel Name "
        "(the name in input.channels) instead of by index",
    )
    z: ZPolicy = Field(
        "refuse",
        description="z-stacks / time series: 'refuse' (an error naming the shape), 'max' (maximum projection "
        "over Z and T) or a plane index (Z plane; the first time point)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        given = [k for k in ("manifest", "loaddata", "folder", "ome_zarr") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of input.manifest, input.loaddata, input.folder, input.ome_zarr; "
                f"found {given or 'none'}"
            )
        if self.folder is not None and not self.pattern:
            raise ValueError("input.folder needs input.pattern, e.g. '{Metadata_Well}_{channel}.tif'")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"input.channels has duplicates: {self.channels}")
        if self.channel_index is not None:
            missing = [c for c in self.channels if c not in self.channel_index]
            if missing:
                raise ValueError(f"input.channel_index has no plane for channel(s) {missing}")
        if self.channel_index is not None and self.channel_names:
            raise ValueError("give input.channel_index or input.channel_names, not both")
        return self
