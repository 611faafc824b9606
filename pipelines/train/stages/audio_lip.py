"""Stage `audio_lip`: E_a + MLP_A^m (AudioToMouth) learn audio -> mouth weights (paper Sec. 3.3, Eq. 11-12).

Everything else is frozen: the visual model comes from `expression` (the last visual stage), the SyncNet from
`syncnet` (its weights are copied into this EDTalk's `syncnet`, so this stage's folder and every later one carry
it). A sample is K consecutive frames of a segment with speech, their mel windows and landmarks, and an identity
frame of the same segment. Per frame t:

    W^m_t = MLN(E(I_t))                  GT mouth weights (frozen visual model, no grad)
    Ŵ^m_t = MLP_A^m(E_a(mel_t))          predicted
    Î_t   = G(identity, mouth Ŵ^m_t, pose/eye/expression of I_t)     (only the mouth differs from I_t)

L = w_fea ||W^m - Ŵ^m||_2 + w_rec ||I - Î||² + w_sync L_sync, L_sync = -log cos(SyncNet video(Î mouths), SyncNet
audio(mel)) over every window of SyncNet's n frames inside the K (Eq. 12); mouths are cut the way SyncNet was
trained (models/syncnet/syncnet.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.train import samples_audio
from pipelines.train.data import RowFn
from pipelines.train.stages import Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.syncnet import load_syncnet, mouths

VISUAL_UPSTREAM = "expression"  # the last visual stage: its folder holds E, G and all four navigation spaces


@dataclass
class AudioLipParams:
    """The `audio_lip:` section of params.yaml."""

    steps: int = 15  # optimizer steps
    lr: float = 1e-3  # Adam learning rate of E_a and MLP_A^m
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    window: int = 5  # K consecutive frames per sample; >= SyncNet's n_frames (the sync loss needs a window)
    clips_per_segment: int = 8  # K-frame runs drawn from each segment per pass
    w_fea: float = 1.0  # weight of the feature loss ||W^m - Ŵ^m||_2 (Eq. 11)
    w_rec: float = 1.0  # weight of the reconstruction loss ||I - Î||² of the re-rendered frames (Eq. 11)
    w_sync: float = 0.1  # weight of the SyncNet loss (Eq. 12)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.window < 1 or self.clips_per_segment < 1:
            raise ValueError("audio_lip params: steps, window and clips_per_segment must be >= 1, lr > 0")
        if min(self.w_fea, self.w_rec, self.w_sync) < 0:
            raise ValueError("audio_lip params: loss weights must be >= 0")


def samples(p: AudioLipParams, seed: int) -> RowFn:
    return samples_audio.audio_clips(p.window, p.clips_per_segment, seed, identity=True)


def build(model_section: dict, p: AudioLipParams, upstream: dict[str, str]) -> Nets:
    nets = edtalk_nets("audio_lip", model_section, upstream[VISUAL_UPSTREAM])
    model = nets.model
    if model.audio_to_mouth is None or model.syncnet is None:
        raise ValueError(
            f"stage audio_lip: the model in {upstream[VISUAL_UPSTREAM]} has no audio_to_mouth or no syncnet (its "
            "config set them to None); train the visual stages with a config that builds them"
        )
    syncnet, crop = load_syncnet(upstream["syncnet"], model.config.syncnet)
    if p.window < syncnet.config.n_frames:
        raise ValueError(
            f"audio_lip params: window={p.window} is shorter than SyncNet's {syncnet.config.n_frames} frames"
        )
    model.syncnet.load_state_dict(syncnet.state_dict())  # exported with this stage's model from here on
    # A separate frozen copy scores the sync loss (an `extra`: never partitioned, never optimised).
    syncnet.requires_grad_(False).eval()
    syncnet.crop_settings = crop
    nets.extras["syncnet"] = syncnet
    return nets


def frozen_in_eval(model, trained: tuple[str, ...]) -> None:
    """Every top-level module of `model` but the `trained` ones to eval mode. The runner puts the whole model in
    train mode, but frozen modules must keep their BatchNorm running statistics (E_a, SyncNet) and no dropout."""
    for name, child in model.named_children():
        if name not in trained:
            child.eval()


def repeat_identity(ident, k: int):
    """An Identity of B images -> one of B*K (each repeated K times), to render K frames per image."""
    from edtalk.model import Identity

    return Identity(
        ident.latent.repeat_interleave(k, 0),
        [f.repeat_interleave(k, 0) for f in ident.features],
        {s: w.repeat_interleave(k, 0) for s, w in ident.weights.items()},
    )


def forward(nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
    """GT weights of the K frames (no grad), predicted mouth weights, and the frames re-rendered with them."""
    from edtalk.navigation import SPACES

    model = nets.model
    frozen_in_eval(model, ("audio_to_mouth",))
    frames = batch["frames"]
    b, k = frames.shape[:2]
    flat = frames.flatten(0, 1)
    with torch.no_grad():
        gt = model.extract(flat, SPACES)
        ident = repeat_identity(model.encode_identity(batch["identity"]), k)
    pred = model.audio_to_mouth(batch["mel"])  # [B,K,n_m]
    weights = {s: w for s, w in gt.items() if s != "mouth"}
    fake = model.render(ident, {**weights, "mouth": pred.flatten(0, 1)})
    return {"gt": gt, "pred": pred, "fake": fake, "flat": flat, "ident": ident, "b": b, "k": k}


def sync_term(syncnet, fake: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 12 over every n-frame window of the K rendered frames: (loss, mean cosine score)."""
    from edtalk import losses
    from edtalk.syncnet import sync_windows

    b, k = batch["frames"].shape[:2]
    crop = syncnet.crop_settings
    cut = mouths(
        fake.view(b, k, *fake.shape[1:]),
        batch["landmarks"],
        syncnet.config,
        crop["crop"],
        crop["crop_margin"],
    )
    video, audio = sync_windows(cut, batch["mel"], syncnet.config.n_frames)
    v = syncnet.embed_video(video.flatten(0, 1))
    a = syncnet.embed_audio(audio.flatten(0, 1))
    return losses.sync_loss(a, v), (a * v).sum(-1).mean().detach()


