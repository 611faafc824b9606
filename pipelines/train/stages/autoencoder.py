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
LOCAL_STATE = "local"  # the training-only state of w_local: its directions and a micro-step counter (buffers)


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
    w_local: float = 0.0  # weight of G's out-of-mouth share along its mouth-local directions (ours; 0 = none)
    local_start: int = 0  # first micro-step with the w_local term (= optimizer step unless grad_accum > 1)
    local_every: int = 100  # micro-steps between two renewals of w_local's directions (pooled batches)
    local_batches: int = 4  # batches (every rank's) pooled into one renewal of w_local's directions
    local_k: int = 3  # how many of the most mouth-local directions the w_local term holds
    local_eps: float = 0.05  # step along a direction (latent units) whose rendered change w_local scores
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
        if self.w_local < 0 or self.local_start < 0 or self.local_every < 1 or self.local_k < 1:
            raise ValueError(
                "autoencoder params: w_local and local_start must be >= 0, local_every and local_k >= 1"
            )
        if self.local_eps <= 0:
            raise ValueError("autoencoder params: local_eps must be > 0")
        if not 1 <= self.local_batches <= self.local_every:
            raise ValueError(
                f"autoencoder params: local_batches={self.local_batches} must be in [1, local_every="
                f"{self.local_every}] (the batches pooled into one renewal of the directions come from the "
                "micro-steps since the previous one)"
            )


def perceptual(p) -> torch.nn.Module:
    from edtalk.losses import PerceptualLoss, PerceptualLossConfig

    cfg = PerceptualLossConfig(scales=tuple(p.perceptual_scales), vgg_weights=p.vgg_weights or None)
    return PerceptualLoss(cfg)


def samples(p: AutoencoderParams, seed: int) -> data.RowFn:
    return data.frame_pairs(
        p.pairs_per_segment,
        seed,
        mouth_mask=p.w_mouth > 0 or p.w_local > 0,
        mouth_contrast=p.mouth_contrast,
        mouth_swap=p.mouth_swap,
        with_mouth_shape=p.w_shape > 0,
    )


def build(model_section: dict, p: AutoencoderParams, upstream: dict[str, str]) -> Nets:
    nets = edtalk_nets("autoencoder", model_section, upstream.get("init_from"), {"perceptual": perceptual(p)})
    if p.w_shape > 0:
        add_aux_head(
            nets, SHAPE_HEAD, torch.nn.Linear(nets.model.config.navigation.lia_bases, 2 * 20, bias=False)
        )
    if p.w_local > 0:
        dim = nets.model.config.latent_dim
        if p.local_k > dim:
            raise ValueError(f"autoencoder.local_k={p.local_k} exceeds model.latent_dim={dim}")
        add_aux_head(nets, LOCAL_STATE, LocalState(dim, p.local_k))
    return nets


