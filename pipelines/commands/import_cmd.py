"""`edtalk import`: the authors' released checkpoint -> a normal model folder every other command accepts."""

from __future__ import annotations

import click

KINDS = ("edtalk", "lip_pose", "lia")


@click.command(name="import")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, help="Model folder to write (must not exist or be empty).")
@click.option("--audio2lip", default=None, help="Audio2Lip.pt to join (the audio-driven mouth).")
@click.option(
    "--expressions",
    default=None,
    help="Folder of the reference's predefined expression weights (angry.npy, ...), for --expression NAME.",
)
@click.option(
    "--kind", type=click.Choice(KINDS), default=None, help="Force the file's kind (default: from its keys)."
)
@click.option(
    "--register",
    default=None,
    help="Also log the folder to an MLflow run (tagged with the sources' SHA-256) and register it under this name.",
)
@click.option("--experiment", default="edtalk", show_default=True, help="MLflow experiment of --register.")
def import_checkpoint(checkpoint, output, audio2lip, expressions, kind, register, experiment):
    """Import EDTalk.pt, EDTalk_lip_pose.pt or LIA's vox.pt (read with weights_only: nothing in the file runs).

    Get the files from the authors' repositories (EDTalk: github.com/tanshuai0219/EDTalk, LIA:
    github.com/wyhsirius/LIA); this command never downloads anything.
    """
    from edtalk.reference.checkpoint import ReferenceImportError
    from edtalk.reference.importer import import_checkpoint as run

    try:
        meta = run(checkpoint, output, audio2lip=audio2lip, expressions=expressions, kind=kind)
    except ReferenceImportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"licence: {meta['licence']}")
    for src in meta["imported_from"]:
        click.echo(f"imported {src['file']} ({src['kind']}, sha256 {src['sha256'][:16]}...)")
    presets = sorted(meta.get("emotion_means", {}))
    if presets:
        click.echo(f"expression presets: {', '.join(presets)}")
    click.echo(f"wrote {output}")
    if register:
        version = register_import(output, meta, register, experiment)
        click.echo(f"registered {register} version {version}")


def register_import(folder: str, meta: dict, name: str, experiment: str) -> str | None:
    """One MLflow run for the import: the source files' names and SHA-256 as tags, the folder as its MLflow
    logged model, registered as a new version of `name` ($MLFLOW_TRACKING_URI or the project's store)."""
    from pipelines import lineage

    uri = lineage.tracking_uri()
    exp_id = lineage.experiment_id(experiment, uri)
    run = lineage.client(uri).create_run(exp_id, run_name=f"import-{name}")
    run_id = run.info.run_id
    tags = {"import.licence": meta["licence"]}
    for src in meta["imported_from"]:
        tags[f"import.{src['kind']}.file"] = src["file"]
        tags[f"import.{src['kind']}.sha256"] = src["sha256"]
    lineage.set_tags(run_id, tags, uri)
    model_id = lineage.log_logged_model(run_id, exp_id, name, folder, tags, uri)
    version = lineage.register(run_id, model_id, name, uri)
    lineage.tag_model_hash(model_id, folder, uri, name, version)
    lineage.end_run(run_id, uri)
    return version
