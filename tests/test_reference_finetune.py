"""Fine-tuning from the authors' weights: `train.init_from` an imported (fixture) EDTalk.pt, 2 mouth_pose steps
through Ray Train + DeepSpeed on the tiny SynthTalk set (upsampled to the reference's 256 px), saved, reloaded
with the reference switches intact, generating; the lineage points at the imported file's SHA-256."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TRAIN_PARAMS, train_overrides
from reference_kit import run_import, write_pt
from safetensors.torch import load_file

from edtalk import EDTalk


@pytest.mark.slow  # a 64M-parameter 256 px model through Ray Train + DeepSpeed: about a minute or more
def test_mouth_pose_fine_tune_from_imported_model(tiny_data, tracking, tmp_path):
    from mlflow import MlflowClient

    from pipelines.train.runner import run_stage

    ckpt = write_pt(tmp_path / "EDTalk.pt", "edtalk")
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    imported = tmp_path / "imported"
    assert run_import(ckpt, "--output", imported).exit_code == 0
    extra = {
        "train.init_from": imported,
        "train.workers": 1,
        "train.cpus_per_worker": 1,
        "train.batch_size": 1,
        "train.sample_every": 0,
        "mouth_pose.mouth_bases": "learned",  # no autoencoder run, so no mouth-local directions to hold
    }
    metrics = run_stage("mouth_pose", TRAIN_PARAMS, train_overrides(tiny_data, tmp_path, **extra))
    assert metrics["steps"] == 2

    out = tmp_path / "models" / "mouth_pose"
    model = EDTalk.from_pretrained(out).eval()
    start = EDTalk.from_pretrained(imported)
    assert model.config == start.config and model.config.generator.warp == "reference"
    before, after = load_file(imported / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(before["encoder.to_latent.weight"], after["encoder.to_latent.weight"])  # E frozen
    assert not torch.equal(before["navigation.mouth.head.2.weight"], after["navigation.mouth.head.2.weight"])
    assert torch.equal(before["navigation.expression.bank"], after["navigation.expression.bank"])

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["init_from"]["imported_from"][0]["sha256"] == sha
    tags = MlflowClient(tracking).get_run(metrics["run_id"]).data.tags
    assert tags["init_from.edtalk.sha256"] == sha

    img = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        frame = model.render(model.encode_identity(img), model.extract(img.flip(-1), ["mouth", "pose"]))
    assert frame.shape == (1, 3, 256, 256) and torch.isfinite(frame).all()
