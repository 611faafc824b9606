"""Preprocessing throughput on a two-node Ray cluster against one node, same inputs, same machine.

Starts local Ray clusters (raylets on this host, as tests/services.py does) one after another:
  one_node   : a head with 1 CPU
  two_nodes  : a head and a worker node, 1 CPU each
and runs the real `edtalk preprocess` through RAY_ADDRESS on the same SynthTalk clips into a fresh output each time.
Reports source frames per second and the ratio two_nodes / one_node (ideal 2.0 on an otherwise idle machine).

Usage: python bench/cluster.py [--clips 8] [--seconds 3] [--size 128] [--repeats 1]
Writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))  # the loopback cluster helpers live with the tests that use them

from services import local_ray_cluster  # noqa: E402


def run_preprocess(cluster, clips: Path, out: Path, workers: int) -> tuple[float, dict]:
    env = {**cluster.env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        "edtalk", "preprocess", "--input", str(clips), "--output", str(out), "--params", str(REPO / "params.yaml"),
        "--no-progress", "--set", f"preprocess.workers={workers}", "--set", "preprocess.cpus_per_worker=0.5",
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"edtalk preprocess failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return seconds, json.loads((out / "_stats.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=8, help="SynthTalk clips (4 identities x clips/4)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per clip")
    ap.add_argument("--size", type=int, default=128, help="clip frame side, pixels")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (the best is kept)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "cluster.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edtalk-bench-cluster-"))
    clips = work / "clips"
    ids = 4
    print(
        f"generating {args.clips} SynthTalk clips of {args.seconds} s at {args.size} px in {clips}",
        flush=True,
    )
    subprocess.run(
        [str(BIN / "edtalk"), "synth", "--out", str(clips), "--identities", str(ids),
         "--clips-per-identity", str(max(1, args.clips // ids)), "--seconds", str(args.seconds),
         "--size", str(args.size), "--seed", "11", "--params", str(REPO / "params.yaml")],
        check=True, cwd=work,
    )  # fmt: skip

    configs = {"one_node": False, "two_nodes": True}
    results: dict[str, dict] = {}
    for name, second_node in configs.items():
        best = None
        for r in range(args.repeats):
            with local_ray_cluster(worker_node=second_node, cpus=1) as cluster:
                print(f"{name}: run {r + 1}/{args.repeats} on {cluster.address}", flush=True)
                seconds, stats = run_preprocess(cluster, clips, work / f"out-{name}-{r}", workers=2)
            if best is None or seconds < best[0]:
                best = (seconds, stats)
        seconds, stats = best
        frames = int(stats["frames"])
        results[name] = {
            "wall_seconds": round(seconds, 2),  # the whole command: start-up, Ray connection, pipeline
            "pipeline_seconds": stats["seconds"],  # the pipeline's own timing (_stats.json)
            "frames": frames,
            "segments": stats["segments"],
            "rejects": stats["rejects"],
            "frames_per_s_wall": round(frames / seconds, 2),
            "frames_per_s_pipeline": stats["frames_per_s"],
        }
        print(f"{name}: {results[name]}", flush=True)

    one, two = results["one_node"], results["two_nodes"]
    if one["frames"] != two["frames"] or one["frames"] == 0:
        raise SystemExit(f"the runs did not process the same frames: {one['frames']} vs {two['frames']}")
    ratio = two["frames_per_s_pipeline"] / one["frames_per_s_pipeline"]
    ratio_wall = two["frames_per_s_wall"] / one["frames_per_s_wall"]
    out = {
        "what": "edtalk preprocess wall time, same SynthTalk clips, local Ray clusters of 1 CPU per node",
        "clips": args.clips,
        "seconds_per_clip": args.seconds,
        "size": args.size,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "results": results,
        "speedup_two_nodes_over_one": round(ratio, 3),
        "speedup_two_nodes_over_one_wall": round(ratio_wall, 3),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"two nodes / one node throughput: {ratio:.2f}x pipeline, {ratio_wall:.2f}x wall -> {args.json}")


if __name__ == "__main__":
    main()
