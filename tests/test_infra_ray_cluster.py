"""A two-node Ray cluster on loopback (two raylets, 1 CPU each): work reaches both nodes, runs on either node log to
the MLflow server, and `edtalk preprocess` runs through RAY_ADDRESS across both nodes with data on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.services

BIN = Path(sys.executable).parent


def test_tasks_run_on_both_nodes(ray_cluster):
    nodes = ray_cluster.node_ids()
    assert set(nodes) == {"head", "worker"} and nodes["head"] != nodes["worker"]
    got = ray_cluster.run_driver(
        """
import json, time, ray
ray.init()

@ray.remote(num_cpus=0.5)
def where(_):
    time.sleep(0.2)
    return ray.get_runtime_context().get_node_id()

spread = ray.get([where.options(scheduling_strategy="SPREAD").remote(i) for i in range(6)])
head = ray.get(where.options(resources={"head_node": 0.01}).remote(0))
worker = ray.get(where.options(resources={"worker_node": 0.01}).remote(0))
print(json.dumps({"spread": sorted(set(spread)), "head": head, "worker": worker}))
"""
    )
    assert got["head"] == nodes["head"] and got["worker"] == nodes["worker"]
    assert got["spread"] == sorted(nodes.values()), "SPREAD tasks did not reach both nodes"


@pytest.mark.slow
def test_runs_logged_from_either_node_reach_the_mlflow_server(
    ray_cluster, mlflow_server, s3_server, monkeypatch
):
    from mlflow import MlflowClient

    nodes = ray_cluster.node_ids()
    # Ray workers get the tracking settings as a job's runtime env, as a RayJob's pods get them from Secrets.
    got = ray_cluster.run_driver(
        """
import json, os, tempfile, ray
ray.init(runtime_env={"env_vars": json.loads(os.environ["CLIENT_ENV"])})

@ray.remote(num_cpus=0.5)
def train_step(where):
    import mlflow
    node = ray.get_runtime_context().get_node_id()
    mlflow.set_experiment("two-node-cluster")
    with mlflow.start_run(run_name=f"on-{where}") as run:
        mlflow.set_tag("node_id", node)
        mlflow.log_param("where", where)
        mlflow.log_metric("loss", 0.5)
        path = os.path.join(tempfile.mkdtemp(), "note.txt")
        open(path, "w").write(where)
        mlflow.log_artifact(path)
    return run.info.run_id

ids = ray.get([train_step.options(resources={f"{w}_node": 0.01}).remote(w) for w in ("head", "worker")])
print(json.dumps(ids))
""",
        extra_env={"CLIENT_ENV": json.dumps(mlflow_server.client_env())},
        timeout=240,
    )
    for k, v in mlflow_server.client_env().items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = {client.get_run(r).data.params["where"]: client.get_run(r) for r in got}
    assert {w: r.data.tags["node_id"] for w, r in runs.items()} == nodes
    keys = s3_server.keys(mlflow_server.bucket)
    for run_id in got:
        assert any(k.endswith(f"{run_id}/artifacts/note.txt") for k in keys), (
            f"artifact of {run_id} not in S3"
        )


@pytest.mark.slow
def test_preprocess_runs_across_both_nodes_with_data_on_s3(ray_cluster, s3_env, tmp_path):
    from preprocessing import storage

    s3_server = s3_env
    env = {**ray_cluster.env(), **s3_server.env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    s3_server.create_bucket("edtalk-raw")
    s3_server.create_bucket("edtalk-processed")
    # Small SynthTalk clips (with sidecar landmarks), written straight to S3.
    synth = subprocess.run(
        ["edtalk", "synth", "--out", "s3://edtalk-raw/synth", "--identities", "2", "--clips-per-identity", "2",
         "--seconds", "2", "--size", "128", "--seed", "3"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stdout + synth.stderr
    before = ray_cluster.workers_by_node()
    run = subprocess.run(
        ["edtalk", "preprocess", "--input", "s3://edtalk-raw/synth", "--output", "s3://edtalk-processed/run",
         "--params", str(Path(__file__).resolve().parents[1] / "params.yaml"), "--no-progress",
         "--set", "preprocess.size=64", "--set", "preprocess.workers=2", "--set", "preprocess.cpus_per_worker=0.5"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    stats = json.loads(storage.read_bytes("s3://edtalk-processed/run/_stats.json"))
    segments = storage.list_files("s3://edtalk-processed/run/segments", suffix=".parquet")
    assert segments, f"no segments written; stats: {stats}"

    # The preprocessing job had worker processes on both nodes (jobs seen only after the run are its jobs).
    after = ray_cluster.workers_by_node()
    new_jobs = {n: jobs - before.get(n, set()) for n, jobs in after.items()}
    nodes = ray_cluster.node_ids()
    assert all(new_jobs.get(nodes[w]) for w in ("head", "worker")), (
        f"work per node: {new_jobs}, nodes {nodes}"
    )
