"""The shared training runner: one Ray Train `TorchTrainer` job per stage run, DeepSpeed engines in every worker.

Driver (`run_stage`): reads params, names the run by a fingerprint of its params and inputs (same name = resume),
opens or resumes its MLflow run, builds the Ray Datasets, runs the trainer, then writes models/STAGE (and runs the
stage's `finalize` hook on it), metrics/STAGE.json and the lineage, and registers the model.

Worker (`worker_loop`): builds the stage's nets from the seed, wraps them in DeepSpeed engines (generator side, and
D for adversarial stages), restores the last checkpoint if any, and loops: batch -> stage.step -> backward/step,
with progress lines, MLflow metrics and image grids from rank 0 and a checkpoint every N steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pipelines import lineage
from pipelines.train import checkpoint, data
from pipelines.train import stages as stage_registry
from pipelines.train.config import (
    RunSpec,
    TrainParams,
    fingerprint,
    load_stage_params,
    load_train_params,
    semantic_train_params,
)
from preprocessing import local_ray, storage
from preprocessing.params import ParamsError, load_section

log = logging.getLogger(__name__)


# ================================================================================================== worker side

# Per-window throughput numbers of a progress line (MLflow metrics, not loss terms).
WINDOW_KEYS = ("samples_per_s", "data_wait_frac")


def _ds_config(tp: TrainParams) -> dict:
    return {
        "train_micro_batch_size_per_gpu": tp.batch_size,
        "gradient_accumulation_steps": tp.grad_accum,
        "gradient_clipping": tp.grad_clip,
        "zero_optimization": {"stage": tp.zero_stage},
        # Master weights and optimizer state stay fp32; bf16 is applied as autocast around forward passes.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _engine(module, params, lr: float, betas: tuple[float, float], tp: TrainParams):
    import deepspeed
    import torch

    # A torch optimizer: DeepSpeed's fused Adam would JIT-compile a C++ op first.
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=_ds_config(tp))
    return engine


def _avg_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _scalar(value) -> float:
    """A logged term as a Python float, detached first (no autograd bookkeeping for a number to print)."""
    return float(value.detach()) if hasattr(value, "detach") else float(value)


def _detached(value):
    """A logged term kept as a detached tensor: summed on its device and read once per progress window (on a GPU,
    reading it every step would wait for the step to finish)."""
    return value.detach().float() if hasattr(value, "detach") else float(value)


def frozen_modules(root, trainable) -> list:
    """The outermost submodules of `root` that hold parameters and train none of them (`trainable`: the
    parameters the stage optimises). Parameter-free modules (dropout, activations) follow their parent."""
    trainable_ids = {id(p) for p in trainable}

    def walk(module) -> list:
        out = []
        for child in module.children():
            params = list(child.parameters())
            if not params:
                continue
            if any(id(p) in trainable_ids for p in params):
                out.extend(walk(child))
            else:
                out.append(child)
        return out

    return walk(root)


def train_mode(nets, frozen: list) -> None:
    """Training mode for what the stage trains only: frozen modules and the frozen helpers (`nets.extras`) stay in
    eval mode, so their BatchNorm running statistics do not move and their dropout is off."""
    nets.model.train()
    for module in frozen:
        module.eval()
    for module in nets.extras.values():
        module.eval()
    if nets.discriminator is not None:
        nets.discriminator.train()


GRID_MIN_SIDE = 128  # grid cells are enlarged (nearest) to at least this side, so their titles stay readable


def _title_rows(title: str, names: list[str], widths: list[int]) -> np.ndarray:
    """White header rows: the grid's title, then each column's name (`_` as spaces, wrapped to the cell width)."""
    import cv2

    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
    line_h = 14
    char_w = cv2.getTextSize("M", font, scale, thick)[0][0]

    def wrap(text: str, width: int) -> list[str]:
        per_cell = max(1, (width - 4) // char_w)
        lines, line = [], ""
        for word in text.split():
            if line and len(line) + 1 + len(word) > per_cell:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        return [*lines, line]

    cells = [wrap(n.replace("_", " "), w) for n, w in zip(names, widths, strict=True)]
    n_lines = (1 if title else 0) + max(len(c) for c in cells)
    header = np.full((n_lines * line_h + 6, sum(widths), 3), 255, np.uint8)
    y = line_h
    if title:
        cv2.putText(header, title, (4, y - 3), font, scale, (0, 0, 160), thick, cv2.LINE_AA)
        y += line_h
    x = 0
    for lines, w in zip(cells, widths, strict=True):
        for j, line in enumerate(lines):
            cv2.putText(header, line, (x + 3, y + j * line_h - 3), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
        x += w
    return header


def grid_image(columns: dict, max_rows: int = 4, title: str = "") -> np.ndarray:
    """{name: (B,3,S,S) in [-1,1]} -> one HxWx3 uint8 image: a row per sample, a column per name, the column names
    (which say what was swapped: `a_mouth_on_b`, `mouth_from_audio`) and `title` written above them."""
    import torch

    cols = []
    for tensor in columns.values():
        t = tensor[:max_rows].detach().float().clamp(-1, 1).cpu()
        cols.append(((t + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    factor = -(-GRID_MIN_SIDE // cols[0].shape[1])  # cells of one grid share a height (widths may differ)
    cols = [c.repeat(factor, axis=1).repeat(factor, axis=2) for c in cols]
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(cols[0].shape[0])]
    body = np.concatenate(rows, axis=0)
    header = _title_rows(title, list(columns), [c.shape[2] for c in cols])
    return np.concatenate([header, body], axis=0)


def worker_loop(config: dict) -> None:
    """The train loop of one Ray Train worker (every rank runs it)."""
    import deepspeed
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress line per N steps instead
    config = dict(config)
    val_samples = config.pop("val_samples", None)
    spec = RunSpec.from_dict(config)
    stage = stage_registry.get(spec.stage)
    tp = TrainParams(**spec.train)
    sp = stage.params_cls(**spec.stage_params)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tp.torch_threads)
    device = ray.train.torch.get_device()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if tp.compute_dtype == "bf16"
        else contextlib.nullcontext()
    )

    torch.manual_seed(tp.seed)  # identical initialisation on every rank and every attempt
    nets = stage.build(spec.model, sp, spec.upstream_dirs)
    frozen = frozen_modules(nets.model, nets.trainable)  # before DeepSpeed wraps anything
    nets.model.to(device)
    for module in nets.extras.values():
        module.to(device)
    if nets.discriminator is not None:
        nets.discriminator.to(device)

    # Ray Train already made the torch process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend="nccl" if tp.use_gpu else "gloo", auto_mpi_discovery=False)
    betas = (getattr(sp, "beta1", 0.9), getattr(sp, "beta2", 0.999))
    engines = {"generator": _engine(nets.model, nets.trainable, sp.lr, betas, tp)}
    if stage.adversarial:
        engines["discriminator"] = _engine(
            nets.discriminator, list(nets.discriminator.parameters()), sp.d_lr, betas, tp
        )
    g_engine, d_engine = engines["generator"], engines.get("discriminator")

    state = {"step": 0, "micro": 0, "epoch": 0, "batch_in_epoch": 0, "logs": {}, "samples": 0, "train_s": 0.0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state.update(checkpoint.restore(ckpt, engines))
        if rank == 0:
            print(f"[{stage.name}] resumed from checkpoint at step {state['step']}", flush=True)

    run_id, uri = spec.run_id, spec.tracking_uri
    train_shard = ray.train.get_dataset_shard("train")
    # Validation samples were taken once on the driver: every rank scores the same ones (collective under ZeRO-3).
    val_batches = [{k: torch.from_numpy(np.array(v)) for k, v in b.items()} for b in (val_samples or [])]
    grid_batch = val_batches[0] if val_batches else None

    image_size = getattr(getattr(nets.model, "config", None), "image_size", None)

    def inputs(batch):
        return data.to_model_inputs(batch, device, image_size)

    def validate() -> dict[str, float]:
        out: dict[str, list[float]] = {}
        nets.model.eval()
        with torch.no_grad(), autocast:
            for b in val_batches:
                for k, v in stage.step(nets, inputs(b), sp).logs.items():
                    out.setdefault(f"val_{k}", []).append(_scalar(v))
        train_mode(nets, frozen)
        return {k: float(np.mean(v)) for k, v in out.items()}

    def log_grid(step: int) -> None:
        if grid_batch is None:
            return
        nets.model.eval()
        with torch.no_grad(), autocast:
            cols = stage.grid(nets, inputs(grid_batch), sp)
        train_mode(nets, frozen)
        if rank == 0 and run_id:
            image = grid_image(cols, title=f"{stage.name} step {step}")
            lineage.log_image(run_id, image, f"samples/step_{step:06d}.png", uri)
            lineage.set_tags(run_id, {"samples.columns": " | ".join(cols)}, uri)

    def final_export(folder: Path) -> None:
        if tp.zero_stage == 3:  # gather the partitioned parameters; rank 0 writes
            params = list(nets.model.parameters())
            if nets.discriminator is not None:
                params += list(nets.discriminator.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:
                    stage.export(nets, folder)
        elif rank == 0:
            stage.export(nets, folder)

    def report(final: bool) -> None:
        metrics = {"step": state["step"], **state["logs"]}
        # Throughput of the training steps alone (no data wait, validation or checkpoints), whole run so far.
        metrics["step_samples_per_s"] = state["samples"] / max(state["train_s"], 1e-9)
        tmp = checkpoint.save(engines, state, rank, final_export if final else None)
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp.name))
        finally:
            tmp.cleanup()

    train_mode(nets, frozen)
    window_t, window_samples = time.perf_counter(), 0
    sums: dict[str, float] = {}
    counts, overhead, window_wait = 0, 0.0, 0.0
    while state["step"] < spec.max_steps:
        it = train_shard.iter_torch_batches(
            batch_size=tp.batch_size,
            drop_last=True,
            device="cpu",
            local_shuffle_buffer_size=tp.shuffle_buffer or None,
            local_shuffle_seed=(tp.seed * 100003 + state["epoch"]) if tp.shuffle_buffer else None,
        )
        seen = 0
        t_ready = time.perf_counter()
        for i, raw in enumerate(it):
            seen += 1
            if i < state["batch_in_epoch"]:
                t_ready = time.perf_counter()
                continue  # replaying the epoch up to where the checkpoint left it
            t0 = time.perf_counter()
            window_wait += t0 - t_ready  # waiting for the data pipeline (batch not ready yet)
            # Per-micro-step seed: any randomness in a step is the same after a restart.
            torch.manual_seed(tp.seed * 1000003 + state["micro"] * 131 + rank)
            batch = inputs(raw)
            if d_engine is not None:
                nets.discriminator.requires_grad_(False)  # the G step must not leave gradients in D
            with autocast:
                out = stage.step(nets, batch, sp)
            g_engine.backward(out.loss)
            g_engine.step()
            logs = {k: _detached(v) for k, v in out.logs.items()}
            if d_engine is not None:
                nets.discriminator.requires_grad_(True)
                from edtalk.losses import discriminator_adversarial_loss

                with autocast:
                    d_loss = discriminator_adversarial_loss(d_engine(out.real), d_engine(out.fake.detach()))
                d_engine.backward(d_loss)
                d_engine.step()
                logs["d_loss"] = _detached(d_loss)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            counts += 1
            state["micro"] += 1
            state["batch_in_epoch"] = i + 1
            n = tp.batch_size * world
            state["samples"] += n
            window_samples += n
            state["train_s"] += time.perf_counter() - t0
            if state["micro"] % tp.grad_accum:
                t_ready = time.perf_counter()
                continue
            state["step"] += 1
            step = state["step"]
            last = step >= spec.max_steps
            if step % tp.log_every == 0 or last:
                elapsed = time.perf_counter() - window_t - overhead
                avg = _avg_over_ranks({k: _scalar(v) / counts for k, v in sums.items()}, device)
                avg["samples_per_s"] = window_samples / max(elapsed, 1e-9)
                avg["data_wait_frac"] = window_wait / max(elapsed, 1e-9)
                avg.update(validate())
                state["logs"] = avg
                if rank == 0:
                    shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(avg.items()) if k not in WINDOW_KEYS)
                    print(
                        f"[{stage.name}] step {step}/{spec.max_steps} {shown} "
                        f"{avg['samples_per_s']:.2f} samples/s ({avg['data_wait_frac']:.0%} data wait)",
                        flush=True,
                    )
                    if run_id:
                        lineage.log_metrics(run_id, avg, step, uri)
                sums, counts, overhead, window_wait = {}, 0, 0.0, 0.0
                window_t, window_samples = time.perf_counter(), 0
            t_aside = time.perf_counter()  # grids and checkpoints do not count against samples/s
            if tp.sample_every and step % tp.sample_every == 0 and not last:
                log_grid(step)
            if step % tp.checkpoint_every == 0 and not last:
                report(final=False)
            overhead += time.perf_counter() - t_aside
            checkpoint.maybe_inject_fault(spec.run_dir, step, tp.fail_at_step, tp.fail_rank, rank)
            if last:
                break
            t_ready = time.perf_counter()
        if seen == 0:
            raise RuntimeError(
                f"stage {stage.name}: worker {rank} got no training batch of {tp.batch_size} samples; the data "
                f"is too small for {world} worker(s) x batch_size {tp.batch_size} (add data, lower "
                f"train.batch_size or train.workers)"
            )
        if state["step"] < spec.max_steps:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    log_grid(state["step"])
    report(final=True)


# ================================================================================================== driver side


def _abs(path: str) -> str:
    """Local paths become absolute (Ray workers run elsewhere); URIs stay as they are."""
    return path if storage.is_remote(path) else str(Path(path).resolve())


# Driver settings the workers need as well: a laptop driver against a remote cluster carries its tracking server
# and object-storage credentials to the ranks (cluster pods may also have them from their own Secrets).
PASSTHROUGH_ENV = (
    "EDTALK_VGG19_WEIGHTS",
    "HF_HOME",
    "TRANSFORMERS_OFFLINE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def _worker_env(tp: TrainParams) -> dict[str, str]:
    env = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "edtalk-torch-extensions")
        ),
        "OMP_NUM_THREADS": str(tp.torch_threads),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else every progress line reaches the console twice
    }
    if not tp.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in PASSTHROUGH_ENV:
        if os.environ.get(key):
            env[key] = os.environ[key]
    if "MLFLOW_TRACKING_URI" in env:
        env["MLFLOW_TRACKING_URI"] = lineage.tracking_uri()  # a relative sqlite path made absolute
    return env


def run_stage(stage_name: str, params_path: str | None = "params.yaml", overrides=()) -> dict:
    """Run (or resume) one training stage; returns the metrics written to metrics/STAGE.json."""
    import ray
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage = stage_registry.get(stage_name)
    overrides = tuple(overrides)
    tp = load_train_params(params_path, overrides)
    sp = load_stage_params(stage.params_cls, stage.name, params_path, overrides)
    model_section = load_section(params_path, "model", overrides)
    if tp.zero_stage == 3 and stage.name in stage_registry.ZERO3_UNSUPPORTED:
        raise ParamsError(
            f"train.zero_stage=3: stage {stage.name} cannot run under ZeRO-3: "
            f"{stage_registry.ZERO3_UNSUPPORTED[stage.name]}, and ZeRO-3 leaves a parameter partitioned outside "
            f"its module's forward; use train.zero_stage 0, 1 or 2"
        )
    if tp.zero_stage == 3 and getattr(sp, "w_local", 0) > 0:
        raise ParamsError(
            f"train.zero_stage=3 with {stage.name}.w_local > 0 is not supported yet: under ZeRO-3 a run with the "
            "locality term does not land where ZeRO-0 does (measured: generator weights 1e-2 apart after 4 steps, "
            "against 1.5e-6 without the term); use train.zero_stage 0, 1 or 2, or w_local 0"
        )
    data_dir = _abs(tp.data_dir)
    models_dir = _abs(tp.models_dir)

    upstream = lineage.read_upstream(models_dir, stage.upstream)
    upstream_dirs = {name: storage.join(models_dir, name) for name in stage.upstream}
    inputs = [data_dir, *upstream_dirs.values()]
    hashes = lineage.input_hashes(inputs, tp.hash_inputs)
    stage_params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(sp).items()}
    code = lineage.code_md5()
    fp = fingerprint(stage.name, stage_params, semantic_train_params(tp), model_section, hashes, code)
    run_name = tp.run_name or f"{stage.name}-{fp}"
    storage_path = _abs(tp.storage_path)
    run_dir = storage.join(storage_path, run_name)

    uri = lineage.tracking_uri()
    run_id, exp_id, resumed = lineage.start_or_resume(run_dir, tp.experiment, stage.name, uri)
    print(
        f"[{stage.name}] {'resuming' if resumed else 'starting'} run {run_name} (MLflow run {run_id}, {uri})",
        flush=True,
    )
    git = lineage.git_info(".")
    stat_tags, stats_doc = lineage.stats_tags(data_dir)
    tags = {"stage": stage.name, "ray.run_name": run_name, "ray.storage": run_dir, "fingerprint": fp, **git}
    tags["code.md5"] = code
    tags.update({lineage.tag_key("dvc.md5", _rel(p)): h for p, h in hashes.items()})
    tags.update({lineage.tag_key("dvc.lock", p): h for p, h in lineage.dvc_lock_hashes(stage.name).items()})
    for name, info in upstream.items():
        tags[f"upstream.{name}.run_id"] = info.get("run_id", "")
        tags[f"upstream.{name}.git_commit"] = info.get("git_commit", "")
        if info.get("model_version"):
            tags[f"upstream.{name}.model_version"] = info["model_version"]
    tags.update(stat_tags)
    tags.update(lineage.source_tags(f"edtalk train {stage.name}", git) | lineage.parent_tags(exp_id, uri))
    lineage.set_tags(run_id, tags, uri)
    dataset = lineage.dataset_entity(data_dir, stage.table, lineage.data_digest(data_dir, hashes[data_dir]))
    upstream_models = [info.get("model_id", "") for info in upstream.values()]
    lineage.log_inputs(run_id, uri, [(dataset, {"mlflow.data.context": "training"})], upstream_models)
    lineage.log_params(run_id, {"train": tp.to_dict(), stage.name: stage_params, "model": model_section}, uri)
    if stats_doc is not None:
        lineage.client(uri).log_dict(run_id, stats_doc, "data/_stats.json")

    # ---- data
    local_ray.init(runtime_env={"env_vars": _worker_env(tp)})  # RAY_ADDRESS's cluster, else loopback-only
    splits = data.segment_splits(data_dir)
    train_ids, val_ids, how = data.train_val_ids(splits, tp.val_fraction)
    print(
        f"[{stage.name}] data {data_dir}: {len(train_ids)} train / {len(val_ids)} val segments ({how})",
        flush=True,
    )
    lineage.set_tags(run_id, {"data.val_split": how}, uri)
    ray.data.DataContext.get_current().enable_progress_bars = False
    row_fn = stage.samples(sp, tp.seed)
    train_ds = data.samples_dataset(data_dir, stage.table, train_ids, stage.row_filter, row_fn)
    budget_mb = tp.cache_mb
    n_rows, est_bytes = data.estimate_bytes(data_dir, stage.table, train_ids, stage.row_filter, row_fn)
    fits = data.fits_cache(est_bytes, budget_mb)
    print(
        f"[{stage.name}] training samples of {n_rows} {stage.table} rows, ~{est_bytes / 2**20:.1f} MiB decoded: "
        + (
            "built once into the object store"
            if fits
            else f"streamed every epoch (cache budget {budget_mb} MiB)"
        ),
        flush=True,
    )
    train_ds, cached = data.cache_if_fits(train_ds, est_bytes, budget_mb, stage.name)
    lineage.set_tags(run_id, {"data.cached": str(cached).lower()}, uri)
    val_samples = []
    if tp.val_batches:
        rows = data.local_samples(
            data_dir,
            stage.table,
            val_ids,
            stage.row_filter,
            stage.samples(sp, tp.seed + 1),
            tp.val_batches * tp.batch_size,
        )
        if not rows:
            raise data.DataError(f"stage {stage.name}: the validation segments {val_ids} yield no samples")
        for i in range(0, len(rows), tp.batch_size):
            chunk = rows[i : i + tp.batch_size]
            val_samples.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # deterministic sample order and sharding: restarts reproduce the run

    spec = RunSpec(
        stage=stage.name,
        train=tp.to_dict(),
        stage_params=stage_params,
        model=model_section,
        upstream_dirs=upstream_dirs,
        run_dir=run_dir,
        run_id=run_id,
        tracking_uri=uri,
        max_steps=sp.steps,
    )
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={**spec.to_dict(), "val_samples": val_samples},
        scaling_config=ScalingConfig(
            num_workers=tp.workers, use_gpu=tp.use_gpu, resources_per_worker={"CPU": tp.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=tp.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tp.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env(tp)},
        ),
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": options}),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError(f"stage {stage.name}: the run finished without a checkpoint")
    except BaseException:
        lineage.end_run(run_id, uri, status="FAILED")
        raise
    wall_s = time.time() - t0

    # ---- outputs: models/STAGE (from the final checkpoint), lineage.json, metrics/STAGE.json, registry
    model_dir = storage.join(models_dir, stage.name)
    # Built in a local folder (models/STAGE itself when local): the finalize hook and MLflow read local files.
    remote_model = storage.local_path_or_none(model_dir) is None
    local_model = Path(_tmpdir()) / stage.name if remote_model else storage.local_path_or_none(model_dir)
    _export_model(result.checkpoint, local_model)
    if stage.finalize is not None:
        print(f"[{stage.name}] finalizing {model_dir} on the driver", flush=True)
        try:
            stage.finalize(
                local_model,
                stage_registry.FinalizeContext(
                    data_dir=data_dir,
                    train_ids=list(train_ids),
                    val_ids=list(val_ids),
                    params=sp,
                    train=tp,
                    model_section=model_section,
                ),
            )
        except BaseException:
            lineage.end_run(run_id, uri, status="FAILED")
            raise
    registered = tp.registered_model_prefix + stage.name if tp.register_model else None
    info = {
        "stage": stage.name,
        "run_id": run_id,
        "experiment_id": exp_id,
        "tracking_uri": uri,
        "git_commit": git["git.commit"],
        "git_dirty": git["git.dirty"],
        "ray_run": run_dir,
        "inputs": {_rel(p): h for p, h in hashes.items()},
        "upstream": {name: u.get("run_id", "") for name, u in upstream.items()},
        "registered_model": registered or "",
    }
    lineage.write_lineage(str(local_model), info)
    if remote_model:
        storage.upload(local_model, model_dir)
    model_tags = {"stage": stage.name, "git.commit": git["git.commit"]}
    model_id = lineage.log_logged_model(run_id, exp_id, stage.name, local_model, model_tags, uri)
    version = lineage.register(run_id, model_id, registered, uri) if registered else None
    info["model_id"] = model_id  # the next stage logs it as its model input
    if version:
        info["model_version"] = version
    lineage.write_lineage(model_dir, info)
    lineage.tag_model_hash(model_id, model_dir, uri, registered, version)  # the folder as DVC will hash it

    final = dict(result.metrics or {})
    steps = int(final.pop("step", sp.steps))
    step_rate = final.pop("step_samples_per_s", None)
    metrics = {
        "stage": stage.name,
        "steps": steps,
        "losses": {k: v for k, v in final.items() if k not in WINDOW_KEYS and not k.startswith("val_")},
        "val_losses": {k[4:]: v for k, v in final.items() if k.startswith("val_")},
        "samples_per_s": final.get("samples_per_s"),  # last progress window, wall clock
        "data_wait_frac": final.get("data_wait_frac"),  # share of that window spent waiting for batches
        "step_samples_per_s": step_rate,  # whole run, step compute only
        "wall_s": round(wall_s, 2),
        "workers": tp.workers,
        "run_id": run_id,
        "run_name": run_name,
        "model_version": version,
        "model_id": model_id,
    }
    metrics_uri = storage.join(_abs(tp.metrics_dir), f"{stage.name}.json")
    storage.write_bytes_atomic(metrics_uri, (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    lineage.log_metrics(run_id, {f"final_{k}": v for k, v in metrics["losses"].items()}, steps, uri)
    lineage.log_metrics(run_id, {"wall_s": wall_s}, steps, uri)
    lineage.end_run(run_id, uri)
    print(
        f"[{stage.name}] done: {model_dir} ({registered or 'not registered'} v{version}), {metrics_uri}",
        flush=True,
    )
    return metrics


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="edtalk-model-")


def _rel(path: str) -> str:
    """A path relative to the working directory when inside it (stable tag names across machines)."""
    local = storage.local_path_or_none(path)
    if local is None:
        return path
    try:
        return local.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return local.as_posix()


def _export_model(ckpt, local: Path) -> None:
    """Copy the final checkpoint's consolidated model folder to the local folder `local` (replacing it)."""
    with checkpoint.local_copy(ckpt) as path:
        final = path / checkpoint.FINAL_DIR
        if not final.is_dir():
            raise RuntimeError(f"final checkpoint {ckpt.path} has no {checkpoint.FINAL_DIR}/ model folder")
        if local.exists():
            shutil.rmtree(local)
        shutil.copytree(final, local)
