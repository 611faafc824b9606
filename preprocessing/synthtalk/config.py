"""SynthConfig: the `synth:` section of params.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class SynthConfigError(ValueError):
    """A SynthTalk setting that cannot be used."""


@dataclass
class SynthConfig:
    """How much SynthTalk data to make and how it looks (see the comments in params.yaml)."""

    identities: int = 5  # synthetic speakers
    clips_per_identity: int = 5  # clips per speaker; emotions cycle so 5 clips cover all five
    seconds: float = 4.0  # length of each clip
    size: int = 128  # frame side in pixels (square)
    seed: int = 0  # everything follows from it; the same seed gives the same bytes
    val_identities: int = 1  # the last identities go to the val split...
    test_identities: int = 1  # ...the ones before them to test; train keeps at least one
    intensity_min: float = 0.4  # emotion intensity range of non-neutral clips (neutral clips have 0)
    intensity_max: float = 1.0
    yaw_deg: float = 18.0  # largest head yaw, degrees
    pitch_deg: float = 10.0  # largest head pitch, degrees
    roll_deg: float = 8.0  # largest head roll, degrees
    shift: float = 0.04  # largest head translation, fraction of the frame side
    audio_nod: float = 0.2  # share of head pitch that follows speech loudness (kept weak)
    crf: int = 20  # x264 quality (lower = better, larger files)
    preset: str = "veryfast"  # x264 speed preset
    workers: int = 1  # parallel processes, one clip each
    preview: bool = False  # also write preview.png (a contact sheet) into the output folder

    def __post_init__(self) -> None:
        checks = [
            (self.identities >= 1, "identities must be >= 1"),
            (self.clips_per_identity >= 1, "clips_per_identity must be >= 1"),
            (self.seconds >= 0.5, "seconds must be >= 0.5"),
            (self.size >= 64 and self.size % 2 == 0, "size must be an even number >= 64"),
            (self.val_identities >= 0 and self.test_identities >= 0, "val/test_identities must be >= 0"),
            (
                0 <= self.intensity_min <= self.intensity_max <= 1,
                "need 0 <= intensity_min <= intensity_max <= 1",
            ),
            (min(self.yaw_deg, self.pitch_deg, self.roll_deg) >= 0, "pose ranges must be >= 0"),
            (self.yaw_deg <= 40 and self.pitch_deg <= 30, "yaw_deg <= 40 and pitch_deg <= 30 (a 2D drawing)"),
            (0 <= self.shift <= 0.2, "shift must be in [0, 0.2]"),
            (0 <= self.audio_nod <= 1, "audio_nod must be in [0, 1]"),
            (0 <= self.crf <= 51, "crf must be in [0, 51]"),
            (self.workers >= 1, "workers must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SynthConfigError(f"synth params: {message}")

    @property
    def frames_per_clip(self) -> int:
        return max(1, int(round(self.seconds * 25)))

    def split_of(self, identity: int) -> str:
        """train/val/test of an identity: the last ones are held out, at least one identity stays in train."""
        n_val = min(self.val_identities, self.identities - 1)
        n_test = min(self.test_identities, self.identities - 1 - n_val)
        if identity >= self.identities - n_val:
            return "val"
        if identity >= self.identities - n_val - n_test:
            return "test"
        return "train"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SynthConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SynthConfigError(f"unknown synth key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**values)
