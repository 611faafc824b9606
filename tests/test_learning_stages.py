"""Learning (issue 5): the product's training stages, run through `pipelines.train.runner.run_stage` (Ray Train +
DeepSpeed, 1 worker) on a tiny SynthTalk set, must learn what each stage is for, measured against SynthTalk's
known factors and compared with golden values kept in tests/golden/learning.json (with tolerances):

- autoencoder: the L1 reconstruction loss falls (mean of the first vs the last progress windows); at the full
  budget it also follows the driving frame better than a copy of the source, and renders a mouth-only change
  (pose-matched open/closed pairs) inside the mouth, the condition for a mouth space;
- mouth_pose: swapping the mouth weights of two frames changes pixels mostly inside the mouth region (a dilated
  hull of the segment's mouth landmarks), swapping the pose weights changes the face well beyond it;
- audio_lip: the mouth weights predicted from audio, projected by a ridge fit on training frames, predict the true
  `mouth_open` of held-out frames (R²), far better than the untrained audio module does.

(audio_pose samples differing across seeds yet staying in range: tests/test_train_audio_stages.py.)

Regenerate the golden values after an intended change of the model or the stages:
`pytest tests/test_learning_stages.py --update-golden` (docs/training.md, "Learning tests").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PARAMS = str(REPO / "params.yaml")
GOLDEN = Path(__file__).resolve().parent / "golden" / "learning.json"
MOUTH = slice(48, 68)  # 68-point convention: outer + inner lip

# Smallest settings found to learn reliably within the budget: 64 px crops, one worker, one torch thread, the
# perceptual loss on the half-size pyramid level only (VGG19 at 64 px is most of a step's cost on CPU).
DATA = {"identities": 3, "seconds": 4.0, "crop": 64, "pairs_per_segment": 8}
TRAIN = {
    "train.workers": 1,
    "train.cpus_per_worker": 1,
    "train.torch_threads": 1,
    "train.batch_size": 4,
    "train.log_every": 5,
    "train.checkpoint_every": 1000,
    "train.sample_every": 0,
    "train.hash_inputs": False,
    "train.seed": 0,
}
STAGES = {
    "autoencoder": {"steps": 60, "pairs_per_segment": 16, "perceptual_scales": [0.5]},
    "mouth_pose": {"steps": 40, "lr": 0.01, "perceptual_scales": [0.5]},
    "eye": {"steps": 1, "perceptual_scales": [0.5]},
    "expression": {"steps": 1, "perceptual_scales": [0.5], "emotion_frames": 4},
    "syncnet": {"steps": 2, "pairs_per_segment": 8},
    "audio_lip": {"steps": 40, "lr": 0.003, "clips_per_segment": 16},
}
# The full budget (EDTALK_LEARNING_FULL=1; about 24 min on 2 CPUs, not in CI): enough autoencoder steps for the generator
# to render the driving motion (below ~500 steps its output barely follows the driving frame, so MLN and PLN would
# have no mouth or pose to separate), with the landmark mouth-shape term and the mouth-region L1 so that its motion
# code holds the mouth too (without them it renders under 1% of a mouth-only change; docs/training.md, "The
# mouth-shape term"), and for its last 300 steps the locality term (docs/training.md, "The locality term"), then
# the stages that rely on it. CI runs the short budget above, which checks only that reconstruction falls.
FULL = os.environ.get("EDTALK_LEARNING_FULL") == "1"
if FULL:
    STAGES = {
        **STAGES,
        "autoencoder": {
            "steps": 2300,
            "lr": 0.003,
            "w_adv": 0.02,
            "w_mouth": 1.0,
            "w_shape": 3.0,
            "w_local": 0.1,
            "local_start": 2000,
            "local_every": 100,
            "local_frames": 16,
            "pairs_per_segment": 64,
            "perceptual_scales": [0.5],
        },
        "mouth_pose": {
            "steps": 200,
            "lr": 0.01,
            "mouth_bases": "local",
            "w_region": 10.0,
            "perceptual_scales": [0.5],
        },
        "audio_lip": {"steps": 200, "lr": 0.003, "clips_per_segment": 16},
    }
    # Three mouth bases: SynthTalk's mouth has one factor, and beyond its first few the frozen generator's
    # mouth-local directions are not local (in-mouth shares 0.54, 0.34, 0.22, 0.20, ... over 16 training frames).
    TRAIN = {**TRAIN, "train.log_every": 50, "model.overrides": "{navigation: {mouth: 3}}"}
    GOLDEN = GOLDEN.with_name("learning_full.json")
    # The autoencoder fixture alone trains for ~13 min on 2 idle CPUs, longer on a busy machine: past the suite's
    # 900 s per-test timeout (pyproject.toml), which would fail the run's first test at setup.
    pytestmark = [pytestmark, pytest.mark.timeout(3600)]
full_only = pytest.mark.skipif(not FULL, reason="needs the full budget: EDTALK_LEARNING_FULL=1")
# The known failure of the full budget (strict: a fix shows up as XPASS), scored on the training speakers. Why
# (measured in a plain loop with the stages' own build/step and through run_stage; docs/training.md, "Why MLN
# collapses", "The mouth-shape term", "Mouth-local bases" and "The locality term"): for pose-matched open/closed
# pairs (`mouth_change` below) 64-71% of the real change's energy lies inside the mouth. Without the mouth terms
# the autoencoder's renders of the two frames differ there by under 1% of it. With them (w_shape 3, w_mouth 1, 2000
# steps) it renders 0.33 / 0.50 of that energy, but only 0.28 / 0.20 of its rendered change lies inside the mouth;
# 300 more steps with the locality term (w_local 0.1, each renewal of its directions pooled over 4 batches, 16
# frames) raise that to 0.39 / 0.31 (floor 0.4; 0.31 / 0.26 from one batch's 4 frames; 0.40 / 0.41 in the plain
# loop with 16 training frames) and G's three most mouth-local directions from in-mouth shares 0.47, 0.31, 0.30 to
# 0.88, 0.75, 0.72. MLN held at those directions (mouth_bases local) then swaps mouths with 0.70 / 0.65 of the
# change inside the mouth (floor 0.6; 0.60 / 0.34 without the term; learned from scratch 0.08), so the mouth swap
# test passes.
# Also tried for the autoencoder's locality: mouth_pose.w_region alone, paint_scales, mouth-directed pairs
# (autoencoder.mouth_contrast, mouth_swap), 4000 autoencoder steps, E and G trained in mouth_pose, an in-batch
# contrastive feature loss, a mouth-shape term for MLN, swap-target and locality terms for MLN, a locality term for
# the autoencoder on pasted mouths, a lower-face swap region.
KNOWN_FAILURE = (
    "the autoencoder's render of a mouth-only change is not local enough (0.39 / 0.31 of it inside the mouth with "
    "the locality term, 0.28 / 0.20 without; floor 0.4)"
)
known_failure = pytest.mark.xfail(reason=KNOWN_FAILURE, strict=True)
# Hard floors that hold whatever the golden file says: a test against them can fail.
FLOORS = {
    "ae_rec_ratio_max": 0.8,
    "ae_rec_over_copy_max": 0.9,
    "ae_mouth_energy_min": 0.25,
    "ae_mouth_inside_min": 0.4,
    "mouth_inside_min": 0.6,
    "pose_outside_min": 0.6,
    "lip_r2_min": 0.25,
    "lip_fidelity_min": 0.5,
}


class Golden:
    """tests/golden/learning.json: {name: {"value": x, "tol": t}} plus the settings that produced them."""

    def __init__(self, update: bool) -> None:
        self.update = update
        self.doc = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"values": {}}
        if not update and self.doc.get("params") not in (None, settings()):
            pytest.fail(
                f"{GOLDEN} was made with other settings than this test's; regenerate it with --update-golden"
            )

    def check(self, name: str, value: float, tol: float) -> None:
        """Compare `value` with the golden one (|diff| <= tol), or record it when updating."""
        assert math.isfinite(value), f"{name} is not finite: {value}"
        values = self.doc.setdefault("values", {})
        if self.update:
            values[name] = {"value": round(float(value), 5), "tol": tol}
            self.doc["params"] = settings()
            GOLDEN.parent.mkdir(parents=True, exist_ok=True)
            GOLDEN.write_text(json.dumps(self.doc, indent=1, sort_keys=True) + "\n")
            return
        if name not in values:
            pytest.fail(f"{GOLDEN} has no value {name!r}; regenerate it with --update-golden")
        want = values[name]
        assert abs(value - want["value"]) <= want["tol"], (
            f"{name} = {value:.4f}, golden {want['value']:.4f} +- {want['tol']} ({GOLDEN})"
        )


def settings() -> dict:
    return {"data": DATA, "train": TRAIN, "stages": STAGES}


@pytest.fixture(scope="module")
def golden(request) -> Golden:
    return Golden(bool(request.config.getoption("--update-golden", default=False)))


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory, local_ray) -> Path:
    """SynthTalk (3 speakers, one 4 s clip each, the last in val) -> `edtalk preprocess` tables, 64 px crops."""
    from preprocessing.params import PreprocessParams
    from preprocessing.pipeline import run
    from preprocessing.synthtalk import SynthConfig, generate_set

    root = tmp_path_factory.mktemp("learning-data")
    cfg = SynthConfig.from_dict(
        {
            "identities": DATA["identities"],
            "clips_per_identity": 1,
            "seconds": DATA["seconds"],
            "val_identities": 1,
            "test_identities": 0,
        }
    )
    generate_set(cfg, root / "raw")
    params = PreprocessParams(
        size=DATA["crop"], landmark_backend="sidecar", workers=1, pairs_per_segment=DATA["pairs_per_segment"]
    )
    run(str(root / "raw"), str(root / "processed"), params, progress=False)
    return root / "processed"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("learning-run")


def train(stage: str, data: Path, out: Path) -> dict:
    from pipelines.train.runner import run_stage

    values = {
        "train.data_dir": data,
        "train.models_dir": out / "models",
        "train.metrics_dir": out / "metrics",
        "train.storage_path": out / "ray",
        **TRAIN,
        **{f"{stage}.{k}": v for k, v in STAGES[stage].items()},
    }
    return run_stage(
        stage, PARAMS, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]
    )


@pytest.fixture(scope="module")
def autoencoder(learn_data, tracking, out) -> dict:
    return train("autoencoder", learn_data, out)


@pytest.fixture(scope="module")
def mouth_pose(autoencoder, learn_data, out) -> dict:
    return train("mouth_pose", learn_data, out)


@pytest.fixture(scope="module")
def audio_lip(mouth_pose, learn_data, out) -> dict:
    # eye and expression only carry the model forward here (1 step each; mouth and pose stay frozen in both).
    for stage in ("eye", "expression", "syncnet"):
        train(stage, learn_data, out)
    return train("audio_lip", learn_data, out)


def segments(data: Path, split: str | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    from preprocessing.schema import decode_segment

    rows = pq.read_table(data / "segments").to_pylist()
    return [
        decode_segment(r) for r in sorted(rows, key=lambda r: r["segment_id"]) if split in (None, r["split"])
    ]


def images(frames: np.ndarray):
    import torch

    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ autoencoder


def test_autoencoder_reconstruction_falls(autoencoder, tracking, golden):
    from mlflow import MlflowClient

    history = sorted(
        MlflowClient(tracking).get_metric_history(autoencoder["run_id"], "rec"), key=lambda m: m.step
    )
    curve = [m.value for m in history]  # each: the mean over one progress window (train.log_every steps)
    assert len(curve) == STAGES["autoencoder"]["steps"] // TRAIN["train.log_every"], curve
    first, last = float(np.mean(curve[:2])), float(np.mean(curve[-2:]))
    ratio = last / first
    print(
        f"autoencoder rec curve {np.round(curve, 4).tolist()}: first {first:.4f} last {last:.4f} ratio {ratio:.3f}"
    )
    assert ratio <= FLOORS["ae_rec_ratio_max"], f"reconstruction did not fall: {curve}"
    golden.check("autoencoder.rec_first", first, 0.05)
    golden.check("autoencoder.rec_last", last, 0.04)
    golden.check("autoencoder.rec_ratio", ratio, 0.15)


@full_only
def test_autoencoder_renders_the_driving_motion(autoencoder, learn_data, out, golden):
    """Rendering frame i's identity with frame j's motion lands closer to frame j than frame i itself is (the
    copy-the-source level). Scored on a training speaker: two training speakers teach motion, not identities, so the
    held-out speaker's number is printed but not held to the floor."""
    import torch

    from edtalk import EDTalk

    model = EDTalk.from_pretrained(out / "models" / "autoencoder").eval()
    ratios = {}
    for split in ("train", "val"):
        frames = images(segments(learn_data, split)[0]["frames"])
        idx = np.random.default_rng(0).choice(len(frames), size=(16, 2), replace=False)
        src, drv = frames[idx[:, 0]], frames[idx[:, 1]]
        with torch.no_grad():
            rec = float((model.reconstruct_lia(src, drv) - drv).abs().mean())
        copy = float((src - drv).abs().mean())
        ratios[split] = rec / copy
        print(f"autoencoder on {split}: L1 to the driving frame {rec:.4f}, copy-the-source level {copy:.4f}")
    assert ratios["train"] <= FLOORS["ae_rec_over_copy_max"], (
        f"the output does not follow the driving frame: rec/copy {ratios}"
    )
    golden.check("autoencoder.train_rec_over_copy", ratios["train"], 0.12)


