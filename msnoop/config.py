"""Typed job configs, loaded from YAML and validated before any work starts.

Every job config is a pydantic model with ``extra="forbid"``: an unknown or missing key fails at load
time with a message naming the key and the file. Any field can be overridden from the command line
with ``--set section.key=value`` (values are parsed as YAML), and the resolved config is saved beside
the job's outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msnoop.preprocess.presets import Preprocessing
from msnoop.runtime import AMP_HELP
from msnoop.segment import SegmentationConfig


class ConfigError(ValueError):
    """A job config is invalid; the message names the file and the offending key."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid")


_Strict = StrictModel


class InputConfig(_Strict):
    """Where the images are and how channels are named.

    Exactly one source: ``manifest`` (CSV/Parquet, one row per image, one path column per channel, or one
    column for files holding every channel with ``channel_index``), ``ome_zarr`` (an NGFF image or plate),
    ``loaddata`` (CellProfiler LoadData CSV with ``FileName_<Ch>``/``PathName_<Ch>``), or ``folder`` with a
    filename ``pattern`` such as ``"{Metadata_Protein}/{name}_{channel}.tif"`` whose ``{channel}`` field
    names the channel and whose other fields become ``Metadata_*`` columns.
    """

    manifest: Path | None = None
    loaddata: Path | None = None
    folder: Path | None = None
    ome_zarr: Path | None = Field(
        None,
        description="an OME-Zarr (NGFF) image or HCS plate: one row per image (plate: per field, with "
        "Metadata_Plate, Metadata_Well, Metadata_Site); channels are picked by OME-Zarr channel label or input.channel_index",
    )
    pattern: str | None = Field(None, description="filename pattern for folder inputs, relative to the folder")
    channels: list[str] = Field(..., min_length=1, description="channel names, in the order they are embedded")
    channel_columns: dict[str, str] | None = Field(None, description="manifest column holding each channel's path")
    channel_values: dict[str, str] | None = Field(None, description="folder inputs: {channel} value of each channel")
    id_column: str | None = Field(None, description="column with a unique image id; default derived from paths")
    root: Path | None = Field(None, description="base folder for relative paths; default the manifest's folder")
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
    z: Literal["refuse", "max"] | int = Field(
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


class PreprocessConfig(_Strict):
    """Overrides of the checkpoint's preprocessing; ``None`` keeps the checkpoint's value."""

    preset: Literal["microsnoop", "cytoimagenet"] | None = None
    mode: Literal["native", "rescale", "tile"] = "native"
    input_size: int | None = Field(None, ge=16)
    tile_overlap: float = Field(0.1, ge=0.05, le=0.5)

    def resolve(self, stored: Preprocessing | None = None) -> Preprocessing:
        base = stored or Preprocessing()
        return Preprocessing(
            preset=self.preset or base.preset,
            mode=self.mode,
            input_size=self.input_size or base.input_size,
            tile_overlap=self.tile_overlap,
        )


class OutputConfig(_Strict):
    dir: Path = Field(..., description="folder for Parquet parts, errors, resolved config and the LanceDB database")
    table: str | None = Field(None, description="LanceDB table name; default the job name")
    lancedb: str | None = Field(None, description="LanceDB URI; default <dir>/lancedb (embedded)")
    write_lance: bool = True
    index: Literal["auto", "none", "ivf_sq", "ivf_pq", "hnsw"] = Field(
        "auto",
        description="LanceDB vector index: auto builds one (IVF_SQ) from index_threshold rows on; smaller tables are searched exactly",
    )
    index_threshold: int = Field(100_000, ge=1, description="rows from which 'auto' builds a vector index")
    on_mismatch: Literal["error", "replace"] = Field(
        "error",
        description="dir holds embeddings of another model, preprocessing, channel list or mode: "
        "stop with an error, or replace them (their parts are removed and every image is embedded again)",
    )


class RuntimeConfig(_Strict):
    address: str | None = Field(
        None, description="Ray address; None = RAY_ADDRESS or a local cluster started on demand"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster; default all")
    object_store_mb: int | None = Field(None, ge=100)
    batch_size: int = Field(64, ge=1, description="one-channel tiles per forward pass")
    images_per_block: int = Field(64, ge=1, description="images per Ray Data block (read/preprocess task)")
    actors: int = Field(1, ge=1, description="embedding actors in the pool (one GPU each where GPUs exist)")
    actor_cpus: float | None = Field(None, gt=0, description="CPUs per embedding actor; default 1 with GPUs, else 0.5")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    amp: Literal["cuda", "auto", "off"] = Field("cuda", description=AMP_HELP)
    inflight_mb: int = Field(
        512, ge=64, description="object-store budget for blocks in flight; bounds read-ahead memory"
    )
    strict: bool = Field(False, description="stop at the first bad image instead of recording it")
    retry_errors: bool = Field(
        False, description="embed again the images recorded in errors/ (their error rows are removed first)"
    )
    progress: bool = True


class CellsConfig(_Strict):
    """Full-field "cells" mode (Microsnoop's cell-region pipeline, ANCHORS 1.6 / 1.8).

    Every image is segmented on its nucleus channel; each cell is cropped with the same window in all
    channels (half-size ``ratio`` x the nucleus' larger bbox extent, capped at ``input_size // 2``,
    zero-padded to ``input_size``), normalised per channel like the ``native`` preset (after padding)
    and embedded. The job writes one row per cell to ``<out>/cells/`` and, in ``<out>/embeddings/``, the
    **mean of the cell embeddings** per image with ``Metadata_CellCount`` (cells averaged) and
    ``Metadata_CellsFound`` (cells kept before ``max_cells_per_image``).
    """

    segmentation: SegmentationConfig = Field(
        default_factory=SegmentationConfig,
        description="nucleus segmentation; segmentation.channel names the nucleus channel (one of input.channels)",
    )
    ratio: float = Field(2.0, gt=0, description="crop half-size / nucleus bbox extent (Microsnoop rsc_crop_ratio)")
    skip_border: bool = Field(True, description="skip nuclei touching the image border (as Microsnoop)")
    max_cells_per_image: int | None = Field(
        None,
        ge=1,
        description="embed at most N cells per image: a random subset (seeded by `seed` and the image id, so "
        "the same cells are picked on every run); None = all cells. A CPU-budget knob: the image vector is "
        "then the mean over the subset",
    )
    seed: int = Field(0, description="seed of the max_cells_per_image subset")
    save_masks: bool = Field(False, description="write each image's label mask as compressed TIFF under <out>/masks/")
    empty: Literal["error", "zero"] = Field(
        "error",
        description="an image without any cell: 'error' records it in errors/; 'zero' writes a zero vector "
        "(Microsnoop's BBBC021 convention) with Metadata_CellCount 0",
    )
    lance_cells_table: bool = Field(True, description="also build the LanceDB table <table>_cells (one row per cell)")


class EmbedJob(_Strict):
    """``msnoop embed``: images -> one vector per image, in Parquet and LanceDB.

    With a ``cells:`` section the job works per cell (segment, crop, embed each cell) and the image
    vector is the mean of its cells' vectors; without it every image is embedded whole.
    """

    job: Literal["embed"] = "embed"
    name: str = Field("embeddings", pattern=r"^[A-Za-z0-9_\-]+$")
    input: InputConfig
    model: str = Field(..., description="checkpoint path, 'default', or 'random:<arch>[:seed]'")
    preprocess: PreprocessConfig = PreprocessConfig()
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    cells: CellsConfig | None = Field(None, description="full-field cells mode; absent = embed whole images")

    @model_validator(mode="after")
    def _check_cells(self) -> EmbedJob:
        if self.cells is None:
            return self
        self.nucleus_channel  # raises ValueError with the reason
        if self.preprocess.mode != "native":
            raise ValueError(
                f"cells mode crops every cell to the model input size; preprocess.mode must be 'native' "
                f"(found {self.preprocess.mode!r}). Remove preprocess.mode or the cells section"
            )
        return self

    @property
    def nucleus_channel(self) -> str:
        """Name of the channel segmented in cells mode (``cells.segmentation.channel``; None = the first)."""
        if self.cells is None:
            raise ValueError("no cells section: this job embeds whole images")
        channels = list(self.input.channels)
        ch = self.cells.segmentation.channel
        if ch is None:
            return channels[0]
        if isinstance(ch, int):
            if not 0 <= ch < len(channels):
                raise ValueError(
                    f"cells.segmentation.channel {ch} is out of range for input.channels {channels} "
                    f"(0..{len(channels) - 1})"
                )
            return channels[ch]
        if ch not in channels:
            raise ValueError(
                f"cells.segmentation.channel {ch!r} is not one of input.channels {channels}; "
                "name the nucleus (DNA/DAPI/Hoechst) channel"
            )
        return ch

    @property
    def table_name(self) -> str:
        return self.output.table or self.name

    @property
    def lancedb_uri(self) -> str:
        return self.output.lancedb or str(self.output.dir / "lancedb")


JOBS: dict[str, type[BaseModel]] = {"embed": EmbedJob}
# Job kinds defined in stage packages; imported on first use (they import this module).
_JOB_MODULES = {
    "pretrain": "msnoop.train.config",
    "bench": "msnoop.evaluate.bench",
    "profile": "msnoop.correct.job",
    "segtrain": "msnoop.segment.train",
    "screen": "msnoop.evaluate.screen_job",
}
T = TypeVar("T", bound=BaseModel)


def register_job(name: str, model: type[BaseModel]) -> None:
    """Make a job config type loadable by :func:`load_config` under ``job: <name>``."""
    JOBS[name] = model


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key {loc!r}")
        elif e["type"] == "missing":
            lines.append(f"  missing key {loc!r}")
        elif not e["loc"] and e["type"] == "value_error":  # a whole-job check: the message says it all
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            found = repr(e.get("input"))
            found = found if len(found) <= 120 else found[:117] + "..."
            lines.append(f"  {loc}: {e['msg']} (found {found})")
    return f"invalid config {source}:\n" + "\n".join(lines)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings (value as YAML) into pairs."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. runtime.batch_size=32")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def build_config(
    data: dict[str, Any],
    *,
    source: str = "<command line>",
    overrides: list[tuple[str, Any]] | None = None,
    job: str | None = None,
) -> BaseModel:
    """Validate a config dict (after overrides) into its job model."""
    data = json.loads(json.dumps(data, default=str))  # deep copy, paths as strings
    for key, value in overrides or []:
        set_path(data, key, value)
    kind = job or data.get("job")
    if kind in _JOB_MODULES and kind not in JOBS:
        import importlib

        importlib.import_module(_JOB_MODULES[kind])
    if kind is None:
        raise ConfigError(
            f"invalid config {source}: missing key 'job' (one of {', '.join(sorted(set(JOBS) | set(_JOB_MODULES)))})"
        )
    if kind not in JOBS:
        raise ConfigError(
            f"invalid config {source}: unknown job {kind!r}; expected one of {', '.join(sorted(set(JOBS) | set(_JOB_MODULES)))}"
        )
    data.setdefault("job", kind)
    try:
        return JOBS[kind].model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(
    path: str | Path | None, *, overrides: list[tuple[str, Any]] | None = None, job: str | None = None
) -> BaseModel:
    """Load and validate a YAML job config; ``path=None`` builds it from overrides alone."""
    data: dict[str, Any] = {}
    source = "<command line>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, found {type(loaded).__name__}")
        data = loaded
    return build_config(data, source=source, overrides=overrides, job=job)


