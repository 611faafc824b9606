"""Training runtime overhead: samples/s of the `autoencoder` stage through the product's runner (Ray Train +
DeepSpeed, 1 worker, Ray Data streaming) against a plain single-process PyTorch loop doing the same work.

Both sides use the stage's own `build` and `step` (tiny preset, the params.yaml `autoencoder:` section), the same
batch size, one torch thread, gradient clipping 1.0 and the same D update; the plain loop uses torch.optim.Adam on
samples preloaded in memory, the runner streams them from Parquet through Ray Data. Warm-up steps are excluded on
both sides: the runner's number is its last progress window (train.log_every = the measured steps), which counts
data waits and logging but not the validation pass, image grids or checkpoints. Measured in one run, so the ratio
holds on a noisy machine better than absolute numbers. Writes bench/results/train.json.

    python bench/train.py [--steps 20] [--warmup 5] [--batch-size 4]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGE = "autoencoder"


class CPUTime:
    """CPU seconds of this process and all its descendants (Ray's workers included), sampled every 0.5 s."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def poll(self) -> float:
        import psutil

        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                self.seen[p.pid] = max(self.seen.get(p.pid, 0.0), c.user + c.system)
        return sum(self.seen.values())

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.poll()


def make_data(root: Path, identities: int, seconds: float) -> Path:
    """SynthTalk -> `edtalk preprocess` tables (64 px crops, sidecar landmarks), as the learning tests make them."""
    from preprocessing.params import PreprocessParams
    from preprocessing.pipeline import run
    from preprocessing.synthtalk import SynthConfig, generate_set

    cfg = SynthConfig.from_dict(
        {
            "identities": identities,
            "clips_per_identity": 1,
            "seconds": seconds,
            "val_identities": 1,
            "test_identities": 0,
        }
    )
    generate_set(cfg, root / "raw")
    params = PreprocessParams(size=64, landmark_backend="sidecar", workers=1, pairs_per_segment=1)
    run(str(root / "raw"), str(root / "processed"), params, progress=False)
    return root / "processed"


def stage_params(overrides: list[str]):
    from pipelines.train import stages
    from pipelines.train.config import load_stage_params

    stage = stages.get(STAGE)
    return stage, load_stage_params(stage.params_cls, STAGE, str(ROOT / "params.yaml"), overrides)


def plain_loop(data: Path, overrides: list[str], batch_size: int, warmup: int, steps: int) -> dict:
    """The stage's build + step in one process: torch.optim.Adam, samples preloaded, no Ray, no DeepSpeed."""
    import torch

    from edtalk.losses import discriminator_adversarial_loss
    from pipelines.train import data as train_data
    from preprocessing.params import load_section

    stage, p = stage_params(overrides)
    model_section = load_section(str(ROOT / "params.yaml"), "model", overrides)
    torch.manual_seed(0)
    nets = stage.build(model_section, p, {})
    splits = train_data.segment_splits(str(data))
    train_ids, _, _ = train_data.train_val_ids(splits, 0.2)
    rows = train_data.local_samples(
        str(data), stage.table, train_ids, stage.row_filter, stage.samples(p, 0), 10**9
    )
    if len(rows) < batch_size:
        raise SystemExit(f"only {len(rows)} training samples for batch size {batch_size}")
    betas = (p.beta1, p.beta2)
    g_opt = torch.optim.Adam(nets.trainable, lr=p.lr, betas=betas)
    d_opt = torch.optim.Adam(nets.discriminator.parameters(), lr=p.d_lr, betas=betas)
    size = nets.model.config.image_size
    nets.model.train()

    def one_step(k: int) -> None:
        chunk = [rows[(k * batch_size + i) % len(rows)] for i in range(batch_size)]
        batch = {key: torch.from_numpy(np.stack([r[key] for r in chunk])) for key in chunk[0]}
        batch = train_data.to_model_inputs(batch, "cpu", size)
        nets.discriminator.requires_grad_(False)
        out = stage.step(nets, batch, p)
        g_opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.trainable, 1.0)  # the runner's DeepSpeed clips the same way
        g_opt.step()
        nets.discriminator.requires_grad_(True)
        d_loss = discriminator_adversarial_loss(
            nets.discriminator(out.real), nets.discriminator(out.fake.detach())
        )
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        float(out.logs["loss"])  # the runner reads every logged term each step; so does this loop

    for k in range(warmup):
        one_step(k)
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(warmup, warmup + steps):
        one_step(k)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "samples_per_s": steps * batch_size / wall,
        "cpu_s_per_step": cpu / steps,
        "wall_s": wall,
        "train_samples": len(rows),
    }