# ------------------------------------------------------------------------------------------------- mouth_pose


def mouth_mask(landmarks: np.ndarray, size: int, dilate: float = 0.35) -> np.ndarray:
    """A float (S,S) mask: the convex hull of the mouth landmarks, dilated by `dilate` x the mouth width."""
    import cv2

    pts = landmarks[MOUTH].astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, np.round(pts).astype(np.int32), 1)
    width = float(pts[:, 0].max() - pts[:, 0].min())
    r = max(1, int(round(dilate * width)))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return mask.astype(np.float64)


def energy_map(x, y) -> np.ndarray:
    """Per-pixel squared change between two images (3, S, S) -> (S, S) float64."""
    return ((x - y) ** 2).sum(0).double().numpy()


def share_inside(energy: np.ndarray, mask: np.ndarray) -> float:
    """The share of an energy map that falls inside a (soft) mask."""
    return float((energy * mask).sum() / max(energy.sum(), 1e-12))


def pose_matched_pairs(seg: dict, count: int = 10, min_open_gap: float = 0.4) -> list[tuple[int, int]]:
    """(open, closed) frame pairs of one SynthTalk segment that differ mostly in the mouth: of the pairs whose
    `mouth_open` differs by more than `min_open_gap` and whose eyes agree (both blinks within 0.2), the `count`
    whose head poses (yaw, pitch, roll, tx, ty, each standardised over the segment) are nearest."""
    f = seg["factors"]
    opening = np.asarray(f["mouth_open"], np.float64)
    blink = np.stack([np.asarray(f[k], np.float64) for k in ("blink_left", "blink_right")], 1)
    pose = np.stack([np.asarray(f[k], np.float64) for k in ("yaw", "pitch", "roll", "tx", "ty")], 1)
    pose = (pose - pose.mean(0)) / (pose.std(0) + 1e-9)
    n = len(opening)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ok = (opening[i] - opening[j] > min_open_gap) & (np.abs(blink[i] - blink[j]).max(-1) < 0.2)
    dist = np.linalg.norm(pose[i] - pose[j], axis=-1)
    order = np.argsort(np.where(ok, dist, np.inf), axis=None)[:count]
    return [(int(i.flat[k]), int(j.flat[k])) for k in order if ok.flat[k]]


