"""A video's transcript: from the manifest, a sidecar, or speech recognition, in that order (DESIGN.md section 3.8).

The text modality of the expression stage is masked when the transcript is empty, so "" is a valid answer; the
source string says where the text came from and goes into the segment's lineage.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from preprocessing import storage
from preprocessing.audio import AudioError, Transcriber, audio_from_video, load_audio

# Values of the returned `source`.
FROM_MANIFEST = "manifest"
FROM_TXT = "sidecar_txt"
FROM_JSON = "sidecar_json"
FROM_ASR = "asr"
NONE = "none"

log = logging.getLogger(__name__)


class TranscriptError(ValueError):
    """A sidecar that exists but cannot be read as a transcript; the message names it and says what to do."""


def _read_text(path: str) -> str | None:
    """Contents of a local file or URI as UTF-8, None when it does not exist."""
    if not storage.exists(path):
        return None
    raw = storage.read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TranscriptError(f"{path}: not UTF-8 text ({exc}); save the transcript as UTF-8") from exc


def sidecar_path(video_path: str | os.PathLike, suffix: str) -> str:
    """NAME.mp4 -> NAME<suffix> next to it (works for URIs too)."""
    text = os.fspath(video_path)
    stem, dot, ext = text.rpartition(".")
    if not dot or "/" in ext:
        return text + suffix
    return stem + suffix


def _json_transcript(sidecar_json: Mapping[str, Any] | str | os.PathLike | None, video_path: str) -> str:
    if sidecar_json is None:
        return ""
    if isinstance(sidecar_json, Mapping):
        value = sidecar_json.get("transcript", "")
        where = f"sidecar JSON of {video_path}"
    else:
        where = os.fspath(sidecar_json)
        raw = _read_text(where)
        if raw is None:
            return ""
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TranscriptError(f"{where}: not valid JSON ({exc}); fix or remove the sidecar") from exc
        value = doc.get("transcript", "") if isinstance(doc, dict) else ""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TranscriptError(f"{where}: 'transcript' must be a string, got {type(value).__name__}")
    return value.strip()


def resolve_transcript(
    video_path: str | os.PathLike,
    manifest_text: str | None = None,
    sidecar_json: Mapping[str, Any] | str | os.PathLike | None = None,
    transcriber: Transcriber | None = None,
    wave: np.ndarray | None = None,
) -> tuple[str, str]:
    """-> (text, source), source one of manifest | sidecar_txt | sidecar_json | asr | none.

    Order: the manifest's transcript column; NAME.txt next to the video; the "transcript" key of the sidecar JSON
    (a parsed dict or its path); ASR with `transcriber` on `wave` (16 kHz; decoded from the video when not given);
    else "". Blank text at one step falls through to the next.
    """
    video = os.fspath(video_path)
    if manifest_text and manifest_text.strip():
        return manifest_text.strip(), FROM_MANIFEST
    txt = _read_text(sidecar_path(video, ".txt"))
    if txt and txt.strip():
        return txt.strip(), FROM_TXT
    from_json = _json_transcript(sidecar_json, video)
    if from_json:
        return from_json, FROM_JSON
    if transcriber is not None:
        if wave is None:
            wave = audio_from_video(video)
            if wave is None:
                wav_sidecar = sidecar_path(video, ".wav")
                if storage.exists(wav_sidecar):
                    try:
                        wave = load_audio(wav_sidecar)
                    except AudioError as exc:
                        log.warning("%s: no ASR transcript, the audio sidecar is unusable: %s", video, exc)
        if wave is not None and len(wave):
            text = transcriber.transcribe(wave).strip()
            if text:
                return text, FROM_ASR
    return "", NONE
