"""End to end: autoencoder (2 workers) and mouth_pose through real Ray Train + DeepSpeed on a tiny SynthTalk set,
their outputs and MLflow lineage; a fault-injected run that restarts from its checkpoint and ends with the very
same weights as the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TRAIN_PARAMS, train_overrides
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PARAMS = TRAIN_PARAMS

# The dataset and Ray instance are session fixtures of tests/conftest.py now (tiny_data, local_ray; the MLflow store
# `tracking` is per module; autoencoder -> mouth_pose is the session's `trained_chain`). These names stay importable
# for modules that still do `shared.tiny_data`: a module attribute that is not a fixture leaves pytest resolving the
# conftest fixture.
ray_cluster = tiny_data = tracking = "moved to tests/conftest.py (fixtures)"
overrides = train_overrides


def test_autoencoder_then_mouth_pose_with_lineage(trained_chain):
    from mlflow import MlflowClient

    from edtalk import EDTalk
    from pipelines.train.stages import AUX_PREFIX

    out, ae, mp = trained_chain.out, trained_chain.autoencoder, trained_chain.mouth_pose
    assert ae["steps"] == 4 and ae["workers"] == 2
    assert {"rec", "per", "adv", "d_loss", "shape", "local"} <= set(ae["losses"]) and ae["samples_per_s"] > 0
    assert json.loads((out / "metrics" / "autoencoder.json").read_text())["run_id"] == ae["run_id"]
    model = EDTalk.from_pretrained(out / "models" / "autoencoder")  # the edtalk API alone, no Ray/DeepSpeed
    assert model.discriminator is not None
    # the w_shape head trained with the model (in the DeepSpeed engine) but is not part of the exported one
    saved = load_file(out / "models" / "autoencoder" / "model.safetensors")
    assert not any(k.startswith(AUX_PREFIX) for k in saved)

    assert mp["steps"] == 2 and {"fea", "self", "rec", "spread_mouth", "spread_pose"} <= set(mp["losses"])

    c = MlflowClient(trained_chain.tracking_uri)
    ae_run, mp_run = c.get_run(ae["run_id"]), c.get_run(mp["run_id"])
    for run in (ae_run, mp_run):
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["git.commit"] and tags["git.dirty"] in ("true", "false", "unknown")
        assert any(k.startswith("dvc.md5.") and v.endswith(".dir") for k, v in tags.items())
        assert tags["code.md5"] and tags["fingerprint"]
        assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
        arts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert "samples" in arts  # the model folder is the run's logged model (tests/test_lineage_mlflow.py)
        assert any(a.path.endswith(".png") for a in c.list_artifacts(run.info.run_id, "samples"))
    assert mp_run.data.tags["upstream.autoencoder.run_id"] == ae["run_id"]
    assert "data.stats.segments" in ae_run.data.tags or any(
        k.startswith("data.stats.") for k in ae_run.data.tags
    )
    assert ae_run.data.params["autoencoder.steps"] == "4"

    version = c.get_model_version("edtalk-mouth_pose", mp["model_version"])
    assert version.run_id == mp["run_id"]
    lineage = json.loads((out / "models" / "mouth_pose" / "lineage.json").read_text())
    assert lineage["run_id"] == mp["run_id"] and lineage["upstream"] == {"autoencoder": ae["run_id"]}

    # mouth_pose trained only MLN/PLN/trunk (and D): E and G are the autoencoder's, bit for bit.
    a = load_file(out / "models" / "autoencoder" / "model.safetensors")
    b = load_file(out / "models" / "mouth_pose" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a if k.startswith(("encoder.", "generator.")))
    assert any(not (a[k] == b[k]).all() for k in a if k.startswith("navigation.mouth"))
    # autoencoder.local_frames: the driver stored the generator's mouth-local directions with the autoencoder, and
    # mouth_pose (mouth_bases=local) held its mouth bank at the first n_m of them through its DeepSpeed steps.
    from pipelines.train import local_directions

    dirs, shares = local_directions.load(str(out / "models" / "autoencoder"))
    assert dirs.shape == (model.config.latent_dim, model.config.latent_dim)
    assert bool((shares[:-1] >= shares[1:]).all()) and 0 <= float(shares[-1]) <= float(shares[0]) <= 1
    bank = b["navigation.mouth.bank"]
    assert torch.equal(bank, dirs[:, : bank.shape[1]])


def test_fault_restart_matches_uninterrupted_run(trained_chain, tiny_data, tracking, tmp_path):
    from mlflow import MlflowClient

    from pipelines.train.runner import run_stage

    ref_out, ref = trained_chain.out, trained_chain.autoencoder
    extra = {
        "train.fail_at_step": 3,
        "train.fail_rank": 1,
        "train.experiment": "fault",
        "train.register_model": False,
        "train.run_name": "fault-run",  # resume by name even if the shared tree's code changes meanwhile
    }
    metrics = run_stage("autoencoder", PARAMS, overrides(tiny_data, tmp_path, **extra))
    assert metrics["steps"] == ref["steps"] == 4
    markers = list((tmp_path / "ray").rglob("fault_injected_step3_rank1"))
    assert len(markers) == 1, "the fault was not injected"

    ref_w = load_file(ref_out / "models" / "autoencoder" / "model.safetensors")
    new_w = load_file(tmp_path / "models" / "autoencoder" / "model.safetensors")
    assert ref_w.keys() == new_w.keys()
    differing = [k for k in ref_w if not (ref_w[k] == new_w[k]).all()]
    assert not differing, f"weights differ after restart: {differing[:5]}"

    # A driver re-run with the same settings resumes the finished run: no training, same MLflow run and weights.
    again = run_stage("autoencoder", PARAMS, overrides(tiny_data, tmp_path, **extra))
    assert (again["run_id"], again["run_name"], again["steps"]) == (metrics["run_id"], metrics["run_name"], 4)
    final = load_file(tmp_path / "models" / "autoencoder" / "model.safetensors")
    assert all((final[k] == new_w[k]).all() for k in new_w)

    c = MlflowClient(tracking)
    runs = c.search_runs([c.get_experiment_by_name("fault").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == metrics["run_id"]
    assert runs[0].info.status == "FINISHED"