def mouth_change(seg: dict, model=None) -> dict[str, float]:
    """Over `pose_matched_pairs` (a open, b closed), inside the closed frame's dilated mouth hull (mouth_mask): the
    share of the real change's squared pixel energy, and with a model, the share of the change between the
    autoencoder's renders of a and b (identity: the segment's first frame, motion through E and the LIA bank) and
    the energy of that rendered change inside the mask over the real one's (1: the autoencoder renders the whole
    mouth change; a mouth space cut from its motion code cannot render more)."""
    import torch

    frames = images(seg["frames"])
    size = frames.shape[-1]
    pairs = pose_matched_pairs(seg)
    assert pairs, f"segment {seg['segment_id']} has no open/closed pair with matching head poses"
    real, ae, energy = [], [], []
    for a, b in pairs:
        mask = mouth_mask(seg["landmarks"][b], size)
        e_real = energy_map(frames[a], frames[b])
        real.append(share_inside(e_real, mask))
        if model is not None:
            with torch.no_grad():
                r = model.reconstruct_lia(frames[:1].expand(2, -1, -1, -1), frames[[a, b]])
            e_ae = energy_map(r[0], r[1])
            ae.append(share_inside(e_ae, mask))
            energy.append(float((e_ae * mask).sum() / max((e_real * mask).sum(), 1e-12)))
    out = {"pairs": len(pairs), "real_inside": float(np.mean(real))}
    if model is not None:
        out.update(render_inside=float(np.mean(ae)), render_energy_over_real=float(np.mean(energy)))
    return out


