"""Stage `autoencoder`: E, G, D and one LIA motion bank learn to reconstruct a frame from another frame of the
same segment (the LIA-style pre-training that later stages start from). Losses: L1 + VGG perceptual + adversarial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.train import data
from pipelines.train.stages import (
    AUX_PREFIX,
    FinalizeContext,
    Nets,
    Stage,
    StepOut,
    add_aux_head,
    edtalk_nets,
)

SHAPE_HEAD = "mouth_shape"  # the auxiliary head of w_shape: LIA weights -> data.mouth_shape (40 numbers)


@dataclass
class AutoencoderParams:
    """The `autoencoder:` section of params.yaml."""

    steps: int = 40  # optimizer steps
    lr: float = 2e-3  # Adam learning rate of E, G and the LIA bank
    d_lr: float = 2e-3  # Adam learning rate of D
    beta1: float = 0.5  # Adam beta1 (both engines)
    beta2: float = 0.99  # Adam beta2 (both engines)
    pairs_per_segment: int = 8  # (source, driving) frame pairs drawn from each segment per pass
    w_rec: float = 1.0  # weight of L1 reconstruction (Eq. 5)
    w_per: float = 1.0  # weight of the VGG19 perceptual loss (Eq. 5)
    w_adv: float = 1.0  # weight of the generator's adversarial loss (Eq. 6)
    w_mouth: float = 0.0  # L1 inside the driving frame's mouth region (ours; 0 = paper)
    mouth_contrast: float = 0.0  # share of pairs: most closed vs most open third of mouths (ours; 0 = paper)
    mouth_swap: float = 0.0  # share of pairs: the source with the other's mouth pasted (ours; 0 = paper)
    w_shape: float = 0.0  # LIA weights -> landmark mouth shape, via a training-only head (ours; 0 = paper)
    local_frames: int = 0  # training frames behind the stored mouth-local latent directions (ours; 0 = none)
    perceptual_scales: tuple[float, ...] = (1.0, 0.5)  # image pyramid of the perceptual loss
    vgg_weights: str = ""  # torchvision-format VGG19 file; "" = $EDTALK_VGG19_WEIGHTS, else random (warned)

    def __post_init__(self) -> None:
        self.perceptual_scales = tuple(self.perceptual_scales)
        if self.steps < 1 or self.lr <= 0 or self.d_lr <= 0 or self.pairs_per_segment < 1:
            raise ValueError("autoencoder params: steps and pairs_per_segment must be >= 1, lr and d_lr > 0")
        if min(self.w_rec, self.w_per, self.w_adv, self.w_mouth, self.w_shape) < 0:
            raise ValueError("autoencoder params: loss weights must be >= 0")
        if self.local_frames < 0:
            raise ValueError(
                "autoencoder params: local_frames must be >= 0 (0 = store no mouth-local directions)"
            )
        if not (0.0 <= self.mouth_contrast <= 1.0 and 0.0 <= self.mouth_swap <= 1.0):
            raise ValueError("autoencoder params: mouth_contrast and mouth_swap must be in [0, 1]")


def perceptual(p) -> torch.nn.Module:
    from edtalk.losses import PerceptualLoss, PerceptualLossConfig

    cfg = PerceptualLossConfig(scales=tuple(p.perceptual_scales), vgg_weights=p.vgg_weights or None)
    return PerceptualLoss(cfg)


def samples(p: AutoencoderParams, seed: int) -> data.RowFn:
    return data.frame_pairs(
        p.pairs_per_segment,
        seed,
        mouth_mask=p.w_mouth > 0,
        mouth_contrast=p.mouth_contrast,
        mouth_swap=p.mouth_swap,
        with_mouth_shape=p.w_shape > 0,
    )


def build(model_section: dict, p: AutoencoderParams, upstream: dict[str, str]) -> Nets:
    nets = edtalk_nets("autoencoder", model_section, None, {"perceptual": perceptual(p)})
    if p.w_shape > 0:
        add_aux_head(
            nets, SHAPE_HEAD, torch.nn.Linear(nets.model.config.navigation.lia_bases, 2 * 20, bias=False)
        )
    return nets


def step(nets: Nets, batch: dict, p: AutoencoderParams) -> StepOut:
    from edtalk import losses

    src, drv = batch["source"], batch["driving"]
    fake, weights = nets.model.reconstruct_lia(src, drv, return_weights=True)
    rec = losses.l1_reconstruction_loss(fake, drv)
    per = nets.extras["perceptual"](fake, drv)
    adv = losses.generator_adversarial_loss(nets.discriminator(fake))
    loss = p.w_rec * rec + p.w_per * per + p.w_adv * adv
    logs = {"rec": rec, "per": per, "adv": adv}
    if p.w_mouth > 0:
        # The mouth is a few percent of a tiny frame: without this term G learns to move the head but hardly to
        # open or close the mouth, and no later stage can then put a mouth into MLN (docs/training.md).
        logs["mouth"] = losses.region_l1_loss(fake, drv, batch["mouth_mask"])
        loss = loss + p.w_mouth * logs["mouth"]
    if p.w_shape > 0:
        # Without it the LIA weights carry the head's pose and next to nothing of the mouth (R² of mouth_open from
        # them below 0 after 1000 steps), so G never learns to render a mouth-only change and MLN later has no
        # mouth to find (docs/training.md). Centred within the batch, so the head needs no bias: uncentred, the
        # first few hundred steps went into the shape's mean (R² of mouth_open 0.4-0.7 at step 500, centred 0.9).
        if weights.shape[0] < 2:
            raise ValueError(
                "autoencoder.w_shape > 0 needs train.batch_size >= 2 (its loss is centred within the batch)"
            )
        head = getattr(nets.model, AUX_PREFIX + SHAPE_HEAD)
        pred, target = head(weights), batch["mouth_shape"].to(weights.dtype)
        logs["shape"] = torch.nn.functional.mse_loss(pred - pred.mean(0), target - target.mean(0))
        loss = loss + p.w_shape * logs["shape"]
    logs["loss"] = loss
    return StepOut(loss, logs, real=drv, fake=fake)


def grid(nets: Nets, batch: dict, p: AutoencoderParams) -> dict[str, torch.Tensor]:
    out = nets.model.reconstruct_lia(batch["source"], batch["driving"])
    return {"identity": batch["source"], "driving": batch["driving"], "output": out}


def finalize(folder: Path, ctx: FinalizeContext) -> None:
    """Driver side, on the exported model folder: with `local_frames` > 0, store the generator's mouth-local latent
    directions over that many training frames (pipelines/train/local_directions.py) for `mouth_pose.mouth_bases:
    local`."""
    from edtalk import EDTalk
    from pipelines.train import local_directions

    frames = int(ctx.params.local_frames)
    if frames == 0:
        return
    model = EDTalk.from_pretrained(folder)
    dirs, shares = local_directions.autoencoder_directions(model, ctx.data_dir, ctx.train_ids, frames)
    local_directions.save(folder, dirs, shares, frames)


STAGE = Stage(
    name="autoencoder",
    params_cls=AutoencoderParams,
    table="segments",
    samples=samples,
    build=build,
    step=step,
    grid=grid,
    finalize=finalize,
    adversarial=True,
)
