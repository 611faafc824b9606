"""Stage `mouth_pose`: MLN and PLN (with the shared navigation trunk) learn to split mouth from pose by
cross-reconstruction of mouth-swapped pairs (paper Sec. 3.2, Eq. 3-7); E and G come frozen from `autoencoder`.

For a pair (a, b) of one segment, I^{m_a}_{p_b} = b with a's mouth (`a_on_b`) and I^{m_b}_{p_a} (`b_on_a`):
    pose from a_on_b + mouth from b_on_a must rebuild b;  pose from b_on_a + mouth from a_on_b must rebuild a
plus self-reconstruction of a and b, and the feature loss between features of swapped and original images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.train import data
from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.autoencoder import perceptual

SPACES = ("mouth", "pose")


@dataclass
class MouthPoseParams:
    """The `mouth_pose:` section of params.yaml."""

    steps: int = 40  # optimizer steps
    lr: float = 2e-3  # Adam learning rate of MLN, PLN and the trunk
    d_lr: float = 2e-3  # Adam learning rate of D
    beta1: float = 0.5  # Adam beta1 (both engines)
    beta2: float = 0.99  # Adam beta2 (both engines)
    w_rec: float = 1.0  # cross-reconstruction L1 (Eq. 5)
    w_per: float = 1.0  # cross-reconstruction perceptual (Eq. 5)
    w_adv: float = 1.0  # adversarial (Eq. 6)
    w_self: float = 1.0  # self-reconstruction of a and b (L1 + perceptual)
    w_fea: float = 1.0  # feature loss exp(-cos) (Eq. 7)
    perceptual_scales: tuple[float, ...] = (1.0, 0.5)  # image pyramid of the perceptual loss
    vgg_weights: str = ""  # torchvision-format VGG19 file; "" = $EDTALK_VGG19_WEIGHTS, else random (warned)

    def __post_init__(self) -> None:
        self.perceptual_scales = tuple(self.perceptual_scales)
        if self.steps < 1 or self.lr <= 0 or self.d_lr <= 0:
            raise ValueError("mouth_pose params: steps must be >= 1, lr and d_lr > 0")
        if min(self.w_rec, self.w_per, self.w_adv, self.w_self, self.w_fea) < 0:
            raise ValueError("mouth_pose params: loss weights must be >= 0")


def samples(p: MouthPoseParams, seed: int) -> data.RowFn:
    return data.swap_pairs()


def build(model_section: dict, p: MouthPoseParams, upstream: dict[str, str]) -> Nets:
    return edtalk_nets("mouth_pose", model_section, upstream["autoencoder"], {"perceptual": perceptual(p)})


def cross(model, batch: dict) -> dict[str, torch.Tensor]:
    """Eq. 3-4 and the cross-reconstructions Î^a, Î^b; also the originals' weights for L_self and L_fea."""
    ident = model.encode_identity(batch["frame_id"])
    w_ab = model.extract(batch["a_on_b"], SPACES)  # pose of b, mouth of a
    w_ba = model.extract(batch["b_on_a"], SPACES)  # pose of a, mouth of b
    w_a = model.extract(batch["frame_a"], SPACES)
    w_b = model.extract(batch["frame_b"], SPACES)
    return {
        "ident": ident,
        "w_ab": w_ab,
        "w_ba": w_ba,
        "w_a": w_a,
        "w_b": w_b,
        "hat_a": model.render(ident, {"pose": w_ba["pose"], "mouth": w_ab["mouth"]}),
        "hat_b": model.render(ident, {"pose": w_ab["pose"], "mouth": w_ba["mouth"]}),
    }


def step(nets: Nets, batch: dict, p: MouthPoseParams) -> StepOut:
    from edtalk import losses

    model, per_loss = nets.model, nets.extras["perceptual"]
    a, b = batch["frame_a"], batch["frame_b"]
    c = cross(model, batch)
    rec = losses.l1_reconstruction_loss(c["hat_a"], a) + losses.l1_reconstruction_loss(c["hat_b"], b)
    per = per_loss(c["hat_a"], a) + per_loss(c["hat_b"], b)
    fakes = torch.cat([c["hat_a"], c["hat_b"]])
    adv = losses.generator_adversarial_loss(nets.discriminator(fakes))
    self_a = model.render(c["ident"], c["w_a"])
    self_b = model.render(c["ident"], c["w_b"])
    self_rec = losses.l1_reconstruction_loss(self_a, a) + losses.l1_reconstruction_loss(self_b, b)
    self_rec = self_rec + per_loss(self_a, a) + per_loss(self_b, b)
    # Eq. 7 on the motion features f^{r->s} = sum_i w_i q_i: swapped-image features vs the originals'.
    nav = model.navigation
    f = {k: nav.motion(c[k]) for k in ("w_ab", "w_ba", "w_a", "w_b")}
    fea = (
        losses.feature_loss(f["w_ab"]["pose"], f["w_b"]["pose"])
        + losses.feature_loss(f["w_ab"]["mouth"], f["w_a"]["mouth"])
        + losses.feature_loss(f["w_ba"]["pose"], f["w_a"]["pose"])
        + losses.feature_loss(f["w_ba"]["mouth"], f["w_b"]["mouth"])
    )
    loss = p.w_rec * rec + p.w_per * per + p.w_adv * adv + p.w_self * self_rec + p.w_fea * fea
    logs = {"loss": loss, "rec": rec, "per": per, "adv": adv, "self": self_rec, "fea": fea}
    logs["orthogonality"] = torch.tensor(model.orthogonality_error())
    return StepOut(loss, logs, real=torch.cat([a, b]), fake=fakes)


def grid(nets: Nets, batch: dict, p: MouthPoseParams) -> dict[str, torch.Tensor]:
    c = cross(nets.model, batch)
    return {
        "identity": batch["frame_id"],
        "a": batch["frame_a"],
        "b": batch["frame_b"],
        "a_mouth_on_b": batch["a_on_b"],
        "b_mouth_on_a": batch["b_on_a"],
        "rebuilt_a": c["hat_a"],
        "rebuilt_b": c["hat_b"],
    }


STAGE = Stage(
    name="mouth_pose",
    params_cls=MouthPoseParams,
    table="pairs",
    samples=samples,
    build=build,
    step=step,
    grid=grid,
    upstream=("autoencoder",),
    adversarial=True,
    row_filter={"kind": "mouth"},
)