def test_pose_matched_pairs_differ_mostly_in_the_mouth(learn_data):
    """The probe of the autoencoder's mouth (test_autoencoder_renders_mouth_changes) is only meaningful if its
    pairs differ mostly in the mouth: most of their real pixel change falls inside the test's mouth mask (SynthTalk
    drops the jaw with the mouth, so not all of it), and far more than for pairs drawn at random."""
    for seg in segments(learn_data, "train"):
        probe = mouth_change(seg)
        frames = images(seg["frames"])
        rng = np.random.default_rng(0)
        rand = [
            share_inside(energy_map(frames[a], frames[b]), mouth_mask(seg["landmarks"][b], frames.shape[-1]))
            for a, b in rng.choice(len(frames), size=(10, 2), replace=False)
        ]
        print(f"{seg['segment_id']}: {probe}; random pairs' real change inside the mouth {np.mean(rand):.3f}")
        assert probe["pairs"] == 10
        assert probe["real_inside"] >= 0.5 and probe["real_inside"] > 2 * np.mean(rand), (probe, rand)


@full_only
@known_failure
def test_autoencoder_renders_mouth_changes(autoencoder, learn_data, out):
    """Upstream of the mouth_pose test: a mouth space is cut out of the autoencoder's motion code, so the
    autoencoder must render a mouth-only change (pose-matched open/closed pairs) itself: at least a quarter of the
    real change's energy inside the mouth, and mostly there. Scored on the training speakers."""
    from edtalk import EDTalk

    model = EDTalk.from_pretrained(out / "models" / "autoencoder").eval()
    probes = [mouth_change(seg, model) for seg in segments(learn_data, "train")]
    for probe in probes:
        print(f"autoencoder on mouth-only changes: {probe}")
    energy = float(np.mean([p["render_energy_over_real"] for p in probes]))
    inside = float(np.mean([p["render_inside"] for p in probes]))
    assert energy >= FLOORS["ae_mouth_energy_min"], (
        f"the autoencoder renders {energy:.3f} of a mouth-only change's energy inside the mouth ({probes})"
    )
    assert inside >= FLOORS["ae_mouth_inside_min"], (
        f"the autoencoder's render of a mouth-only change falls mostly outside the mouth ({probes})"
    )


