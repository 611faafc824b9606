"""What the swap stages (`mouth_pose`, `eye`) share: cross-reconstruction of region-swapped pairs (paper Sec. 3.2,
Eq. 3-7) for any split of the spaces into the swapped ones (the region the pairs exchange) and the kept ones (taken
from the rest of the swapped image).

For a pair (a, b) of one segment, `a_on_b` is b with a's swapped region and `b_on_a` is a with b's:
    kept spaces from b_on_a + swapped spaces from a_on_b  must rebuild a;
    kept spaces from a_on_b + swapped spaces from b_on_a  must rebuild b
plus self-reconstruction of a and b and the feature loss (Eq. 7) between the features of swapped and original
images, and (ours, `w_region`) an L1 inside the swapped region of both reconstructions, so that a small region
(a 64 px mouth is ~6% of the frame) weighs as much as the rest. `mouth_pose` is swapped=("mouth",), kept=("pose",); `eye` is swapped=("eye",), kept=("mouth", "pose").
"""

from __future__ import annotations

import torch

from pipelines.train import data
from pipelines.train.stages import Nets, StepOut


def samples(p, seed: int) -> data.RowFn:
    """Rows of the pairs table as they are: (frame_id, frame_a, frame_b, a_on_b, b_on_a)."""
    return data.swap_pairs()


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
    the swapped ones; a stage whose kept spaces train too lists them as well)."""
    from edtalk import losses

    model, per_loss = nets.model, nets.extras["perceptual"]
    a, b = batch["frame_a"], batch["frame_b"]
    c = cross(model, batch, swapped, kept)
    rec = losses.l1_reconstruction_loss(c["hat_a"], a) + losses.l1_reconstruction_loss(c["hat_b"], b)
    # L1 inside the swapped region (mask_on_a: where a got b's region, i.e. a's own; mask_on_b likewise), for the
    # cross- and the self-reconstructions: the part of the image that tells the swapped space from the kept ones.
    ma, mb = batch["mask_on_a"], batch["mask_on_b"]
    region = losses.region_l1_loss(c["hat_a"], a, ma) + losses.region_l1_loss(c["hat_b"], b, mb)
    per = per_loss(c["hat_a"], a) + per_loss(c["hat_b"], b)
    fakes = torch.cat([c["hat_a"], c["hat_b"]])
    adv = losses.generator_adversarial_loss(nets.discriminator(fakes))
    self_a = model.render(c["ident"], c["w"]["a"])
    self_b = model.render(c["ident"], c["w"]["b"])
    self_rec = losses.l1_reconstruction_loss(self_a, a) + losses.l1_reconstruction_loss(self_b, b)
    self_rec = self_rec + per_loss(self_a, a) + per_loss(self_b, b)
    region = region + losses.region_l1_loss(self_a, a, ma) + losses.region_l1_loss(self_b, b, mb)
    # Eq. 7 on f^{r->s} = sum_i w_i q_i: each part of a swapped image must give the features of the frame it came
    # from (a_on_b: the swapped region of a, the kept spaces of b; b_on_a the other way round).
    spaces = tuple(swapped if feature_spaces is None else feature_spaces)
    bases = model.navigation.bases()
    # every space the stage renders (c["w"][k] holds them all): the loss takes `spaces`, the spread logs all
    f = {k: model.navigation.motion(c["w"][k], bases) for k in c["w"]}
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
        "region": region,
        # How far each space's motion spreads over the batch's real frames (a and b): the sign of a collapse is the
        # swapped space's spread falling towards 0 while the kept ones' stays (docs/training.md, "Swap stages'
        # health").
        **{f"spread_{s}": motion_spread(torch.cat([f["a"][s], f["b"][s]])) for s in (*swapped, *kept)},
        "real": torch.cat([a, b]),
        "fake": fakes,
    }


def motion_spread(f: torch.Tensor) -> torch.Tensor:
    """Mean distance of a batch of motion vectors f^{r->s} (B, D) from their mean: 0 when a space's navigation
    gives every frame the same motion."""
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"motion_spread needs a (B>=2, D) batch of motions, got {tuple(f.shape)}")
    f = f.detach().float()
    return (f - f.mean(0, keepdim=True)).norm(dim=1).mean()


def swap_step(
    nets: Nets,
    batch: dict,
    p,
    swapped: tuple[str, ...],
    kept: tuple[str, ...],
    feature_spaces: tuple[str, ...] | None = None,
) -> StepOut:
    """One generator step of a swap stage: the terms weighted by p.w_rec, w_per, w_adv, w_self, w_fea, w_region."""
    t = swap_losses(nets, batch, swapped, kept, feature_spaces)
    loss = (
        p.w_rec * t["rec"]
        + p.w_per * t["per"]
        + p.w_adv * t["adv"]
        + p.w_self * t["self"]
        + p.w_fea * t["fea"]
        + p.w_region * t["region"]
    )
    logs = {"loss": loss, **{k: t[k] for k in ("rec", "per", "adv", "self", "fea", "region")}}
    logs.update({k: v for k, v in t.items() if k.startswith("spread_")})
    logs["orthogonality"] = torch.tensor(nets.model.orthogonality_error())
    return StepOut(loss, logs, real=t["real"], fake=t["fake"])
