"""Generating a SynthTalk set: one clip = identity + speech + motion -> frames -> mp4 and sidecars."""

from __future__ import annotations

import json
import logging
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from preprocessing import storage
from preprocessing.synthtalk.audio import Speech, synthesize
from preprocessing.synthtalk.config import SynthConfig
from preprocessing.synthtalk.identity import sample_identity
from preprocessing.synthtalk.motion import MotionConfig, clip_factors
from preprocessing.synthtalk.preview import preview
from preprocessing.synthtalk.render import background, render_frames
from preprocessing.synthtalk.template import EMOTIONS
from preprocessing.synthtalk.writer import write_mp4, write_sidecars

log = logging.getLogger(__name__)

# Independent random streams per clip, so that e.g. the head motion does not change when the speech does.
_SPEECH, _POSE, _EYES, _LOOK, _EMOTION = range(5)


@dataclass
class Clip:
    """Everything known about one generated clip before it is written."""

    name: str  # file stem
    speaker: str
    split: str
    emotion: str
    frames: list  # RGB uint8 frames (only when rendered)
    landmarks: np.ndarray  # (T, 68, 2) pixels
    factors: dict[str, np.ndarray]
    waveform: np.ndarray
    transcript: str


def clip_name(identity: int, clip: int) -> str:
    return f"synth{identity:03d}_c{clip:03d}"


def clip_plan(cfg: SynthConfig, identity: int, clip: int) -> tuple[dict[str, np.ndarray], Speech]:
    """The ground truth of one clip without drawing it: (factors per frame, Speech)."""
    ident = sample_identity(cfg.seed, identity)
    emotion = (identity + clip) % len(EMOTIONS)  # balanced, and unrelated to who speaks
    rng = lambda stream: np.random.default_rng([cfg.seed, identity, clip, stream])  # noqa: E731
    intensity = 0.0 if emotion == 0 else float(rng(_EMOTION).uniform(cfg.intensity_min, cfg.intensity_max))
    speech = synthesize(rng(_SPEECH), cfg.frames_per_clip, emotion, intensity, ident.f0, ident.formant_scale)
    motion = MotionConfig(
        yaw_deg=cfg.yaw_deg,
        pitch_deg=cfg.pitch_deg,
        roll_deg=cfg.roll_deg,
        shift=cfg.shift,
        audio_nod=cfg.audio_nod,
    )
    factors = clip_factors(rng(_POSE), rng(_EYES), speech, emotion, intensity, motion)
    return factors, speech


def make_clip(cfg: SynthConfig, identity: int, clip: int) -> Clip:
    """Plan and render one clip in memory."""
    ident = sample_identity(cfg.seed, identity)
    factors, speech = clip_plan(cfg, identity, clip)
    bg = background(ident, cfg.size, np.random.default_rng([cfg.seed, identity, clip, _LOOK]))
    frames, marks = [], []
    for frame, lm in render_frames(ident, factors, cfg.size, bg):
        frames.append(frame.copy())
        marks.append(lm)
    return Clip(
        name=clip_name(identity, clip),
        speaker=ident.speaker,
        split=cfg.split_of(identity),
        emotion=EMOTIONS[int(factors["emotion"][0])],
        frames=frames,
        landmarks=np.stack(marks),
        factors=factors,
        waveform=speech.waveform,
        transcript=speech.transcript,
    )


def write_clip(cfg: SynthConfig, out_dir: Path, identity: int, clip: int) -> Path:
    """Render one clip and write NAME.mp4, NAME.txt and NAME.json into out_dir."""
    c = make_clip(cfg, identity, clip)
    path = out_dir / f"{c.name}.mp4"
    write_mp4(path, c.frames, cfg.size, c.waveform, crf=cfg.crf, preset=cfg.preset)
    write_sidecars(
        path,
        speaker=c.speaker,
        emotion=c.emotion,
        split=c.split,
        landmarks=c.landmarks,
        factors=c.factors,
        transcript=c.transcript,
    )
    return path


def _write_clip_job(args: tuple[dict, str, int, int]) -> str:
    cfg_dict, out_dir, identity, clip = args
    return str(write_clip(SynthConfig(**cfg_dict), Path(out_dir), identity, clip))


def generate_set(cfg: SynthConfig, out_dir: str | Path) -> list[Path | str]:
    """Write the whole set into out_dir and an index `_synthtalk.json` (+ `preview.png` if cfg.preview).

    out_dir may be a local folder (created if missing), a file:// URI or object storage (s3://, gs://: written
    locally first, then uploaded). Returns the mp4 paths (URIs for object storage).
    """
    local = storage.local_path_or_none(out_dir)
    if local is None:
        with tempfile.TemporaryDirectory(prefix="synthtalk-") as tmp:
            paths = generate_set(cfg, tmp)
            storage.upload(tmp, out_dir)
        return [storage.join(out_dir, Path(p).name) for p in paths]
    out = local
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"synth output {out} exists and is not a directory; pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (cfg.to_dict(), str(out), i, c) for i in range(cfg.identities) for c in range(cfg.clips_per_identity)
    ]
    start = time.perf_counter()
    if cfg.workers == 1:
        paths = [_write_clip_job(j) for j in tqdm(jobs, desc="synthtalk clips", unit="clip")]
    else:
        ctx = multiprocessing.get_context("spawn")  # safe beside threads (Ray, torch) in the parent
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
            paths = list(
                tqdm(pool.map(_write_clip_job, jobs), total=len(jobs), desc="synthtalk clips", unit="clip")
            )
    elapsed = time.perf_counter() - start
    frames = len(jobs) * cfg.frames_per_clip
    log.info(
        "SynthTalk: %d clips, %d frames in %.1f s (%.0f frames/s)",
        len(jobs),
        frames,
        elapsed,
        frames / elapsed,
    )
    index = {
        "generator": "synthtalk",
        "config": cfg.to_dict(),
        "emotions": list(EMOTIONS),
        "clips": [
            {"video": Path(p).name, "speaker": f"synth{j[2]:03d}", "split": cfg.split_of(j[2])}
            for p, j in zip(paths, jobs, strict=True)
        ],
    }
    (out / "_synthtalk.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    if cfg.preview:
        preview(out, out / "preview.png")
    return [Path(p) for p in paths]


def generate(
    out_dir: str | Path,
    identities: int,
    clips_per_identity: int,
    seconds: float,
    size: int,
    seed: int,
    workers: int = 1,
    **settings,
) -> list[Path | str]:
    """Generate a SynthTalk set; any other SynthConfig field may be passed as a keyword. Returns the mp4 paths."""
    cfg = SynthConfig.from_dict(
        dict(
            settings,
            identities=identities,
            clips_per_identity=clips_per_identity,
            seconds=seconds,
            size=size,
            seed=seed,
            workers=workers,
        )
    )
    return generate_set(cfg, out_dir)