def swap_energy(model, seg: dict, pairs: int = 8) -> dict[str, float]:
    """Render frame i with the mouth (or the pose) weights of frame j; the share of the squared pixel change that
    falls inside i's dilated mouth hull. Pairs: the most closed mouths with the most open ones."""
    import torch

    frames = images(seg["frames"])
    size = frames.shape[-1]
    opening = np.asarray(seg["factors"]["mouth_open"], np.float64)
    order = np.argsort(opening)
    lo, hi = order[:pairs], order[::-1][:pairs]
    with torch.no_grad():
        ident = model.encode_identity(frames[:1])
        w = model.extract(frames, ("mouth", "pose"))
        inside = {"mouth": [0.0, 0.0], "pose": [0.0, 0.0]}
        area = []
        for i, j in zip(lo, hi, strict=True):
            mask = mouth_mask(seg["landmarks"][i], size)
            area.append(mask.mean())
            base = model.render(ident, {"mouth": w["mouth"][i : i + 1], "pose": w["pose"][i : i + 1]})
            for space in ("mouth", "pose"):
                swapped = {s: w[s][(j if s == space else i) : (j if s == space else i) + 1] for s in w}
                energy = energy_map(model.render(ident, swapped)[0], base[0])
                inside[space][0] += float((energy * mask).sum())
                inside[space][1] += float(energy.sum())
    return {
        "mouth_inside": inside["mouth"][0] / max(inside["mouth"][1], 1e-12),
        "pose_inside": inside["pose"][0] / max(inside["pose"][1], 1e-12),
        "mask_area": float(np.mean(area)),
        "mouth_energy": inside["mouth"][1],
        "pose_energy": inside["pose"][1],
    }


