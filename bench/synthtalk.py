"""SynthTalk generation speed on one core: drawing alone, and a whole clip (plan, draw, encode, sidecars).

Writes bench/results/synthtalk.json. Run: `python bench/synthtalk.py [--size 256] [--seconds 8] [--clips 4]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from preprocessing.synthtalk import SynthConfig, clip_plan  # noqa: E402
from preprocessing.synthtalk.generate import write_clip  # noqa: E402
from preprocessing.synthtalk.identity import sample_identity  # noqa: E402
from preprocessing.synthtalk.render import background, render_frames  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthtalk.json"))
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one core, as the target says
    cfg = SynthConfig(
        identities=args.clips, clips_per_identity=1, seconds=args.seconds, size=args.size, seed=0
    )

    plans = [clip_plan(cfg, i, 0)[0] for i in range(args.clips)]
    render_s, frames = 0.0, 0
    for i, factors in enumerate(plans):
        ident = sample_identity(cfg.seed, i)
        bg = background(ident, cfg.size, np.random.default_rng(i))
        start = time.perf_counter()
        for _ in render_frames(ident, factors, cfg.size, bg):
            frames += 1
        render_s += time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for i in range(args.clips):
            write_clip(cfg, Path(tmp), i, 0)
        total_s = time.perf_counter() - start

    result = {
        "size": cfg.size,
        "frames": frames,
        "render_frames_per_s": frames / render_s,
        "end_to_end_frames_per_s": frames / total_s,
        "end_to_end_over_render": (frames / total_s) / (frames / render_s),
        "real_time_factor": (frames / total_s) / 25.0,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