def step(nets: Nets, batch: dict, p: AudioLipParams) -> StepOut:
    from edtalk import losses

    out = forward(nets, batch)
    b, k = out["b"], out["k"]
    fea = losses.mouth_weight_loss(out["pred"], out["gt"]["mouth"].view(b, k, -1))
    rec = F.mse_loss(out["fake"], out["flat"])
    sync, score = sync_term(nets.extras["syncnet"], out["fake"], batch)
    loss = p.w_fea * fea + p.w_rec * rec + p.w_sync * sync
    return StepOut(loss, {"loss": loss, "fea": fea, "rec": rec, "sync": sync, "sync_score": score})


def grid(nets: Nets, batch: dict, p: AudioLipParams) -> dict[str, torch.Tensor]:
    """Identity, GT centre frame, the frame with the mouth from audio, and with its own (GT) mouth weights."""
    out = forward(nets, batch)
    b, k = out["b"], out["k"]
    c = k // 2
    pick = torch.arange(b, device=out["fake"].device) * k + c
    ident = nets.model.encode_identity(batch["identity"])
    gt_render = nets.model.render(ident, {s: w[pick] for s, w in out["gt"].items()})
    return {
        "identity": batch["identity"],
        "ground_truth": batch["frames"][:, c],
        "mouth_from_audio": out["fake"][pick],
        "mouth_from_video": gt_render,
    }


STAGE = Stage(
    name="audio_lip",
    params_cls=AudioLipParams,
    table="segments",
    samples=samples,
    build=build,
    step=step,
    grid=grid,
    upstream=(VISUAL_UPSTREAM, "syncnet"),
)
