"""`dvc repro` of the stages that exist (synth -> preprocess -> autoencoder -> mouth_pose) in a temporary copy of the
repository on a tiny config: every stage runs, a second `dvc repro` runs nothing, and the DVC hashes the runs
tagged in MLflow are the ones DVC recorded in dvc.lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TARGET = "mouth_pose"  # the last stage built so far; move it down the graph as stages land

TINY = {
    "synth": {
        "identities": 3,
        "clips_per_identity": 1,
        "seconds": 2.0,
        "val_identities": 1,
        "test_identities": 0,
    },
    "preprocess": {"size": 64, "landmark_backend": "sidecar", "workers": 1, "pairs_per_segment": 2},
    "train": {"workers": 1, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "val_batches": 1},
    "autoencoder": {"steps": 2, "pairs_per_segment": 2},
    "mouth_pose": {"steps": 2},
}


def _copy_repo(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree (what a fresh clone plus edits holds)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        src = REPO / raw.decode()
        if src.is_file():
            (dst / raw.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / raw.decode())


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout + proc.stderr


def test_dvc_repro_runs_once_then_nothing(tmp_path):
    from mlflow import MlflowClient

    repo = tmp_path / "repo"
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),  # the copy's code, not the checkout's
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
    }
    env.pop("RAY_ADDRESS", None)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], repo, env)

    # one parent MLflow run around the invocation, as scripts/demo.sh opens it: DVC's stage processes nest under it
    start = [sys.executable, "-m", "pipelines.pipeline_run", "start"]
    parent = subprocess.run(
        start, cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    env["EDTALK_PARENT_RUN_ID"] = parent
    first = _run(["dvc", "repro", TARGET], repo, env)
    for stage in ("synth", "preprocess", "autoencoder", "mouth_pose"):
        assert f"Running stage '{stage}'" in first, first[-3000:]
    assert (repo / "models" / "mouth_pose" / "model.safetensors").is_file()

    second = _run(["dvc", "repro", TARGET], repo, env)
    assert "Running stage" not in second, second[-3000:]
    assert "up to date" in _run(["dvc", "status", TARGET], repo, env)

    # Our DVC-style md5 of the inputs, tagged on the MLflow run, equals what DVC itself locked.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["mouth_pose"]["deps"]
    locked = {d["path"]: d["md5"] for d in lock}
    lineage = yaml.safe_load((repo / "models" / "mouth_pose" / "lineage.json").read_text())
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(lineage["run_id"])
    assert run.data.tags["dvc.md5.data/processed"] == locked["data/processed"]
    assert run.data.tags["dvc.md5.models/autoencoder"] == locked["models/autoencoder"]
    # ... the dataset input's digest is that same hash, the run is nested, and the registered version carries the
    # hash DVC locked for the stage's output folder
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [locked["data/processed"]]
    assert run.data.tags["mlflow.parentRunId"] == parent
    outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["mouth_pose"]["outs"]
    version = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version(
        lineage["registered_model"], lineage["model_version"]
    )
    assert version.tags["dvc.md5"] == next(o["md5"] for o in outs if o["path"] == "models/mouth_pose")


def test_render_stage_command_makes_a_video_of_a_held_out_identity(tmp_path):
    """dvc.yaml's `render` command, as written, on SynthTalk clips generated with params.yaml's synth split (short,
    small) and a tiny audio-capable model standing in for models/audio_expression."""
    import shlex

    import av

    from edtalk import EDTalk, ModelConfig
    from preprocessing.synthtalk import SynthConfig, generate_set

    cmd = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["render"]["cmd"])
    args = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert cmd[:2] == ["edtalk", "generate"] and args["--model"] == "models/audio_expression"
    synth = yaml.safe_load((REPO / "params.yaml").read_text())["synth"]
    cfg = SynthConfig.from_dict({**synth, "clips_per_identity": 2, "seconds": 1.0, "size": 64, "workers": 1})
    generate_set(cfg, tmp_path / "data" / "raw" / "synthtalk")
    meta = json.loads((tmp_path / Path(args["--identity"]).with_suffix(".json")).read_text())
    assert meta["split"] == "test", f"render identity {args['--identity']} is in the {meta['split']} split"
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(tmp_path / "models" / "audio_expression")
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    _run(cmd, tmp_path, env)
    with av.open(str(tmp_path / args["--output"])) as video:
        kinds = {s.type for s in video.streams}
        frames = sum(1 for _ in video.decode(video=0))
    assert kinds == {"video", "audio"} and frames >= 20, (kinds, frames)
