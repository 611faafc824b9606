"""Stage `syncnet`: the lip-sync expert, trained here on our own data (no upstream stage: it needs no visual model).

A sample is `n_frames` consecutive face crops of one segment and one mel window: the window of the centre frame
(in sync, label 1) or of a frame at least `min_shift` frames away in the same segment (off sync, label 0). The
mouths are cut in the step (`edtalk.syncnet.crop_mouths`: around the mouth landmarks, or the lower half of the
crop), SyncNet scores the pair with the cosine of its two unit embeddings, trained by BCE against the label.

Output: models/syncnet holds the SyncNet alone (`syncnet.safetensors` + `syncnet.json`: its config and how its
mouths were cropped), not a whole EDTalk, so this stage needs no visual model and runs beside the visual stages.
`audio_lip` lists it as an upstream and copies the weights into its EDTalk's `syncnet` (`load_syncnet` checks
that the configs agree); from there on every stage folder carries the trained SyncNet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.train import samples_audio
from pipelines.train.data import RowFn
from pipelines.train.stages import Nets, Stage, StepOut

WEIGHTS = "syncnet.safetensors"
META = "syncnet.json"
FORMAT = "edtalk-syncnet"
CROPS = ("landmarks", "lower_half")


@dataclass
class SyncNetParams:
    """The `syncnet:` section of params.yaml."""

    steps: int = 30  # optimizer steps
    n_frames: int = 5  # frames per sample; must equal the model's syncnet.n_frames (checked when building)
    lr: float = 1e-3  # Adam learning rate of both SyncNet branches
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    pairs_per_segment: int = 16  # samples drawn from each segment per pass, half in sync and half shifted
    min_shift: int = 5  # off-sync samples take the mel window of a frame at least this many frames away
    crop: str = "landmarks"  # mouth crops: around the mouth landmarks, or the lower half of the face crop
    crop_margin: float = 1.6  # landmark crops: box width / mouth width

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.pairs_per_segment < 2:
            raise ValueError("syncnet params: steps >= 1, lr > 0 and pairs_per_segment >= 2 are required")
        if self.n_frames < 1 or self.n_frames % 2 == 0:
            raise ValueError(f"syncnet params: n_frames must be odd (a centre frame), got {self.n_frames}")
        if self.min_shift < 1:
            raise ValueError(f"syncnet params: min_shift must be >= 1 frame, got {self.min_shift}")
        if self.crop not in CROPS:
            raise ValueError(f"syncnet params: crop must be one of {CROPS}, got {self.crop!r}")
        if self.crop_margin <= 0:
            raise ValueError(f"syncnet params: crop_margin must be > 0, got {self.crop_margin}")


def mouths(
    frames: torch.Tensor, landmarks: torch.Tensor | None, cfg, crop: str, margin: float
) -> torch.Tensor:
    """Face crops [B,K,3,S,S] (+ landmarks [B,K,68,2] as fractions of the side) -> mouth crops [B,K,3,h,w]."""
    from edtalk.syncnet import crop_mouths

    size = (cfg.mouth_height, cfg.mouth_width)
    if crop != "landmarks":
        return crop_mouths(frames, size, None, margin)
    return crop_mouths(frames, size, landmarks * frames.shape[-1], margin)


def samples(p: SyncNetParams, seed: int) -> RowFn:
    return samples_audio.sync_pairs(p.n_frames, p.pairs_per_segment, p.min_shift, seed)


def _config(model_section: dict):
    from edtalk import ModelConfig

    cfg = ModelConfig.from_params(model_section).syncnet
    if cfg is None:
        raise ValueError(
            "stage syncnet: the model config builds no SyncNet (model.overrides.syncnet is None)"
        )
    return cfg


def build(model_section: dict, p: SyncNetParams, upstream: dict[str, str]) -> Nets:
    from edtalk.syncnet import SyncNet

    cfg = _config(model_section)
    if cfg.n_frames != p.n_frames:
        raise ValueError(
            f"syncnet params: n_frames={p.n_frames} but the model's SyncNet takes {cfg.n_frames} frames; set "
            f"syncnet.n_frames={cfg.n_frames} (sample building cannot read the model section)"
        )
    net = SyncNet(cfg)
    # Kept on the module so `export` can record how mouths were cut: audio_lip must cut them the same way.
    net.crop_settings = {"crop": p.crop, "crop_margin": p.crop_margin}
    return Nets(model=net, trainable=list(net.parameters()))


def step(nets: Nets, batch: dict, p: SyncNetParams) -> StepOut:
    from edtalk import losses

    net = nets.model
    crops = mouths(batch["frames"], batch["landmarks"], net.config, p.crop, p.crop_margin)
    score = net(crops, batch["mel"])
    label = batch["in_sync"].to(score.dtype)
    loss = losses.sync_bce_loss(score, label)
    with torch.no_grad():
        acc = ((score > 0.5).to(score.dtype) == label).to(score.dtype).mean()
    logs = {"loss": loss, "accuracy": acc}
    if not net.training:  # validation: mean score per label (shuffled training batches may lack one)
        for name, mask in (("score_in_sync", label > 0.5), ("score_off_sync", label < 0.5)):
            if mask.any():
                logs[name] = score[mask].mean()
    return StepOut(loss, logs)


def grid(nets: Nets, batch: dict, p: SyncNetParams) -> dict[str, torch.Tensor]:
    """The centre face crop and the mouth strip SyncNet sees (its frames side by side, at the face's height)."""
    frames = batch["frames"]
    crops = mouths(frames, batch["landmarks"], nets.model.config, p.crop, p.crop_margin)
    b, k, c, h, w = crops.shape
    s = frames.shape[-1]
    strip = crops.permute(0, 2, 3, 1, 4).reshape(b, c, h, k * w)
    strip = F.interpolate(strip, size=(s, round(k * w * s / h)), mode="bilinear", align_corners=False)
    return {"centre_frame": frames[:, k // 2], "mouths": strip}


def export(nets: Nets, folder) -> None:
    """models/syncnet: the SyncNet weights + config, and how its mouths were cropped (later stages must crop so)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in nets.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": 1, "config": nets.model.config.to_dict()}
    meta.update(getattr(nets.model, "crop_settings", {}))
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_syncnet(folder: str | Path, expected=None):
    """models/syncnet (a path or URI) -> (SyncNet, crop settings {"crop", "crop_margin"}). With `expected` (a SyncNetConfig, e.g.
    the one inside an EDTalk), a config that differs is a clear error instead of a shape mismatch later."""
    from safetensors.torch import load_file

    from edtalk.syncnet import SyncNet, SyncNetConfig
    from preprocessing import storage

    local = storage.local_path_or_none(str(folder))
    if local is None:  # workers on other nodes read it from object storage
        import tempfile

        local = storage.download(str(folder), tempfile.mkdtemp(prefix="edtalk-syncnet-"))
    folder = Path(local)
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        raise FileNotFoundError(
            f"{folder} is not a trained SyncNet folder (needs {WEIGHTS} and {META}): run `edtalk train syncnet`"
        )
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META}: format {meta.get('format')!r} is not {FORMAT!r}")
    cfg = SyncNetConfig.from_dict(meta["config"])
    if expected is not None and cfg.to_dict() != expected.to_dict():
        raise ValueError(
            f"the SyncNet in {folder} was trained with config {cfg.to_dict()}, but this model's syncnet config is "
            f"{expected.to_dict()}: train syncnet with the same `model:` section as the visual stages"
        )
    net = SyncNet(cfg)
    net.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    crop = {"crop": meta.get("crop", "landmarks"), "crop_margin": float(meta.get("crop_margin", 1.6))}
    return net, crop


STAGE = Stage(
    name="syncnet",
    params_cls=SyncNetParams,
    table="segments",
    samples=samples,
    build=build,
    step=step,
    grid=grid,
    export=export,
)
