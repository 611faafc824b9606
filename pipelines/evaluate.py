"""`edtalk evaluate`: held-out metrics of a trained model, written to metrics/evaluate.json and an MLflow run.

Protocol (per held-out segment, frames resized to the model's image size):
- video-driven self-reenactment (EDTalk-V): identity = the segment's first frame; every space driven by the
  segment's own frames;
- audio-driven (EDTalk-A, when the model has E_a and the segment usable audio): mouth from the segment's mel
  windows; pose, eyes and expression from its frames, so the comparison with the ground truth isolates the audio
  part (the flows sample poses that no ground truth can score);
- PSNR, SSIM, LPIPS (only when its local weights are available), M-LMD / F-LMD, SyncNet confidence, the banks'
  orthogonality error and, for SynthTalk segments (`factors`), the disentanglement R² matrix and heatmap.

Landmarks: the ground truth is the segment's `landmarks` column (the sidecar's for SynthTalk, the preprocessing
detector's otherwise); generated frames go through dlib (preprocessing.landmarks). The HOG detector misses faces
below about 80 px, so generated frames are upsampled to `lmd_detect_side` before detection and the landmarks scaled
back; frames where it still finds no face are left out and their share is reported (`lmd_detected`).
LMDs are in pixels of the model's image size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import video_io
from pipelines.generate import load_model, to_tensor, to_uint8
from preprocessing.params import ParamsError, build, load_section

log = logging.getLogger(__name__)

SPACES = ("mouth", "pose", "eye", "expression")


class EvaluateError(ValueError):
    """An input of `edtalk evaluate` that cannot be used; the message says what to do instead."""


@dataclass
class EvaluateParams:
    """The `evaluate:` section of params.yaml (see the comments there)."""

    split: str = "test"  # held-out split of the segments table (test | val | train)
    max_segments: int = 8  # held-out segments evaluated (0 = all)
    max_frames: int = 125  # frames per segment evaluated (0 = all; 125 = 5 s)
    batch_frames: int = 32  # frames per extract/render batch
    audio_driven: bool = True  # also evaluate audio-driven mouths (needs E_a in the model)
    lmd_detect_side: int = 256  # generated frames are upsampled to this side before dlib landmark detection
    sync_max_offset: int = 15  # SyncNet offset search, +- frames (the original SyncNet's 0.6 s)
    videos: int = 2  # side-by-side videos (ground truth | video-driven | audio-driven) logged as artifacts
    holdout_fraction: float = 0.3  # disentanglement: share of segments whose frames score the ridge probes
    experiment: str = "edtalk"  # MLflow experiment of the evaluation run
    lpips_backbone: str = ""  # VGG16 weights file for LPIPS ("" = its default locations; skipped if absent)
    lpips_lin: str = ""  # LPIPS lin-layer weights file ("" = its default locations)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    seed: int = 0  # seeds the disentanglement hold-out choice

    def __post_init__(self) -> None:
        checks = [
            (self.split in ("train", "val", "test"), "split must be train, val or test"),
            (self.max_segments >= 0, "max_segments must be >= 0 (0 = all)"),
            (self.max_frames >= 0, "max_frames must be >= 0 (0 = all)"),
            (self.batch_frames >= 1, "batch_frames must be >= 1"),
            (self.lmd_detect_side >= 64, "lmd_detect_side must be >= 64"),
            (self.sync_max_offset >= 1, "sync_max_offset must be >= 1"),
            (self.videos >= 0, "videos must be >= 0"),
            (0 < self.holdout_fraction < 1, "holdout_fraction must be in (0, 1)"),
            (self.threads >= 0, "threads must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamsError(f"evaluate params: {message}")

    @classmethod
    def load(cls, path: str | Path | None = "params.yaml", overrides=()) -> EvaluateParams:
        return build(cls, load_section(path, "evaluate", overrides), "evaluate")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------ data
def held_out_segments(data_dir: str, split: str, limit: int):
    """Decoded segments of `split`, read batch by batch (the table may be far larger than memory)."""
    import pyarrow.dataset as ds

    from preprocessing import storage
    from preprocessing.schema import decode_segment

    seg_dir = storage.join(data_dir, "segments")
    if not storage.exists(seg_dir):
        raise EvaluateError(f"{seg_dir} does not exist; run `edtalk preprocess --output {data_dir}` first")
    fs, path = storage.resolve(seg_dir)
    table = ds.dataset(path, filesystem=fs, format="parquet")
    count = 0
    for batch in table.to_batches(filter=ds.field("split") == split, batch_size=4):
        for row in batch.to_pylist():
            yield decode_segment(row)
            count += 1
            if limit and count >= limit:
                return
    if count == 0:
        splits = table.to_table(columns=["split"]).column("split").to_pylist()
        counts = {s: splits.count(s) for s in sorted(set(splits))}
        raise EvaluateError(
            f"{seg_dir}: no segments in split {split!r} (segments per split: {counts}); choose another with "
            "--set evaluate.split=val, or give sources a held-out split in the manifest or sidecar"
        )


def resize_segment(seg: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames and landmarks at the model's image size."""
    from pipelines.generate import resize_frames

    frames = seg["frames"]
    scale = size / frames.shape[1]
    return resize_frames(frames, size), (seg["landmarks"] * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------------- helpers
def render_all(model, ident, weights: dict[str, torch.Tensor], batch: int) -> np.ndarray:
    n = next(iter(weights.values())).shape[0]
    out = []
    for a in range(0, n, batch):
        out.append(to_uint8(model.render(ident, {k: v[a : a + batch] for k, v in weights.items()})))
    return np.concatenate(out)


def extract_all(model, frames: np.ndarray, batch: int, device) -> dict[str, torch.Tensor]:
    parts = [
        model.extract(to_tensor(frames[a : a + batch], device), SPACES) for a in range(0, len(frames), batch)
    ]
    return {s: torch.cat([p[s] for p in parts]) for s in SPACES}


def detect_landmarks(backend, frames: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """dlib 68 landmarks of (small) generated frames: upsampled to `side` first, returned in frame pixels, with the
    per-frame mask of frames where a face was found (detected or tracked)."""
    import cv2

    scale = side / frames.shape[1]
    big = np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_CUBIC) for f in frames])
    track = backend.track(big)
    return track.landmarks / scale, np.asarray(track.valid, bool)


