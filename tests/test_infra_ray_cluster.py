"""A two-node Ray cluster on loopback (two raylets, 3 logical CPUs each): work reaches both nodes, runs on either node
log to the MLflow server, `edtalk preprocess` runs through RAY_ADDRESS across both nodes with data on S3, and a
training stage runs 2 Ray Train workers, one per node, with data, checkpoints, model and metrics on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.services

BIN = Path(sys.executable).parent
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _flag_ports(cmd: list[str]) -> dict[str, int]:
    return {
        flag: int(cmd[i + 1]) for i, flag in enumerate(cmd) if flag.endswith("-port") and cmd[i + 1].isdigit()
    }


def test_two_nodes_ports_never_clash(tmp_path):
    # Ray refuses to start a node with one of its ports inside its own worker range ("... is trying to use a port
    # number ... that is used by other components"): a CI run once lost the cluster tests to one such draw. Over
    # many draws: every single port of a node distinct (and not the GCS's) and outside both worker ranges, the
    # ranges apart.
    from services import WORKER_PORTS, _ray_node_cmd, free_port, free_port_range, release_port_range

    for _ in range(100):
        head_range, worker_range = free_port_range(WORKER_PORTS), free_port_range(WORKER_PORTS)
        try:
            gcs = free_port()
            head = _flag_ports(_ray_node_cmd(tmp_path, True, gcs, {"head_node": 1}, head_range))
            worker = _flag_ports(_ray_node_cmd(tmp_path, False, gcs, {"worker_node": 1}, worker_range))
            assert head.pop("--min-worker-port") == head_range
            assert worker.pop("--min-worker-port") == worker_range
            assert head.pop("--max-worker-port") == head_range + WORKER_PORTS - 1
            assert worker.pop("--max-worker-port") == worker_range + WORKER_PORTS - 1
            assert abs(head_range - worker_range) >= WORKER_PORTS
            singles = [gcs, *head.values(), *worker.values()]
            assert head["--port"] == gcs and len(singles) == 1 + 8 + 6
            assert len(set(head.values())) == 8 and len(set([gcs, *worker.values()])) == 7
            for port in singles:
                for base in (head_range, worker_range):
                    assert not base <= port < base + WORKER_PORTS, (port, base)
        finally:
            release_port_range(head_range)
            release_port_range(worker_range)


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


def jobs_added(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, set[str]]:
    return {node: jobs - before.get(node, set()) for node, jobs in after.items()}


@pytest.fixture(scope="module")
def preprocessed(ray_cluster, s3_server, tmp_path_factory) -> dict:
    """SynthTalk clips written to S3, then `edtalk preprocess` S3 -> S3 through RAY_ADDRESS on both nodes."""
    work = tmp_path_factory.mktemp("cluster-preprocess")
    env = {**ray_cluster.env(), **s3_server.env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    s3_server.create_bucket("edtalk-raw")
    s3_server.create_bucket("edtalk-processed")
    synth = subprocess.run(
        ["edtalk", "synth", "--out", "s3://edtalk-raw/synth", "--identities", "2", "--clips-per-identity", "2",
         "--seconds", "2", "--size", "128", "--seed", "3", "--params", str(PARAMS)],
        env=env, capture_output=True, text=True, timeout=300, cwd=work,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stdout + synth.stderr
    before = ray_cluster.workers_by_node()
    run = subprocess.run(
        ["edtalk", "preprocess", "--input", "s3://edtalk-raw/synth", "--output", "s3://edtalk-processed/run",
         "--params", str(PARAMS), "--no-progress",
         "--set", "preprocess.size=64", "--set", "preprocess.workers=2", "--set", "preprocess.cpus_per_worker=0.5"],
        env=env, capture_output=True, text=True, timeout=600, cwd=work,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:] + ray_cluster.raylet_log_tail()
    return {"output": "s3://edtalk-processed/run", "jobs": jobs_added(before, ray_cluster.workers_by_node())}


@pytest.mark.slow
def test_preprocess_runs_across_both_nodes_with_data_on_s3(ray_cluster, preprocessed, s3_env):
    from preprocessing import storage

    stats = json.loads(storage.read_bytes(storage.join(preprocessed["output"], "_stats.json")))
    segments = storage.list_files(storage.join(preprocessed["output"], "segments"), suffix=".parquet")
    assert stats["inputs"] == 4 and stats["segments"] > 0 and segments, stats
    # The preprocessing job had worker processes on both nodes.
    nodes = ray_cluster.node_ids()
    assert all(preprocessed["jobs"].get(nodes[w]) for w in ("head", "worker")), (preprocessed["jobs"], nodes)


@pytest.mark.slow
def test_training_stage_with_two_workers_across_nodes_through_s3(
    ray_cluster, preprocessed, mlflow_server, s3_env, monkeypatch
):
    """`edtalk train autoencoder` on the cluster: 2 Ray Train workers (one per node), data, checkpoints, model and
    metrics on S3, the run on the MLflow server."""
    from mlflow import MlflowClient

    from preprocessing import storage

    s3_env.create_bucket("edtalk-models")
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    env = {
        **ray_cluster.env(),
        **s3_env.env(),
        **mlflow_server.client_env(),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    before = ray_cluster.workers_by_node()
    sets = {
        "train.workers": 2,
        "train.cpus_per_worker": 2,  # 3 CPUs per node: one rank per node, one CPU left for data tasks
        "train.batch_size": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "train.val_batches": 1,
        "train.data_dir": preprocessed["output"],
        "train.models_dir": "s3://edtalk-models/models",
        "train.metrics_dir": "s3://edtalk-models/metrics",
        "train.storage_path": "s3://edtalk-models/ray",
        "train.experiment": "cluster-training",
        "autoencoder.steps": 3,
    }
    cmd = ["edtalk", "train", "autoencoder", "--params", str(PARAMS)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=work)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:] + ray_cluster.raylet_log_tail()

    model_files = storage.list_files("s3://edtalk-models/models/autoencoder")
    assert any(f.endswith("config.json") for f in model_files), model_files
    metrics = json.loads(storage.read_bytes("s3://edtalk-models/metrics/autoencoder.json"))
    assert metrics, "empty metrics"
    assert s3_env.keys("edtalk-models", "ray/"), "no Ray Train checkpoints in S3"

    nodes = ray_cluster.node_ids()
    jobs = jobs_added(before, ray_cluster.workers_by_node())
    assert all(jobs.get(nodes[w]) for w in ("head", "worker")), f"training workers per node: {jobs}, {nodes}"

    for k, v in mlflow_server.client_env().items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("cluster-training")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
    assert runs[0].data.metrics, "the training run logged no metrics to the server"
