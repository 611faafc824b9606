"""Stage `eye` (EDTalk++): EYLN learns the eye space by cross-reconstruction of eye-swapped pairs, the way MLN and
PLN learned mouth and pose (paper Sec. 3.2, Eq. 3-7, with eyes in the mouth's role); E, G, the navigation trunk,
MLN and PLN come frozen from `mouth_pose`.

For a pair (a, b) of one segment, `a_on_b` is b with a's eyes and `b_on_a` is a with b's eyes:
    mouth + pose from b_on_a, eyes from a_on_b  must rebuild a;  mouth + pose from a_on_b, eyes from b_on_a  must
    rebuild b
plus self-reconstruction of a and b and the feature loss (Eq. 7) on the eye features. Only the eye space trains, so
the feature terms of the frozen spaces carry no gradient and are left out. The eye bank comes after mouth and pose
in the ordered QR: their bases stay bitwise what `mouth_pose` left.

The cross-reconstruction and its losses are shared with `mouth_pose` (pipelines/train/stages/swap.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.autoencoder import perceptual
from pipelines.train.stages.swap import cross, swap_step
from pipelines.train.stages.swap import samples as swap_samples

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
    w_region: float = 0.0  # L1 inside the swapped eye region, cross- and self-rec (ours; 0 = paper)
    perceptual_scales: tuple[float, ...] = (1.0, 0.5)  # image pyramid of the perceptual loss
    vgg_weights: str = ""  # torchvision-format VGG19 file; "" = $EDTALK_VGG19_WEIGHTS, else random (warned)

    def __post_init__(self) -> None:
        self.perceptual_scales = tuple(self.perceptual_scales)
        if self.steps < 1 or self.lr <= 0 or self.d_lr <= 0:
            raise ValueError(
                f"eye params: steps must be >= 1, lr and d_lr > 0 (got steps={self.steps}, lr={self.lr}, "
                f"d_lr={self.d_lr})"
            )
        if min(self.w_rec, self.w_per, self.w_adv, self.w_self, self.w_fea, self.w_region) < 0:
            raise ValueError(
                "eye params: loss weights (w_rec, w_per, w_adv, w_self, w_fea, w_region) must be >= 0"
            )


def build(model_section: dict, p: EyeParams, upstream: dict[str, str]) -> Nets:
    return edtalk_nets("eye", model_section, upstream["mouth_pose"], {"perceptual": perceptual(p)})


def step(nets: Nets, batch: dict, p: EyeParams) -> StepOut:
    return swap_step(nets, batch, p, SWAPPED, KEPT)


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
