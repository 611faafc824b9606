"""`edtalk serve`: a trained model behind an HTTP API on Ray Serve (pipelines/serve, docs/serving.md)."""

from __future__ import annotations

import click

from pipelines import signals


@click.command()
@click.option(
    "--model",
    required=True,
    help="models/ folder, models/STAGE, or MLflow URI (models:/NAME/VERSION, models:/NAME@ALIAS).",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default)."
)
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Parameter file.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    help="Override a parameter: serve.KEY=VALUE, generate.KEY=VALUE (repeatable).",
)
def serve(model, host, port, params_path, overrides):
    """Serve MODEL: POST /generate (identity image + audio -> mp4), POST /generate/stream (the same, sent as it is
    rendered), GET /model (version and lineage), GET /health, and a page to try it at /.

    Local Ray on loopback unless RAY_ADDRESS names a cluster. A bearer token, when $EDTALK_SERVE_TOKEN or the file
    $EDTALK_SERVE_TOKEN_FILE holds one, guards every route but /health. Runs until Ctrl-C / SIGTERM.
    """
    import logging
    import threading

    from pipelines import model_uri
    from pipelines.generate import GenerateError, GenerateParams, resolve_model_dir
    from pipelines.serve.app import read_token
    from pipelines.serve.config import ServeParams
    from pipelines.serve.start import start, stop
    from preprocessing.params import ParamsError, PreprocessParams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signals.terminate_like_interrupt()
    try:
        gen = GenerateParams.load(params_path, overrides)
        prep = PreprocessParams.load(params_path, overrides)
        params = ServeParams.load(params_path, overrides)
        read_token()  # an unreadable token file: one line now, not a replica's traceback
        if not model_uri.is_uri(model):
            resolve_model_dir(model)  # a missing or empty folder: one line now, not a replica's traceback
    except (GenerateError, ParamsError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        url = start(model, gen, prep, params, host, port)
        click.echo(f"serving {model} at {url} (POST /generate, GET /model, GET /health); Ctrl-C stops")
        threading.Event().wait()
    except KeyboardInterrupt as exc:
        stop()
        signals.exit_terminated(exc)
