"""Typed parameters of the training runtime: the shared `train:` section and the run spec handed to workers.

Each stage adds its own section (`autoencoder:`, `mouth_pose:`, ...) through a dataclass declared in its stage
module; this file holds only what every stage shares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocessing.params import ParamsError, build, load_section

# Keys that change how a run is executed or observed but not what it computes: they stay out of the run's
# fingerprint, so e.g. a fault-injection re-run or a different log interval resumes the same run.
RUNTIME_ONLY_KEYS = frozenset(
    {
        "fail_at_step",
        "fail_rank",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_failures",
        "storage_path",
        "run_name",
        "models_dir",
        "metrics_dir",
        "experiment",
        "registered_model_prefix",
        "register_model",
        "hash_inputs",
    }
)


@dataclass
class TrainParams:
    """The `train:` section of params.yaml (shared by every training stage; see the comments there)."""

    workers: int = 1  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False  # one GPU per worker; False trains on CPU over gloo
    cpus_per_worker: float = 1.0  # Ray CPUs per worker; fractional is fine (2-core machines: 0.5-1)
    torch_threads: int = 1  # intra-op threads per worker; keep workers * threads <= cores
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3 (under 3 every rank saves its shard)
    precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU | fp32 | bf16
    batch_size: int = 4  # micro-batch per worker
    grad_accum: int = 1  # micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)
    grad_clip: float = 1.0  # global gradient-norm clip (DeepSpeed gradient_clipping); 0 = off
    seed: int = 0  # seeds init, sample building, shuffling and per-step randomness
    shuffle_buffer: int = 32  # rows in the per-worker local shuffle buffer; 0 = no shuffle
    cache_mb: int = 1024  # decoded training samples up to this size are built once into Ray's object store; 0 = stream every epoch
    val_fraction: float = 0.2  # hash split of segments when the data has no `val` rows
    val_batches: int = 1  # validation batches scored at each log step (rank-0 numbers, all ranks compute)
    log_every: int = 5  # progress line + MLflow metrics every N steps
    sample_every: int = 0  # image grid to MLflow every N steps; 0 = only at the end
    checkpoint_every: int = 20  # DeepSpeed checkpoint through ray.train.report every N steps (and at the end)
    keep_checkpoints: int = 2  # checkpoints kept in Ray storage
    max_failures: int = 2  # worker failures Ray Train recovers from (restart from the last checkpoint)
    fail_at_step: int = 0  # fault injection: rank `fail_rank` raises once after step k; 0 = off
    fail_rank: int = 0  # the rank that fails when fail_at_step > 0
    data_dir: str = "data/processed"  # output of `edtalk preprocess` (segments/, pairs/, _stats.json)
    models_dir: str = "models"  # each stage writes models_dir/STAGE; upstream stages are read from here
    metrics_dir: str = "metrics"  # each stage writes metrics_dir/STAGE.json
    storage_path: str = "outputs/ray"  # Ray Train storage (checkpoints, run-id file); local path or URI
    run_name: str = ""  # Ray run name; "" = STAGE-<fingerprint of params and inputs> (same name = resume)
    experiment: str = "edtalk"  # MLflow experiment
    registered_model_prefix: str = "edtalk-"  # registered model name = prefix + stage
    register_model: bool = True  # register models/STAGE as a model version in the MLflow registry
    hash_inputs: bool = True  # md5 the input dirs DVC-style for the lineage tags (cheap on small data)
    # Start from this model folder (e.g. one written by `edtalk import`) instead of the upstream stages' models/
    # folders (or, for a first stage, a fresh model); its meta.json source hashes go into the lineage. "" = off.
    init_from: str = ""

    def __post_init__(self) -> None:
        checks = [
            (self.workers >= 1, "workers must be >= 1"),
            (self.cpus_per_worker > 0, "cpus_per_worker must be > 0"),
            (self.torch_threads >= 1, "torch_threads must be >= 1"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)"),
            (self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0"),
            (self.cache_mb >= 0, "cache_mb must be >= 0"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.val_batches >= 0, "val_batches must be >= 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.sample_every >= 0, "sample_every must be >= 0"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.max_failures >= 0, "max_failures must be >= 0"),
            (self.fail_at_step >= 0, "fail_at_step must be >= 0 (0 = off)"),
            (0 <= self.fail_rank < self.workers, "fail_rank must name a worker: 0 <= fail_rank < workers"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamsError(f"train params: {message}")

    @property
    def compute_dtype(self) -> str:
        """fp32 or bf16: the autocast dtype of forward passes (master weights stay fp32)."""
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunSpec:
    """Everything a worker needs, as plain data (it crosses into Ray workers as the train-loop config)."""

    stage: str  # stage name, a key of pipelines.train.stages.STAGES
    train: dict  # TrainParams fields
    stage_params: dict  # the stage's own section, as its dataclass's fields
    model: dict  # the `model:` section (ModelConfig preset + overrides)
    upstream_dirs: dict[str, str] = field(default_factory=dict)  # upstream stage -> absolute models dir
    run_dir: str = ""  # Ray storage dir of this run (storage_path/run_name): markers, run-id file
    run_id: str = ""  # MLflow run id (rank 0 logs to it)
    tracking_uri: str = ""  # absolute MLflow tracking URI
    max_steps: int = 0  # optimizer steps of this stage

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        return cls(**data)


def load_train_params(path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()) -> TrainParams:
    return build(TrainParams, load_section(path, "train", overrides), "train")


def load_stage_params(cls: type, section: str, path: str | Path | None, overrides=()) -> Any:
    return build(cls, load_section(path, section, overrides), section)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (params, input hashes): names a run so identical inputs resume."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def semantic_train_params(train: TrainParams) -> dict:
    """The `train:` values that change what a run computes (see RUNTIME_ONLY_KEYS)."""
    return {k: v for k, v in train.to_dict().items() if k not in RUNTIME_ONLY_KEYS}