def sync_confidence(syncnet, frames: np.ndarray, mel: np.ndarray, max_offset: int, device) -> float | None:
    """SyncNet confidence (median - min distance over audio offsets) of a clip; None when it is too short."""
    from edtalk.syncnet import crop_mouths

    cfg = syncnet.config
    t = len(frames)
    offset = min(max_offset, (t - cfg.n_frames) // 2 - 1)
    if offset < 1:
        return None
    with torch.no_grad():
        mouths = crop_mouths(to_tensor(frames, device), (cfg.mouth_height, cfg.mouth_width))
        res = syncnet.confidence(mouths, torch.from_numpy(mel).to(device), max_offset=offset)
    return float(res.confidence[0])


class Mean:
    """Running means of named values (None values are skipped)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value, weight: int = 1) -> None:
        if value is None or not np.isfinite(value):
            return
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * weight
        self.counts[name] = self.counts.get(name, 0) + weight

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in sorted(self.sums)}


def score(acc: Mean, prefix: str, gen: np.ndarray, real: np.ndarray, real_lmk: np.ndarray, ctx: dict) -> None:
    """Add PSNR, SSIM, LPIPS, M-LMD, F-LMD of generated frames against the ground truth to `acc`."""
    from edtalk.metrics import f_lmd, lpips_distance, m_lmd, psnr, ssim

    n = len(gen)
    acc.add(f"{prefix}.psnr", float(np.mean(np.minimum(psnr(gen, real, data_range=255), 100.0))), n)
    acc.add(f"{prefix}.ssim", float(np.mean(ssim(gen, real, data_range=255))), n)
    if ctx["lpips"] is not None:
        acc.add(f"{prefix}.lpips", float(np.mean(lpips_distance(gen, real, model=ctx["lpips"]))), n)
    lmk, valid = detect_landmarks(ctx["backend"], gen, ctx["params"].lmd_detect_side)
    acc.add(f"{prefix}.lmd_detected", float(valid.mean()), n)
    if valid.any():
        acc.add(f"{prefix}.m_lmd", m_lmd(lmk[valid], real_lmk[valid]), int(valid.sum()))
        acc.add(f"{prefix}.f_lmd", f_lmd(lmk[valid], real_lmk[valid]), int(valid.sum()))


# ---------------------------------------------------------------------------------------------------- the run
def evaluate(
    model_path: str,
    data_dir: str,
    output: str,
    params: EvaluateParams,
    prep=None,
    log_mlflow=True,
    alias: str | None = None,
) -> dict:
    """Evaluate `model_path` (folder or MLflow URI) on the held-out segments of `data_dir`; write `output`
    (metrics JSON) and, unless log_mlflow is False, an MLflow run with the metrics, videos and heatmap; with
    `alias`, point that alias of the model's registered name at the version scored."""
    from tqdm import tqdm

    from edtalk.metrics import load_lpips
    from edtalk.metrics.disentanglement import disentanglement, factor_groups, heatmap
    from pipelines.generate import FaceCropper
    from preprocessing.params import PreprocessParams

    t0 = time.perf_counter()
    if params.threads:
        torch.set_num_threads(params.threads)
    if alias and not log_mlflow:
        raise EvaluateError(f"--alias {alias} needs the MLflow run: drop --no-mlflow")
    model, folder = load_model(model_path)
    scored = scored_version(model_path, folder)
    if alias and scored is None:
        raise EvaluateError(
            f"--alias {alias}: model {model_path} is not a registered version; pass models:/NAME/VERSION or a "
            "models/STAGE folder from a training run with train.register_model true"
        )
    device = next(model.parameters()).device
    size = int(model.config.image_size)
    prep = prep or PreprocessParams(landmark_backend="dlib")
    if prep.landmark_backend in ("auto", "sidecar"):
        prep = dataclasses.replace(prep, landmark_backend="dlib")  # generated frames need a detector
    ctx = {
        "params": params,
        "backend": FaceCropper(prep).backend,
        "lpips": load_lpips(params.lpips_backbone or None, params.lpips_lin or None),
    }
    audio_ok = params.audio_driven and model.audio_to_mouth is not None
    out_dir = Path(output).parent
    video_dir = out_dir / "evaluate_videos"
    acc = Mean()
    weights_all: dict[str, list[np.ndarray]] = {s: [] for s in SPACES}
    factors_all: list[str] = []
    segment_ids: list[int] = []
    videos: list[Path] = []
    n_segments = n_frames = 0
    bar = tqdm(desc="evaluate", unit="segment", disable=None)
    for seg in held_out_segments(data_dir, params.split, params.max_segments):
        frames, real_lmk = resize_segment(seg, size)
        mel, audio = seg["mel"], seg["audio"]
        if params.max_frames:
            frames, real_lmk = frames[: params.max_frames], real_lmk[: params.max_frames]
            mel, audio = mel[: params.max_frames], audio[: params.max_frames * video_io.SAMPLES_PER_FRAME]
        with torch.no_grad():
            ident = model.encode_identity(to_tensor(frames[:1], device))
            w = extract_all(model, frames, params.batch_frames, device)
            gen_v = render_all(model, ident, w, params.batch_frames)
            gen_a = None
            if audio_ok and seg.get("audio_usable", True):
                mouth = model.audio_to_mouth(torch.from_numpy(mel).to(device)[None])[0]
                gen_a = render_all(model, ident, {**w, "mouth": mouth}, params.batch_frames)
        score(acc, "video", gen_v, frames, real_lmk, ctx)
        if gen_a is not None:
            score(acc, "audio", gen_a, frames, real_lmk, ctx)
        if model.syncnet is not None and seg.get("has_audio", True):
            acc.add(
                "ground_truth.sync_conf",
                sync_confidence(model.syncnet, frames, mel, params.sync_max_offset, device),
            )
            acc.add(
                "video.sync_conf", sync_confidence(model.syncnet, gen_v, mel, params.sync_max_offset, device)
            )
            if gen_a is not None:
                acc.add(
                    "audio.sync_conf",
                    sync_confidence(model.syncnet, gen_a, mel, params.sync_max_offset, device),
                )
        if seg.get("factors"):
            for s in SPACES:
                weights_all[s].append(w[s].float().cpu().numpy())
            factors_all.append(json.dumps(seg["factors"]))
            segment_ids.extend([n_segments] * len(frames))
            if params.max_frames:  # factors are per frame: cut them like the frames
                factors_all[-1] = json.dumps({k: v[: len(frames)] for k, v in seg["factors"].items()})
        if len(videos) < params.videos:
            panels = [frames, gen_v] + ([gen_a] if gen_a is not None else [])
            path = video_dir / f"{len(videos):02d}_{seg['segment_id']}.mp4"
            with video_io.VideoWriter(path, size * len(panels), size) as writer:
                writer.write(np.concatenate(panels, axis=2), audio if seg.get("has_audio", True) else None)
            videos.append(path)
        n_segments += 1
        n_frames += len(frames)
        bar.update(1)
    bar.close()

    metrics: dict = {"segments": n_segments, "frames": n_frames, "split": params.split, **acc.result()}
    metrics["orthogonality_error"] = float(model.orthogonality_error())
    metrics["lpips_available"] = ctx["lpips"] is not None
    heat = None
    if factors_all:
        ids = np.asarray(segment_ids)
        rng = np.random.default_rng(params.seed)
        held = rng.permutation(n_segments)[: max(1, round(params.holdout_fraction * n_segments))]
        train = (
            ~np.isin(ids, held) if len(np.unique(ids)) >= 3 else None
        )  # hold out whole segments when possible
        result = disentanglement(
            {s: np.concatenate(v) for s, v in weights_all.items()},
            factor_groups(factors_all),
            train=train,
            holdout_fraction=params.holdout_fraction,
            seed=params.seed,
        )
        metrics["disentanglement"] = result.to_dict()
        heat = heatmap(result, out_dir / "evaluate_disentanglement.png")
    metrics["wall_s"] = time.perf_counter() - t0
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(metrics, indent=2) + "\n")
    if log_mlflow:
        metrics["mlflow_run_id"] = log_run(
            metrics, params, model_path, folder, data_dir, output, videos, heat, scored
        )
        if alias:
            set_alias(scored, alias, metrics["mlflow_run_id"])
            metrics["alias"] = f"models:/{scored.name}@{alias}"
        Path(output).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def scored_version(model_path: str, folder: Path):
    """The registered version being evaluated: the one `models:/NAME/VERSION|@ALIAS` names, else the one the
    folder's lineage.json records (a training run's models/STAGE), else None."""
    from pipelines import lineage, model_uri

    found = model_uri.registered_version(str(model_path)) if model_uri.is_uri(str(model_path)) else None
    record = folder / lineage.LINEAGE_FILE
    if found is None and record.is_file():
        info = json.loads(record.read_text())
        if info.get("registered_model") and info.get("model_version"):
            found = model_uri.RegisteredVersion(
                info["registered_model"], str(info["model_version"]), info.get("model_id")
            )
    return found


