"""Read a released checkpoint safely, recognise which of the four files it is, convert it into our modules.

Safety: `torch.load(weights_only=True)` runs PyTorch's restricted unpickler, which only rebuilds tensors and plain
containers and refuses every other global, so a crafted pickle cannot run code. The authors' trainers also store
`args`, an `argparse.Namespace`, which that unpickler rejects. We do not allowlist the real class (nothing from the
file is ever constructed as an argparse object): the name "argparse.Namespace" is mapped to `_DiscardedArgs`, an
empty placeholder whose `__setstate__` drops the state, so the file loads and `args` carries nothing. With
`mmap=True` the storages are mapped, not read, so entries other than the one we take (`dis`, optimiser states)
are never brought into memory.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edtalk.config import ModelConfig
from edtalk.reference.config import KINDS
from edtalk.reference.layout import layout

# The entry each released file's demos read (the rest of the file is ignored).
ENTRY = {"edtalk": "gen", "lip_pose": "gen", "lia": "gen", "audio2lip": "audio2lip"}
FILE_NAMES = {
    "edtalk": "EDTalk.pt",
    "lip_pose": "EDTalk_lip_pose.pt",
    "lia": "LIA vox.pt",
    "audio2lip": "Audio2Lip.pt",
}


class ReferenceImportError(ValueError):
    """A released checkpoint that cannot be imported; the message is one line naming the file and the key."""


class _DiscardedArgs:
    """Stands in for argparse.Namespace while unpickling (see the module docstring); keeps nothing."""

    def __setstate__(self, state: Any) -> None:
        pass


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The top-level dict of a released file, loaded with the restricted unpickler (nothing else runs)."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceImportError(
            f"{path}: no such file; pass the path of EDTalk.pt, EDTalk_lip_pose.pt, vox.pt or Audio2Lip.pt"
        )
    try:
        with torch.serialization.safe_globals([(_DiscardedArgs, "argparse.Namespace")]):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next(
            (ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else ""
        )
        raise ReferenceImportError(
            f"{path}: refused to unpickle: it holds objects other than tensors and plain containers ({why}); "
            "a released checkpoint holds only state dicts, so this file was not written by the authors' code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ReferenceImportError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {str(exc).splitlines()[0][:160]}); "
            "download the file again"
        ) from None
    if not isinstance(obj, Mapping):
        raise ReferenceImportError(
            f"{path}: top level is a {type(obj).__name__}, expected a dict with 'gen' or 'audio2lip'"
        )
    return dict(obj)


def detect_kind(ckpt: Mapping[str, Any]) -> str | None:
    """Which released file this is, from its keys (None: none of the four)."""
    if isinstance(ckpt.get("audio2lip"), Mapping):
        return "audio2lip"
    gen = ckpt.get("gen")
    if not isinstance(gen, Mapping):
        return None
    if "dec.direction.weight" in gen or "enc.fc.0.weight" in gen:
        return "lia"
    if "direction_exp.weight" in gen:
        return "edtalk"
    if "direction_lipnonlip.weight" in gen:
        return "lip_pose"
    return None


def state_dict_of(path: str | Path, ckpt: Mapping[str, Any], kind: str) -> Mapping[str, torch.Tensor]:
    """The entry of `kind` (with a clear error when it is absent or is another network's)."""
    if kind not in KINDS:
        raise ReferenceImportError(f"{path}: unknown kind {kind!r}; choose one of {list(KINDS)}")
    found = detect_kind(ckpt)
    entry = ENTRY[kind]
    sd = ckpt.get(entry)
    if not isinstance(sd, Mapping) or (found is not None and found != kind):
        seen = (
            f"it looks like {FILE_NAMES[found]} (--kind {found})"
            if found
            else f"top-level keys {sorted(ckpt)[:6]}"
        )
        raise ReferenceImportError(
            f"{path}: expected {FILE_NAMES[kind]} with a state dict under {entry!r}, but {seen}"
        )
    return sd


def convert(path: str | Path, sd: Mapping[str, Any], kind: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Reference state dict -> {our parameter name: tensor}, checking every key and shape like a strict load."""
    lay = layout(kind, cfg)
    unexpected = [k for k in sd if k not in lay]
    if unexpected:
        raise ReferenceImportError(
            f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected) in {FILE_NAMES[kind]}'s "
            f"{ENTRY[kind]!r}; expected exactly the {len(lay)} keys of the reference network"
        )
    missing = [k for k in lay if k not in sd]
    if missing:
        raise ReferenceImportError(
            f"{path}: missing key {missing[0]!r} ({len(missing)} missing) in {FILE_NAMES[kind]}'s {ENTRY[kind]!r}; "
            f"expected shape {list(lay[missing[0]].shape)}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, entry in lay.items():
        value = sd[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != entry.shape:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ReferenceImportError(f"{path}: key {key!r} has shape {got}, expected {list(entry.shape)}")
        if not (value.is_floating_point() or key.endswith("num_batches_tracked")):
            raise ReferenceImportError(
                f"{path}: key {key!r} has dtype {value.dtype}, expected a float tensor"
            )
        for target, cols in entry.targets:
            v = value if cols is None else value[:, cols[0] : cols[1]]
            out[target] = v.to(torch.float32) if v.is_floating_point() else v.clone()
    return out