def ray_run(data: Path, out: Path, overrides: list[str], warmup: int, steps: int) -> dict:
    """The product: pipelines.train.runner.run_stage, 1 worker; the last progress window is the measurement."""
    from pipelines.train.runner import run_stage

    if warmup % steps:
        raise SystemExit(
            "--warmup must be a multiple of --steps (the runner's progress windows are --steps long)"
        )
    extra = {
        "train.data_dir": data,
        "train.models_dir": out / "models",
        "train.metrics_dir": out / "metrics",
        "train.storage_path": out / "ray",
        "train.log_every": steps,
        "train.sample_every": 0,
        "train.checkpoint_every": 10**6,
        "train.hash_inputs": False,
        "train.register_model": False,
        f"{STAGE}.steps": warmup + steps,
    }
    t0 = time.perf_counter()
    metrics = run_stage(
        STAGE, str(ROOT / "params.yaml"), [*overrides, *(f"{k}={v}" for k, v in extra.items())]
    )
    return {
        "samples_per_s": metrics["samples_per_s"],
        "step_samples_per_s": metrics["step_samples_per_s"],
        "run_wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps on each side")
    ap.add_argument(
        "--warmup", type=int, default=20, help="steps before the measurement (multiple of --steps)"
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--identities", type=int, default=4, help="SynthTalk speakers (one in val)")
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length")
    ap.add_argument(
        "--pairs-per-segment", type=int, default=64, help="autoencoder pairs per segment per epoch"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    torch.set_num_threads(1)  # the runner's workers run train.torch_threads=1 as well
    overrides = [
        "train.workers=1",
        "train.cpus_per_worker=1",
        "train.torch_threads=1",
        f"train.batch_size={args.batch_size}",
        f"{STAGE}.pairs_per_segment={args.pairs_per_segment}",
    ]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edtalk-bench-train-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        ray.init(num_cpus=2, include_dashboard=False)
        data = make_data(root, args.identities, args.seconds)
        print("plain PyTorch loop ...", flush=True)
        plain = plain_loop(data, overrides, args.batch_size, args.warmup, args.steps)
        print(f"  {plain['samples_per_s']:.2f} samples/s", flush=True)
        print("Ray Train + DeepSpeed runner ...", flush=True)
        cpu = CPUTime()
        via_ray = ray_run(data, root / "run", overrides, args.warmup, args.steps)
        ray_cpu = cpu.stop()
        print(f"  {via_ray['samples_per_s']:.2f} samples/s", flush=True)
        ray.shutdown()
    overhead = plain["samples_per_s"] / via_ray["samples_per_s"] - 1.0
    result = {
        "stage": STAGE,
        "preset": "tiny",
        "batch_size": args.batch_size,
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        "torch_threads": 1,
        "samples_per_s_plain": round(plain["samples_per_s"], 3),
        "samples_per_s_ray": round(via_ray["samples_per_s"], 3),
        "overhead": round(overhead, 4),
        "ray_step_only_samples_per_s": round(via_ray["step_samples_per_s"], 3),
        "step_overhead": round(plain["samples_per_s"] / via_ray["step_samples_per_s"] - 1.0, 4),
        "plain_cpu_s_per_step": round(plain["cpu_s_per_step"], 4),
        "ray_run_wall_s": round(via_ray["run_wall_s"], 1),
        "ray_run_cpu_s": round(ray_cpu, 1),
        "train_samples_per_epoch": plain["train_samples"],
        "data": {"plain": "preloaded in memory", "ray": "streamed from Parquet (Ray Data, preserve_order)"},
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
