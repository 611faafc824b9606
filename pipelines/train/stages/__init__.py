"""Training stages as declarations: what each stage reads, builds, optimises and shows; the runner does the rest.

Adding a stage = one module here defining a `STAGE = Stage(...)` and one line in STAGES below (see
docs/training.md). A stage never touches Ray, DeepSpeed or MLflow; it gets plain torch modules and batches.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# stage name -> "module:attribute" of its Stage; imported lazily so listing stages loads no torch code.
STAGES: dict[str, str] = {
    "autoencoder": "pipelines.train.stages.autoencoder:STAGE",
    "mouth_pose": "pipelines.train.stages.mouth_pose:STAGE",
    "eye": "pipelines.train.stages.eye:STAGE",
    "expression": "pipelines.train.stages.expression:STAGE",
    "syncnet": "pipelines.train.stages.syncnet:STAGE",
    "audio_lip": "pipelines.train.stages.audio_lip:STAGE",
    "audio_pose": "pipelines.train.stages.audio_pose:STAGE",
    "audio_eye": "pipelines.train.stages.audio_eye:STAGE",
    "audio_expression": "pipelines.train.stages.audio_expression:STAGE",
}


@dataclass
class Nets:
    """The torch modules of one stage run, built identically on every worker from the same seed."""

    model: nn.Module  # generator side: wrapped by the first DeepSpeed engine and exported to models/STAGE
    trainable: list[nn.Parameter]  # what the generator engine optimises (everything else stays frozen)
    discriminator: nn.Module | None = None  # adversarial stages: the second engine
    extras: dict[str, nn.Module] = field(
        default_factory=dict
    )  # frozen helpers (perceptual loss, SyncNet ...)


@dataclass
class StepOut:
    """What a stage's step returns: the generator-side loss, the numbers to log and the images for D."""

    loss: torch.Tensor  # scalar the generator engine back-propagates
    logs: dict[str, torch.Tensor]  # named scalar terms (detached or not); averaged over ranks when logged
    real: torch.Tensor | None = None  # adversarial stages: real images shown to D
    fake: torch.Tensor | None = (
        None  # adversarial stages: generated images shown to D (detached by the runner)
    )


def edtalk_nets(
    stage: str, model_section: dict, upstream_dir: str | None, extras: dict[str, nn.Module] | None = None
) -> Nets:
    """Nets for an EDTalk stage: the model built from the `model:` section (or loaded from the upstream stage's
    folder), trainable/frozen per `edtalk.stages.STAGES[stage]`, and D taken out of it as the second engine's
    module (so no parameter sits in two engines); `export` puts D back before saving."""
    from edtalk import EDTalk, ModelConfig
    from edtalk.stages import apply_stage, get_stage

    if upstream_dir:
        from preprocessing import storage

        # Workers on other nodes read the upstream model from object storage.
        if storage.is_remote(upstream_dir):
            import tempfile

            upstream_dir = storage.download(upstream_dir, tempfile.mkdtemp(prefix="edtalk-upstream-"))
        model = EDTalk.from_pretrained(upstream_dir)
    else:
        model = EDTalk(ModelConfig.from_params(model_section))
    trainable = apply_stage(model, stage)
    disc = None
    if get_stage(stage).adversarial:
        disc = model.discriminator
        del model._modules["discriminator"]  # the D engine owns it while training
        model.discriminator = None
        d_ids = {id(p) for p in disc.parameters()}
        trainable = [p for p in trainable if id(p) not in d_ids]
        disc.requires_grad_(True)
    return Nets(model=model, trainable=trainable, discriminator=disc, extras=dict(extras or {}))


# Submodules a stage adds to the model for training only (auxiliary heads): trained in the model's engine and kept
# in its checkpoints, left out of the exported model.
AUX_PREFIX = "train_aux_"


def add_aux_head(nets: Nets, name: str, module: nn.Module) -> nn.Module:
    """Attach a training-only `module` to nets.model (as AUX_PREFIX + name) and train it with the model."""
    nets.model.add_module(AUX_PREFIX + name, module)
    module.requires_grad_(True)
    nets.trainable.extend(module.parameters())
    return module