@full_only
def test_mouth_pose_swaps_are_local_and_global(mouth_pose, learn_data, out, golden):
    """Scored on the first training speaker's segment: with two training identities the visual stages learn motion,
    not identities, so the held-out speaker (whose frames the autoencoder does not even reconstruct better than a
    copy of the source) tells nothing about MLN/PLN; its numbers and the other training speaker's are printed, not
    held to the floors. (2026-12-03: 0.74 inside, 0.71 on the other training speaker, floor 0.6; without the
    autoencoder's locality term 0.60 / 0.34.)"""
    from edtalk import EDTalk

    spread = {k: v for k, v in mouth_pose["losses"].items() if k.startswith("spread_")}
    print(f"mouth_pose motion spread over the last progress window: {spread}")
    model = EDTalk.from_pretrained(out / "models" / "mouth_pose").eval()
    val = swap_energy(model, segments(learn_data, "val")[0])
    print(f"mouth_pose swap energy, held-out speaker (not scored): {val}")
    train_segs = segments(learn_data, "train")
    print(f"mouth_pose swap energy, other training speaker (not scored): {swap_energy(model, train_segs[1])}")
    e = swap_energy(model, train_segs[0])
    print(f"mouth_pose swap energy, training speaker: {e}")
    assert e["mouth_energy"] > 0 and e["pose_energy"] > 0, (
        "a swap changed nothing: the weights carry no motion"
    )
    assert e["mouth_inside"] >= FLOORS["mouth_inside_min"], (
        f"swapping mouth weights changed mostly pixels outside the mouth region ({e})"
    )
    assert 1.0 - e["pose_inside"] >= FLOORS["pose_outside_min"], (
        f"swapping pose weights changed mostly the mouth region, not the whole face ({e})"
    )
    golden.check("mouth_pose.mouth_inside", e["mouth_inside"], 0.1)
    golden.check("mouth_pose.pose_inside", e["pose_inside"], 0.1)


# -------------------------------------------------------------------------------------------------- audio_lip


