"""The lineage in MLflow's own terms, read back through the MLflow client from the trained chain's sqlite store:
source tags, the processed tables as dataset inputs (digest = DVC md5), the model chain as logged models and model
inputs, the runs nested under the invocation's parent run; an alias set by `edtalk evaluate` that generation
resolves. Also the labels written on the sample grids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from pipelines import lineage
from preprocessing.schema import TABLES


def _dataset_inputs(run) -> list:
    return list(run.inputs.dataset_inputs)


@pytest.mark.slow
def test_stage_runs_carry_source_dataset_model_chain_and_parent(trained_chain, tiny_data, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.model_uri import registered_version

    uri = trained_chain.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the default store
    c = MlflowClient(uri)
    ae_id, mp_id = trained_chain.autoencoder["run_id"], trained_chain.mouth_pose["run_id"]
    runs = {"autoencoder": c.get_run(ae_id), "mouth_pose": c.get_run(mp_id)}
    experiment = c.get_experiment(runs["autoencoder"].info.experiment_id)
    assert experiment.tags[lineage.EXPERIMENT_KIND] == lineage.MODEL_TRAINING  # the model-training view

    parent = c.get_run(trained_chain.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == experiment.experiment_id
    data_md5 = lineage.dvc_md5(tiny_data)  # DVC's md5 of data/processed, computed here from the files
    segments = pads.dataset(str(tiny_data / "segments"), format="parquet").to_table(
        columns=["speaker", "num_frames"]
    )
    for stage, table in (("autoencoder", "segments"), ("mouth_pose", "pairs")):
        run = runs[stage]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == trained_chain.parent_run_id
        assert tags["mlflow.source.name"] == f"edtalk train {stage}" and tags["mlflow.source.type"] == "JOB"
        assert tags["mlflow.source.git.commit"] == tags["git.commit"] == parent.data.tags["git.commit"]
        assert len(tags["git.commit"]) == 40

        (inp,) = _dataset_inputs(run)
        ds = inp.dataset
        assert ds.name == f"processed/{table}" and ds.digest == data_md5
        assert tags[lineage.tag_key("dvc.md5", str(tiny_data))] == data_md5
        assert json.loads(ds.source)["uri"] == str(tiny_data / table) and ds.source_type == "local"
        assert [c_["name"] for c_ in json.loads(ds.schema)["mlflow_colspec"]] == TABLES[table].names
        profile = json.loads(ds.profile)
        assert profile["segments"] == segments.num_rows and profile["speakers"] == 3  # tiny_data: 3 speakers
        assert profile["frames"] == sum(segments.column("num_frames").to_pylist())
        assert profile["pairs"] == pads.dataset(str(tiny_data / "pairs"), format="parquet").count_rows()
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"

    # the model chain: each run's output is its logged model, the upstream model is mouth_pose's model input
    ae_model, mp_model = (trained_chain.autoencoder["model_id"], trained_chain.mouth_pose["model_id"])
    assert [m.model_id for m in runs["autoencoder"].outputs.model_outputs] == [ae_model]
    assert [m.model_id for m in runs["mouth_pose"].outputs.model_outputs] == [mp_model]
    assert [m.model_id for m in runs["mouth_pose"].inputs.model_inputs] == [ae_model]
    assert not runs["autoencoder"].inputs.model_inputs
    for stage, model_id in (("autoencoder", ae_model), ("mouth_pose", mp_model)):
        logged = c.get_logged_model(model_id)
        folder = trained_chain.models / stage
        assert logged.source_run_id == runs[stage].info.run_id and logged.status.to_int() == 2  # READY
        assert json.loads((folder / "lineage.json").read_text())["model_id"] == model_id
        version = c.get_model_version(f"edtalk-{stage}", trained_chain.__dict__[stage]["model_version"])
        assert version.source == f"models:/{model_id}" and version.run_id == runs[stage].info.run_id
        assert registered_version(f"models:/edtalk-{stage}/{version.version}", uri).model_id == model_id
        # the registered version carries the DVC md5 of the final folder, as `dvc commit` would record it
        assert version.tags["dvc.md5"] == lineage.dvc_md5(folder) == logged.tags["dvc.md5"]
        # the logged model's artifacts are the exported weights
        got = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{model_id}", tracking_uri=trained_chain.tracking_uri
            )
        )
        assert (got / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_evaluate_alias_resolves_in_generate(trained_chain, tiny_data, tmp_path, monkeypatch):
    """`edtalk evaluate --alias candidate` on models/mouth_pose points the alias at the chain's registered version;
    `models:/edtalk-mouth_pose@candidate` then loads that very model in generation. The chain's store is copied
    (the fixture is shared); evaluation logs into its own experiment there."""
    from mlflow import MlflowClient

    from pipelines.evaluate import EvaluateParams, evaluate
    from pipelines.generate import GenerateError, load_model

    store = tmp_path / "mlflow.db"
    shutil.copy(trained_chain.tracking_uri[len("sqlite:///") :], store)
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("EDTALK_PARENT_RUN_ID", raising=False)
    c = MlflowClient(uri)
    mp = trained_chain.mouth_pose
    with pytest.raises(GenerateError, match="no alias 'candidate'"):
        load_model("models:/edtalk-mouth_pose@candidate")

    params = EvaluateParams(
        split="val", max_segments=1, max_frames=12, videos=0, audio_driven=False, threads=1,
        experiment="evaluate-lineage",
    )  # fmt: skip
    out = tmp_path / "metrics" / "evaluate.json"
    metrics = evaluate(
        str(trained_chain.models / "mouth_pose"), str(tiny_data), str(out), params, alias="candidate"
    )
    assert metrics["alias"] == "models:/edtalk-mouth_pose@candidate"
    assert str(c.get_model_version_by_alias("edtalk-mouth_pose", "candidate").version) == str(
        mp["model_version"]
    )

    run = c.get_run(metrics["mlflow_run_id"])
    assert (
        run.data.tags["mlflow.source.name"] == "edtalk evaluate" and run.data.tags["mlflow.source.git.commit"]
    )
    (inp,) = _dataset_inputs(run)
    assert inp.dataset.name == "processed/segments" and inp.dataset.digest == lineage.dvc_md5(tiny_data)
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "evaluation", "split": "val"}
    assert [m.model_id for m in run.inputs.model_inputs] == [mp["model_id"]]

    net, folder = load_model("models:/edtalk-mouth_pose@candidate")
    ref, _ = load_model(str(trained_chain.models / "mouth_pose"))
    assert (folder / "model.safetensors").read_bytes() == (
        trained_chain.models / "mouth_pose" / "model.safetensors"
    ).read_bytes()
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    with pytest.raises(GenerateError, match="has no version 99"):
        load_model("models:/edtalk-mouth_pose/99")


def test_sample_grid_is_labelled_on_the_image():
    """Column names and the title are drawn above the cells (dark text on a white band); the cells below are the
    inputs, enlarged by whole pixels."""
    from pipelines.train.runner import GRID_MIN_SIDE, grid_image

    g = torch.Generator().manual_seed(0)
    cols = {
        name: torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for name in ("identity", "a_mouth_on_b", "output")
    }
    plain = grid_image(cols, title="")
    titled = grid_image(cols, title="mouth_pose step 4")
    factor = GRID_MIN_SIDE // 32
    body_h = 2 * 32 * factor
    assert plain.shape[1] == 3 * 32 * factor and titled.shape[0] > plain.shape[0] > body_h
    header = plain[: plain.shape[0] - body_h]
    for i in range(3):  # every column has a title: dark pixels in its part of the header
        assert (header[:, i * 32 * factor : (i + 1) * 32 * factor] < 100).any()
    cell = ((cols["a_mouth_on_b"][1] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    big = np.repeat(np.repeat(cell, factor, 0), factor, 1)
    y0 = plain.shape[0] - body_h + 32 * factor
    assert np.array_equal(plain[y0 : y0 + 32 * factor, 32 * factor : 64 * factor], big)
