"""Stage `expression` end to end through real Ray Train + DeepSpeed on a tiny SynthTalk set (K-frame windows of
segments): outputs, one MLflow run with the upstream lineage, what stays frozen, and the per-emotion mean expression
weights stored with the model for `edtalk generate --expression EMOTION`. Paths are relative to the working
directory, as `dvc repro` gives them (the stage must find the data from inside a Ray worker)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TRAIN_PARAMS
from test_train_eye import bases, check_run, frozen_and_trained, seed_upstream, stage_overrides

# tiny_data, tracking (and local_ray) are fixtures of tests/conftest.py, shared by the training tests.
PARAMS = TRAIN_PARAMS


def training_emotions(data_dir) -> set[str]:
    """The emotion labels of the segments the runner trains on (its own split rule)."""
    from pipelines.train import data

    train_ids, _, _ = data.train_val_ids(data.segment_splits(str(data_dir)), 0.2)
    table = pq.read_table(data_dir / "segments", columns=["segment_id", "emotion"]).to_pylist()
    return {r["emotion"] for r in table if r["segment_id"] in set(train_ids) and r["emotion"]}


@pytest.mark.slow
def test_expression_stage_end_to_end(tiny_data, tracking, tmp_path, monkeypatch):
    from edtalk import EDTalk
    from pipelines.generate import classify_source, model_emotions
    from pipelines.train.runner import run_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(tiny_data, target_is_directory=True)
    upstream_run = seed_upstream(tmp_path / "models", "eye", tracking)
    extra = {"expression.steps": 2, "expression.window": 3, "expression.samples_per_segment": 2}
    metrics = run_stage("expression", PARAMS, stage_overrides("data", ".", **extra))

    assert metrics["steps"] == 2 and metrics["workers"] == 1
    assert {"loss", "rec", "per", "adv", "mot", "mc", "d_loss", "orthogonality"} <= set(metrics["losses"])
    check_run(metrics, "expression", "eye", upstream_run, tmp_path, tracking)

    up, new = tmp_path / "models" / "eye", tmp_path / "models" / "expression"
    frozen_and_trained(up, new, ("navigation.expression.", "eem."))
    before, after = bases(up), bases(new)
    for space in ("mouth", "pose", "eye"):
        assert torch.equal(before[space], after[space]), space
    assert not torch.equal(before["expression"], after["expression"])

    # Generation side: the folder alone, through the edtalk API, carries one mean per training emotion.
    model = EDTalk.from_pretrained(new)
    assert model.orthogonality_error() < 1e-5
    means = model_emotions(model)
    emotions = training_emotions(tiny_data)
    assert means is not None and set(means) == emotions and len(emotions) >= 2
    n = model.config.navigation.expression
    assert all(len(v) == n and all(math.isfinite(x) for x in v) for v in means.values())
    assert len({tuple(v) for v in means.values()}) == len(means), "emotion means are not per-emotion"
    for emotion in emotions:
        assert classify_source("expression", emotion, False, sorted(means)) == ("emotion", emotion)
    with torch.no_grad():
        ident = model.encode_identity(torch.zeros(1, 3, 64, 64))
        frame = model.render(ident, {"expression": torch.tensor([means[sorted(means)[0]]])})
    assert frame.shape == (1, 3, 64, 64) and torch.isfinite(frame).all()


def test_window_indices_clamp_at_the_segment_edges():
    from pipelines.train.samples_visual import window_indices

    assert window_indices(0, 5, 10).tolist() == [0, 0, 0, 1, 2]
    assert window_indices(9, 5, 10).tolist() == [7, 8, 9, 9, 9]
    assert window_indices(4, 4, 10).tolist() == [2, 3, 4, 5]
    assert window_indices(0, 3, 1).tolist() == [0, 0, 0]


def test_expression_params_name_what_is_wrong():
    from pipelines.train.stages.expression import ExpressionParams

    with pytest.raises(ValueError, match="window"):
        ExpressionParams(window=0)
    with pytest.raises(ValueError, match="sigma"):
        ExpressionParams(motion_sigma=2.0)
    with pytest.raises(ValueError, match="emotion_frames"):
        ExpressionParams(emotion_frames=-1)
