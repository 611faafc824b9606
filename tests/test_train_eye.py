"""Stage `eye` end to end through real Ray Train + DeepSpeed on a tiny SynthTalk set (eye-swap pairs): outputs, one
MLflow run with the upstream lineage, and what stays frozen (everything but EYLN and D, and the mouth/pose bases
bit for bit, by the ordered QR)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_PARAMS
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# tiny_data, tracking (and local_ray) are fixtures of tests/conftest.py, shared by the training tests.
PARAMS = TRAIN_PARAMS


def seed_upstream(models_dir: Path, stage: str, uri: str, seed: int = 1) -> str:
    """models_dir/STAGE as an upstream stage run leaves it: a tiny EDTalk folder and a lineage.json naming a finished
    MLflow run (training the whole upstream chain here would cost minutes; test_train_stages trains it for real).
    Returns that run's id."""
    from mlflow import MlflowClient

    from edtalk import EDTalk, ModelConfig
    from pipelines import lineage

    torch.manual_seed(seed)
    folder = models_dir / stage
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(folder)
    client = MlflowClient(uri)
    run = client.create_run(lineage.experiment_id("upstream-fixtures", uri), run_name=f"{stage}-fixture")
    client.set_terminated(run.info.run_id)
    lineage.write_lineage(str(folder), {"stage": stage, "run_id": run.info.run_id, "git_commit": "fixture"})
    return run.info.run_id


def stage_overrides(data: Path | str, out: Path | str, **extra) -> list[str]:
    values = {
        "train.data_dir": data,
        "train.models_dir": Path(out) / "models",
        "train.metrics_dir": Path(out) / "metrics",
        "train.storage_path": Path(out) / "ray",
        "train.workers": 1,
        "train.cpus_per_worker": 1,
        "train.batch_size": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 100,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def check_run(metrics: dict, stage: str, upstream: str, upstream_run: str, out: Path, uri: str) -> None:
    """metrics/STAGE.json, models/STAGE + lineage.json, and exactly one finished MLflow run tagged with its upstream."""
    from mlflow import MlflowClient

    from edtalk import EDTalk

    assert json.loads((out / "metrics" / f"{stage}.json").read_text())["run_id"] == metrics["run_id"]
    assert all(math.isfinite(v) for v in metrics["losses"].values()), metrics["losses"]
    EDTalk.from_pretrained(out / "models" / stage)  # the edtalk API alone: no Ray, no DeepSpeed
    lineage = json.loads((out / "models" / stage / "lineage.json").read_text())
    assert lineage["run_id"] == metrics["run_id"] and lineage["upstream"] == {upstream: upstream_run}
    c = MlflowClient(uri)
    runs = c.search_runs(
        [c.get_experiment_by_name("edtalk").experiment_id], filter_string=f"tags.stage = '{stage}'"
    )
    assert [r.info.run_id for r in runs] == [metrics["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[f"upstream.{upstream}.run_id"] == upstream_run
    assert run.data.params[f"{stage}.steps"] == str(metrics["steps"])
    assert any(a.path.endswith(".png") for a in c.list_artifacts(run.info.run_id, "samples"))
    assert c.get_model_version(f"edtalk-{stage}", metrics["model_version"]).run_id == metrics["run_id"]


def frozen_and_trained(before: Path, after: Path, trained: tuple[str, ...]) -> None:
    """Every tensor outside `trained` (and D) is bitwise unchanged; each trained module changed."""
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert a.keys() == b.keys()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    outside = {k for k in moved if not k.startswith((*trained, "discriminator."))}
    assert not outside, f"frozen tensors changed: {sorted(outside)[:5]}"
    for prefix in trained:
        assert any(k.startswith(prefix) for k in moved), f"{prefix} did not train"


def bases(folder: Path) -> dict[str, torch.Tensor]:
    from edtalk import EDTalk

    with torch.no_grad():
        return EDTalk.from_pretrained(folder).navigation.bases()


def test_eye_stage_end_to_end(tiny_data, tracking, tmp_path):
    from edtalk import EDTalk
    from pipelines.train.runner import run_stage

    upstream_run = seed_upstream(tmp_path / "models", "mouth_pose", tracking)
    metrics = run_stage("eye", PARAMS, stage_overrides(tiny_data, tmp_path, **{"eye.steps": 2}))

    assert metrics["steps"] == 2 and metrics["workers"] == 1
    assert {"loss", "rec", "per", "adv", "self", "fea", "d_loss", "orthogonality", "spread_eye"} <= set(
        metrics["losses"]
    )
    assert {"rec", "fea"} <= set(metrics["val_losses"])
    check_run(metrics, "eye", "mouth_pose", upstream_run, tmp_path, tracking)

    up, new = tmp_path / "models" / "mouth_pose", tmp_path / "models" / "eye"
    frozen_and_trained(up, new, ("navigation.eye.",))
    before, after = bases(up), bases(new)
    for space in ("mouth", "pose"):  # the ordered QR: a later bank never moves an earlier one
        assert torch.equal(before[space], after[space]), space
    assert not torch.equal(before["eye"], after["eye"])
    model = EDTalk.from_pretrained(new)
    assert model.orthogonality_error() < 1e-5
    assert tuple(model.active_spaces) == ("mouth", "pose", "eye")
