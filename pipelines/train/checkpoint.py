"""Checkpoints of a stage run: DeepSpeed engine states + the loop state, reported through ray.train.report.

Layout of one checkpoint directory (all ranks write into their own temporary copy; Ray Train merges them, so every
file name carries the rank where ranks differ, as DeepSpeed already does):

    generator/...        engine.save_checkpoint(dir, tag="generator")  (ZeRO-1/2: each rank its optimizer shard;
    discriminator/...    ZeRO-3: each rank its parameter shard too)
    state.json           rank 0: step, epoch, batch in epoch, MLflow run id, last logged numbers
    final/               last checkpoint only, rank 0: the consolidated model (save_pretrained) + discriminator
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from preprocessing import storage

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FINAL_DIR = "final"
ENGINE_TAGS = ("generator", "discriminator")
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it on every call


def save(engines: dict, state: dict, rank: int, final_export=None) -> tempfile.TemporaryDirectory:
    """Every rank: save its engine states into a fresh temp dir (returned; caller reports then cleans it up)."""
    tmp = tempfile.TemporaryDirectory(prefix="edtalk-ckpt-")
    for tag, engine in engines.items():
        engine.save_checkpoint(tmp.name, tag=tag, save_latest=False)
    if rank == 0:
        Path(tmp.name, STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    if final_export is not None:
        final_export(Path(tmp.name, FINAL_DIR))  # collective under ZeRO-3: every rank enters, rank 0 writes
    return tmp


# The only classes (beyond tensors and plain containers) in DeepSpeed's checkpoint files, ZeRO stages 0-3 (listed
# with torch.serialization.get_unsafe_globals_in_checkpoint; tests/test_security_checkpoints.py keeps it current).
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects other than tensors, plain data and DEEPSPEED_CLASSES."""


@contextmanager
def weights_only_loads():
    """Every torch.load inside unpickles tensors, plain data and DEEPSPEED_CLASSES only.

    DeepSpeed calls torch.load(weights_only=False): a checkpoint store anyone can write to (a shared bucket) would
    otherwise run their code in every worker. TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides the caller's argument."""
    import importlib

    import torch

    classes = []
    for name in DEEPSPEED_CLASSES:
        module, attr = name.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), attr))
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(classes):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


def restore(checkpoint, engines: dict) -> dict:
    """Load every engine's state from a Ray Checkpoint; returns the loop state of rank 0's state.json."""
    import pickle

    with checkpoint.as_directory() as path:
        for tag, engine in engines.items():
            try:
                with weights_only_loads():
                    load_path, _ = engine.load_checkpoint(path, tag=tag)
            except pickle.UnpicklingError as exc:
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [
                    type(exc).__name__
                ]
                reason = next((line for line in lines if "global" in line.lower()), lines[0])
                raise UnsafeCheckpointError(
                    f"checkpoint {checkpoint.path}: refused to load the {tag!r} state: it holds objects other than "
                    f"tensors and DeepSpeed's own ({reason[:300]}); it was not written by this runner, or was "
                    "tampered with. Delete the run's checkpoints (or use a fresh train.storage_path) to start over"
                ) from None
            if load_path is None:
                raise RuntimeError(f"checkpoint {checkpoint.path}: no DeepSpeed state for {tag!r} in {path}")
        state_file = Path(path, STATE_FILE)
        if not state_file.exists():
            raise RuntimeError(
                f"checkpoint {checkpoint.path} has no {STATE_FILE}; it was not written by this runner"
            )
        return json.loads(state_file.read_text())


@contextmanager
def local_copy(checkpoint):
    """The checkpoint as a local directory (downloaded when it lives on object storage)."""
    with checkpoint.as_directory() as path:
        yield Path(path)


# ---------------------------------------------------------------------------------------- fault injection


def fault_marker(run_dir: str, step: int, rank: int) -> str:
    return storage.join(run_dir, f"fault_injected_step{step}_rank{rank}")


def maybe_inject_fault(run_dir: str, step: int, fail_at_step: int, fail_rank: int, rank: int) -> None:
    """Raise once on `fail_rank` right after step `fail_at_step`; a marker in the run dir stops a second time."""
    if fail_at_step <= 0 or step != fail_at_step or rank != fail_rank:
        return
    marker = fault_marker(run_dir, step, rank)
    if storage.exists(marker):
        return
    storage.write_bytes_atomic(marker, b"injected\n")
    log.warning("fault injection: rank %d raises after step %d (train.fail_at_step)", rank, step)
    raise RuntimeError(f"injected fault at step {step} on rank {rank} (train.fail_at_step={fail_at_step})")