class LocalState(torch.nn.Module):
    """State of the w_local term (checkpointed with the model, dropped on export): the K directions it holds
    (buffer (D, K); zeros until first computed), the number of training micro-steps seen (buffer), and the Jacobian
    sums pooled since the last renewal (extra state in float64, which a bf16 engine would not keep in a buffer)."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.register_buffer("directions", torch.zeros(dim, k))
        self.register_buffer("micro", torch.zeros((), dtype=torch.long))
        self.sums: dict[str, torch.Tensor] | None = None  # a, b: (D, D) float64; frames: () (CPU)

    def add(self, a: torch.Tensor, b: torch.Tensor, frames: torch.Tensor) -> None:
        new = {"a": a, "b": b, "frames": frames.to(a.dtype)}
        self.sums = new if self.sums is None else {k: self.sums[k] + v for k, v in new.items()}

    def get_extra_state(self) -> dict:
        return {} if self.sums is None else {k: v.clone() for k, v in self.sums.items()}

    def set_extra_state(self, state: dict) -> None:
        self.sums = {k: v.detach().cpu().double().clone() for k, v in state.items()} if state else None


def schedule(micro: int, p: AutoencoderParams) -> tuple[bool, bool]:
    """(pool this micro-step's batch, renew the directions after it): renewals at local_start + j * local_every,
    each from the local_batches micro-steps up to and including it."""
    offset = (micro - p.local_start) % p.local_every
    renew = micro >= p.local_start and offset == 0
    pool = micro > p.local_start - p.local_batches and (
        offset == 0 or offset > p.local_every - p.local_batches
    )
    return pool, renew


def pool_directions(
    nets: Nets, batch: dict, p: AutoencoderParams, state: LocalState, micro: int, renew: bool
) -> None:
    """Add this batch's Jacobian sums, summed over all ranks, to the pool (so every rank holds the same pool, and
    rank 0's checkpoint restores it for all); at a renewal, hold the generator's p.local_k most mouth-local
    directions of the pool and empty it."""
    import torch.distributed as dist

    from pipelines.train.local_directions import directions_from_sums, jacobian_sums

    a, b = jacobian_sums(nets.model, batch["source"], batch["driving"], batch["mouth_mask"], progress=False)
    frames = torch.tensor(float(batch["source"].shape[0]), dtype=a.dtype)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:  # one collective, on the device the backend works on
        d = a.shape[0]
        flat = torch.cat([a.flatten(), b.flatten(), frames.reshape(1)]).to(state.directions.device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        a, b, frames = flat[: d * d].view(d, d), flat[d * d : 2 * d * d].view(d, d), flat[-1]
    state.add(a, b, frames)
    if not renew:
        return
    sums, state.sums = state.sums, None
    dirs, shares = directions_from_sums(sums["a"], sums["b"])
    dirs = dirs[:, : p.local_k].to(state.directions).contiguous()  # broadcast fills contiguous memory only
    if distributed:  # rank 0's solution everywhere, bit for bit
        dist.broadcast(dirs, src=0)
    state.directions.copy_(dirs)
    if distributed and dist.get_rank() != 0:
        return
    print(
        f"[autoencoder] w_local: directions renewed at micro-step {micro} from {int(sums['frames'])} frames; "
        "their in-mouth share: " + ", ".join(f"{float(x):.3f}" for x in shares[: p.local_k]),
        flush=True,
    )


def local_term(nets: Nets, batch: dict, p: AutoencoderParams) -> torch.Tensor | None:
    """Ours, not the paper's: the share of G's rendered change outside the mouth along its K most mouth-local
    latent directions, at each pair's latent code (only G gets the gradient). Without it even the most
    mouth-local directions put most of their change outside the mouth (shares 0.47, 0.31, 0.30 after 2000
    steps), and MLN held there swaps mouths half outside the mouth region (docs/training.md, "The locality term").
    None before local_start and during validation before the directions exist."""
    state = getattr(nets.model, AUX_PREFIX + LOCAL_STATE)
    training = nets.model.training and torch.is_grad_enabled()
    if training:
        micro = int(state.micro)
        state.micro += 1
        pool, renew = schedule(micro, p)
        if pool:
            pool_directions(nets, batch, p, state, micro, renew)
        if micro < p.local_start:
            return None
    if not bool(state.directions.any()):
        return None
    model = nets.model
    with torch.no_grad():
        latent, feats = model.encoder(batch["source"])
        drv, _ = model.encoder(batch["driving"])
        code = latent + model.lia.motion(model.lia.weights(drv))
    mask = batch["mouth_mask"].to(code.dtype)
    b = code.shape[0]
    feats2 = [torch.cat([f, f]) for f in feats]
    outside = []
    for k in range(state.directions.shape[1]):
        d = state.directions[:, k].to(code.dtype) * p.local_eps
        out = model.generator(torch.cat([code + d, code - d]), feats2)
        energy = ((out[:b] - out[b:]) ** 2).sum(1, keepdim=True)
        outside.append(((energy * (1 - mask)).sum((1, 2, 3)) / (energy.sum((1, 2, 3)) + 1e-12)).mean())
    return torch.stack(outside).mean()


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
    if p.w_local > 0:
        outside = local_term(nets, batch, p)
        if outside is not None:
            logs["local"] = outside
            loss = loss + p.w_local * outside
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
