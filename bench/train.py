"""Training runtime overhead: samples/s of the `autoencoder` stage through the product's runner (Ray Train +
DeepSpeed, 1 worker, Ray Data) against a plain single-process PyTorch loop doing the same work.

Both sides use the stage's own `build` and `step` (tiny preset, the params.yaml `autoencoder:` section), the same
batch size, one torch thread, gradient clipping 1.0 and the same D update; the plain loop uses torch.optim.Adam on
samples preloaded in memory, the runner gets them from Parquet through Ray Data (built once into the object store
when they fit its cache budget, as here). Warm-up steps are excluded on both sides: the runner's number is its last
progress window (train.log_every = the measured steps), which counts data waits, epoch restarts and logging but
not the validation pass, image grids or checkpoints. The sides alternate in one run: plain, then (runner, plain)
x --rounds, each runner run compared with the mean of the plain segments around it; overhead = 1 - runner/plain.
Writes bench/results/train.json.

    python bench/train.py [--steps 20] [--warmup 20] [--rounds 2] [--batch-size 4]
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


def stage_params(overrides: list[str], stage_name: str = STAGE, params_path: Path = ROOT / "params.yaml"):
    from pipelines.train import stages
    from pipelines.train.config import load_stage_params

    stage = stages.get(stage_name)
    return stage, load_stage_params(stage.params_cls, stage_name, str(params_path), overrides)


class TooFewSamples(SystemExit):
    """The data holds fewer training samples than one batch (a CLI still exits with the message)."""


class PlainLoop:
    """The stage's build + step in one process: torch.optim.Adam, samples preloaded, no Ray, no DeepSpeed.

    Built and warmed up once; `run(steps)` times the next `steps` steps, so its segments can bracket the runner's.
    Any adversarial visual stage (`stage_name`, its `upstream` model folders) on any device, optionally under bf16
    autocast with fp32 master weights (bench/train_gpu.py).
    """

    def __init__(
        self,
        data: Path,
        overrides: list[str],
        batch_size: int,
        warmup: int,
        stage_name: str = STAGE,
        params_path: Path = ROOT / "params.yaml",
        device: str = "cpu",
        bf16: bool = False,
        upstream: dict[str, str] | None = None,
        channels_last: bool = False,
    ) -> None:
        import torch

        from pipelines.train import data as train_data
        from preprocessing.params import load_section

        self.stage, self.p = stage_params(overrides, stage_name, params_path)
        model_section = load_section(str(params_path), "model", overrides)
        torch.manual_seed(0)
        self.device, self.bf16 = torch.device(device), bf16
        self.nets = self.stage.build(model_section, self.p, dict(upstream or {}))
        self.nets.model.to(self.device)
        self.nets.discriminator.to(self.device)
        for extra in self.nets.extras.values():
            extra.to(self.device)
        # NHWC weights and images (spares cuDNN's layout transforms on a GPU)
        self.channels_last = channels_last
        if channels_last:
            for net in (self.nets.model, self.nets.discriminator, *self.nets.extras.values()):
                net.to(memory_format=torch.channels_last)
        splits = train_data.segment_splits(str(data))
        train_ids, _, _ = train_data.train_val_ids(splits, 0.2)
        self.rows = train_data.local_samples(
            str(data),
            self.stage.table,
            train_ids,
            self.stage.row_filter,
            self.stage.samples(self.p, 0),
            10**9,
        )
        if len(self.rows) < batch_size:
            raise TooFewSamples(f"only {len(self.rows)} training samples for batch size {batch_size}")
        betas = (self.p.beta1, self.p.beta2)
        self.g_opt = torch.optim.Adam(self.nets.trainable, lr=self.p.lr, betas=betas)
        self.d_opt = torch.optim.Adam(self.nets.discriminator.parameters(), lr=self.p.d_lr, betas=betas)
        self.batch_size, self.k, self.sums = batch_size, 0, {}
        self.nets.model.train()
        for _ in range(warmup):
            self._step()

    def _step(self) -> None:
        import torch

        from edtalk.losses import discriminator_adversarial_loss
        from pipelines.train import data as train_data

        nets, bs = self.nets, self.batch_size
        chunk = [self.rows[(self.k * bs + i) % len(self.rows)] for i in range(bs)]
        self.k += 1
        batch = {key: torch.from_numpy(np.stack([r[key] for r in chunk])) for key in chunk[0]}
        batch = train_data.to_model_inputs(batch, self.device, nets.model.config.image_size)
        if self.channels_last:
            batch = {
                k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                for k, v in batch.items()
            }
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        nets.discriminator.requires_grad_(False)
        with autocast:
            out = self.stage.step(nets, batch, self.p)
        self.g_opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.trainable, 1.0)  # the runner's DeepSpeed clips the same way
        self.g_opt.step()
        nets.discriminator.requires_grad_(True)
        with autocast:
            d_loss = discriminator_adversarial_loss(
                nets.discriminator(out.real), nets.discriminator(out.fake.detach())
            )
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()
        # The runner sums every logged term as a detached fp32 tensor and reads the sums once per progress window
        # (no per-step device sync); so does this loop, once per run().
        for k, v in out.logs.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> dict:
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self._step()
        logs = {k: float(v) / max(steps, 1) for k, v in self.sums.items()}
        self.sums = {}
        self._sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {
            "samples_per_s": steps * self.batch_size / wall,
            "cpu_s_per_step": cpu / steps,
            "load_avg_1min": os.getloadavg()[0],
            "mean_logs": logs,
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
        "data_wait_frac": metrics.get("data_wait_frac"),
        "run_wall_s": time.perf_counter() - t0,
        "load_avg_1min": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps on each side")
    ap.add_argument(
        "--warmup", type=int, default=20, help="runner steps before the measurement (multiple of --steps)"
    )
    ap.add_argument("--plain-warmup", type=int, default=5, help="plain-loop steps before its first segment")
    ap.add_argument("--rounds", type=int, default=2, help="runner runs, each bracketed by plain segments")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--identities", type=int, default=4, help="SynthTalk speakers (one in val)")
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length")
    ap.add_argument(
        "--pairs-per-segment",
        type=int,
        default=16,
        help="autoencoder pairs per segment per epoch (16: 12 steps an epoch, so epochs restart in the window)",
    )
    ap.add_argument(
        "--cache-mb",
        type=float,
        default=None,
        help="the runner's sample cache budget, train.cache_mb (default: params.yaml; 0 = stream every epoch)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from preprocessing import local_ray

    torch.set_num_threads(1)  # the runner's workers run train.torch_threads=1 as well
    overrides = [
        "train.workers=1",
        "train.cpus_per_worker=1",
        "train.torch_threads=1",
        f"train.batch_size={args.batch_size}",
        f"{STAGE}.pairs_per_segment={args.pairs_per_segment}",
    ]
    if args.cache_mb is not None:
        overrides.append(f"train.cache_mb={args.cache_mb:g}")
    from preprocessing.params import load_section

    cache_mb = load_section(str(ROOT / "params.yaml"), "train", overrides).get("cache_mb", 0)
    # plain, then (runner, plain) x rounds: each runner run is compared with the plain segments just before and
    # after it, so load that changes during the bench (shared machine) hits both sides of every ratio alike.
    plains, rays, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="edtalk-bench-train-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        local_ray.init(num_cpus=2)
        data = make_data(root, args.identities, args.seconds)
        plain = PlainLoop(data, overrides, args.batch_size, args.plain_warmup)
        plains.append(plain.run(args.steps))
        print(f"plain PyTorch loop: {plains[-1]['samples_per_s']:.2f} samples/s", flush=True)
        cpu = CPUTime()
        for r in range(args.rounds):
            rays.append(
                ray_run(
                    data, root / f"run{r}", [*overrides, f"train.run_name=bench-{r}"], args.warmup, args.steps
                )
            )
            plains.append(plain.run(args.steps))
            bracket = (plains[-2]["samples_per_s"] + plains[-1]["samples_per_s"]) / 2
            ratios.append(rays[-1]["samples_per_s"] / bracket)
            print(
                f"round {r + 1}: runner {rays[-1]['samples_per_s']:.2f} samples/s "
                f"({rays[-1]['data_wait_frac']:.0%} data wait), plain {plains[-1]['samples_per_s']:.2f}, "
                f"runner/plain {ratios[-1]:.3f}",
                flush=True,
            )
        ray_cpu = cpu.stop()
        ray.shutdown()
    ratio = float(np.mean(ratios))
    plain_rate = float(np.mean([p["samples_per_s"] for p in plains]))
    result = {
        "stage": STAGE,
        "preset": "tiny",
        "batch_size": args.batch_size,
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "torch_threads": 1,
        "samples_per_s_plain": round(plain_rate, 3),
        "samples_per_s_ray": round(float(np.mean([x["samples_per_s"] for x in rays])), 3),
        # 1 - runner/plain: the share of the plain loop's throughput the runner loses (mean of the rounds'
        # bracketed ratios; the target is <= 0.10).
        "overhead": round(1.0 - ratio, 4),
        "runner_over_plain_per_round": [round(x, 4) for x in ratios],
        "samples_per_s_plain_segments": [round(p["samples_per_s"], 3) for p in plains],
        "samples_per_s_ray_runs": [round(x["samples_per_s"], 3) for x in rays],
        "ray_data_wait_frac": [round(x["data_wait_frac"], 4) for x in rays],
        "ray_step_only_samples_per_s": [round(x["step_samples_per_s"], 3) for x in rays],
        "plain_cpu_s_per_step": round(float(np.mean([p["cpu_s_per_step"] for p in plains])), 4),
        "ray_run_wall_s": [round(x["run_wall_s"], 1) for x in rays],
        "ray_runs_cpu_s": round(ray_cpu, 1),
        "train_samples_per_epoch": len(plain.rows),
        "steps_per_epoch": len(plain.rows) // args.batch_size,
        "data": {
            "plain": "preloaded in memory",
            "ray": "Ray Data, preserve_order; "
            + (
                f"decoded samples built once into the object store (cache budget {cache_mb} MiB)"
                if cache_mb > 0
                else "read -> decode re-run every epoch (cache off)"
            ),
        },
        "load_avg_1min": {
            "plain": [round(p["load_avg_1min"], 2) for p in plains],
            "ray": [round(x["load_avg_1min"], 2) for x in rays],
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
