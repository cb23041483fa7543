"""``msnoop pretrain`` job config: data pool, masking, optimiser, schedule, Ray Train runtime, outputs.

``job: pretrain`` configs validate into :class:`PretrainJob` (declared in :mod:`msnoop.job_kinds`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from msnoop.core.config import StrictModel as _Strict
from msnoop.core.runtime import AMP_HELP
from msnoop.core.runtime_env import RuntimeEnvConfig, runtime_env_field
from msnoop.io.config import InputConfig


class SourceConfig(_Strict):
    """One training source: every channel of every image becomes a one-channel sample."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-.]+$", description="short name used in the card and figure")
    input: InputConfig
    weight: float = Field(1.0, gt=0, description="multiplies the source's sampling probability")
    where: str | None = Field(
        None,
        description="SQL filter on the source's image table (msnoop's filter dialect), e.g. "
        "\"Metadata_source = 'bccd_blood_cells'\" to make one source of each part of a shared manifest",
    )


class AugmentConfig(_Strict):
    """Random augmentation of every training crop (applied in this order: window, flips, rot90, jitter)."""

    flips: bool = Field(True, description="random horizontal/vertical flips")
    rot90: bool = Field(True, description="random multiples of 90 degrees")
    rotate: bool = Field(True, description="free rotation by a uniform angle (corners become zero)")
    scale_jitter: float = Field(0.25, ge=0, le=0.9, description="zoom factor drawn log-uniformly in [1/(1+j), 1+j]")
    intensity_jitter: float = Field(0.1, ge=0, le=1, description="after normalisation: gain in 1±j, offset in ±j/2")


class FilterConfig(_Strict):
    """CytoImageNet-style quality filters."""

    drop_binary: bool = Field(True, description="drop images with at most two distinct values (label masks)")
    drop_uniform: bool = Field(
        True,
        description="redraw crops whose content is constant, or nearly so with outlier pixels (data.MAX_NORMALIZED)",
    )
    drop_dim: bool = Field(True, description="redraw crops whose content has 75th percentile 0")
    max_tries: int = Field(20, ge=1, description="redraws per sample before a filtered crop is accepted anyway")


class DataConfig(_Strict):
    """The training pool: sources, their weighting, crop geometry, preloading, augmentation, filters."""

    sources: list[SourceConfig] = Field(..., min_length=1)
    weighting: Literal["equal", "sqrt", "size"] = Field(
        "sqrt", description="source probability ∝ 1, sqrt(n samples) or n samples, times the source weight"
    )
    crop_size: int = Field(
        224, ge=32, description="training crop side; multiple of the patch size (model is fully convolutional)"
    )
    crop_sizes: list[int] | None = Field(
        None,
        min_length=1,
        description="mixed canvases: each step draws its crop side from this list (each a multiple of the patch "
        "size and of 8) and takes batch_size * (crop_size / side)^2 crops, so that every step costs about the same "
        "(e.g. [64, 96, 128, 160, 224] with crop_size 96: 36 crops of 64 px or 3 of 224 px for 16 of 96 px)",
    )
    preload_mb: int = Field(1024, ge=0, description="load every image into memory when the pool's estimated size fits")
    augment: AugmentConfig = AugmentConfig()
    filters: FilterConfig = FilterConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, found {names}")
        return self


class ModelConfig(_Strict):
    """The trained architecture and its starting weights."""

    arch: str = Field("microsnoop_cnn", description="registered architecture (msnoop.models.registry)")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = Field(
        None,
        description="start from these weights (a checkpoint path or 'default') instead of a random "
        "initialisation: continued pretraining; the optimiser and schedule start fresh",
    )


