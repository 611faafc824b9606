"""`edtalk evaluate`: held-out metrics of a trained model -> metrics/evaluate.json and an MLflow run."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--model",
    "model",
    required=True,
    help="models/ folder, models/STAGE, or MLflow URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/path).",
)
@click.option(
    "--data",
    "data_dir",
    default="data/processed",
    show_default=True,
    help="Output folder of `edtalk preprocess` (local or URI).",
)
@click.option(
    "--output", "-o", default="metrics/evaluate.json", show_default=True, help="Metrics JSON to write."
)
@click.option("--no-mlflow", is_flag=True, help="Do not log an MLflow run (metrics JSON only).")
@click.option(
    "--alias",
    default=None,
    help="Point this alias of the scored model's registered name at its version (e.g. candidate).",
)
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Parameter file.")
@click.option(
    "--set", "overrides", multiple=True, help="Override a parameter: evaluate.KEY=VALUE (repeatable)."
)
def evaluate(model, data_dir, output, no_mlflow, alias, params_path, overrides):  # fmt: skip
    """Self-reenactment and audio-driven generation on held-out segments: PSNR, SSIM, LPIPS, M-LMD, F-LMD,
    Sync confidence, orthogonality and (SynthTalk) the disentanglement matrix."""
    import json
    import logging

    from pipelines.evaluate import EvaluateError, EvaluateParams
    from pipelines.evaluate import evaluate as run_evaluation
    from pipelines.generate import GenerateError
    from preprocessing.params import ParamsError, PreprocessParams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = EvaluateParams.load(params_path, overrides)
        prep = PreprocessParams.load(params_path, overrides)
        metrics = run_evaluation(model, data_dir, output, params, prep, log_mlflow=not no_mlflow, alias=alias)
    except (EvaluateError, GenerateError, ParamsError) as exc:
        raise click.ClickException(str(exc)) from exc
    shown = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    click.echo(json.dumps(shown, indent=1))
    click.echo(f"wrote {output}")
