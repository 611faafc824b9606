"""SynthTalk generation speed on one core: drawing alone, and a whole clip (plan, draw, encode, sidecars).

Rates are frames per CPU-second of this single-threaded process (time.process_time), so they read as "one core"
even on a shared, busy machine; wall-clock rates are recorded beside them.

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

from edtalk.metrics.disentanglement import disentanglement, factor_groups  # noqa: E402
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
    render_s = render_wall = 0.0
    frames = 0
    for i, factors in enumerate(plans):
        ident = sample_identity(cfg.seed, i)
        bg = background(ident, cfg.size, np.random.default_rng(i))
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in render_frames(ident, factors, cfg.size, bg):
            frames += 1
        render_s += time.process_time() - cpu
        render_wall += time.perf_counter() - wall

    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(args.clips):
            write_clip(cfg, Path(tmp), i, 0)
        total_s = time.process_time() - cpu
        total_wall = time.perf_counter() - wall

    # The benchmark's ceiling and floor: the true factors against themselves, whole clips held out.
    truth_cfg = SynthConfig(identities=8, clips_per_identity=10, seconds=5.0, seed=0)
    docs, clip_of_frame = [], []
    for i in range(truth_cfg.identities):
        for c in range(truth_cfg.clips_per_identity):
            docs.append({"factors": clip_plan(truth_cfg, i, c)[0]})
            clip_of_frame += [len(docs)] * truth_cfg.frames_per_clip
    groups = factor_groups(docs)
    clip_of_frame = np.array(clip_of_frame)
    held = np.random.default_rng(0).choice(len(docs), len(docs) // 4, replace=False) + 1
    truth = disentanglement(groups, groups, train=~np.isin(clip_of_frame, held))

    result = {
        "size": cfg.size,
        "frames": frames,
        "render_frames_per_s": frames / render_s,
        "end_to_end_frames_per_s": frames / total_s,
        "end_to_end_over_render": (frames / total_s) / (frames / render_s),
        "real_time_factor": (frames / total_s) / 25.0,
        "render_frames_per_wall_s": frames / render_wall,
        "end_to_end_frames_per_wall_s": frames / total_wall,
        "load_average_1min": os.getloadavg()[0],
        "true_factor_matrix": truth.to_dict(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