class MaskConfig(_Strict):
    """Microsnoop's masked reconstruction: patch masking and the reconstruction loss."""

    weight: float = Field(
        1.0,
        ge=0,
        description="weight of the masked reconstruction loss (Microsnoop's objective); 0 = no decoder pass, "
        "only possible with a distillation or spread term",
    )
    ratio: float = Field(0.25, gt=0, lt=1, description="fraction of patches zero-filled (Microsnoop: 0.25)")
    patch_size: int = Field(16, ge=1, description="patch side (Microsnoop: 16)")
    loss: Literal["masked", "full"] = Field("masked", description="MSE on masked pixels, or on the whole image")
    select: Literal["all", "content"] = Field(
        "all",
        description="patches that may be masked: all (Microsnoop), or content only (not the constant zero canvas "
        "around a small image)",
    )
    average: Literal["batch", "image"] = Field(
        "batch",
        description="loss mean over the batch's masked pixels, or per image then over images (a small cell in a "
        "padded canvas then weighs as much as a full field)",
    )
    skips: Literal["keep", "drop_masked"] = Field(
        "keep",
        description="keep: the U-Net's skip connections as in Microsnoop; drop_masked: every skip but the deepest "
        "map is zeroed over masked patches, so masked pixels must be reconstructed through the deepest map "
        "(the one that is embedded)",
    )


class AgreementConfig(_Strict):
    """An embedding-level term added to the masked loss: VICReg (Bardes et al., ICLR 2022) on two views.

    The second view of each crop is the same crop with its own flips / 90-degree rotation, intensity
    jitter and mask; both run through the encoder in one batch (the decoder runs once), and the term
    compares the global averages of their deepest maps (``[B, 256]``, the embedding before L2
    normalisation), without a projector. Loss = ``weight * (invariance * MSE(z1, z2) + variance *
    (hinge(1 - std z1) + hinge(1 - std z2)) / 2 + covariance * (off-diagonal cov(z1)^2 + cov(z2)^2) / d)``,
    the coefficients as in VICReg (25, 25, 1).
    """

    weight: float = Field(0.0, ge=0, description="0 = off (Microsnoop's recipe)")
    invariance: float = Field(25.0, ge=0)
    variance: float = Field(25.0, ge=0)
    covariance: float = Field(1.0, ge=0)


TeacherTap = Literal["early", "middle", "final"]


class DistillConfig(_Strict):
    """Masked feature distillation from an ImageNet network (MaskDistill / BEiT v2 / SEED style).

    The student (the U-Net being trained) sees the masked crop, the teacher the whole crop. A small head
    (Linear -> GELU -> Linear) on the global average of the student's deepest map (the map that is embedded)
    predicts, for each tap, the global average of the teacher's map at that depth; the loss is 1 - cosine
    against the target standardised per dimension with running statistics (so that the dimensions' shared
    mean, which any input matches, is not what is learnt). ``spatial`` adds a 1x1-conv head on the deepest
    map that predicts the teacher's stride-8 map at the masked positions. The teacher is the network of
    ``msnoop.models.efficientnet_lite`` (ImageNet-1k labels: the result is no longer purely self-supervised).
    """

    weight: float = Field(0.0, ge=0, description="weight of the pooled-feature term; 0 = no distillation")
    teacher: Literal["imagenet:efficientnet_lite0"] = "imagenet:efficientnet_lite0"
    taps: list[TeacherTap] = Field(
        default_factory=lambda: ["final"],
        min_length=1,
        description="teacher depths predicted from the student's pooled deepest map: early (stride 8, 40-d), "
        "middle (stride 16, 112-d), final (the 1280-d head); the term is the mean over taps",
    )
    head_hidden: int = Field(512, ge=8, description="hidden width of each prediction head")
    spatial: float = Field(
        0.0,
        ge=0,
        description="weight of the spatial term: the deepest map (stride 8) predicts the teacher's early map "
        "(stride 8) at masked positions (cosine per position); 0 = off",
    )
    target_momentum: float = Field(0.01, gt=0, le=1, description="EMA momentum of the target statistics")

    @field_validator("taps")
    @classmethod
    def _unique_taps(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"distill.taps must not repeat a tap, found {value}")
        return value

    @property
    def enabled(self) -> bool:
        """Whether any distillation term is on (and so a teacher is needed)."""
        return self.weight > 0 or self.spatial > 0


