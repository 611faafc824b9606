"""`edtalk evaluate` on held-out SynthTalk segments (real preprocessing, tiny random model, sqlite MLflow), and the
landmark detection on small generated frames it relies on."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edtalk import EDTalk, ModelConfig
from edtalk.metrics import f_lmd, m_lmd
from pipelines import video_io
from pipelines.evaluate import EvaluateParams, detect_landmarks, evaluate
from pipelines.generate import FaceCropper
from preprocessing.params import PreprocessParams


def test_small_frames_are_upsampled_before_landmark_detection(media_dir):
    """Generated frames are small (64 px in the tiny preset) and dlib's HOG detector looks for faces of ~80 px:
    upsampled first, landmarks of 64 px frames match those found at full resolution to a fraction of a pixel."""
    backend = FaceCropper(PreprocessParams(landmark_backend="dlib")).backend
    frames = video_io.DrivingVideo(media_dir / "videos" / "EDTalk__mouth_source.mp4").frames(0, 20)  # 256 px
    reference = backend.track(frames).landmarks * (64 / 256)
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames])
    lmk, valid = detect_landmarks(backend, small, 256)
    assert valid.all()
    assert m_lmd(lmk, reference) < 1.0 and f_lmd(lmk, reference) < 1.0
    # the shrunk frames really are what the detector sees: far from the full-size landmarks without rescaling
    assert f_lmd(lmk * 4, reference) > 5.0


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory):
    """3 SynthTalk speakers x one 2 s clip, all in the test split, preprocessed to 64 px with sidecar landmarks."""
    import ray

    from preprocessing.pipeline import run
    from preprocessing.synthtalk import SynthConfig, generate_set

    root = tmp_path_factory.mktemp("eval-data")
    cfg = SynthConfig.from_dict(
        {"identities": 3, "clips_per_identity": 1, "seconds": 2.0, "val_identities": 0, "test_identities": 3}
    )
    generate_set(cfg, root / "raw")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        params = PreprocessParams(size=64, landmark_backend="sidecar", workers=1, pairs_per_segment=0)
        run(str(root / "raw"), str(root / "processed"), params, progress=False)
    finally:
        ray.shutdown()
    return root / "processed"


@pytest.mark.slow
def test_evaluate_writes_metrics_and_an_mlflow_run_with_lineage(held_out_data, tmp_path, monkeypatch):
    import mlflow

    from pipelines import lineage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    torch.manual_seed(0)
    model_dir = tmp_path / "models" / "audio_expression"
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(model_dir)
    client = lineage.client(uri)
    upstream = client.create_run(lineage.experiment_id("fixtures", uri), run_name="audio_expression-fixture")
    lineage.write_lineage(str(model_dir), {"stage": "audio_expression", "run_id": upstream.info.run_id})

    out = tmp_path / "metrics" / "evaluate.json"
    params = EvaluateParams(max_frames=40, videos=1, threads=1)
    metrics = evaluate(str(tmp_path / "models"), str(held_out_data), str(out), params)
    saved = json.loads(out.read_text())
    assert saved["segments"] >= 2 and saved["frames"] == 40 * saved["segments"]
    for mode in ("video", "audio"):
        assert 0 < saved[f"{mode}.psnr"] < 60 and 0 <= saved[f"{mode}.ssim"] <= 1
        assert 0 <= saved[f"{mode}.lmd_detected"] <= 1
        assert np.isfinite(saved[f"{mode}.sync_conf"])
    assert np.isfinite(saved["ground_truth.sync_conf"])
    assert saved["orthogonality_error"] < 1e-4
    assert (
        saved["lpips_available"] is False and "video.lpips" not in saved
    )  # no LPIPS weights on this machine
    matrix = np.array(saved["disentanglement"]["matrix"], dtype=float)
    assert matrix.shape == (4, 4) and np.all((matrix >= 0) & (matrix <= 1))

    run = mlflow.MlflowClient(uri).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["upstream.model.run_id"] == upstream.info.run_id
    assert run.data.tags["git.commit"] and any(k.startswith("dvc.md5.") for k in run.data.tags)
    assert run.data.metrics["video_psnr"] == pytest.approx(saved["video.psnr"])
    assert run.data.params["evaluate.max_frames"] == "40"
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"evaluate.json", "evaluate_disentanglement.png", "videos"} <= artifacts
    video = next(p for p in (tmp_path / "metrics" / "evaluate_videos").glob("*.mp4"))
    info = video_io.probe(video)
    assert info["video"]["width"] == 3 * 64 and info["video"]["frames"] == 40 and info["audio"] is not None

    res = CliRunner().invoke(
        __import__("pipelines.cli", fromlist=["cli"]).cli,
        ["evaluate", "--model", str(model_dir), "--data", str(held_out_data), "--output", str(tmp_path / "e.json"),
         "--no-mlflow", "--set", "evaluate.split=val"],
    )  # fmt: skip
    assert res.exit_code != 0 and "no segments in split 'val'" in res.output and "'test':" in res.output
