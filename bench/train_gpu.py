"""GPU training throughput and memory of a visual stage at the paper preset under bf16 autocast (issue 5's GPU check).

The stage's own `build` + `step` (bench/train.py's plain loop: torch Adam, fp32 master weights, bf16 autocast, the
same D update, gradient clipping 1.0), 256 px samples from a preprocessed folder, E and G from a freshly built
paper-preset model (speed and memory do not depend on the weight values). Ray and DeepSpeed are not used: the GPU
machine lacks them, and the runner's overhead over this loop is measured by bench/train.py. For each batch size:
warm-up steps, then timed steps between CUDA synchronisations; samples/s and the peak of allocated and reserved
GPU memory (torch.cuda.max_memory_*), reset per batch size. Writes bench/results/train_gpu.json.

    # here (decord, PyAV, the SynthTalk generator): 256 px SynthTalk tables, small enough to carry
    python bench/train_gpu.py --make-data bench/.gpu_data
    # on the GPU machine (torch, pyarrow, OpenCV, safetensors are enough):
    python bench/train_gpu.py --data bench/.gpu_data --device cuda --batch-sizes 4,8,16
    # the same with autotuned convolutions, NHWC memory, and a torch.profiler table of 3 more steps per size
    python bench/train_gpu.py --data bench/.gpu_data --device cuda --cudnn-benchmark --channels-last --profile 3
    # a dry run of the same code on CPU (tiny preset): what tests/test_bench_train_gpu.py runs
    python bench/train_gpu.py --data DIR --device cpu --preset tiny --params params.yaml --batch-sizes 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def make_data(out: Path, identities: int, seconds: float, size: int) -> Path:
    """SynthTalk (one clip per speaker, frames of twice the crop side, so the face is large enough to crop at
    `size` without upscaling) -> `edtalk preprocess` tables at `size` px with sidecar landmarks."""
    from preprocessing.params import PreprocessParams
    from preprocessing.pipeline import run
    from preprocessing.synthtalk import SynthConfig, generate_set

    with tempfile.TemporaryDirectory(prefix="edtalk-gpu-data-") as tmp:
        cfg = SynthConfig.from_dict(
            {
                "identities": identities,
                "clips_per_identity": 1,
                "seconds": seconds,
                "size": 2 * size,
                "val_identities": 0,
                "test_identities": 0,
            }
        )
        generate_set(cfg, Path(tmp) / "raw")
        params = PreprocessParams(size=size, landmark_backend="sidecar", workers=1, pairs_per_segment=8)
        stats = run(str(Path(tmp) / "raw"), str(out), params, progress=False)
    if not stats["segments"]:
        raise SystemExit(f"{out}: no segments were made (rejects: {stats['rejects']})")
    print(
        f"{out}: {stats['segments']} segments, {stats['pairs']} pairs, {stats['frames']} frames", flush=True
    )
    return out


def upstream_model(preset_section: dict, folder: Path) -> str:
    """A freshly initialised model at the preset, saved as the upstream stage's folder."""
    import torch

    from edtalk import EDTalk, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_params(preset_section)
    cfg.expression_predictor = None  # not trained by the visual stages (and its checkpoints need a download)
    EDTalk(cfg).save_pretrained(folder)
    return str(folder)


def profile(loop, args, bs: int) -> None:
    """torch.profiler over `args.profile` more steps: the top operators by self CPU time and by self device time,
    and the number of kernels a step launches, written beside --out (train_gpu_profile_bsN.txt)."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch.profiler.profile(activities=activities) as prof:
        loop.run(args.profile)  # synchronises the device before and after
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    text = [
        f"{args.stage} {args.preset} bs {bs}, {args.profile} profiled steps, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, cudnn.benchmark={args.cudnn_benchmark}, "
        f"channels_last={args.channels_last}",
        f"device kernels per step: {kernels / args.profile:.0f}",
        events.table(sort_by="self_cpu_time_total", row_limit=25),
    ]
    if len(activities) > 1:
        text.append(events.table(sort_by="self_device_time_total", row_limit=25))
    path = args.out.parent / f"train_gpu_profile_bs{bs}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")
    print(text[0], "|", text[1], "->", path, flush=True)


def make_loop(args, overrides: list[str], bs: int, upstream: dict):
    from train import PlainLoop

    return PlainLoop(  # raises train.TooFewSamples for a batch larger than the training samples
        args.data,
        overrides,
        bs,
        args.warmup,
        stage_name=args.stage,
        params_path=args.params,
        device=args.device,
        bf16=args.bf16,
        upstream=upstream,
        channels_last=args.channels_last,
    )


def measure(args) -> dict:
    import torch
    from train import TooFewSamples

    from pipelines.train import stages
    from preprocessing.params import load_section

    overrides = [f"model.preset={args.preset}"]
    model_section = load_section(str(args.params), "model", overrides)
    stage = stages.get(args.stage)
    cuda = args.device.startswith("cuda")
    if cuda and args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # autotuned convolution algorithms (the shapes do not change)
    results = []
    with tempfile.TemporaryDirectory(prefix="edtalk-gpu-up-") as tmp:
        upstream = {name: upstream_model(model_section, Path(tmp) / name) for name in stage.upstream}
        for bs in args.batch_sizes:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                loop = make_loop(args, overrides, bs, upstream)
            except TooFewSamples as e:  # keep the other sizes' rows
                row = {"batch_size": bs, "skipped": str(e)}
                print(json.dumps(row), flush=True)
                results.append(row)
                continue
            seg = loop.run(args.steps)
            if args.profile:
                profile(loop, args, bs)
            row = {
                "batch_size": bs,
                "samples_per_s": round(seg["samples_per_s"], 2),
                "s_per_step": round(bs / seg["samples_per_s"], 4),
                "losses": {k: round(v, 5) for k, v in seg["mean_logs"].items()},
            }
            if cuda:
                row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                row["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            print(json.dumps(row), flush=True)
            results.append(row)
            del loop
    return {
        "stage": args.stage,
        "preset": args.preset,
        "image_size": model_section.get("image_size") or (256 if args.preset == "paper" else 64),
        "precision": "bf16 autocast, fp32 master weights" if args.bf16 else "fp32",
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "channels_last": bool(args.channels_last),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "warmup_steps": args.warmup,
        "measured_steps": args.steps,
        "results": results,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-data", type=Path, help="write 256 px SynthTalk tables here and stop")
    ap.add_argument("--identities", type=int, default=6)  # 40 training pairs: batches up to 32 (11 MB)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--data", type=Path, help="a preprocessed folder (segments/, pairs/)")
    ap.add_argument("--stage", default="mouth_pose", help="an adversarial visual stage")
    ap.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    ap.add_argument("--params", type=Path, default=ROOT / "params" / "paper.yaml")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast")
    ap.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16], help="e.g. 4,8,16"
    )
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--channels-last", action="store_true", help="NHWC weights and images")
    ap.add_argument("--profile", type=int, default=0, help="profile this many more steps per batch size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_gpu.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.make_data:
        make_data(args.make_data, args.identities, args.seconds, args.size)
        return
    if args.data is None:
        ap.error("--data DIR is needed (make one with --make-data DIR)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device here (use --device cpu for a dry run)")
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
