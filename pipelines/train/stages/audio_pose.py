"""Stage `audio_pose`: the conditional normalizing flow φ_p from audio features to pose weights (Sec. 3.3,
Eq. 13-14). `audio_eye` is the same recipe for the eye space (EDTalk++), built by `flow_stage` below.

A sample is N consecutive frames of a segment with speech and their mel windows. The frozen model gives the GT
weights W (PLN(E(I_t)) for pose) and the condition f^a_t = E_a(mel_t) (E_a trained by audio_lip, frozen here):

    z, log|det| = φ^{-1}(W, f^a)            L_MLE = mean_t -log p_Z(z_t) - log|det|        (Eq. 13)
    Ŵ = φ(z_rec, f^a)                        L_rec = ||W - Ŵ||_2, L_tem on frame differences  (Eq. 14)

φ is an exact bijection, so decoding the encoded z would give W back and make Eq. 14 vacuous; the reconstruction
decodes z_rec ~ N(0, rec_temperature² I) instead (0: the flow's mode), which ties the conditional mode to the GT
trajectory and its frame-to-frame motion while L_MLE shapes the spread around it that sampling draws from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines.train import samples_audio
from pipelines.train.data import RowFn
from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.audio_lip import frozen_in_eval


@dataclass
class FlowParams:
    """Shared fields of the flow stages' sections (`audio_pose:`, `audio_eye:`)."""

    steps: int = 40  # optimizer steps
    lr: float = 1e-2  # Adam learning rate of the flow (small net; must learn the weights' offset and scale)
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    window: int = 16  # N consecutive frames per sample (>= the flow's temporal context; >= 2 for L_tem)
    clips_per_segment: int = 8  # N-frame runs drawn from each segment per pass
    w_mle: float = 1.0  # weight of the negative log-likelihood per frame (Eq. 13)
    w_rec: float = 1.0  # weight of ||W - Ŵ||_2 (Eq. 14)
    w_tem: float = 1.0  # weight of the temporal loss (Eq. 14)
    rec_temperature: float = 0.0  # z of the reconstruction path ~ N(0, τ²); 0 = the flow's mode
    sample_temperature: float = 0.7  # temperature of the flow samples shown in the image grid

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.steps < 1 or self.lr <= 0 or self.clips_per_segment < 1:
            raise ValueError(f"{name}: steps and clips_per_segment must be >= 1, lr > 0")
        if self.window < 2:
            raise ValueError(f"{name}: window must be >= 2 frames (the temporal loss needs two)")
        if min(self.w_mle, self.w_rec, self.w_tem, self.rec_temperature, self.sample_temperature) < 0:
            raise ValueError(f"{name}: loss weights and temperatures must be >= 0")


@dataclass
class AudioPoseParams(FlowParams):
    """The `audio_pose:` section of params.yaml (fields: FlowParams)."""


def flow_stage(name: str, space: str, flow_attr: str, upstream: str, params_cls: type) -> Stage:
    """A flow stage for `space`: trains `model.<flow_attr>` on GT weights of that space, starting from `upstream`."""

    def samples(p: FlowParams, seed: int) -> RowFn:
        return samples_audio.audio_clips(p.window, p.clips_per_segment, seed, identity=True)

    def build(model_section: dict, p: FlowParams, ups: dict[str, str]) -> Nets:
        nets = edtalk_nets(name, model_section, ups[upstream])
        flow = getattr(nets.model, flow_attr)
        if flow is None or nets.model.audio_to_mouth is None:
            raise ValueError(
                f"stage {name}: the model in {ups[upstream]} has no {flow_attr} or no audio_to_mouth (E_a); "
                "train from a config that builds them"
            )
        return nets

    def targets(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """GT weights [B,N,d] of the frames and audio features [B,N,C], both from frozen modules."""
        frozen_in_eval(model, (flow_attr,))  # E_a's BatchNorm statistics stay as audio_lip left them
        frames = batch["frames"]
        b, n = frames.shape[:2]
        with torch.no_grad():
            w = model.extract(frames.flatten(0, 1), (space,))[space].view(b, n, -1)
            cond = model.audio_to_mouth.features(batch["mel"])
        return w, cond

    def step(nets: Nets, batch: dict, p: FlowParams) -> StepOut:
        from edtalk import losses

        model = nets.model
        flow = getattr(model, flow_attr)
        w, cond = targets(model, batch)
        z, logdet = flow(w, cond)
        nll = losses.flow_nll(z, logdet)
        z_rec = torch.randn_like(z) * p.rec_temperature if p.rec_temperature > 0 else torch.zeros_like(z)
        w_hat = flow.inverse(z_rec, cond)
        rec = losses.l2_norm_loss(w_hat, w)
        tem = losses.temporal_loss(w_hat, w)
        loss = p.w_mle * nll + p.w_rec * rec + p.w_tem * tem
        return StepOut(loss, {"loss": loss, "nll": nll, "rec": rec, "tem": tem})

    def grid(nets: Nets, batch: dict, p: FlowParams) -> dict[str, torch.Tensor]:
        """Identity, GT middle frame, that frame with this space sampled from audio, and with its GT weights."""
        from edtalk.navigation import SPACES

        model = nets.model
        frames = batch["frames"]
        c = frames.shape[1] // 2
        w, cond = targets(model, batch)
        sampled = getattr(model, flow_attr).sample(cond, temperature=p.sample_temperature, seed=0)
        gt = model.extract(frames[:, c], SPACES)
        ident = model.encode_identity(batch["identity"])
        return {
            "identity": batch["identity"],
            "ground_truth": frames[:, c],
            f"{space}_from_audio": model.render(ident, {**gt, space: sampled[:, c]}),
            f"{space}_from_video": model.render(ident, gt),
        }

    return Stage(
        name=name,
        params_cls=params_cls,
        table="segments",
        samples=samples,
        build=build,
        step=step,
        grid=grid,
        upstream=(upstream,),
    )


STAGE = flow_stage("audio_pose", "pose", "pose_flow", "audio_lip", AudioPoseParams)