def mouth_weights(model, seg: dict, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(mouth weights (T, n_m), SynthTalk's mouth_open (T,)) of one segment: predicted from its mel windows by the
    audio module (source="audio") or extracted from its frames by MLN (source="visual")."""
    import torch

    with torch.no_grad():
        if source == "audio":
            x = model.audio_to_mouth(torch.from_numpy(seg["mel"])[None])[0]
        else:
            x = model.extract(images(seg["frames"]), ("mouth",))["mouth"]
    y = np.asarray(seg["factors"]["mouth_open"], np.float64)
    assert len(x) == len(y) == seg["num_frames"]
    return x.numpy().astype(np.float64), y


def lip_r2(model, data: Path, source: str = "audio") -> float:
    """R² of `mouth_open` on the held-out speaker, as edtalk.metrics.disentanglement scores a space: a ridge fit
    from the mouth weights (`mouth_weights`) on the pooled frames of the training speakers, scored on the val
    speaker's frames."""
    from edtalk.metrics.disentanglement import ridge_r2

    fit = [mouth_weights(model, s, source) for s in segments(data, "train")]
    assert len(fit) >= 2, "the learning set needs two training speakers"
    x_score, y_score = mouth_weights(model, segments(data, "val")[0], source)
    return ridge_r2(
        np.concatenate([x for x, _ in fit]), np.concatenate([y for _, y in fit]), x_score, y_score
    )


def cross_speaker_r2(model, data: Path, source: str) -> float:
    """The same fit on the first training speaker alone, scored on the second (printed, not held to a floor)."""
    from edtalk.metrics.disentanglement import ridge_r2

    a, b = (mouth_weights(model, s, source) for s in segments(data, "train")[:2])
    return ridge_r2(*a, *b)


def weight_fidelity(model, data: Path) -> list[float]:
    """Per training speaker: the correlation of the audio-predicted mouth weights with MLN's on the same frames,
    averaged over the weights (what audio_lip's L_fea trains)."""
    out = []
    for seg in segments(data, "train"):
        (xa, _), (xv, _) = mouth_weights(model, seg, "audio"), mouth_weights(model, seg, "visual")
        out.append(float(np.mean([np.corrcoef(xa[:, k], xv[:, k])[0, 1] for k in range(xa.shape[1])])))
    return out


@full_only
def test_audio_lip_predicts_mouth_opening(audio_lip, learn_data, out, golden):
    """audio_lip's job, on a speaker it never heard: its mouth weights follow MLN's on the training speakers, and a
    linear readout of `mouth_open` from them, fitted on the training speakers, predicts the held-out speaker's
    mouth opening (R²) clearly better than the same readout of the untrained audio module.

    Not held to a floor (printed): the same readout from MLN's own visual weights, and fits from one training
    speaker to the other. MLN's weights carry a speaker-specific offset and scale (two training identities; nothing
    in the mouth_pose stage trains identity invariance), so those R² are low and vary from run to run
    (docs/training.md, "Learning tests")."""
    from edtalk import EDTalk

    trained_model = EDTalk.from_pretrained(out / "models" / "audio_lip").eval()
    untrained_model = EDTalk.from_pretrained(out / "models" / "expression").eval()
    trained, untrained = lip_r2(trained_model, learn_data), lip_r2(untrained_model, learn_data)
    fidelity = weight_fidelity(trained_model, learn_data)
    print(
        f"audio_lip: R² of mouth_open on the held-out speaker {trained:.3f} (untrained audio module "
        f"{untrained:.3f}; MLN's visual weights {lip_r2(trained_model, learn_data, 'visual'):.3f}); correlation "
        f"with MLN's weights on the training speakers {[round(f, 3) for f in fidelity]} (untrained "
        f"{[round(f, 3) for f in weight_fidelity(untrained_model, learn_data)]}); from one training speaker to the "
        f"other: audio {cross_speaker_r2(trained_model, learn_data, 'audio'):.3f}, visual "
        f"{cross_speaker_r2(trained_model, learn_data, 'visual'):.3f}"
    )
    assert min(fidelity) >= FLOORS["lip_fidelity_min"], (
        f"audio-predicted mouth weights do not follow MLN's on the training speakers (correlations {fidelity})"
    )
    assert trained >= FLOORS["lip_r2_min"], (
        f"audio-predicted mouth weights do not follow mouth_open on the held-out speaker (R² {trained})"
    )
    assert trained > untrained + 0.1, (trained, untrained)
    golden.check("audio_lip.mouth_open_r2", trained, 0.15)
    golden.check("audio_lip.weight_fidelity", min(fidelity), 0.15)
