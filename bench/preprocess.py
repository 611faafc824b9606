"""Preprocessing throughput: end-to-end frames/s with 1 and 2 Ray workers vs a decode-only baseline, peak memory.

All three are measured in this one run on the same files (the shared real media, each capped at --max-seconds), so
their ratios hold even on a noisy machine. Writes bench/results/preprocess.json.

    python bench/preprocess.py [--media ../shared/media] [--max-seconds 20] [--repeat 6]

--repeat N processes N distinct copies of every video (each copy ends in an MP4 `free` box of its own, so its
content hash differs and the pipeline treats it as a new input): a longer run over which the fixed start-up of a
run (Ray Data planning, actor start, model load: ~5 s) weighs less, as it does at cluster scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (Ray's workers included) every 0.2 s."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def decode_only(files: list[str], max_seconds: float) -> tuple[int, float, float]:
    """decord, one thread, the same 25 fps frame selection the pipeline makes: (frames, seconds, CPU seconds)."""
    from preprocessing.decode import decode_video

    t0, c0 = time.perf_counter(), time.process_time()
    frames = 0
    for f in files:
        frames += len(decode_video(f, 25.0, max_seconds, 1e9).frames)
    return frames, time.perf_counter() - t0, time.process_time() - c0


def replicate(files: list[str], copies: int, out_dir: Path) -> list[str]:
    """`copies` byte copies of each file, each followed by an MP4 `free` box carrying its copy number."""
    if copies <= 1:
        return files
    out = []
    for f in files:
        data = Path(f).read_bytes()
        for k in range(copies):
            tag = f"bench-copy-{k}".encode()
            dst = out_dir / f"{Path(f).stem}__copy{k}.mp4"
            dst.write_bytes(data + (8 + len(tag)).to_bytes(4, "big") + b"free" + tag)
            for sidecar in (Path(f).with_suffix(x) for x in (".wav", ".txt", ".json")):
                if sidecar.exists():  # keep sidecar audio/transcripts/landmarks with each copy
                    dst.with_suffix(sidecar.suffix).write_bytes(sidecar.read_bytes())
            out.append(str(dst))
    return out


def end_to_end(files: list[str], workers: int, max_seconds: float) -> dict:
    from preprocessing.params import PreprocessParams
    from preprocessing.pipeline import run

    params = PreprocessParams(max_seconds_per_video=max_seconds, workers=workers, cpus_per_worker=0.5)
    with tempfile.TemporaryDirectory(prefix="bench-pre-") as tmp:
        manifest = Path(tmp) / "inputs.jsonl"
        manifest.write_text("".join(json.dumps({"path": f}) + "\n" for f in files))
        t0 = time.perf_counter()
        stats = run(str(manifest), str(Path(tmp) / "out"), params, progress=False)
        seconds = time.perf_counter() - t0
    stages: dict[str, float] = {}
    for s in stats["sources"]:
        for k, v in s.get("stage_seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + v
    busy = sum(s["seconds"] for s in stats["sources"])
    cpu = sum(s["cpu_seconds"] for s in stats["sources"])
    return {
        "frames": stats["frames"],
        "seconds": round(seconds, 2),
        "frames_per_s": round(stats["frames"] / seconds, 1),
        # per-source processing only (no Ray/actor start-up): what a long run converges to
        "steady_frames_per_s": round(stats["frames"] / (busy / workers), 1),
        # frames per CPU-second of the workers: per-core throughput, robust to other load on the machine
        "frames_per_cpu_s": round(stats["frames"] / cpu, 1),
        "cpu_seconds": round(cpu, 2),
        "rejects": stats["rejects"],
        "stage_seconds": {k: round(v, 2) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
        "phases": stats["phases"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", default=str(ROOT.parent / "shared" / "media"))
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="cap per video (the 60 s clip is long)"
    )
    parser.add_argument("--repeat", type=int, default=6, help="distinct copies of each video (longer run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "preprocess.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    media = Path(args.media)
    files = sorted(str(p) for p in [*media.glob("videos/*.mp4"), *media.glob("edge_cases/*.mp4")])
    if not files:
        raise SystemExit(f"no videos under {media}/videos or {media}/edge_cases: pass --media")
    copies_dir = tempfile.TemporaryDirectory(prefix="bench-pre-copies-")
    originals = len(files)
    files = replicate(files, args.repeat, Path(copies_dir.name))
    import ray

    from preprocessing import local_ray

    load_before = os.getloadavg()
    print(f"{len(files)} videos, <= {args.max_seconds:g} s each; warming up", flush=True)
    decode_only(files[:1], 1.0)  # imports and codec init outside the timings
    frames0, sec0, cpu0 = decode_only(files, args.max_seconds)
    print(f"decode only: {frames0} frames in {sec0:.1f} s = {frames0 / sec0:.0f} frames/s", flush=True)

    local_ray.init(num_cpus=os.cpu_count())
    try:
        with PeakRSS() as mem:
            one = end_to_end(files, 1, args.max_seconds)
            print(f"1 worker: {one}", flush=True)
            two = end_to_end(files, 2, args.max_seconds)
            print(f"2 workers: {two}", flush=True)
    finally:
        ray.shutdown()
    result = {
        "frames_per_s_1worker": one["frames_per_s"],
        "frames_per_s_2workers": two["frames_per_s"],
        "scaling_1_to_2": round(two["frames_per_s"] / one["frames_per_s"], 2),
        "steady_frames_per_s_1worker": one["steady_frames_per_s"],
        "steady_frames_per_s_2workers": two["steady_frames_per_s"],
        "decode_only_frames_per_s": round(frames0 / sec0, 1),
        "end_to_end_over_decode_1worker": round(one["frames_per_s"] / (frames0 / sec0), 3),
        "frames_per_cpu_s_1worker": one["frames_per_cpu_s"],
        "frames_per_cpu_s_2workers": two["frames_per_cpu_s"],
        "decode_only_frames_per_cpu_s": round(frames0 / cpu0, 1),
        "peak_rss_mb": round(mem.peak / 2**20),
        "videos": originals,
        "copies_of_each": max(1, args.repeat),
        "max_seconds_per_video": args.max_seconds,
        "frames": one["frames"],
        "one_worker": one,
        "two_workers": two,
        "landmark_backend": "dlib",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "note": "frames_per_s_*: wall clock of the whole run (Ray actor start-up and warm-up included); "
        "steady_*: frames / (summed per-source seconds / workers)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