def set_alias(scored, alias: str, run_id: str) -> None:
    """Point `alias` of the scored model's registered name at the scored version (moving it from any other)."""
    from pipelines import lineage

    uri = lineage.tracking_uri()
    lineage.client(uri).set_registered_model_alias(scored.name, alias, scored.version)
    lineage.set_tags(run_id, {"registered_model.alias": f"{scored.name}@{alias} -> {scored.version}"}, uri)


def log_run(metrics, params, model_path, folder: Path, data_dir, output, videos, heat, scored=None) -> str:
    """One MLflow run with the lineage of the training stages: git, input hashes, the model's own run; in MLflow's
    terms, the held-out split as a dataset input and the scored logged model as a model input."""
    from pipelines import lineage

    uri = lineage.tracking_uri()
    c = lineage.client(uri)
    exp_id = lineage.experiment_id(params.experiment, uri)
    run = c.create_run(exp_id, run_name="evaluate")
    run_id = run.info.run_id
    git = lineage.git_info(".")
    tags = {"stage": "evaluate", "model.uri": str(model_path), **git}
    tags.update(lineage.source_tags("edtalk evaluate", git) | lineage.parent_tags(exp_id, uri))
    model_id = scored.model_id if scored else None
    upstream = folder / lineage.LINEAGE_FILE
    if upstream.is_file():
        info = json.loads(upstream.read_text())
        tags["upstream.model.run_id"] = info.get("run_id", "")
        tags["upstream.model.stage"] = info.get("stage", folder.name)
        if info.get("model_version"):
            tags["upstream.model.version"] = info["model_version"]
        model_id = model_id or info.get("model_id")
    if scored:
        tags["registered_model"] = f"{scored.name}/{scored.version}"
    hashes = lineage.input_hashes([str(folder), data_dir])
    tags.update({lineage.tag_key("dvc.md5", p): h for p, h in hashes.items()})
    lineage.set_tags(run_id, tags, uri)
    dataset = lineage.dataset_entity(data_dir, "segments", lineage.data_digest(data_dir, hashes[data_dir]))
    context = {"mlflow.data.context": "evaluation", "split": params.split}
    lineage.log_inputs(run_id, uri, [(dataset, context)], [model_id] if model_id else [])
    lineage.log_params(run_id, {"evaluate": params.to_dict()}, uri)
    flat = {
        k.replace(".", "_"): v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if "disentanglement" in metrics:
        flat["disentanglement_diagonal"] = metrics["disentanglement"]["diagonal_mean"]
        flat["disentanglement_leakage"] = metrics["disentanglement"]["leakage"]
    lineage.log_metrics(run_id, {k: v for k, v in flat.items() if np.isfinite(v)}, 0, uri)
    c.log_artifact(run_id, str(output))
    for path in videos:
        c.log_artifact(run_id, str(path), "videos")
    if heat is not None:
        c.log_artifact(run_id, str(heat))
    lineage.end_run(run_id, uri)
    return run_id
