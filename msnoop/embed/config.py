"""``job: embed`` config: images -> one vector per image (or per cell), in Parquet and LanceDB."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from msnoop.core.actors import ActorsSetting, parse_actors
from msnoop.core.config import StrictModel as _Strict
from msnoop.core.rundir import RunDir
from msnoop.core.runtime import AMP_HELP, Amp, UseGpu
from msnoop.core.runtime_env import RuntimeEnvConfig, runtime_env_field
from msnoop.core.storage import Location, StorageConfig
from msnoop.io.config import InputConfig
from msnoop.preprocess.config import PreprocessConfig
from msnoop.segment.config import SegmentationConfig
from msnoop.vectors.distance import IndexKind
from msnoop.vectors.postprocess import DEFAULT_POSTPROCESS, PostprocessMethod


class OutputConfig(_Strict):
    """Where an embedding job writes (its :class:`~msnoop.core.rundir.RunDir`) and how its LanceDB table is built."""

    dir: Location = Field(
        ...,
        description="folder or object storage URI (s3://bucket/prefix, gs://...) for Parquet parts, errors, "
        "resolved config and the LanceDB database",
    )
    table: str | None = Field(None, description="LanceDB table name; default the job name")
    lancedb: str | None = Field(None, description="LanceDB URI (a folder or s3://...); default <dir>/lancedb")
    write_lance: bool = True
    index: IndexKind = Field(
        "auto",
        description="LanceDB vector index: auto builds one (IVF_SQ) from index_threshold rows on; smaller tables are searched exactly",
    )
    index_threshold: int = Field(100_000, ge=1, description="rows from which 'auto' builds a vector index")
    on_mismatch: Literal["error", "replace"] = Field(
        "error",
        description="dir holds embeddings of another model, preprocessing, channel list or mode: "
        "stop with an error, or replace them (their parts are removed and every image is embedded again)",
    )
    postprocess: PostprocessMethod = Field(
        DEFAULT_POSTPROCESS,
        description="vectors in the LanceDB table: 'standardize' = z-scored per dimension over the table (fitted "
        "without labels; see msnoop.vectors.postprocess) so cosine distances mean something; 'raw' = Microsnoop's "
        "readout. The Parquet parts always hold the raw readout",
    )


class RuntimeConfig(_Strict):
    """How the job runs on Ray: the cluster, block and batch sizes, the actor pool, GPUs, error handling."""

    address: str | None = Field(
        None,
        description="Ray address; None = RAY_ADDRESS, else a running `msnoop cluster`, else a local cluster started "
        "on demand (or none at all for a job smaller than ray_min_images)",
    )
    ray_min_images: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="a job with fewer images left to embed than this, and no Ray cluster to join (no address, no "
        "RAY_ADDRESS, no running `msnoop cluster`), runs in this process without starting Ray: the same stages and "
        "outputs without Ray's 5-15 s of start-up; 0 = always Ray; 'auto' = 1000 on a CPU with images on local "
        "disk (there Ray's parallel reads gain nothing over a read-ahead thread: same cells/s, measured with "
        "jobs/bench_cpu.py), 64 with a GPU or images on object storage (parallel reads keep a GPU or the network busy)",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs for a local cluster (torch threads for a job run in this process); default all"
    )
    object_store_mb: int | None = Field(None, ge=100)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="one-channel tiles per forward pass, or 'auto': 64 on a GPU; on a CPU as many as fit its caches "
        "(2 tiles of 224 px, 32 of 64 px: larger batches of large tiles fall out of the caches; measured with "
        "jobs/bench_cpu.py)",
    )
    images_per_block: int = Field(64, ge=1, description="images per Ray Data block (read/preprocess task)")
    actors: ActorsSetting = Field(
        1,
        description="embedding actors: a fixed pool size N; {min: 1, max: 8} for a pool that Ray Data grows "
        "from min to max as blocks queue up (on an autoscaling cluster the pending actors' requests bring nodes "
        "up); or 'auto' = one per GPU of the cluster, or without GPUs one per actor_cpus share of its CPUs "
        "(capped by actor_resources). One GPU each where GPUs exist",
    )
    actor_resources: dict[str, float] = Field(
        {},
        description="custom Ray resources each embedding actor requests, e.g. {gpu_node: 1} to run the actors "
        "only on nodes started with --resources='{\"gpu_node\": 8}', or {'accelerator_type:A100': 0.001} for a "
        "GPU type. Writing stays a CPU task on any node, and so does reading with GPUs (without GPUs reading is "
        "fused into the actors)",
    )
    actor_cpus: float | None = Field(None, gt=0, description="CPUs per embedding actor; default 1 with GPUs, else 0.5")
    use_gpu: UseGpu = "auto"
    amp: Amp = Field(
        "auto",
        description=AMP_HELP + ". Default 'auto' for embedding: on the dev sets bf16 left the shipped model's kNN "
        "balanced accuracy within the paired bootstrap intervals of float32 (yeast, hpa_toy, malaria; "
        "jobs/bench_cpu.py). A network whose features vary little between cells moves more (a random one: yeast "
        "localisation +0.023), so msnoop bench compares models in float32. Vectors differ from float32 ones by bf16 "
        "rounding, so an output folder keeps the precision it was made with",
    )
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch",
        description="what runs the network: 'torch' (the reference) or 'onnxruntime' on CPUs, always in float32 (the "
        "network exported to ONNX at start; vectors within 1e-6 of torch's float32 ones, about 1.4x the tiles per "
        "CPU-second of torch float32 measured with jobs/bench_cpu.py; pip install 'msnoop[onnx]')",
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="memory layout of the network's weights and inputs: 'auto' = channels_last on CPUs (faster there, "
        "same vectors up to float summation order), the default layout on GPUs",
    )
    inflight_mb: int = Field(
        512, ge=64, description="object-store budget for blocks in flight; bounds read-ahead memory"
    )
    strict: bool = Field(False, description="stop at the first bad image instead of recording it")
    retry_errors: bool = Field(
        False, description="embed again the images recorded in errors/ (their error rows are removed first)"
    )
    progress: bool = Field(
        True, description="a progress bar on stderr when it is a terminal (see msnoop.core.progress)"
    )
    worker_env: list[str] = Field(
        [],
        description="names of environment variables whose values are copied from the driver to the Ray tasks that "
        "read and write storage (Ray runtime_env), e.g. AWS_ACCESS_KEY_ID for a local cluster started before they "
        "were set; on a multi-node cluster set credentials on the nodes instead",
    )

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, value: object) -> object:
        return parse_actors(value)

    @field_validator("actor_resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = {
            "CPU": "; set runtime.actor_cpus",
            "GPU": "; set runtime.use_gpu",
            "memory": "",
            "object_store_memory": "",
        }
        for name, amount in value.items():
            if name in builtin:
                raise ValueError(f"{name!r} is a built-in Ray resource, not a custom one{builtin[name]}")
            if not amount > 0:
                raise ValueError(f"{name!r}: expected an amount > 0 per actor, found {amount}")
        return value


class CellsConfig(_Strict):
    """Full-field "cells" mode (Microsnoop's cell-region pipeline).

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
    model: str = Field(
        "default", description="'default' (the model shipped with msnoop), a checkpoint path, or 'random:<arch>[:seed]'"
    )
    preprocess: PreprocessConfig = PreprocessConfig()
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    cells: CellsConfig | None = Field(None, description="full-field cells mode; absent = embed whole images")
    runtime_env: RuntimeEnvConfig | None = runtime_env_field()
    storage: StorageConfig | None = Field(
        None,
        description="object storage settings (endpoint_url, region, allow_http, anonymous); unset fields come from "
        "the environment (AWS_ENDPOINT_URL, AWS_REGION); credentials always come from the environment",
    )

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
        """The LanceDB table: ``output.table``, else the job's name."""
        return self.output.table or self.name

    @property
    def run_dir(self) -> RunDir:
        """The output folder (``output.dir``) with this job's storage settings."""
        return RunDir(self.output.dir, self.storage_config)

    @property
    def lancedb_uri(self) -> str:
        """The LanceDB database: ``output.lancedb``, else the output folder's own (:meth:`RunDir.lancedb_uri`)."""
        return self.run_dir.lancedb_uri(self.output.lancedb)

    @property
    def storage_config(self) -> StorageConfig:
        """The ``storage:`` section with unset fields filled from the environment (:meth:`StorageConfig.from_env`)."""
        return StorageConfig.from_env(self.storage)
