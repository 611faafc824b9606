"""Stage `audio_expression`: speech (HuBERT, CNN frozen) + transcript (RoBERTa) + MLP_A^e -> expression weights,
with the random modality masking of Eq. 15 (the predictor draws it in training mode).

A sample is a window of a segment with speech: its waveform (zero-padded to the window, with the real length),
the segment's transcript (as fixed-size UTF-8 bytes, tokenised in the step by the model's own tokenizer) and a few
frames spread over the window. The target W^e is EXLN(E(frame)) averaged over those frames (frozen visual model):
the expression of the window, as the predictor pools the whole window into one vector. L = ||W^e - Ŵ^e||_1.
Validation also scores each modality alone (`loss_speech_only`, `loss_text_only`).

Starts from audio_eye's folder: the last stage, whose model carries every trained module (generate reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.train import samples_audio
from pipelines.train.data import RowFn
from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.audio_lip import frozen_in_eval

UPSTREAM = "audio_eye"


@dataclass
class AudioExpressionParams:
    """The `audio_expression:` section of params.yaml."""

    steps: int = 20  # optimizer steps
    lr: float = 1e-3  # Adam learning rate of the HuBERT transformer, RoBERTa and MLP_A^e (paper-size: ~1e-5)
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    window: int = (
        50  # frames of speech per sample (25 fps; shorter segments are zero-padded); paper data: <= 125
    )
    target_frames: int = 4  # frames spread over the window whose EXLN weights are averaged into the target
    windows_per_segment: int = 2  # windows drawn from each segment per pass
    max_text_bytes: int = 256  # transcript bytes kept per sample (the tokenizer truncates further)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.windows_per_segment < 1 or self.target_frames < 1:
            raise ValueError(
                "audio_expression params: steps, windows_per_segment and target_frames must be >= 1, lr > 0"
            )
        if self.window < 1 or self.max_text_bytes < 1:
            raise ValueError("audio_expression params: window and max_text_bytes must be >= 1")


def samples(p: AudioExpressionParams, seed: int) -> RowFn:
    return samples_audio.expression_windows(
        p.window, p.target_frames, p.windows_per_segment, p.max_text_bytes, seed
    )


def build(model_section: dict, p: AudioExpressionParams, upstream: dict[str, str]) -> Nets:
    nets = edtalk_nets("audio_expression", model_section, upstream[UPSTREAM])
    if nets.model.expression_predictor is None:
        raise ValueError(
            f"stage audio_expression: the model in {upstream[UPSTREAM]} has no expression_predictor (its config "
            "set it to None); train from a config that builds it"
        )
    return nets


def _inputs(model, batch: dict) -> dict:
    texts = samples_audio.decode_text(batch["text"].cpu(), batch["text_bytes"].cpu())
    ids, mask, available = model.expression_predictor.tokenize(texts)
    device = batch["speech"].device
    return {
        "speech": batch["speech"],
        "speech_lengths": batch["speech_samples"],
        "input_ids": ids.to(device),
        "text_mask": mask.to(device),
        "text_available": available.to(device),
    }


def target(model, batch: dict) -> torch.Tensor:
    """W^e of the window: EXLN weights of its frames, averaged (no grad: the visual model is frozen)."""
    frames = batch["frames"]
    b, f = frames.shape[:2]
    with torch.no_grad():
        w = model.extract(frames.flatten(0, 1), ("expression",))["expression"]
    return w.view(b, f, -1).mean(1)


def step(nets: Nets, batch: dict, p: AudioExpressionParams) -> StepOut:
    from edtalk import losses

    model = nets.model
    frozen_in_eval(model, ("expression_predictor",))
    predictor = model.expression_predictor
    inputs = _inputs(model, batch)
    want = target(model, batch)
    loss = losses.expression_loss(predictor(**inputs), want)  # training: Eq. 15's random masking
    logs = {"loss": loss}
    if not predictor.training:  # validation: each modality alone too
        for modality in ("speech", "text"):
            pred = predictor(**inputs, modality=modality)
            logs[f"loss_{modality}_only"] = losses.expression_loss(pred, want)
    return StepOut(loss, logs)


def grid(nets: Nets, batch: dict, p: AudioExpressionParams) -> dict[str, torch.Tensor]:
    """First frame as identity, the middle frame, and it with the expression from audio+text / its own (GT)."""
    from edtalk.navigation import SPACES

    model = nets.model
    frames = batch["frames"]
    c = frames.shape[1] // 2
    pred = model.expression_predictor(**_inputs(model, batch), modality="both")
    gt = model.extract(frames[:, c], SPACES)
    ident = model.encode_identity(frames[:, 0])
    return {
        "identity": frames[:, 0],
        "ground_truth": frames[:, c],
        "expression_from_audio_text": model.render(ident, {**gt, "expression": pred}),
        "expression_from_video": model.render(ident, gt),
    }


STAGE = Stage(
    name="audio_expression",
    params_cls=AudioExpressionParams,
    table="segments",
    samples=samples,
    build=build,
    step=step,
    grid=grid,
    upstream=(UPSTREAM,),
)
