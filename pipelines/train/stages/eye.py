"""Stage `eye` (EDTalk++): EYLN learns the eye space by cross-reconstruction of eye-swapped pairs, the way MLN and
PLN learned mouth and pose (paper Sec. 3.2, Eq. 3-7, with eyes in the mouth's role); E, G, the navigation trunk,
MLN and PLN come frozen from `mouth_pose`.

For a pair (a, b) of one segment, `a_on_b` is b with a's eyes and `b_on_a` is a with b's eyes:
    mouth + pose from b_on_a, eyes from a_on_b  must rebuild a;  mouth + pose from a_on_b, eyes from b_on_a  must
    rebuild b
plus self-reconstruction of a and b and the feature loss (Eq. 7) on the eye features. Only the eye space trains, so
the feature terms of the frozen spaces carry no gradient and are left out. The eye bank comes after mouth and pose
in the ordered QR: their bases stay bitwise what `mouth_pose` left.

`cross` and `swap_losses` take the swapped and the kept spaces as arguments, so they serve any swap stage
(mouth_pose is `swapped=("mouth",), kept=("pose",)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.autoencoder import perceptual
from pipelines.train.stages.mouth_pose import samples as swap_samples

SWAPPED = ("eye",)  # the space whose region the pairs swap (trained here)
KEPT = ("mouth", "pose")  # spaces taken from the rest of the swapped image (frozen here)


@dataclass
class EyeParams:
    """The `eye:` section of params.yaml."""

    steps: int = 40  # optimizer steps
    lr: float = 2e-3  # Adam learning rate of EYLN (its head and bank)
    d_lr: float = 2e-3  # Adam learning rate of D
    beta1: float = 0.5  # Adam beta1 (both engines)
    beta2: float = 0.99  # Adam beta2 (both engines)
    w_rec: float = 1.0  # cross-reconstruction L1 (Eq. 5)
    w_per: float = 1.0  # cross-reconstruction perceptual (Eq. 5)
    w_adv: float = 1.0  # adversarial (Eq. 6)
    w_self: float = 1.0  # self-reconstruction of a and b (L1 + perceptual)
    w_fea: float = 1.0  # feature loss exp(-cos) on the eye features (Eq. 7)
    perceptual_scales: tuple[float, ...] = (1.0, 0.5)  # image pyramid of the perceptual loss
    vgg_weights: str = ""  # torchvision-format VGG19 file; "" = $EDTALK_VGG19_WEIGHTS, else random (warned)

    def __post_init__(self) -> None:
        self.perceptual_scales = tuple(self.perceptual_scales)
        if self.steps < 1 or self.lr <= 0 or self.d_lr <= 0:
            raise ValueError(
                f"eye params: steps must be >= 1, lr and d_lr > 0 (got steps={self.steps}, lr={self.lr}, "
                f"d_lr={self.d_lr})"
            )
        if min(self.w_rec, self.w_per, self.w_adv, self.w_self, self.w_fea) < 0:
            raise ValueError("eye params: loss weights (w_rec, w_per, w_adv, w_self, w_fea) must be >= 0")


def build(model_section: dict, p: EyeParams, upstream: dict[str, str]) -> Nets:
    return edtalk_nets("eye", model_section, upstream["mouth_pose"], {"perceptual": perceptual(p)})


def cross(model, batch: dict, swapped: tuple[str, ...], kept: tuple[str, ...]) -> dict:
    """Weights of the swapped images and the originals, and the cross-reconstructions Î^a, Î^b (Eq. 3-4)."""
    spaces = (*kept, *swapped)
    ident = model.encode_identity(batch["frame_id"])
    w = {
        "ab": model.extract(batch["a_on_b"], spaces),  # kept of b, swapped region of a
        "ba": model.extract(batch["b_on_a"], spaces),  # kept of a, swapped region of b
        "a": model.extract(batch["frame_a"], spaces),
        "b": model.extract(batch["frame_b"], spaces),
    }

    def mix(kept_from: str, swapped_from: str) -> dict[str, torch.Tensor]:
        return {**{s: w[kept_from][s] for s in kept}, **{s: w[swapped_from][s] for s in swapped}}

    return {
        "ident": ident,
        "w": w,
        "hat_a": model.render(ident, mix("ba", "ab")),
        "hat_b": model.render(ident, mix("ab", "ba")),
    }


def swap_losses(
    nets: Nets,
    batch: dict,
    swapped: tuple[str, ...],
    kept: tuple[str, ...],
    feature_spaces: tuple[str, ...] | None = None,
) -> dict:
    """The unweighted terms of a swap stage: rec, per, adv (G side), self, and fea over `feature_spaces` (default:
    the swapped ones, the only ones a later swap stage trains)."""
    from edtalk import losses

    model, per_loss = nets.model, nets.extras["perceptual"]
    a, b = batch["frame_a"], batch["frame_b"]
    c = cross(model, batch, swapped, kept)
    rec = losses.l1_reconstruction_loss(c["hat_a"], a) + losses.l1_reconstruction_loss(c["hat_b"], b)
    per = per_loss(c["hat_a"], a) + per_loss(c["hat_b"], b)
    fakes = torch.cat([c["hat_a"], c["hat_b"]])
    adv = losses.generator_adversarial_loss(nets.discriminator(fakes))
    self_a = model.render(c["ident"], c["w"]["a"])
    self_b = model.render(c["ident"], c["w"]["b"])
    self_rec = losses.l1_reconstruction_loss(self_a, a) + losses.l1_reconstruction_loss(self_b, b)
    self_rec = self_rec + per_loss(self_a, a) + per_loss(self_b, b)
    # Eq. 7 on f^{r->s} = sum_i w_i q_i: each part of a swapped image must give the features of the frame it came
    # from (a_on_b: the swapped region of a, the kept spaces of b; b_on_a the other way round).
    spaces = tuple(swapped if feature_spaces is None else feature_spaces)
    bases = model.navigation.bases()
    f = {k: model.navigation.motion({s: c["w"][k][s] for s in spaces}, bases) for k in c["w"]}
    fea = sum(
        losses.feature_loss(f["ab"][s], f["a" if s in swapped else "b"][s])
        + losses.feature_loss(f["ba"][s], f["b" if s in swapped else "a"][s])
        for s in spaces
    )
    return {
        "rec": rec,
        "per": per,
        "adv": adv,
        "self": self_rec,
        "fea": fea,
        "real": torch.cat([a, b]),
        "fake": fakes,
    }


def step(nets: Nets, batch: dict, p: EyeParams) -> StepOut:
    t = swap_losses(nets, batch, SWAPPED, KEPT)
    loss = (
        p.w_rec * t["rec"]
        + p.w_per * t["per"]
        + p.w_adv * t["adv"]
        + p.w_self * t["self"]
        + p.w_fea * t["fea"]
    )
    logs = {"loss": loss, **{k: t[k] for k in ("rec", "per", "adv", "self", "fea")}}
    logs["orthogonality"] = torch.tensor(nets.model.orthogonality_error())
    return StepOut(loss, logs, real=t["real"], fake=t["fake"])


def grid(nets: Nets, batch: dict, p: EyeParams) -> dict[str, torch.Tensor]:
    """identity | driving (a) | output (a rendered from its own weights) | the swaps and cross-reconstructions."""
    model = nets.model
    c = cross(model, batch, SWAPPED, KEPT)
    return {
        "identity": batch["frame_id"],
        "driving": batch["frame_a"],
        "output": model.render(c["ident"], c["w"]["a"]),
        "b": batch["frame_b"],
        "a_eyes_on_b": batch["a_on_b"],
        "b_eyes_on_a": batch["b_on_a"],
        "rebuilt_a": c["hat_a"],
        "rebuilt_b": c["hat_b"],
    }


STAGE = Stage(
    name="eye",
    params_cls=EyeParams,
    table="pairs",
    samples=swap_samples,
    build=build,
    step=step,
    grid=grid,
    upstream=("mouth_pose",),
    adversarial=True,
    row_filter={"kind": "eye"},
)