def absolutize(cfg: T) -> T:
    """A copy of ``cfg`` with every relative path (and a model given as an existing file) made absolute.

    Used before sending a config to a cluster, where the job runs in another working directory.
    """

    def fix(node: Any) -> Any:
        if isinstance(node, BaseModel):
            updates = {name: fix(getattr(node, name)) for name in type(node).model_fields}
            return node.model_copy(update=updates)
        if isinstance(node, Path):
            return node.expanduser().resolve()
        if isinstance(node, list):
            return [fix(v) for v in node]
        if isinstance(node, dict):
            return {k: fix(v) for k, v in node.items()}
        return node

    out = fix(cfg)
    model = getattr(out, "model", None)
    if isinstance(model, str) and Path(model).expanduser().is_file():
        out = out.model_copy(update={"model": str(Path(model).expanduser().resolve())})
    return out


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def config_hash(cfg: BaseModel) -> str:
    """Short stable hash of a resolved config (runtime settings excluded: they do not change results)."""
    data = json.loads(cfg.model_dump_json())
    data.pop("runtime", None)
    if data.get("job") == "embed" and data.get("cells") is None:
        data.pop("cells", None)  # hashes of whole-image jobs stay as they were before cells mode existed
    if data.get("job") == "embed":  # input options added later change no hash while at their defaults
        new_input = {"dtypes": None, "channel_index": None, "channel_names": False, "z": "refuse", "ome_zarr": None}
        for key, default in new_input.items():
            if data.get("input", {}).get(key, default) == default:
                data.get("input", {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def save_resolved(cfg: BaseModel, out_dir: str | Path, name: str = "resolved_config.yaml") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(config_to_yaml(cfg))
    return path
