"""`edtalk generate`: an identity image + audio and/or driving videos -> a talking-head mp4."""

from __future__ import annotations

import click

from pipelines import signals

SPACE_HELP = {
    "mouth": "audio | identity | VIDEO | IMAGE",
    "pose": "sample | identity | VIDEO | IMAGE",
    "eye": "sample | identity | VIDEO | IMAGE",
    "expression": "audio | identity | EMOTION | VIDEO | IMAGE",
}


@click.command()
@click.option(
    "--model",
    "model",
    required=True,
    help="models/ folder, models/STAGE, or MLflow URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/path).",
)
@click.option(
    "--identity", required=True, help="Image with one face (any size); cropped as preprocessing does."
)
@click.option(
    "--audio",
    default=None,
    help="Driving audio: any common format, rate and channel count, or a video's audio track.",
)
@click.option(
    "--video", default=None, help="Driving video for every space left on auto (video-driven generation)."
)
@click.option("--mouth", default="auto", show_default=True, help=SPACE_HELP["mouth"])
@click.option("--pose", default="auto", show_default=True, help=SPACE_HELP["pose"])
@click.option("--eye", default="auto", show_default=True, help=SPACE_HELP["eye"])
@click.option("--expression", default="auto", show_default=True, help=SPACE_HELP["expression"])
@click.option("--transcript", default=None, help="Transcript text or a .txt file, for --expression audio.")
@click.option("--seed", type=int, default=None, help="Seed of the pose/eye flow samples (default: params).")
@click.option("--temperature", type=float, default=None, help="Flow sampling temperature (default: params).")
@click.option(
    "--preview/--no-preview",
    default=None,
    help="Also write OUTPUT_preview.mp4 with the driving sources side by side.",
)
@click.option("--output", "-o", required=True, help="The mp4 to write.")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Parameter file.")
@click.option(
    "--set", "overrides", multiple=True, help="Override a parameter: generate.KEY=VALUE (repeatable)."
)
def generate(model, identity, audio, video, mouth, pose, eye, expression, transcript, seed, temperature, preview, output, params_path, overrides):  # fmt: skip
    """Generate a talking-head video (25 fps, H.264 + AAC) from one identity image.

    Audio-driven: --audio speech.wav (mouth from the audio, pose and eyes sampled, expression from the audio or
    --expression happy). Video-driven: --video driving.mp4, or one source per space with --mouth/--pose/--eye/
    --expression.
    """
    import logging

    from pipelines.generate import GenerateError, GenerateParams, Request, run
    from pipelines.video_io import MediaError
    from preprocessing.audio import AudioError
    from preprocessing.landmarks import FaceNotFoundError, LandmarkBackendError, MultipleFacesError
    from preprocessing.params import ParamsError, PreprocessParams

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signals.terminate_like_interrupt()  # SIGTERM/SIGHUP: the partial output is removed as on Ctrl-C
    try:
        params = GenerateParams.load(params_path, overrides)
        prep = PreprocessParams.load(params_path, overrides)
        req = Request(
            identity=identity,
            output=output,
            audio=audio,
            video=video,
            mouth=mouth,
            pose=pose,
            eye=eye,
            expression=expression,
            transcript=transcript,
            seed=seed,
            temperature=temperature,
            preview=preview,
        )
        result = run(req, model, params, prep)
    except (
        GenerateError,
        MediaError,
        AudioError,
        FaceNotFoundError,
        MultipleFacesError,
        LandmarkBackendError,
        ParamsError,
    ) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt as exc:
        signals.exit_terminated(exc)
    click.echo(f"wrote {result['output']} ({result['frames']} frames, {result['seconds']:.2f} s)")
    if result.get("preview"):
        click.echo(f"wrote {result['preview']}")
