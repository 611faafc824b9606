"""Inference benchmark: frames/s of `edtalk generate` end to end and of the rendering loop alone, and where the
end-to-end time goes (load, decode, audio/driving modules, render, encode, mux).

Paper preset (256 px, D=512) with random weights: speed does not depend on the weights. The expression predictor
is left out (its paper checkpoints, HuBERT and EmoBERTa, are not on a machine without network), so audio-driven
runs keep the identity's expression; everything else runs as in production. Real media from ../shared/media.

    python bench/inference.py [--preset paper] [--seconds 2] [--threads 0]

Writes bench/results/inference.json; docs/benchmarks.md ("Inference") quotes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"


def render_loop(model, identity_img: torch.Tensor, frames: int, chunk: int) -> float:
    """frames/s of the rendering loop alone: identity encoded once, weights given (every space, the expression
    too, new on every frame: the costliest case), chunks of `chunk`, through the renderer `edtalk generate` uses
    (the FastRenderer on CPU)."""
    with torch.no_grad():
        ident = model.encode_identity(identity_img)
        renderer = model.fast_renderer() if next(model.parameters()).device.type == "cpu" else model
        sizes = model.navigation.num_bases()
        gen = torch.Generator().manual_seed(0)
        weights = {s: torch.randn(frames, n, generator=gen) * 0.5 for s, n in sizes.items()}
        renderer.render(ident, {s: w[:chunk] for s, w in weights.items()})  # warm-up (weight packing)
        t0 = time.perf_counter()
        for a in range(0, frames, chunk):
            renderer.render(ident, {s: w[a : a + chunk] for s, w in weights.items()})
        return frames / (time.perf_counter() - t0)


def shares(res: dict) -> dict[str, float]:
    timers = dict(res["timers_s"])
    wall = res["wall_s"]
    out = {k: round(v / wall, 4) for k, v in timers.items()}
    out["unaccounted"] = round(1 - sum(out.values()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=("paper", "tiny"))
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="seconds of audio / driving video generated"
    )
    parser.add_argument("--chunk", type=int, default=16, help="generate.chunk_frames")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "inference.json"))
    args = parser.parse_args()

    from edtalk import EDTalk, ModelConfig
    from pipelines.generate import GenerateParams, Request, load_model, run, to_tensor
    from preprocessing.audio import load_audio
    from preprocessing.params import PreprocessParams

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    cfg.expression_predictor = None
    identity = str(MEDIA / "images" / "SadTalker__happy.png")
    driving = str(MEDIA / "videos" / "EDTalk__mouth_source_muxed.mp4")  # 256 px, 25 fps, AAC
    prep = PreprocessParams(landmark_backend="dlib")
    params = GenerateParams(chunk_frames=args.chunk, max_seconds=args.seconds, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        EDTalk(cfg).save_pretrained(folder)
        wave = load_audio(MEDIA / "audio" / "SadTalker__RD_Radio34_002.wav")[: int(args.seconds * 16000)]
        audio = Path(tmp) / "speech.wav"
        sf.write(audio, wave, 16000)
        print(f"[inference] {args.preset} preset, {args.seconds:g} s per run, chunk {args.chunk}", flush=True)
        audio_run = run(
            Request(identity=identity, audio=str(audio), output=f"{tmp}/a.mp4"), str(folder), params, prep
        )
        print(
            f"[inference] audio-driven: {audio_run['frames'] / audio_run['wall_s']:.3f} frames/s", flush=True
        )
        video_run = run(
            Request(identity=identity, video=driving, output=f"{tmp}/v.mp4"), str(folder), params, prep
        )
        print(
            f"[inference] video-driven: {video_run['frames'] / video_run['wall_s']:.3f} frames/s", flush=True
        )
        model, _ = load_model(folder)
        size = int(model.config.image_size)
        img = to_tensor(np.zeros((1, size, size, 3), np.uint8), torch.device("cpu"))
        fps_render = render_loop(model, img, audio_run["frames"], args.chunk)
        print(f"[inference] render loop: {fps_render:.3f} frames/s", flush=True)
        # the reference demo re-encodes the identity image for every frame; ours encodes it once per video
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(3):
                model.encode_identity(img)
            encode_s = (time.perf_counter() - t0) / 3

    result = {
        "preset": args.preset,
        "image_size": size,
        "seconds_per_run": args.seconds,
        "chunk_frames": args.chunk,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "frames_per_s_e2e": audio_run["frames"] / audio_run["wall_s"],
        "frames_per_s_e2e_video": video_run["frames"] / video_run["wall_s"],
        "frames_per_s_render": fps_render,
        "identity_encode_s": encode_s,
        "render_share_of_e2e": (audio_run["frames"] / fps_render) / audio_run["wall_s"],
        "audio_driven": {"frames": audio_run["frames"], "wall_s": audio_run["wall_s"], "timers_s": audio_run["timers_s"], "shares": shares(audio_run)},
        "video_driven": {"frames": video_run["frames"], "wall_s": video_run["wall_s"], "timers_s": video_run["timers_s"], "shares": shares(video_run)},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
