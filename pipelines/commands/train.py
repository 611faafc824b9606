"""`edtalk train STAGE`: one training stage as a Ray Train + DeepSpeed job, tracked in MLflow (docs/training.md)."""

from __future__ import annotations

import logging

import click

STAGE_NAMES = (
    "autoencoder",
    "mouth_pose",
    "eye",
    "expression",
    "syncnet",
    "audio_lip",
    "audio_pose",
    "audio_eye",
    "audio_expression",
)


@click.command()
@click.argument("stage", type=click.Choice(STAGE_NAMES))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Parameter file.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a parameter (repeatable).",
)
def train(stage: str, params_path: str, overrides: tuple[str, ...]) -> None:
    """Train STAGE from the `train:` and `STAGE:` sections of the parameter file.

    Writes models/STAGE (EDTalk.save_pretrained folder + lineage.json) and metrics/STAGE.json, one MLflow run
    with the lineage tags, and a registered model version. Re-running with the same settings resumes the run from
    its last checkpoint (Ray storage: train.storage_path); RAY_ADDRESS reaches a cluster, MLFLOW_TRACKING_URI a
    tracking server.
    """
    from pipelines.train import stages
    from pipelines.train.data import DataError
    from pipelines.train.runner import run_stage
    from preprocessing.params import ParamsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if stage not in stages.STAGES:
        raise click.ClickException(
            f"stage {stage!r} is part of the pipeline but not built yet; built stages: {', '.join(stages.STAGES)}"
        )
    try:
        run_stage(stage, params_path, overrides)
    except (ParamsError, FileNotFoundError, DataError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
