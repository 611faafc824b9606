"""`edtalk preprocess`: raw talking-face videos -> Parquet tables (segments, pairs, rejects, _stats.json)."""

from __future__ import annotations

import logging

import click


@click.command()
@click.option(
    "--input", "input_spec", required=True, help="A folder, a glob, a video, or a CSV/JSONL manifest."
)
@click.option("--output", required=True, help="Output folder (local path or s3://, gs://, file:// URI).")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Parameter file.")
@click.option(
    "--set", "overrides", multiple=True, metavar="preprocess.KEY=VALUE", help="Override a parameter."
)
@click.option("--no-progress", is_flag=True, help="Hide Ray Data's progress bars.")
def preprocess(
    input_spec: str, output: str, params_path: str, overrides: tuple[str, ...], no_progress: bool
) -> None:
    """Turn raw videos into 25 fps face crops, landmarks, swap pairs, audio features and transcripts.

    Re-running skips sources already done (by content hash); every input ends in `segments` or `rejects`.
    """
    from preprocessing.landmarks import LandmarkBackendError
    from preprocessing.params import ParamsError, PreprocessParams
    from preprocessing.pipeline import run, summary_table
    from preprocessing.sources import SourceError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = PreprocessParams.load(params_path, overrides)
        stats = run(input_spec, output, params, progress=not no_progress)
    except (ParamsError, SourceError, LandmarkBackendError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary_table(stats))
    if stats["errors"]:
        raise click.ClickException(
            f"{len(stats['errors'])} source(s) could not be recorded; re-run to retry them"
        )
