"""Stage `expression`: EXLN and the EEM learn expression by self-reconstruction complementary learning (paper
Sec. 3.2, Eq. 8-10); E, G, the trunk, MLN, PLN and EYLN come frozen from `eye`.

For an identity frame I^i and a driving frame I^d of the same segment, the frozen spaces take mouth, pose and eyes
from I^d; the expression weights are averaged over the K frames centred on d (a clean f^{r->e}: expression changes
more slowly than the rest), and the EEM adapts the identity features with it. The result must rebuild I^d:
L1 + perceptual + adversarial, the motion loss (our landmark/latent substitute for EMOCA, edtalk.losses.MotionLoss,
weight 10 as in the paper) and mouth consistency (Eq. 10).

After training, the driver (Stage.finalize) also stores, with the model, the mean expression weights of each
emotion label over the training segments (`EDTalk.emotion_means`), so `edtalk generate --expression happy` works.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.train import data
from pipelines.train.samples_visual import expression_windows
from pipelines.train.stages import FinalizeContext, Nets, Stage, StepOut, edtalk_nets
from pipelines.train.stages.autoencoder import perceptual

log = logging.getLogger(__name__)

FROZEN_SPACES = ("mouth", "pose", "eye")  # taken from the driving frame by the frozen navigation heads


@dataclass
class ExpressionParams:
    """The `expression:` section of params.yaml."""

    steps: int = 40  # optimizer steps
    lr: float = 2e-3  # Adam learning rate of EXLN (head and bank) and the EEM
    d_lr: float = 2e-3  # Adam learning rate of D
    beta1: float = 0.5  # Adam beta1 (both engines)
    beta2: float = 0.99  # Adam beta2 (both engines)
    window: int = 5  # K: frames centred on the driving frame whose expression weights are averaged
    samples_per_segment: int = 4  # (identity, driving window) samples drawn from each segment per pass
    w_rec: float = 1.0  # L1 reconstruction of the driving frame (Eq. 5)
    w_per: float = 1.0  # perceptual loss (Eq. 5)
    w_adv: float = 1.0  # adversarial loss (Eq. 6)
    w_mot: float = 10.0  # motion loss (Eq. 9; our substitute, see edtalk.losses.MotionLoss); paper: 10
    w_mc: float = 1.0  # mouth consistency exp(-cos) (Eq. 10)
    motion_latent_weight: float = 1.0  # motion loss: frozen-E latent term (stands in for EMOCA's emotion net)
    motion_landmark_weight: float = (
        1.0  # motion loss: landmark-region pixel term (stands in for EMOCA geometry)
    )
    motion_sigma: float = 0.06  # motion loss: landmark Gaussian radius, fraction of the image side
    perceptual_scales: tuple[float, ...] = (1.0, 0.5)  # image pyramid of the perceptual loss
    vgg_weights: str = ""  # torchvision-format VGG19 file; "" = $EDTALK_VGG19_WEIGHTS, else random (warned)
    emotion_frames: int = (
        16  # frames per training segment (evenly spaced) behind the per-emotion means; 0 = none
    )

    def __post_init__(self) -> None:
        self.perceptual_scales = tuple(self.perceptual_scales)
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.lr > 0 and self.d_lr > 0, "lr and d_lr must be > 0"),
            (self.window >= 1, "window (K) must be >= 1"),
            (self.samples_per_segment >= 1, "samples_per_segment must be >= 1"),
            (
                min(self.w_rec, self.w_per, self.w_adv, self.w_mot, self.w_mc) >= 0,
                "loss weights must be >= 0",
            ),
            (self.emotion_frames >= 0, "emotion_frames must be >= 0 (0 = no per-emotion means)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"expression params: {message}")
        # MotionLossConfig validates the motion-loss keys with its own clear message.
        self.motion_config()

    def motion_config(self):
        from edtalk.losses import MotionLossConfig

        return MotionLossConfig(
            latent_weight=self.motion_latent_weight,
            landmark_weight=self.motion_landmark_weight,
            sigma=self.motion_sigma,
        )


def samples(p: ExpressionParams, seed: int) -> data.RowFn:
    return expression_windows(p.window, p.samples_per_segment, seed)


def build(model_section: dict, p: ExpressionParams, upstream: dict[str, str]) -> Nets:
    from edtalk.losses import MotionLoss

    extras = {"perceptual": perceptual(p), "motion": MotionLoss(p.motion_config())}
    return edtalk_nets("expression", model_section, upstream["eye"], extras)


def clean_expression(model, window: torch.Tensor) -> torch.Tensor:
    """(B,K,3,S,S) frames -> (B,n_e) expression weights averaged over the K frames (f^{r->e} is linear in them)."""
    b, k = window.shape[:2]
    w = model.extract(window.flatten(0, 1), ("expression",))["expression"]
    return w.view(b, k, -1).mean(1)


def forward(model, batch: dict) -> dict:
    """The generated frame Î^g_e and what the losses need."""
    ident = model.encode_identity(batch["identity"])
    drv = batch["driving"]
    drv_latent, _ = model.encoder(drv)
    weights = model.navigation.weights(drv_latent, FROZEN_SPACES)
    weights["expression"] = clean_expression(model, batch["window"])
    return {
        "ident": ident,
        "drv_latent": drv_latent,
        "weights": weights,
        "fake": model.render(ident, weights),
    }


def step(nets: Nets, batch: dict, p: ExpressionParams) -> StepOut:
    from edtalk import losses

    model = nets.model
    drv = batch["driving"]
    f = forward(model, batch)
    fake = f["fake"]
    rec = losses.l1_reconstruction_loss(fake, drv)
    per = nets.extras["perceptual"](fake, drv)
    adv = losses.generator_adversarial_loss(nets.discriminator(fake))
    fake_latent, _ = model.encoder(fake)  # frozen E: gradients reach the image, not E
    landmarks = batch["landmarks"] * drv.shape[-1]  # fractions of the side -> pixels of this image
    mot = nets.extras["motion"](fake, drv, fake_latent, f["drv_latent"], landmarks)
    # Eq. 10 on the mouth features f^{r->m}: MLN(E(Î)) against MLN(E(I^d)).
    bases = model.navigation.bases()
    fake_mouth = model.navigation.weights(fake_latent, ("mouth",))
    mouth = model.navigation.motion(fake_mouth, bases)["mouth"]
    drv_mouth = model.navigation.motion({"mouth": f["weights"]["mouth"]}, bases)["mouth"]
    mc = losses.mouth_consistency_loss(mouth, drv_mouth.detach())
    loss = p.w_rec * rec + p.w_per * per + p.w_adv * adv + p.w_mot * mot + p.w_mc * mc
    logs = {"loss": loss, "rec": rec, "per": per, "adv": adv, "mot": mot, "mc": mc}
    logs["orthogonality"] = torch.tensor(model.orthogonality_error())
    return StepOut(loss, logs, real=drv, fake=fake)


def grid(nets: Nets, batch: dict, p: ExpressionParams) -> dict[str, torch.Tensor]:
    """identity | driving | output | without_expression (the identity's own expression: what EXLN adds)."""
    model = nets.model
    f = forward(model, batch)
    neutral = {s: f["weights"][s] for s in FROZEN_SPACES}
    return {
        "identity": batch["identity"],
        "driving": batch["driving"],
        "output": f["fake"],
        "without_expression": model.render(f["ident"], neutral),
    }


# ------------------------------------------------------------------------------------ per-emotion mean weights


def emotion_means(model, data_dir: str, segment_ids, frames_per_segment: int) -> dict[str, list[float]]:
    """{emotion: mean expression weights} over the segments `segment_ids` that carry an emotion label.

    Each segment counts once: the mean of its weights over `frames_per_segment` evenly spaced frames, then the
    mean over the segments of each emotion. Streams the segments table (one row group at a time).
    """
    import pyarrow.parquet as pq

    from preprocessing import storage
    from preprocessing.schema import decode_jpeg

    wanted = set(segment_ids)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    device = next(model.parameters()).device
    size = model.config.image_size
    model.eval()
    seen, t0 = 0, time.perf_counter()
    columns = ["segment_id", "emotion", "num_frames", "frames"]
    with torch.no_grad():
        for uri in data.table_files(data_dir, "segments"):
            fs, path = storage.resolve(uri)
            for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=8, columns=columns):
                for row in batch.to_pylist():
                    emotion = (row["emotion"] or "").strip()
                    t = int(row["num_frames"])
                    if row["segment_id"] not in wanted or not emotion or t < 1:
                        continue
                    idx = np.unique(np.linspace(0, t - 1, min(frames_per_segment, t)).round().astype(int))
                    frames = np.stack([decode_jpeg(row["frames"][int(i)]) for i in idx])
                    # The runner's own conversion: [-1, 1] NCHW, resized to the model's side like training batches.
                    x = data.to_model_inputs({"x": torch.from_numpy(frames)}, device, size)["x"]
                    w = model.extract(x, ("expression",))["expression"].double().mean(0)
                    sums[emotion] = sums.get(emotion, 0) + w
                    counts[emotion] = counts.get(emotion, 0) + 1
                    seen += 1
                    if seen % 50 == 0:
                        log.info("emotion means: %d segments in %.1f s", seen, time.perf_counter() - t0)
    means = {e: (sums[e] / counts[e]).float().tolist() for e in sorted(sums)}
    print(
        f"[expression] per-emotion mean expression weights from {seen} training segments: "
        + ", ".join(f"{e} ({counts[e]})" for e in sorted(counts)),
        flush=True,
    )
    return means


def finalize(folder: Path, ctx: FinalizeContext) -> None:
    """Driver side, on the exported model folder: add the per-emotion mean expression weights over the run's
    training segments to the model's meta (`EDTalk.emotion_means`)."""
    from edtalk import EDTalk

    frames = int(ctx.params.emotion_frames)
    if frames == 0:
        return
    model = EDTalk.from_pretrained(folder)
    model.emotion_means = emotion_means(model, ctx.data_dir, ctx.train_ids, frames)
    if not model.emotion_means:
        log.warning(
            "expression: no training segment carries an emotion label; the model stores no emotion means"
        )
    model.save_pretrained(folder)


STAGE = Stage(
    name="expression",
    params_cls=ExpressionParams,
    table="segments",
    samples=samples,
    build=build,
    step=step,
    grid=grid,
    upstream=("eye",),
    finalize=finalize,
    adversarial=True,
)
