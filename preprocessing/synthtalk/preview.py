"""Contact sheet of a SynthTalk set: one row per identity, one column per emotion."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from preprocessing.synthtalk.render import draw_landmarks
from preprocessing.synthtalk.template import EMOTIONS


def _clips(source: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"preview: {folder} is not a folder of SynthTalk clips; pass the --out folder"
            )
        clips = sorted(folder.glob("*.mp4"))
    else:
        clips = [Path(p) for p in source]
    clips = [c for c in clips if c.with_suffix(".json").exists()]
    if not clips:
        raise FileNotFoundError(
            f"preview: no mp4 with a .json sidecar found in {source!r}; generate a set first"
        )
    return clips


def _frame(video: Path, index: int) -> np.ndarray:
    import av  # decoding only here, so importing this module stays light

    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise ValueError(f"preview: {video} has fewer than {index + 1} frames")


def preview(
    source: str | Path | Sequence[str | Path],
    path: str | Path | None = None,
    landmarks: bool = False,
    tile: int = 128,
    max_rows: int = 8,
) -> Path:
    """Write a PNG grid (rows: speakers, columns: emotions) of each clip's most open-mouthed frame; returns its path.

    `source` is a folder written by `generate` or a list of its mp4 files; `landmarks` overlays the sidecar's
    68 points, which shows that they sit on the drawn face.
    """
    clips = _clips(source)
    by_cell: dict[tuple[str, str], Path] = {}
    for c in clips:
        doc = json.loads(c.with_suffix(".json").read_text())
        by_cell.setdefault((doc["speaker"], doc["emotion"]), c)
    speakers = sorted({s for s, _ in by_cell})[:max_rows]
    emotions = [e for e in EMOTIONS if any((s, e) in by_cell for s in speakers)]
    head = 18
    sheet = np.full((head + tile * len(speakers), tile * len(emotions), 3), 255, np.uint8)
    for col, emotion in enumerate(emotions):
        cv2.putText(
            sheet, emotion, (col * tile + 4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (40, 40, 40), 1, cv2.LINE_AA
        )
    for row, speaker in enumerate(speakers):
        for col, emotion in enumerate(emotions):
            clip = by_cell.get((speaker, emotion))
            if clip is None:
                continue
            doc = json.loads(clip.with_suffix(".json").read_text())
            mouth = np.asarray(doc["factors"]["mouth_open"])
            t = int(np.argmax(mouth))
            img = _frame(clip, t)
            if landmarks:
                img = draw_landmarks(img, np.asarray(doc["landmarks"][t]))
            img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
            sheet[head + row * tile : head + (row + 1) * tile, col * tile : (col + 1) * tile] = img
    out = Path(path) if path is not None else clips[0].parent / "preview.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return out
