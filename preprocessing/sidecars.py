"""The sidecar JSON next to a video (NAME.json, docs/contracts.md): parsed and checked field by field.

A sidecar comes with the data set, so it is untrusted input: a wrong type or shape is a SidecarError naming the file
and the field (the pipeline rejects the video as `unreadable`), never a crash deep in a later step. Unknown keys are
ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

TEXT_FIELDS = ("speaker", "emotion", "split", "transcript")
MAX_FPS = 1000.0


class SidecarError(ValueError):
    """A sidecar JSON that cannot be used; the message names the file, the field and the fix."""


def _numbers(name: str, where: str, value: Any, ndim: int, shape_text: str) -> np.ndarray:
    """A JSON array of numbers (null allowed: it becomes NaN, a frame without a value) of `ndim` dimensions."""
    if not isinstance(value, list):
        raise SidecarError(
            f"{where}: '{name}' must be {shape_text}, got {type(value).__name__}; fix or remove it"
        )
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise SidecarError(
            f"{where}: '{name}' must be {shape_text} of numbers ({exc}); fix or remove it"
        ) from exc
    if arr.ndim != ndim or arr.shape[0] == 0:
        raise SidecarError(f"{where}: '{name}' must be {shape_text}, got shape {arr.shape}; fix or remove it")
    return arr


def validate(doc: Any, where: str) -> dict:
    """A parsed sidecar document -> the same dict, checked: text fields are strings (or null), `fps` a positive
    number, `landmarks` a (T, 68, 2) array of numbers, `factors` an object of non-empty 1-D number arrays."""
    if not isinstance(doc, dict):
        raise SidecarError(
            f"{where}: the top level must be a JSON object, got {type(doc).__name__}; fix or remove it"
        )
    for key in TEXT_FIELDS:
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise SidecarError(
                f"{where}: '{key}' must be a string, got {type(value).__name__}; fix or remove it"
            )
    fps = doc.get("fps")
    if fps is not None and (
        isinstance(fps, bool)
        or not isinstance(fps, (int, float))
        or not math.isfinite(fps)
        or not 0 < fps <= MAX_FPS
    ):
        raise SidecarError(
            f"{where}: 'fps' must be a number in (0, {MAX_FPS:g}], got {fps!r}; fix or remove it"
        )
    if doc.get("landmarks") is not None:
        lms = _numbers("landmarks", where, doc["landmarks"], 3, "a T x 68 x 2 array")
        if lms.shape[1:] != (68, 2):
            raise SidecarError(
                f"{where}: 'landmarks' must be a T x 68 x 2 array, got shape {lms.shape}; fix or remove it"
            )
    factors = doc.get("factors")
    if factors is not None:
        if not isinstance(factors, dict):
            raise SidecarError(
                f"{where}: 'factors' must be an object of per-frame arrays, got {type(factors).__name__}; "
                "fix or remove it"
            )
        for name, values in factors.items():
            _numbers(f"factors.{name}", where, values, 1, "a non-empty array")
    return doc


def parse(data: bytes, where: str) -> dict:
    """Sidecar bytes -> a validated document (SidecarError for bad UTF-8, bad JSON or a bad field)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SidecarError(f"{where}: not valid JSON ({exc}); fix or remove it") from exc
    return validate(doc, where)