def export_edtalk(nets: Nets, folder) -> None:
    """Write the trained model (with D put back, without the auxiliary heads) as an `EDTalk.save_pretrained`
    folder.

    DeepSpeed flattens parameters into shared buffers, which safetensors refuses to save; a fresh model loaded
    from cloned tensors has plain storage.
    """
    from edtalk import EDTalk

    state = {
        k: v.detach().cpu().clone()
        for k, v in nets.model.state_dict().items()
        if not k.startswith(AUX_PREFIX)
    }
    if nets.discriminator is not None:
        state.update(
            {
                f"discriminator.{k}": v.detach().cpu().clone()
                for k, v in nets.discriminator.state_dict().items()
            }
        )
    fresh = EDTalk(nets.model.config)
    fresh.load_state_dict(state, strict=True)
    fresh.active_spaces = tuple(nets.model.active_spaces)
    fresh.emotion_means = dict(nets.model.emotion_means)
    fresh.save_pretrained(folder)


@dataclass(frozen=True)
class FinalizeContext:
    """What the driver hands a stage's `finalize` hook: the run's data and split, and its settings."""

    data_dir: str  # the run's train.data_dir, absolute (or a URI): readable from the driver
    train_ids: list[str]  # segment ids the run trained on
    val_ids: list[str]  # segment ids held out for validation
    params: Any  # the stage's params dataclass (its params.yaml section, overrides applied)
    train: Any  # the run's TrainParams
    model_section: dict  # the `model:` section


@dataclass(frozen=True)
class Stage:
    """One training stage, declared. Functions are module-level so Ray can pickle the stage by reference."""

    name: str  # stage name = its params.yaml section = models/NAME = metrics/NAME.json
    params_cls: type  # dataclass of the section: needs steps, lr (and d_lr when adversarial)
    table: str  # Parquet table it reads: "segments" or "pairs"
    samples: Callable  # (params, seed) -> (table row -> list of sample dicts); see pipelines/train/data.py
    build: Callable  # (model section, params, {upstream stage: models dir}) -> Nets
    step: Callable  # (nets, batch of tensors, params) -> StepOut; the runner does backward/step
    grid: Callable  # (nets, batch, params) -> {column name: (B,3,S,S) images} for the sample grid
    upstream: tuple[str, ...] = ()  # stages whose models/NAME it starts from (they must have run)
    export: Callable = export_edtalk  # (nets, folder) -> writes the model folder models/NAME (rank-0 worker)
    # Driver side, after the final model folder is exported and before MLflow logs/registers it:
    # (local model folder: Path, FinalizeContext) -> None; may rewrite files in the folder (e.g. summaries of data).
    finalize: Callable | None = None
    adversarial: bool = False  # two engines: the generator side and D (Nets.discriminator)
    row_filter: dict[str, Any] = field(default_factory=dict)  # column == value, e.g. {"kind": "mouth"}


# ZeRO-3 gathers a parameter only around its owning module's forward (and backward), so a stage whose code reads
# parameters anywhere else cannot run under it. stage -> why; the runner refuses train.zero_stage=3 with the reason.
# Empty since the flows' inverse runs inside forwards too (edtalk/flow.py `reverse=True`): list a stage here if its
# code is found to read parameters elsewhere.
ZERO3_UNSUPPORTED: dict[str, str] = {}


def names() -> list[str]:
    return list(STAGES)


def get(name: str) -> Stage:
    """The Stage called `name`; a clear error lists the known ones."""
    if name not in STAGES:
        raise KeyError(f"unknown training stage {name!r}; known stages: {', '.join(STAGES)}")
    module_name, attr = STAGES[name].split(":")
    stage = getattr(importlib.import_module(module_name), attr)
    if stage.name != name:
        raise RuntimeError(f"{STAGES[name]} declares stage {stage.name!r}, registered as {name!r}")
    return stage
