"""Parameters: a generic loader for one params.yaml section with `--set` overrides, and the preprocess dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A parameter file or override that cannot be used."""


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is parsed as YAML (so 3, 0.5, true, [1, 2] work)."""
    if "=" not in text:
        raise ParamsError(
            f"override {text!r} is not of the form SECTION.KEY=VALUE (e.g. preprocess.size=128)"
        )
    lhs, raw = text.split("=", 1)
    if "." not in lhs:
        raise ParamsError(
            f"override {text!r}: the key must be SECTION.KEY (e.g. preprocess.size), got {lhs!r}"
        )
    section, key = lhs.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return section.strip(), key.strip(), value


def _set_nested(target: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override of {dotted!r}: {part!r} is not a mapping")
    node[parts[-1]] = value


def load_section(path: str | Path | None, section: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read `section` of a params YAML file (missing file or section -> {}) and apply `SECTION.KEY=VALUE` overrides.

    Overrides for other sections are ignored, so one `--set` list can be handed to every command. Nested keys use
    dots: `train.optimizer.lr=1e-4`.
    """
    values: dict = {}
    if path is not None and Path(path).exists():
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(
                f"{path}: not valid YAML ({exc}); fix the file or pass another --params"
            ) from exc
        if not isinstance(doc, dict):
            raise ParamsError(f"{path}: expected a mapping of sections at the top level")
        values = dict(doc.get(section) or {})
    elif path is not None and str(path) != "params.yaml":
        raise ParamsError(f"params file {path} does not exist")
    for text in overrides:
        sec, key, value = parse_override(text)
        if sec == section:
            _set_nested(values, key, value)
    return values


def build(cls: type, values: dict, section: str):
    """Instantiate dataclass `cls` from a dict, naming unknown keys instead of failing obscurely."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ParamsError(f"unknown key(s) in section {section!r}: {unknown}; known keys: {sorted(names)}")
    return cls(**values)


@dataclass
class PreprocessParams:
    """The `preprocess:` section of params.yaml (see the comments there)."""

    size: int = 256  # side of the square face crop, pixels
    fps: float = 25.0  # output frame rate; the whole project assumes 25
    segment_seconds: float = 5.0  # longest segment (HDTF convention)
    min_seconds: float = 1.0  # shorter videos (after decoding) are rejected as too_short
    max_seconds_per_video: float = 0.0  # only the first N seconds of each video are used; 0 = all
    # per-video decode time limit; past it the video is rejected (decode_timeout)
    decode_timeout_s: float = 120.0
    landmark_backend: str = "auto"  # auto | dlib | face_alignment | sidecar
    detect_every: int = 10  # dlib: full-frame detection every N frames; a small-window re-detection between
    detect_max_side: int = 320  # dlib: longest side of the downscaled frame the detector sees
    min_face_px: int = 48  # faces whose landmark box side (source pixels) is below this are face_too_small
    min_face_fraction: float = 0.5  # fewer detector hits than this fraction of probed frames -> no_face
    # at least this fraction of probed frames with 2+ faces -> multiple_faces
    multi_face_fraction: float = 0.5
    # a new face tube when the face box's IoU with the tube's first box drops below this
    tube_min_iou: float = 0.5
    crop_scale: float = 1.8  # crop side / landmark box side (FOMM-like margin around the face)
    crop_shift_up: float = 0.12  # move the crop centre up by this fraction of the landmark box (forehead)
    jpeg_quality: int = 95  # JPEG quality of stored frames
    pairs_per_segment: int = 2  # mouth-swap and eye-swap pairs per segment, each
    mask_feather: float = 0.1  # Gaussian feather (sigma) of swap masks, as a fraction of the region's size
    # a segment, or its whole video, with less speech activity is flagged no_speech
    min_speech_ratio: float = 0.3
    speech_encoder: str = ""  # local HuBERT-like model folder for speech_states; "" = none
    asr_model: str = ""  # local Whisper-like model folder for transcripts without a sidecar; "" = none
    default_split: str = "train"  # split of sources that name none (train|val|test)
    workers: int = 2  # parallel per-video workers (Ray actors)
    cpus_per_worker: float = 0.5  # Ray CPUs per worker; fractional so small machines never deadlock
    seed: int = 0  # seeds the choice of swap-pair frames

    def __post_init__(self) -> None:
        checks = [
            (self.size >= 32 and self.size % 2 == 0, "size must be an even number >= 32"),
            (self.fps > 0, "fps must be > 0"),
            (self.segment_seconds > 0, "segment_seconds must be > 0"),
            (self.min_seconds >= 0, "min_seconds must be >= 0"),
            (self.max_seconds_per_video >= 0, "max_seconds_per_video must be >= 0 (0 = all)"),
            (self.decode_timeout_s > 0, "decode_timeout_s must be > 0"),
            (
                self.landmark_backend in ("auto", "dlib", "face_alignment", "sidecar"),
                "landmark_backend must be one of auto, dlib, face_alignment, sidecar",
            ),
            (self.detect_every >= 1, "detect_every must be >= 1"),
            (self.detect_max_side >= 64, "detect_max_side must be >= 64"),
            (self.min_face_px >= 1, "min_face_px must be >= 1"),
            (0 <= self.min_face_fraction <= 1, "min_face_fraction must be in [0, 1]"),
            (0 < self.multi_face_fraction <= 1, "multi_face_fraction must be in (0, 1]"),
            (0 < self.tube_min_iou <= 1, "tube_min_iou must be in (0, 1]"),
            (self.crop_scale >= 1, "crop_scale must be >= 1"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality must be in [1, 100]"),
            (self.pairs_per_segment >= 0, "pairs_per_segment must be >= 0"),
            (0 <= self.mask_feather <= 1, "mask_feather must be in [0, 1]"),
            (0 <= self.min_speech_ratio <= 1, "min_speech_ratio must be in [0, 1]"),
            (self.default_split in ("train", "val", "test"), "default_split must be train, val or test"),
            (self.workers >= 1, "workers must be >= 1"),
            (self.cpus_per_worker > 0, "cpus_per_worker must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamsError(f"preprocess params: {message}")

    @property
    def segment_frames(self) -> int:
        return max(1, int(round(self.segment_seconds * self.fps)))

    @classmethod
    def load(cls, path: str | Path | None = "params.yaml", overrides=()) -> PreprocessParams:
        return build(cls, load_section(path, "preprocess", overrides), "preprocess")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
