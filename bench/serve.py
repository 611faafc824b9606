"""Serving benchmark: `edtalk serve` under 1, 4 and 16 concurrent clients against the same number of sequential
`edtalk generate` runs on the same machine: output frames/s, and latency (first byte of the streamed video, whole
video; median and p95).

Random weights (speed does not depend on them), no expression predictor (as bench/inference.py: its paper
checkpoints are not on a machine without network), real portraits and speech from ../shared/media. Every request
sends an image no request sent before (the four portraits cycled, each re-encoded with the request's number in a
PNG text chunk: same pixels, new sha256), so the server's identity cache never hits; `cached_4_clients` repeats
the 4-client round with the portraits as they are, all seen before (the cache's gain). The sequential baseline runs
generate.run in this process one request after another after one warm-up run, each loading the model from its
folder as `edtalk generate` does (Python start-up and imports not counted: the CLI's real cost is higher);
`sequential_warm_frames_per_s` is the same with the model loaded once (what a server gains by staying up). The server is one replica given every CPU (serve.num_cpus), warmed up by
one request, through the streaming route (/generate/stream) so the first byte is measured.

    python bench/serve.py [--preset paper|tiny] [--seconds 2] [--clients 1,4,16]

Writes bench/results/serve.json (at least `speedup_4_clients`); docs/benchmarks.md ("Serving") quotes it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
PORTRAITS = ["SadTalker__happy.png", "LivePortrait__d8.jpg", "SadTalker__happy1.png", "LivePortrait__d19.jpg"]


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def portrait(i: int, fresh: bool) -> bytes:
    """Request i's identity image: portrait i mod 4, as a PNG with a text chunk naming i when `fresh`."""
    from PIL import Image, PngImagePlugin

    path = MEDIA / "images" / PORTRAITS[i % len(PORTRAITS)]
    if not fresh:
        return path.read_bytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("request", str(i))
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def one_request(url: str, identity: bytes, audio: Path) -> dict:
    files = {"identity": ("face.png", identity), "audio": ("speech.wav", audio.read_bytes())}
    t0 = time.perf_counter()
    first, size = None, 0
    with requests.post(f"{url}/generate/stream", files=files, stream=True, timeout=3600) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_content(chunk_size=None):
            if chunk and first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
    return {"first_byte_s": first, "total_s": time.perf_counter() - t0, "bytes": size}


def serve_round(url: str, clients: int, audio: Path, frames: int, first: int, fresh: bool = True) -> dict:
    identities = [portrait(first + i, fresh) for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(url, p, audio), identities))
    wall = time.perf_counter() - t0
    firsts, totals = [r["first_byte_s"] for r in results], [r["total_s"] for r in results]
    return {
        "clients": clients,
        "wall_s": wall,
        "frames_per_s": clients * frames / wall,
        "first_byte_s": {"median": statistics.median(firsts), "p95": p95(firsts)},
        "total_s": {"median": statistics.median(totals), "p95": p95(totals)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=("paper", "tiny"))
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of speech per request")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per round (comma-separated)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    rounds = [int(c) for c in args.clients.split(",")]

    from edtalk import EDTalk, ModelConfig
    from pipelines.generate import GenerateParams, Request, load_model, run
    from pipelines.serve.config import ServeParams
    from pipelines.serve.start import start, stop
    from preprocessing.audio import load_audio
    from preprocessing.params import PreprocessParams

    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    cfg.expression_predictor = None
    prep, gen = PreprocessParams(landmark_backend="dlib"), GenerateParams()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        EDTalk(cfg).save_pretrained(folder)
        wave = load_audio(MEDIA / "audio" / "SadTalker__RD_Radio34_002.wav")[: int(args.seconds * 16000)]
        audio = Path(tmp) / "speech.wav"
        sf.write(audio, wave, 16000)
        frames = int(np.ceil(len(wave) / 640))
        print(f"[serve] {args.preset} preset, {frames} frames per request, rounds {rounds}", flush=True)

        sequential = []
        for i in range(-1, max(rounds)):  # -1: the warm-up run
            identity = Path(tmp) / f"face-{i}.png"
            identity.write_bytes(portrait(i, True))
            req = Request(identity=str(identity), audio=str(audio), output=f"{tmp}/cli-{i}.mp4")
            t0 = time.perf_counter()
            run(req, str(folder), gen, prep)
            if i >= 0:
                sequential.append(time.perf_counter() - t0)
        cli = {n: n * frames / sum(sequential[:n]) for n in rounds}  # the first n sequential runs
        net, _ = load_model(folder)
        t0 = time.perf_counter()
        for i in range(max(rounds)):
            identity = Path(tmp) / f"face-{i}.png"
            run(
                Request(identity=str(identity), audio=str(audio), output=f"{tmp}/warm-{i}.mp4"),
                net,
                gen,
                prep,
            )
        warm = max(rounds) * frames / (time.perf_counter() - t0)
        print(f"[serve] sequential, model loaded once: {warm:.2f} frames/s", flush=True)
        print(f"[serve] sequential generate: {cli}", flush=True)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        params = ServeParams(max_pending=max(rounds), num_cpus=cpus)
        url = start(str(folder), gen, prep, params, port=port)
        try:
            one_request(url, portrait(-1, True), audio)  # warm-up: fast-path build, first imports
            rss = [requests.get(f"{url}/health", timeout=60).json()["rss_mb"]]  # the replica's memory
            served, first = {}, 1000
            for n in rounds:
                served[n] = serve_round(url, n, audio, frames, first)
                first += n
                print(f"[serve] {n} clients: {served[n]}", flush=True)
            for i in range(len(PORTRAITS)):  # the portraits as they are, into the cache
                one_request(url, portrait(i, False), audio)
            cached = serve_round(url, 4, audio, frames, 0, fresh=False)
            print(f"[serve] 4 clients, cached identities: {cached}", flush=True)
            rss.append(requests.get(f"{url}/health", timeout=60).json()["rss_mb"])
        finally:
            stop()

    result = {
        "preset": args.preset,
        "image_size": cfg.image_size,
        "seconds_per_request": args.seconds,
        "frames_per_request": frames,
        "machine": f"{platform.machine()}, {cpus} CPUs, torch {torch.__version__}",
        "replicas": 1,
        "sequential_generate_s": sequential,
        "sequential_warm_frames_per_s": warm,
        **{f"speedup_{n}_clients": served[n]["frames_per_s"] / cli[n] for n in rounds},
        "rounds": [{**served[n], "sequential_frames_per_s": cli[n]} for n in rounds],
        "replica_rss_mb_after_warmup_and_all_rounds": rss,
        "requests_served": 1 + sum(rounds) + 2 * len(PORTRAITS),
        "cached_4_clients": {**cached, "speedup": cached["frames_per_s"] / cli.get(4, cli[max(rounds)])},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("speedup")}, indent=1))


if __name__ == "__main__":
    main()
