"""`edtalk synth`: write a SynthTalk set (procedural talking faces with known ground truth)."""

from __future__ import annotations

import logging

import click


@click.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    help="Output folder (or s3://, gs://, file:// URI) for NAME.mp4 + .txt + .json clips.",
)
@click.option("--identities", type=int, default=None, help="Synthetic speakers [params synth.identities].")
@click.option(
    "--clips-per-identity", type=int, default=None, help="Clips per speaker [synth.clips_per_identity]."
)
@click.option("--seconds", type=float, default=None, help="Seconds per clip [synth.seconds].")
@click.option("--size", type=int, default=None, help="Frame side in pixels [synth.size].")
@click.option("--seed", type=int, default=None, help="Random seed; same seed, same bytes [synth.seed].")
@click.option("--workers", type=int, default=None, help="Parallel processes [synth.workers].")
@click.option("--preview/--no-preview", default=None, help="Also write OUT/preview.png [synth.preview].")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Parameter file.")
@click.option("--set", "overrides", multiple=True, metavar="synth.KEY=VALUE", help="Override a parameter.")
def synth(
    out_dir: str,
    identities: int | None,
    clips_per_identity: int | None,
    seconds: float | None,
    size: int | None,
    seed: int | None,
    workers: int | None,
    preview: bool | None,
    params_path: str,
    overrides: tuple[str, ...],
) -> None:
    """Generate SynthTalk clips: mp4 (H.264 + AAC, 25 fps, 16 kHz) with transcript and ground-truth sidecars.

    Values come from the `synth:` section of the parameter file; `--set synth.KEY=VALUE` and the options above
    override it (options win).
    """
    from preprocessing.params import ParamsError, load_section
    from preprocessing.synthtalk import SynthConfig, SynthConfigError, generate_set

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = {
        "identities": identities,
        "clips_per_identity": clips_per_identity,
        "seconds": seconds,
        "size": size,
        "seed": seed,
        "workers": workers,
        "preview": preview,
    }
    try:
        values = load_section(params_path, "synth", overrides)
        values.update({k: v for k, v in given.items() if v is not None})
        cfg = SynthConfig.from_dict(values)
    except (ParamsError, SynthConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    paths = generate_set(cfg, out_dir)
    click.echo(
        f"wrote {len(paths)} clips ({cfg.identities} identities x {cfg.clips_per_identity}) to {out_dir}"
    )
    if cfg.preview:
        click.echo(f"preview: {out_dir.rstrip('/')}/preview.png")
