"""The generator's mouth-local latent directions: where in G's latent space a move changes the mouth and little else.

At a latent code z (the autoencoder's: E(identity) + the LIA motion of a driving frame), G's Jacobian J = dG/dz maps a
small move d to a pixel change J d. Its energy inside a mouth mask M over its energy in the whole frame is
    share(d) = d^T (J^T M J) d / d^T (J^T J) d,
and the directions with the largest share, pooled over frames (A = sum J^T M J, B = sum J^T J), are the generalised
eigenvectors of (A, B). The autoencoder stage stores them with its model (`autoencoder.local_frames`), and
`mouth_pose.mouth_bases: local` starts MLN's bases there and holds them, so that swapping mouth weights can only move
G along directions it renders inside the mouth (docs/training.md, "Mouth-local bases"). Ours, not the paper's.

J is taken by central differences (G's warping, grid_sample, has no forward-mode derivative): 2 D renders a frame,
in chunks. Memory: the (3 S^2, D) Jacobian of one frame in float32 (tiny preset 3 MB; paper preset, S=256 and D=512,
400 MB), multiplied out in float64 slices of ROWS rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FILE = "mouth_directions.safetensors"  # in the autoencoder's model folder, next to model.safetensors
ROWS = 16384  # Jacobian rows per float64 product


def generator_jacobian(
    model, code: torch.Tensor, features: list[torch.Tensor], eps: float = 1e-2, chunk: int = 64
) -> torch.Tensor:
    """dG/dz at one latent `code` (D,), by central differences: (3*S*S, D) float32."""
    d = code.shape[0]
    eye = torch.eye(d, dtype=code.dtype, device=code.device)
    cols = []
    with torch.no_grad():
        for start in range(0, d, chunk):
            e = eye[start : start + chunk] * eps
            n = e.shape[0]
            feats = [f.expand(2 * n, *f.shape[1:]) for f in features]
            out = model.generator(torch.cat([code + e, code - e]), feats)
            cols.append(((out[:n] - out[n:]).reshape(n, -1) / (2 * eps)).t())
    return torch.cat(cols, dim=1).float()


def jacobian_sums(
    model,
    identities: torch.Tensor,
    frames: torch.Tensor,
    masks: torch.Tensor,
    eps: float = 1e-2,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled sums (A, B) = (sum J^T M J, sum J^T J) over frames, each (D, D) float64, returned on the CPU.

    identities, frames: (N,3,S,S) in [-1, 1] (frame k rendered from identity k, as the autoencoder renders it);
    masks: (N,1,S,S) in [0, 1], frame k's mouth region. Sums from several calls (batches, ranks) add up.
    progress: log every 8th frame (off for the training term's small batches, which log once per renewal).
    """
    if (
        frames.dim() != 4
        or identities.shape != frames.shape
        or masks.shape != (frames.shape[0], 1, *frames.shape[2:])
    ):
        raise ValueError(
            "local_directions: identities and frames must be (N,3,S,S) and masks (N,1,S,S), got "
            f"{tuple(identities.shape)}, {tuple(frames.shape)}, {tuple(masks.shape)}"
        )
    if frames.shape[0] < 1:
        raise ValueError("local_directions: needs at least one frame")
    # each module's own mode back afterwards: a training run keeps its frozen modules in eval mode
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    a = b = None
    try:
        with torch.no_grad():
            for k in range(frames.shape[0]):
                if k == 0 or not torch.equal(identities[k], identities[k - 1]):  # one per segment
                    latent, feats = model.encoder(identities[k : k + 1])
                drv, _ = model.encoder(frames[k : k + 1])
                code = (latent + model.lia.motion(model.lia.weights(drv)))[0]
                jac = generator_jacobian(model, code, feats, eps)
                m = masks[k].expand(3, -1, -1).reshape(-1, 1)
                if a is None:
                    a = torch.zeros(jac.shape[1], jac.shape[1], dtype=torch.float64, device=jac.device)
                    b = torch.zeros_like(a)
                for r in range(0, jac.shape[0], ROWS):  # float64 products, a bounded slice of rows at a time
                    jr, mr = jac[r : r + ROWS].double(), m[r : r + ROWS].double()
                    a += jr.t() @ (mr * jr)
                    b += jr.t() @ jr
                done = k + 1  # progress: at the paper preset a frame's Jacobian takes 1,024 renders at 256 px
                if progress and (done % 8 == 0 or done == frames.shape[0]):
                    log.info("mouth-local directions: Jacobians of %d/%d frames", done, frames.shape[0])
    finally:
        for m, training in modes:
            m.train(training)
    return a.cpu(), b.cpu()