class SpreadConfig(_Strict):
    """VICReg's variance and covariance terms (Bardes et al., ICLR 2022) on one view: the batch of pooled
    deepest maps (``[B, 256]``, the embedding before L2 normalisation). They spread the batch over many
    dimensions (a standardised embedding with a participation ratio of 3 uses about 3 of its 256)."""

    variance: float = Field(0.0, ge=0, description="weight of the hinge on each dimension's std below 1; 0 = off")
    covariance: float = Field(
        0.0, ge=0, description="weight of the squared off-diagonal covariances / d; 0 = off (needs batches > d)"
    )


class OptimConfig(_Strict):
    """AdamW with linear warm-up and cosine decay."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate (after warm-up)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not applied to norms and biases)")
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = Field(None, ge=0, description="default 5 % of train.steps")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the gradient norm; null disables")


class TrainConfig(_Strict):
    """Schedule length, batch, seed, logging, checkpoints, budgets, precision, BatchNorm mode."""

    steps: int = Field(..., ge=1, description="optimiser steps (the schedule's length)")
    batch_size: int = Field(16, ge=1, description="crops per worker per step (Microsnoop: 16)")
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1, description="steps between resumable checkpoints")
    max_minutes: float | None = Field(
        None, gt=0, description="wall-clock budget; training stops cleanly and writes outputs"
    )
    max_cpu_minutes: float | None = Field(
        None,
        gt=0,
        description="CPU-time budget of the training process (all its threads, time.process_time), summed over "
        "the stretches of a resumed run, for arms compared at equal compute on a shared machine; training stops "
        "cleanly and writes outputs",
    )
    amp: Literal["cuda", "auto", "off"] = Field(
        "cuda",
        description=AMP_HELP + "; true/false mean 'cuda'/'off'",
    )
    resume_from: Path | None = Field(
        None,
        description="a compact training state (msnoop.train.pretrain.write_compact_state: float16 weights, step, "
        "schedule, CPU seconds, no optimiser moments) to continue from when the run folder holds no checkpoint, "
        "e.g. on a fresh machine; the optimiser restarts with zero moments and the learning rate ramps up again "
        "over resume_warmup_steps",
    )
    resume_warmup_steps: int = Field(
        50, ge=1, description="steps over which the learning rate ramps up after resuming from resume_from"
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value: Any) -> Any:
        """Configs written before 'auto' existed say ``amp: true`` (CUDA only) or ``amp: false``."""
        if isinstance(value, bool):
            return "cuda" if value else "off"
        return value

    batchnorm: Literal["train", "frozen"] = Field(
        "train",
        description="train: BatchNorm uses and updates batch statistics; frozen: running statistics stay those of "
        "model.init (affine weights still learn), so crops smaller than the inference canvas do not shift them",
    )
    prefetch: int = Field(2, ge=0, description="batches prepared ahead in background threads (0 = inline)")
    loader_threads: int = Field(1, ge=1, description="threads preparing batches when prefetch > 0")


class PretrainOutputConfig(_Strict):
    """Where and how the trained model and its card are written."""

    dir: Path = Field(
        ..., description="model.pt, MODEL_CARD.md, figures, train_log.jsonl, resolved config, Ray run dir"
    )
    half: bool = Field(True, description="store float16 weights in model.pt")
    input_size: int = Field(224, ge=16, description="inference input size recorded in model.pt (Microsnoop: 224)")
    figure_images: int = Field(3, ge=1, le=8, description="images per source in the reconstruction figure")
    keep_checkpoints: int = Field(2, ge=1)
    bn_recalibration_batches: int = Field(
        16,
        ge=0,
        description="batches of input_size crops to re-estimate BatchNorm statistics when crop_size differs (0: off)",
    )


class PretrainRuntimeConfig(_Strict):
    """Ray Train workers, devices and failure handling."""

    address: str | None = Field(None, description="Ray address; None = RAY_ADDRESS or a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster; default all")
    object_store_mb: int | None = Field(None, ge=100)
    num_workers: int = Field(1, ge=0, description="Ray Train workers (0 = local mode: in the driver process)")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1, description="worker-failure retries, each resuming from the latest checkpoint")


class PretrainJob(_Strict):
    """``msnoop pretrain``: masked-reconstruction pretraining of a one-channel CNN."""

    job: Literal["pretrain"] = "pretrain"
    name: str = Field(
        "pretrain", pattern=r"^[A-Za-z0-9_\-]+$", description="run name; a rerun with the same name resumes"
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    mask: MaskConfig = MaskConfig()
    agreement: AgreementConfig = AgreementConfig()
    distill: DistillConfig = DistillConfig()
    spread: SpreadConfig = SpreadConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    output: PretrainOutputConfig
    runtime: PretrainRuntimeConfig = PretrainRuntimeConfig()
    runtime_env: RuntimeEnvConfig | None = runtime_env_field()

    @model_validator(mode="after")
    def _geometry(self) -> PretrainJob:
        p = self.mask.patch_size
        for s in [self.data.crop_size, *(self.data.crop_sizes or [])]:
            if s % p or s % 8:
                raise ValueError(
                    f"crop side {s} (data.crop_size / data.crop_sizes) must be a multiple of mask.patch_size {p} and "
                    f"of 8; e.g. {max(p, 8) * max(1, s // max(p, 8))}"
                )
        if self.mask.weight == 0 and not (self.distill.enabled or self.spread.variance or self.spread.covariance):
            raise ValueError("mask.weight is 0 and no distill or spread term is on: the job would learn nothing")
        student = self.distill.enabled or self.spread.variance > 0 or self.spread.covariance > 0
        if student and (self.agreement.weight > 0 or self.mask.skips != "keep"):
            raise ValueError(
                "distill / spread terms do not combine with agreement or mask.skips: drop_masked; use one recipe"
            )
        if self.output.input_size % 8:
            raise ValueError(f"output.input_size must be a multiple of 8, found {self.output.input_size}")
        return self

    @property
    def warmup_steps(self) -> int:
        """``optim.warmup_steps``, or 5 % of ``train.steps`` when unset."""
        if self.optim.warmup_steps is not None:
            return min(self.optim.warmup_steps, self.train.steps)
        return int(round(0.05 * self.train.steps))


def absolutize(job: PretrainJob, base: Path | None = None) -> PretrainJob:
    """Copy of ``job`` whose file paths are absolute (Ray workers may run in another folder)."""
    base = (base or Path.cwd()).resolve()

    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    sources = []
    for src in job.data.sources:
        inp = src.input.model_copy(
            update={k: fix(getattr(src.input, k)) for k in ("manifest", "loaddata", "folder", "root")}
        )
        sources.append(src.model_copy(update={"input": inp}))
    data = job.data.model_copy(update={"sources": sources})
    output = job.output.model_copy(update={"dir": fix(job.output.dir)})
    train = job.train
    if train.resume_from is not None:
        resume = fix(train.resume_from)
        if resume is None or not resume.is_file():
            raise FileNotFoundError(
                f"train.resume_from {str(train.resume_from)!r}: no compact training state at {resume} "
                f"(relative to {base})"
            )
        train = train.model_copy(update={"resume_from": resume})
    model = job.model
    init = model.init
    if init and init != "default" and not init.startswith("random:"):
        path = fix(Path(init))
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"model.init {init!r}: no checkpoint at {path}; give a checkpoint file (relative to {base}) or 'default'"
            )
        model = model.model_copy(update={"init": str(path)})
    return job.model_copy(update={"data": data, "output": output, "model": model, "train": train})
