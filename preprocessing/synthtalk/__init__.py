"""SynthTalk: procedural talking faces whose every factor is known (the embedded default data).

`generate(out_dir, identities, clips_per_identity, seconds, size, seed)` writes mp4 clips (H.264 + AAC, 25 fps,
16 kHz) with `.txt` transcripts and `.json` sidecars (landmarks and per-frame factors, docs/contracts.md);
`preview(out_dir)` draws a contact sheet.
"""

from preprocessing.synthtalk.config import SynthConfig, SynthConfigError
from preprocessing.synthtalk.generate import clip_plan, generate, generate_set, make_clip
from preprocessing.synthtalk.motion import FACTOR_NAMES
from preprocessing.synthtalk.preview import preview
from preprocessing.synthtalk.template import EMOTIONS

__all__ = [
    "EMOTIONS",
    "FACTOR_NAMES",
    "SynthConfig",
    "SynthConfigError",
    "clip_plan",
    "generate",
    "generate_set",
    "make_clip",
    "preview",
]
