"""Stage `mouth_pose`: MLN and PLN (with the shared navigation trunk) learn to split mouth from pose by
cross-reconstruction of mouth-swapped pairs (paper Sec. 3.2, Eq. 3-7); E and G come frozen from `autoencoder`.

For a pair (a, b) of one segment, I^{m_a}_{p_b} = b with a's mouth (`a_on_b`) and I^{m_b}_{p_a} (`b_on_a`):
    pose from a_on_b + mouth from b_on_a must rebuild b;  pose from b_on_a + mouth from a_on_b must rebuild a
plus self-reconstruction of a and b, and the feature loss between features of swapped and original images (on both
spaces: all of them train here). The cross-reconstruction and its losses are shared with `eye` (stages/swap.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.autoencoder import perceptual
from pipelines.train.stages.swap import cross, samples, swap_step

SWAPPED = ("mouth",)  # the region the pairs swap
KEPT = ("pose",)  # taken from the rest of the swapped image


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
    w_region: float = 0.0  # L1 inside the swapped mouth region, cross- and self-rec (ours; 0 = paper)
    perceptual_scales: tuple[float, ...] = (1.0, 0.5)  # image pyramid of the perceptual loss
    vgg_weights: str = ""  # torchvision-format VGG19 file; "" = $EDTALK_VGG19_WEIGHTS, else random (warned)

    def __post_init__(self) -> None:
        self.perceptual_scales = tuple(self.perceptual_scales)
        if self.steps < 1 or self.lr <= 0 or self.d_lr <= 0:
            raise ValueError("mouth_pose params: steps must be >= 1, lr and d_lr > 0")
        if min(self.w_rec, self.w_per, self.w_adv, self.w_self, self.w_fea, self.w_region) < 0:
            raise ValueError("mouth_pose params: loss weights must be >= 0")


def build(model_section: dict, p: MouthPoseParams, upstream: dict[str, str]) -> Nets:
    return edtalk_nets("mouth_pose", model_section, upstream["autoencoder"], {"perceptual": perceptual(p)})


def step(nets: Nets, batch: dict, p: MouthPoseParams) -> StepOut:
    # MLN, PLN and the trunk all train here: the feature loss covers both spaces.
    return swap_step(nets, batch, p, SWAPPED, KEPT, feature_spaces=(*SWAPPED, *KEPT))


def grid(nets: Nets, batch: dict, p: MouthPoseParams) -> dict[str, torch.Tensor]:
    c = cross(nets.model, batch, SWAPPED, KEPT)
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
