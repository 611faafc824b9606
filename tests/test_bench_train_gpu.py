"""bench/train_gpu.py (the GPU training check: paper preset, bf16) runs the same code on CPU at the tiny preset, so
the script a GPU session carries is known to work before it gets there."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", ["autoencoder", "mouth_pose"])
def test_gpu_training_bench_dry_run_on_cpu(tiny_data, tmp_path, stage):
    out = tmp_path / "train_gpu.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "train_gpu.py"),
        "--data",
        str(tiny_data),
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--params",
        str(ROOT / "params.yaml"),
        "--stage",
        stage,
        "--batch-sizes",
        "1,2",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--out",
        str(out),
    ]
    if stage == "mouth_pose":
        # the GPU session's other switches, and a batch larger than the samples (skipped, not fatal)
        cmd[cmd.index("1,2")] = "1,2,100000"
        cmd += ["--channels-last", "--profile", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["stage"] == stage and result["preset"] == "tiny"
    assert result["precision"].startswith("bf16")
    rows = result["results"]
    if stage == "mouth_pose":
        skipped = rows.pop()
        assert skipped["batch_size"] == 100000 and "training samples" in skipped["skipped"], skipped
        assert result["channels_last"] is True
        for bs in (1, 2):
            text = (tmp_path / f"train_gpu_profile_bs{bs}.txt").read_text()
            assert "aten::" in text and "kernels per step" in text
    assert [r["batch_size"] for r in rows] == [1, 2]
    for row in rows:
        assert row["samples_per_s"] > 0
        assert row["losses"] and all(math.isfinite(v) for v in row["losses"].values()), row
    if stage == "mouth_pose":  # bf16 autocast leaves the bases orthogonal (float32 QR)
        assert all(r["losses"]["orthogonality"] <= 1e-5 for r in rows)


def test_gpu_training_bench_says_when_there_is_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_gpu.py"), "--data", str(tmp_path), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "no CUDA device here" in proc.stderr
