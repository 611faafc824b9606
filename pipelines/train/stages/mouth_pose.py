"""Stage `mouth_pose`: MLN and PLN (with the shared navigation trunk) learn to split mouth from pose by
cross-reconstruction of mouth-swapped pairs (paper Sec. 3.2, Eq. 3-7); E and G come frozen from `autoencoder`.

For a pair (a, b) of one segment, I^{m_a}_{p_b} = b with a's mouth (`a_on_b`) and I^{m_b}_{p_a} (`b_on_a`):
    pose from a_on_b + mouth from b_on_a must rebuild b;  pose from b_on_a + mouth from a_on_b must rebuild a
plus self-reconstruction of a and b, and the feature loss between features of swapped and original images (on both
spaces: all of them train here). The cross-reconstruction and its losses are shared with `eye` (stages/swap.py).
With `mouth_bases: local` (ours) MLN's bases are held at the autoencoder's mouth-local latent directions
(pipelines/train/local_directions.py) and only its head learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.autoencoder import perceptual
from pipelines.train.stages.swap import cross, samples, swap_step

SWAPPED = ("mouth",)  # the region the pairs swap
KEPT = ("pose",)  # taken from the rest of the swapped image
MOUTH_BASES = ("learned", "local")


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
    mouth_bases: str = "learned"  # learned (paper) | local: held at the autoencoder's mouth-local directions
    perceptual_scales: tuple[float, ...] = (1.0, 0.5)  # image pyramid of the perceptual loss
    vgg_weights: str = ""  # torchvision-format VGG19 file; "" = $EDTALK_VGG19_WEIGHTS, else random (warned)

    def __post_init__(self) -> None:
        self.perceptual_scales = tuple(self.perceptual_scales)
        if self.steps < 1 or self.lr <= 0 or self.d_lr <= 0:
            raise ValueError("mouth_pose params: steps must be >= 1, lr and d_lr > 0")
        if min(self.w_rec, self.w_per, self.w_adv, self.w_self, self.w_fea, self.w_region) < 0:
            raise ValueError("mouth_pose params: loss weights must be >= 0")
        if self.mouth_bases not in MOUTH_BASES:
            raise ValueError(
                f"mouth_pose params: mouth_bases must be one of {', '.join(MOUTH_BASES)}, got {self.mouth_bases!r}"
            )


def build(model_section: dict, p: MouthPoseParams, upstream: dict[str, str]) -> Nets:
    nets = edtalk_nets("mouth_pose", model_section, upstream["autoencoder"], {"perceptual": perceptual(p)})
    if p.mouth_bases == "local":
        hold_local_bases(nets, upstream["autoencoder"])
    return nets


def hold_local_bases(nets: Nets, autoencoder_dir: str) -> None:
    """MLN's bank = the first n_m of the autoencoder's mouth-local latent directions, not trained.

    Learned from scratch, MLN collapsed on SynthTalk at the tiny preset: the cross-reconstruction's optimum is a constant MLN with
    PLN carrying all motion, and the directions MLN finds render as changes of the whole face. Mouth comes first in
    the bases' Gram-Schmidt order, so Q^m spans exactly these directions and PLN (orthogonal to them) cannot move G
    along them; MLN's head learns the weights (docs/training.md, "Mouth-local bases").
    """
    from pipelines.train import local_directions

    dirs, shares = local_directions.load(autoencoder_dir)
    bank = nets.model.navigation.space("mouth").bank
    latent, n = bank.shape
    if dirs.shape[0] != latent or dirs.shape[1] < n:
        raise ValueError(
            f"mouth_pose.mouth_bases=local: {autoencoder_dir} stores {tuple(dirs.shape)} directions, the model's "
            f"mouth bank is ({latent}, {n}); retrain the autoencoder with this model config"
        )
    with torch.no_grad():
        bank.copy_(dirs[:, :n].to(bank.dtype))
    bank.requires_grad_(False)
    nets.trainable[:] = [q for q in nets.trainable if q is not bank]
    print(
        f"[mouth_pose] mouth bases held at the autoencoder's {n} most mouth-local directions (in-mouth share "
        + ", ".join(f"{float(s):.3f}" for s in shares[:n])
        + ")",
        flush=True,
    )


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