def directions_from_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalised eigenvectors of (A, B) (jacobian_sums): (directions (D, D) float32, unit columns, most local
    first; shares (D,) float64, the pooled in-mask share of each column's rendered change)."""
    a, b = a.double(), b.double()
    d = a.shape[0]
    # B is positive definite unless G ignores some latent direction entirely; a tiny ridge keeps it invertible.
    ridge = 1e-9 * float(torch.diagonal(b).mean()) * torch.eye(d, dtype=b.dtype)
    chol = torch.linalg.cholesky(b + ridge)
    inv = torch.linalg.inv(chol)
    shares, vecs = torch.linalg.eigh(inv @ a @ inv.t())
    dirs = inv.t() @ vecs  # generalised eigenvectors: A x = share B x
    order = torch.argsort(shares, descending=True)
    dirs, shares = dirs[:, order], shares[order]
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    return dirs.float(), shares


def local_directions(
    model, identities: torch.Tensor, frames: torch.Tensor, masks: torch.Tensor, eps: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mouth-local latent directions of `model`'s generator, pooled over frames (inputs as `jacobian_sums`).
    Returns (directions (D, D) float32, unit columns, most local first; shares (D,) float64)."""
    return directions_from_sums(*jacobian_sums(model, identities, frames, masks, eps))


def autoencoder_directions(
    model, data_dir: str, segment_ids, frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`local_directions` over `frames` frames spread evenly over the training segments `segment_ids` (each frame
    rendered from its segment's first frame, its mouth region from its landmarks as the swap pairs' masks are)."""
    from pipelines.train import data
    from preprocessing.schema import decode_jpeg

    ids_sorted = sorted(set(segment_ids))
    if not ids_sorted:
        raise ValueError("autoencoder.local_frames: the run has no training segments to take frames from")
    # at most `frames` segments, spread over the sorted ids, and as many frames from each as makes `frames`
    pick = np.unique(np.linspace(0, len(ids_sorted) - 1, min(frames, len(ids_sorted))).round().astype(int))
    wanted = {ids_sorted[int(i)] for i in pick}
    per_segment = max(1, -(-frames // len(wanted)))

    def row_samples(row: dict) -> list[dict]:
        t = int(row["num_frames"])
        if t < 1:
            return []
        lm = data.f32_array(row["landmarks"], (t, 68, 2))
        first = decode_jpeg(row["frames"][0])
        return [
            {
                "id": first,
                "drv": decode_jpeg(row["frames"][int(i)]),
                "m": data._region_mask(lm[i], "mouth", first.shape[0]),
            }
            for i in np.unique(np.linspace(0, t - 1, min(per_segment, t)).round().astype(int))
        ]

    samples = data.local_samples(
        data_dir, "segments", sorted(wanted), {}, row_samples, frames, ["num_frames", "frames", "landmarks"]
    )
    if not samples:
        raise ValueError(f"autoencoder.local_frames: none of the {len(wanted)} training segments has frames")
    size = model.config.image_size
    x = data.to_model_inputs(
        {k: torch.from_numpy(np.stack([r[k] for r in samples])) for k in ("id", "drv", "m")},
        torch.device("cpu"),
        size,
    )
    t0 = time.perf_counter()
    dirs, shares = local_directions(model, x["id"], x["drv"], x["m"])
    print(
        f"[autoencoder] mouth-local latent directions from {len(samples)} frames of {len(wanted)} training segments in "
        f"{time.perf_counter() - t0:.1f} s; in-mouth share of the first five: "
        + ", ".join(f"{float(s):.3f}" for s in shares[:5]),
        flush=True,
    )
    return dirs, shares


def save(folder: Path, dirs: torch.Tensor, shares: torch.Tensor, frames: int) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / FILE
    save_file(
        {"directions": dirs.contiguous(), "shares": shares.float().contiguous()},
        str(path),
        metadata={
            "frames": str(frames),
            "what": "generator mouth-local latent directions (columns, most local first)",
        },
    )
    return path


def load(model_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (D, D), shares (D,)) stored with an autoencoder model folder (a path or a storage URI)."""
    from safetensors.torch import load as load_bytes

    from preprocessing import storage

    uri = storage.join(str(model_dir), FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"mouth_pose.mouth_bases=local needs {uri}: the autoencoder stores its mouth-local directions only when "
            "trained with autoencoder.local_frames > 0; retrain it so (or set mouth_pose.mouth_bases=learned)"
        )
    t = load_bytes(storage.read_bytes(uri))
    return t["directions"], t["shares"]
