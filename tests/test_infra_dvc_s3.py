"""A DVC remote on S3 (moto on loopback): `dvc push` from one clone and `dvc pull` into a fresh clone round-trip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.services

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({out.returncode}) in {cwd}:\n{out.stdout}\n{out.stderr}"
        )
    return out.stdout


def test_dvc_push_pull_round_trip(s3_server, tmp_path):
    bucket = s3_server.create_bucket("edtalk-dvc")
    env = {
        **os.environ,
        # Credentials only from the environment, as on a cluster (the endpoint is in the remote's config).
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "DVC_NO_ANALYTICS": "1",
    }
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(k, None)
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["dvc", "remote", "add", "-d", "s3remote", f"s3://{bucket}/store"], repo, env)
    run(["dvc", "remote", "modify", "s3remote", "endpointurl", s3_server.endpoint], repo, env)

    data = repo / "data" / "processed"
    (data / "segments").mkdir(parents=True)
    payload = {
        "segments/part-0.parquet": os.urandom(200_000),  # binary, not tiny: a realistic object
        "_stats.json": b'{"segments": 7}',
    }
    for rel, content in payload.items():
        (data / rel).write_bytes(content)
    run(["dvc", "add", "-q", "data/processed"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "data"], repo, env)
    run(["dvc", "push", "-q"], repo, env)

    # The content-addressed objects are in the bucket (two files + the directory manifest).
    keys = s3_server.keys(bucket, "store/")
    assert len([k for k in keys if "/files/md5/" in k]) == 3, keys

    # A fresh clone (another machine: no DVC cache) gets the data back from S3 alone.
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data" / "processed").exists()
    run(["dvc", "pull", "-q"], clone, env)
    for rel, content in payload.items():
        assert (clone / "data" / "processed" / rel).read_bytes() == content
    status = run(["dvc", "status", "-c"], clone, env)
    assert "up to date" in status.lower() or "in sync" in status.lower(), status


def test_pipeline_job_script_runs_and_pushes(s3_server, tmp_path):
    """infra/scripts/dvc-repro.sh (what the pipeline RayJob runs) on a small DVC pipeline: remote from the
    environment, -S overrides recorded in params.yaml, outputs pushed to S3."""
    bucket = s3_server.create_bucket("edtalk-dvc-job")
    env = {
        **os.environ,
        **s3_server.env(),
        "DVC_REMOTE_URL": f"s3://{bucket}/dvc",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "DVC_NO_ANALYTICS": "1",
    }
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    (repo / "params.yaml").write_text("train:\n  scale: 1\n")
    (repo / "raw.txt").write_text("3\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  scale:\n"
        "    cmd: python -c \"import yaml; s = yaml.safe_load(open('params.yaml'))['train']['scale'];"
        " open('out.txt', 'w').write(str(int(open('raw.txt').read()) * s))\"\n"
        "    deps: [raw.txt]\n"
        "    params: [train.scale]\n"
        "    outs: [out.txt]\n"
    )
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "pipeline"], repo, env)

    script = Path(__file__).resolve().parents[1] / "infra" / "scripts" / "dvc-repro.sh"
    run(["bash", str(script), "scale", "-S", "train.scale=5"], repo, env)
    assert (repo / "out.txt").read_text() == "15"
    assert "scale: 5" in (repo / "params.yaml").read_text()  # the override is in the experiment's params
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()  # site settings stay in config.local
    assert [k for k in s3_server.keys(bucket, "dvc/") if "/files/md5/" in k], "nothing pushed"
