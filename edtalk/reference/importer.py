"""Import a released checkpoint (+ optional Audio2Lip.pt and expression presets) into a normal model folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edtalk.reference.checkpoint import (
    FILE_NAMES,
    ReferenceImportError,
    convert,
    detect_kind,
    read_checkpoint,
    sha256,
    state_dict_of,
)
from edtalk.reference.config import reference_config

LICENCES = {
    "edtalk": "EDTalk weights and code: Apache-2.0; they build on LIA (CC BY-NC 4.0): non-commercial use only",
    "lip_pose": "EDTalk weights and code: Apache-2.0; they build on LIA (CC BY-NC 4.0): non-commercial use only",
    "lia": "LIA weights and code: CC BY-NC 4.0: non-commercial use only",
}
FRESH_SEED = 0  # seed of the modules the file does not hold (recorded in meta.json)


def import_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    audio2lip: str | Path | None = None,
    expressions: str | Path | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """Convert `checkpoint` into the model folder `output` (written whole or not at all); returns its meta."""
    from edtalk.model import META_NAME, EDTalk

    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ReferenceImportError(f"{output}: already exists and is not empty; choose a new --output folder")
    ckpt = read_checkpoint(checkpoint)
    kind = kind or detect_kind(ckpt)
    if kind is None:
        raise ReferenceImportError(
            f"{checkpoint}: none of EDTalk.pt, EDTalk_lip_pose.pt, LIA vox.pt, Audio2Lip.pt (top-level keys "
            f"{sorted(ckpt)[:6]}); pass --kind to force one"
        )
    if kind == "audio2lip":
        raise ReferenceImportError(
            f"{checkpoint}: Audio2Lip.pt holds only the audio-to-lip encoder; import EDTalk.pt and pass this file "
            "with --audio2lip"
        )
    cfg = reference_config(kind, audio2lip=audio2lip is not None)
    weights = convert(checkpoint, state_dict_of(checkpoint, ckpt, kind), kind, cfg)
    sources = [{"file": checkpoint.name, "sha256": sha256(checkpoint), "kind": kind}]
    if audio2lip is not None:
        audio2lip = Path(audio2lip)
        a2l = read_checkpoint(audio2lip)
        weights.update(convert(audio2lip, state_dict_of(audio2lip, a2l, "audio2lip"), "audio2lip", cfg))
        sources.append({"file": audio2lip.name, "sha256": sha256(audio2lip), "kind": "audio2lip"})
    del ckpt
    torch.manual_seed(FRESH_SEED)
    model = EDTalk(cfg)
    ours = model.state_dict()
    # Same values, our shapes (the reference keeps biases as [1, C, 1, 1] and modulated weights as [1, O, I, k, k]).
    weights = {k: v.reshape(ours[k].shape) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected  # the layout only names our parameters
    if expressions is not None:
        model.emotion_means = read_expressions(Path(expressions), cfg.navigation.expression)
    meta = {
        "imported_from": sources,
        "licence": LICENCES[kind],
        "fresh_init": {"seed": FRESH_SEED, "modules": sorted({k.split(".")[0] for k in missing})},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        full = json.loads((tmp / META_NAME).read_text()) | meta
        (tmp / META_NAME).write_text(json.dumps(full, indent=2) + "\n")
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return full


def read_expressions(folder: Path, n_exp: int) -> dict[str, list[float]]:
    """The reference's predefined expression weights: NAME.npy files of shape (1, n_exp) -> {NAME: weights}."""
    if n_exp == 0:
        raise ReferenceImportError(f"{folder}: this checkpoint has no expression space; drop --expressions")
    files = sorted(folder.glob("*.npy")) if folder.is_dir() else []
    if not files:
        raise ReferenceImportError(f"{folder}: no .npy expression presets found (expected e.g. angry.npy)")
    out = {}
    for f in files:
        try:
            arr = np.load(f, allow_pickle=False)
        except ValueError as exc:
            raise ReferenceImportError(f"{f}: not a plain .npy array ({exc})") from None
        if arr.shape not in ((1, n_exp), (n_exp,)) or not np.issubdtype(arr.dtype, np.floating):
            raise ReferenceImportError(
                f"{f}: shape {arr.shape} {arr.dtype}, expected float ({n_exp},) or (1, {n_exp})"
            )
        out[f.stem] = [float(v) for v in arr.astype(np.float32).reshape(-1)]
    return out


__all__ = ["FILE_NAMES", "LICENCES", "import_checkpoint", "read_expressions"]
