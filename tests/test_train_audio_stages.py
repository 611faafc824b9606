"""The audio stages end to end through real Ray Train + DeepSpeed on the tiny SynthTalk set: syncnet (2 workers),
then the chain audio_lip -> audio_pose -> audio_eye -> audio_expression, each a few steps. Per stage: models/STAGE,
metrics/STAGE.json, one finished MLflow run tagged with its upstream runs, and only the stage's module changed.
After audio_pose, flow samples differ across seeds yet stay in the range of the GT pose weights (an untrained flow
does not). The visual upstream (`expression`) is a seeded tiny EDTalk with a real MLflow run (test_train_eye's
`seed_upstream`): the visual chain is trained for real in test_train_stages and costs minutes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TRAIN_PARAMS
from safetensors.torch import load_file
from test_train_eye import seed_upstream, stage_overrides

pytestmark = pytest.mark.slow

# tiny_data, tracking (and local_ray) are fixtures of tests/conftest.py, shared by the training tests.
PARAMS = TRAIN_PARAMS

FEW_STEPS = {
    "syncnet.steps": 2,
    "syncnet.pairs_per_segment": 8,
    "audio_lip.steps": 2,
    "audio_lip.clips_per_segment": 2,
    "audio_pose.steps": 40,  # enough for the flow to find the weights' offset and scale (range check)
    "audio_pose.window": 8,
    "audio_pose.clips_per_segment": 8,
    "audio_eye.steps": 2,
    "audio_eye.window": 8,
    "audio_eye.clips_per_segment": 2,
    "audio_expression.steps": 2,
    "audio_expression.window": 25,
    "audio_expression.windows_per_segment": 2,
}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio-stages")


def run(stage: str, data: Path, out: Path, **extra) -> dict:
    from pipelines.train.runner import run_stage

    return run_stage(stage, PARAMS, stage_overrides(data, out, **{**FEW_STEPS, **extra}))


@pytest.fixture(scope="module")
def visual_run(out, tracking) -> str:
    return seed_upstream(out / "models", "expression", tracking)


@pytest.fixture(scope="module")
def syncnet_run(tiny_data, tracking, out) -> dict:
    return run("syncnet", tiny_data, out, **{"train.workers": 2, "train.cpus_per_worker": 0.5})


@pytest.fixture(scope="module")
def lip_run(syncnet_run, visual_run, tiny_data, out) -> dict:
    return run("audio_lip", tiny_data, out)


@pytest.fixture(scope="module")
def pose_run(lip_run, tiny_data, out) -> dict:
    return run("audio_pose", tiny_data, out)


@pytest.fixture(scope="module")
def eye_run(pose_run, tiny_data, out) -> dict:
    return run("audio_eye", tiny_data, out)


@pytest.fixture(scope="module")
def expression_run(eye_run, tiny_data, out) -> dict:
    return run("audio_expression", tiny_data, out)


def check_run(metrics: dict, stage: str, upstream: dict[str, str], out: Path, uri: str) -> None:
    """metrics/STAGE.json, lineage.json, and exactly one finished MLflow run tagged with its upstream runs."""
    from mlflow import MlflowClient

    assert json.loads((out / "metrics" / f"{stage}.json").read_text())["run_id"] == metrics["run_id"]
    assert metrics["losses"] and all(math.isfinite(v) for v in metrics["losses"].values()), metrics
    assert metrics["val_losses"] and all(math.isfinite(v) for v in metrics["val_losses"].values()), metrics
    lineage = json.loads((out / "models" / stage / "lineage.json").read_text())
    assert lineage["run_id"] == metrics["run_id"] and lineage["upstream"] == upstream
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("edtalk").experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.stage = '{stage}'")
    assert [r.info.run_id for r in runs] == [metrics["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    for name, run_id in upstream.items():
        assert tags[f"upstream.{name}.run_id"] == run_id
    assert tags["git.commit"] and tags["fingerprint"] and tags["code.md5"]
    assert any(k.startswith("dvc.md5.") for k in tags)
    assert run.data.params[f"{stage}.steps"] == str(metrics["steps"])
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
    assert any(a.path.endswith(".png") for a in c.list_artifacts(run.info.run_id, "samples"))
    assert c.get_model_version(f"edtalk-{stage}", metrics["model_version"]).run_id == metrics["run_id"]


def moved(before: Path, after: Path) -> set[str]:
    """Tensor names whose values differ between two EDTalk folders (same keys required)."""
    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def only_trained(before: Path, after: Path, trained: str, allowed: tuple[str, ...] = ()) -> None:
    changed = moved(before, after)
    outside = {k for k in changed if not k.startswith((trained, *allowed))}
    assert not outside, f"frozen tensors changed: {sorted(outside)[:5]}"
    assert any(k.startswith(trained) for k in changed), f"{trained} did not train"


def test_syncnet(syncnet_run, out, tracking):
    from edtalk import ModelConfig
    from pipelines.train.stages.syncnet import load_syncnet

    m = syncnet_run
    assert m["steps"] == 2 and m["workers"] == 2
    assert {"loss", "accuracy", "score_in_sync", "score_off_sync"} <= set(m["val_losses"])
    check_run(m, "syncnet", {}, out, tracking)
    # The folder alone (no Ray, no DeepSpeed) gives the SyncNet and how its mouths were cut.
    net, crop = load_syncnet(out / "models" / "syncnet", ModelConfig.preset("tiny").syncnet)
    assert crop == {"crop": "landmarks", "crop_margin": 1.6}
    with torch.no_grad():
        score = net(torch.zeros(2, 5, 3, 24, 48), torch.zeros(2, 80, 16))
    assert score.shape == (2,) and ((score >= 0) & (score <= 1)).all()


def test_audio_lip(lip_run, syncnet_run, visual_run, out, tracking):
    m = lip_run
    assert m["steps"] == 2 and {"fea", "rec", "sync", "sync_score"} <= set(m["losses"])
    check_run(m, "audio_lip", {"expression": visual_run, "syncnet": syncnet_run["run_id"]}, out, tracking)
    models = out / "models"
    only_trained(models / "expression", models / "audio_lip", "audio_to_mouth.", allowed=("syncnet.",))
    # The trained SyncNet travels inside the EDTalk from here on, bit for bit.
    sync = load_file(models / "syncnet" / "syncnet.safetensors")
    lip = load_file(models / "audio_lip" / "model.safetensors")
    assert all(torch.equal(lip[f"syncnet.{k}"], v) for k, v in sync.items())


def val_segments(data: Path) -> list[dict]:
    from preprocessing.schema import decode_segment

    rows = pq.read_table(data / "segments").to_pylist()
    return [decode_segment(r) for r in rows if r["split"] == "val" and r["audio_usable"]]


def pose_samples(model, segments: list[dict], seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Flow samples (temperature 0.7, as `edtalk generate`) on each val segment's audio, and its GT pose weights."""
    samples, gt = [], []
    with torch.no_grad():
        for s in segments:
            frames = torch.from_numpy(s["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            gt.append(model.extract(frames, ("pose",))["pose"])
            cond = model.audio_to_mouth.features(torch.from_numpy(s["mel"])[None])
            samples.append(model.pose_flow.sample(cond, temperature=0.7, seed=seed)[0])
    return samples, torch.cat(gt)


def test_audio_pose_samples_vary_and_stay_in_range(pose_run, lip_run, tiny_data, out, tracking):
    from edtalk import EDTalk

    m = pose_run
    assert m["steps"] == FEW_STEPS["audio_pose.steps"] and {"nll", "rec", "tem"} <= set(m["losses"])
    check_run(m, "audio_pose", {"audio_lip": lip_run["run_id"]}, out, tracking)
    only_trained(out / "models" / "audio_lip", out / "models" / "audio_pose", "pose_flow.")

    segments = val_segments(tiny_data)
    assert segments, "the tiny set has no val segment with speech"
    trained = EDTalk.from_pretrained(out / "models" / "audio_pose").eval()
    a, gt = pose_samples(trained, segments, seed=0)
    b, _ = pose_samples(trained, segments, seed=1)
    assert all(x.shape == (len(s["frames"]), 6) for x, s in zip(a, segments, strict=True))
    assert not any(torch.allclose(x, y) for x, y in zip(a, b, strict=True)), "seeds give the same pose"
    # In range: GT pose weights of the val frames (all dims) widened by their own span on each side.
    lo, hi = float(gt.min()), float(gt.max())
    margin = hi - lo

    def outside(samples: list[torch.Tensor]) -> float:
        x = torch.cat(samples)
        return float(((x < lo - margin) | (x > hi + margin)).float().mean())

    # At most 1% of the sampled values outside (a 2-step flow samples its tails; a seed put 1 of 300 just outside).
    assert outside(a) <= 0.01 and outside(b) <= 0.01, (lo, hi, outside(a), outside(b))
    # The same check on the untrained flow (audio_lip's folder) fails by far (~24% outside): training brings the
    # samples in.
    untrained = EDTalk.from_pretrained(out / "models" / "audio_lip").eval()
    assert outside(pose_samples(untrained, segments, seed=0)[0]) >= 0.05


def test_audio_eye(eye_run, pose_run, out, tracking):
    m = eye_run
    assert m["steps"] == 2 and {"nll", "rec", "tem"} <= set(m["losses"])
    check_run(m, "audio_eye", {"audio_pose": pose_run["run_id"]}, out, tracking)
    only_trained(out / "models" / "audio_pose", out / "models" / "audio_eye", "eye_flow.")


def test_audio_expression(expression_run, eye_run, out, tracking):
    from edtalk import EDTalk

    m = expression_run
    assert m["steps"] == 2
    assert {"loss", "loss_speech_only", "loss_text_only"} <= set(m["val_losses"])
    check_run(m, "audio_expression", {"audio_eye": eye_run["run_id"]}, out, tracking)
    before, after = out / "models" / "audio_eye", out / "models" / "audio_expression"
    only_trained(before, after, "expression_predictor.")
    changed = moved(before, after)
    assert not {k for k in changed if ".feature_extractor." in k}, "HuBERT's CNN must stay frozen"
    assert any(k.startswith("expression_predictor.head.") for k in changed)
    # The last stage's folder carries every trained audio module (what `edtalk generate` loads).
    model = EDTalk.from_pretrained(after).eval()
    lip = load_file(out / "models" / "audio_lip" / "model.safetensors")
    final = load_file(after / "model.safetensors")
    assert all(
        torch.equal(final[k], v) for k, v in lip.items() if k.startswith(("audio_to_mouth.", "syncnet."))
    )
    with torch.no_grad():
        ids, mask, available = model.expression_predictor.tokenize(["happy seven"])
        w = model.expression_predictor(torch.from_numpy(np.zeros((1, 16000), np.float32)), None, ids, mask)
    assert w.shape == (1, model.config.navigation.expression) and torch.isfinite(w).all()
