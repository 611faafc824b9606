"""A real MLflow tracking server as deployed by infra/mlflow: PostgreSQL backend store, basic auth, artifacts proxied
to S3. A run logged through it keeps its params/metrics in PostgreSQL and its artifact in the bucket."""

from __future__ import annotations

from pathlib import Path

import pytest
from services import http_status

pytestmark = pytest.mark.services


def test_requests_without_valid_credentials_are_refused(mlflow_server):
    api = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(api) == 401
    assert http_status(api, ("admin", "wrong-password")) == 401
    assert http_status(api, ("admin", mlflow_server.admin_password)) == 200


def test_run_logs_to_postgres_and_s3(mlflow_server, postgres_server, s3_server, tmp_path, monkeypatch):
    import mlflow
    import psycopg2
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    # The client has no S3 credentials at all: the server proxies artifacts (--artifacts-destination).
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in mlflow_server.client_env().items():
        monkeypatch.setenv(k, v)

    # The admin creates a user for the training jobs; the run is logged as that user.
    password = "trainer-" + mlflow_server.admin_password
    users = get_app_client("basic-auth", tracking_uri=mlflow_server.uri)
    users.create_user("trainer", password)
    users.create_user("viewer", password + "-v")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp_id = client.create_experiment("infra-server-test")
    run = client.create_run(exp_id, tags={"stage": "autoencoder"})
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.0002")
    for step, loss in enumerate([1.0, 0.7, 0.55]):
        client.log_metric(run_id, "loss", loss, step=step)
    sample = tmp_path / "samples.txt"
    sample.write_text("grid of generated frames")
    client.log_artifact(run_id, str(sample), artifact_path="samples")
    client.set_terminated(run_id)

    got = client.get_run(run_id)
    assert got.data.params == {"lr": "0.0002"} and got.data.tags["stage"] == "autoencoder"
    # Authorization follows the authenticated user: another user may read the run (default READ) but not write.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "viewer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password + "-v")
    assert client.get_run(run_id).data.params == {"lr": "0.0002"}
    with pytest.raises(MlflowException, match="(?i)permission"):
        client.log_param(run_id, "lr2", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.7, 0.55]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/samples.txt"]
    back = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/samples.txt",
                                               dst_path=str(tmp_path / "back"), tracking_uri=mlflow_server.uri)  # fmt: skip
    assert Path(back).read_text() == "grid of generated frames"

    # The params really are rows in PostgreSQL ...
    conn = psycopg2.connect(postgres_server.url("mlflow"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("lr", "0.0002")]
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (run_id,))
            assert cur.fetchone()[0] == 3
    finally:
        conn.close()
    # ... and the artifact really is an object in the S3 bucket.
    keys = s3_server.keys(mlflow_server.bucket, mlflow_server.artifacts_prefix + "/")
    assert any(k.endswith(f"{run_id}/artifacts/samples/samples.txt") for k in keys), keys


def test_lineage_entities_through_the_server(mlflow_server, tmp_path, monkeypatch):
    """What pipelines/lineage.py records, through the PostgreSQL-backed server: a dataset input whose digest is a
    36-character DVC directory md5 (the column's limit there), a logged model uploaded through the artifact proxy
    and used as the next run's model input, a registered version from it, and an alias that pipelines.model_uri
    resolves to the model's files."""
    from mlflow import MlflowClient
    from mlflow.entities import Dataset

    from pipelines import lineage, model_uri

    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in mlflow_server.client_env().items():
        monkeypatch.setenv(k, v)
    uri = mlflow_server.uri
    client = MlflowClient(tracking_uri=uri)
    exp_id = lineage.experiment_id("infra-lineage-test", uri)
    assert client.get_experiment(exp_id).tags[lineage.EXPERIMENT_KIND] == lineage.MODEL_TRAINING

    digest = "0123456789abcdef0123456789abcdef.dir"  # md5 + ".dir": DVC's hash of a folder, 36 characters
    data = Dataset("processed/segments", digest, "local", '{"uri": "/data/processed/segments"}', None, "{}")
    first = client.create_run(exp_id, run_name="autoencoder").info.run_id
    lineage.log_inputs(first, uri, [(data, {"mlflow.data.context": "training"})])
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"preset": "tiny"}')
    model_id = lineage.log_logged_model(first, exp_id, "autoencoder", folder, {"stage": "autoencoder"}, uri)
    version = lineage.register(first, model_id, "infra-lineage-autoencoder", uri)
    client.set_registered_model_alias("infra-lineage-autoencoder", "candidate", version)
    second = client.create_run(exp_id, run_name="mouth_pose", tags={"mlflow.parentRunId": first}).info.run_id
    lineage.log_inputs(second, uri, [(data, {"mlflow.data.context": "training"})], [model_id])

    run = client.get_run(second)
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest]
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    assert [m.model_id for m in client.get_run(first).outputs.model_outputs] == [model_id]
    local = model_uri.download("models:/infra-lineage-autoencoder@candidate")
    assert (local / "config.json").read_text() == '{"preset": "tiny"}'
