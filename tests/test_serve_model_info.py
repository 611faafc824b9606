"""GET /model's content (pipelines/serve/engine.Engine.info, no HTTP needed): a model served by registry alias
reports its registered name and the version the alias points at, and the training run and data hashes of the
lineage.json that came with it, through a real MLflow store (the module's `tracking` sqlite)."""

from __future__ import annotations

import torch

from edtalk import EDTalk, ModelConfig
from pipelines import lineage
from pipelines.generate import GenerateParams
from pipelines.serve.config import ServeParams
from pipelines.serve.engine import Engine
from preprocessing.params import PreprocessParams


def test_model_info_from_registry_alias_and_lineage(tracking, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "audio_eye"
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(folder)
    exp = lineage.experiment_id("serve-test", tracking)
    run_id = lineage.client(tracking).create_run(exp).info.run_id
    inputs = {"data/processed/segments": "0123456789abcdef0123456789abcdef.dir"}
    lineage.write_lineage(str(folder), {"stage": "audio_eye", "run_id": run_id, "git_commit": "abc1234",
                                        "inputs": inputs, "upstream": {"audio_pose": "r-up"}})  # fmt: skip
    model_id = lineage.log_logged_model(run_id, exp, "audio_eye", folder, {}, tracking)
    version = lineage.register(run_id, model_id, "edtalk-serve-test", tracking)
    lineage.client(tracking).set_registered_model_alias("edtalk-serve-test", "production", version)

    engine = Engine(
        "models:/edtalk-serve-test@production", GenerateParams(), PreprocessParams(), ServeParams()
    )
    info = engine.info()
    assert (info["name"], info["version"]) == ("edtalk-serve-test", version), info
    assert info["run_id"] == run_id and info["git_commit"] == "abc1234" and info["stage"] == "audio_eye"
    assert info["data"] == inputs and info["upstream"] == {"audio_pose": "r-up"}
