"""Shared by the tests/test_reference_*.py files: the golden fixtures of ../shared/reference, the checkpoints
regenerated from their manifests' recipe (and checked against the manifests' sha256), comparisons with the
fixture README's tolerances, and imports through the `edtalk import` command."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
REF = REPO_ROOT.parent / "shared" / "reference"
MANIFESTS = {"edtalk": "EDTalk", "lip_pose": "EDTalk_lip_pose", "lia": "LIA_vox", "audio2lip": "Audio2Lip"}
_TOL = json.loads((REF / "tolerances.json").read_text())["noise_floor_and_recommended"]


def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(REF / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def regenerate(kind: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(entry name, state dict) of a released file's layout with the manifest's seeded weights, each tensor's
    little-endian bytes checked against the manifest's sha256."""
    man = json.loads((REF / f"manifest_{MANIFESTS[kind]}.json").read_text())
    sd = {}
    for e in man["keys"]:
        if e["init"] == "randn":
            g = torch.Generator().manual_seed(man["seed_base"] + e["i"])
            t = torch.randn(e["shape"], generator=g) * e["scale"] + e["offset"]
        else:
            t = torch.tensor(e["literal"], dtype=getattr(torch, e["dtype"]))
        digest = hashlib.sha256(t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()).hexdigest()
        assert digest == e["check"]["sha256_le_bytes"], f"regenerated {e['key']} differs from the manifest"
        sd[e["key"]] = t
    return man["state_dict_key"], sd


def write_pt(path: Path, kind: str, with_args: bool = True) -> Path:
    """The regenerated file saved as the authors' trainers do (a dict with an argparse.Namespace `args`)."""
    entry, sd = regenerate(kind)
    obj = {entry: sd}
    if with_args:
        obj["args"] = argparse.Namespace(size=256, latent_dim_style=512, lr=0.002, exp_path="./exps")
    torch.save(obj, path)
    return path


def run_import(*args: str):
    from pipelines.cli import cli

    return CliRunner().invoke(cli, ["import", *map(str, args)])


def check(npz: str, key: str, ours: torch.Tensor | np.ndarray, ref: np.ndarray) -> None:
    """Max and mean |ours - ref| within the fixture's recommended tolerances (exact for integer arrays)."""
    a = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    a = a.reshape(ref.shape)
    if np.issubdtype(ref.dtype, np.integer):
        assert np.array_equal(a, ref), f"{npz}:{key} differs"
        return
    # A stacked array takes the tolerance measured on its first row ("frames[0]"); the rest the README's default.
    table = _TOL.get(npz, {})
    tol = (
        table.get(key)
        or table.get(f"{key}[0]")
        or {"recommended_max_abs": 1e-4, "recommended_mean_abs": 1e-5}
    )
    diff = np.abs(a.astype(np.float64) - ref.astype(np.float64))
    assert diff.max() <= tol["recommended_max_abs"] and diff.mean() <= tol["recommended_mean_abs"], (
        f"{npz}:{key} max |Δ| {diff.max():.3g} (tol {tol['recommended_max_abs']}), mean {diff.mean():.3g} "
        f"(tol {tol['recommended_mean_abs']})"
    )


def check_map(npz: str, name: str, fmap: torch.Tensor, ref: dict[str, np.ndarray]) -> None:
    """A feature map against the fixture's stored form: whole (<= 16x16) or channels 0-1, plus channel stats."""
    if name in ref:
        check(npz, name, fmap, ref[name])
    else:
        check(npz, f"{name}_ch0-1", fmap[:, :2], ref[f"{name}_ch0-1"])
    if f"{name}_chmean" in ref:
        flat = fmap[0].flatten(1).double()
        check(npz, f"{name}_chmean", flat.mean(1), ref[f"{name}_chmean"])
        check(npz, f"{name}_chstd", flat.std(1), ref[f"{name}_chstd"])


def import_model(tmp: Path, name: str, kind: str, *extra: str):
    """Regenerate `kind`'s released file as tmp/NAME.pt, import it with the command into tmp/NAME, load it."""
    from edtalk import EDTalk

    out = tmp / name
    result = run_import(write_pt(tmp / f"{name}.pt", kind), "--output", out, *extra)
    assert result.exit_code == 0, result.output
    return EDTalk.from_pretrained(out).eval()


def image_inputs() -> dict[str, torch.Tensor]:
    """The fixture's image inputs as tensors (the uint8 decoded pixels left out)."""
    return {k: torch.from_numpy(v) for k, v in fixture("inputs_images.npz").items() if "uint8" not in k}
