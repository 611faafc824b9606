"""Training resume unpickles nothing but tensors, plain data and DeepSpeed's own classes (issue 23 item 2).

DeepSpeed loads its checkpoint files with torch.load(weights_only=False): whoever can write to the Ray storage path
(often a shared bucket) could run code in every worker on the next resume. One rank of a real DeepSpeed engine per
ZeRO stage, in a subprocess (its own gloo group): a checkpoint it wrote resumes through pipelines.train.checkpoint;
the same checkpoint with one file replaced by a pickle that runs code is refused, and the code does not run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this calls os.system: what a tampered checkpoint file would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo ran > {self.marker}",))


def resume_one_process(port: str, root: str) -> None:
    """Per ZeRO stage 0-3: train a step, save, restore into a fresh engine (same weights and optimizer state);
    then tamper a file and expect UnsafeCheckpointError with the marker absent. Prints OK."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from pipelines.train import checkpoint
    from pipelines.train.config import TrainParams
    from pipelines.train.runner import _engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)

    def engine(stage: int):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        return _engine(
            net, list(net.parameters()), 1e-2, (0.5, 0.9), TrainParams(zero_stage=stage, batch_size=2)
        )

    for stage in (0, 1, 2, 3):
        trained = engine(stage)
        for _ in range(2):
            trained.backward(trained(torch.randn(2, 4)).pow(2).sum())
            trained.step()
        tmp = checkpoint.save({"generator": trained}, {"step": 2}, rank=0)
        ckpt = ray.train.Checkpoint.from_directory(tmp.name)
        fresh = engine(stage)
        assert checkpoint.restore(ckpt, {"generator": fresh}) == {"step": 2}
        with deepspeed.zero.GatheredParameters(list(trained.parameters()) + list(fresh.parameters())):
            for a, b in zip(trained.parameters(), fresh.parameters(), strict=True):
                assert torch.equal(a, b), f"ZeRO-{stage}: resumed weights differ"
        assert fresh.global_steps == trained.global_steps == 2
        for victim in sorted(Path(tmp.name, "generator").glob("*.pt")):
            marker = Path(root, f"ran-{stage}-{victim.stem}")
            original = victim.read_bytes()
            torch.save({"module": _RunsCode(str(marker))}, victim)
            try:
                checkpoint.restore(ckpt, {"generator": engine(stage)})
            except checkpoint.UnsafeCheckpointError as exc:
                message = str(exc)
                assert "\n" not in message and "refused to load the 'generator' state" in message, message
                assert "posix.system" in message or "os.system" in message, message
            else:
                raise AssertionError(f"ZeRO-{stage}: a tampered {victim.name} was loaded")
            assert not marker.exists(), f"ZeRO-{stage}: code in {victim.name} ran"
            victim.write_bytes(original)
        tmp.cleanup()
    print("OK")


def test_resume_loads_deepspeed_checkpoints_and_refuses_pickled_code(tmp_path):
    code = f"import test_security_checkpoints as t; t.resume_one_process('{29100 + os.getpid() % 400}', {str(tmp_path)!r})"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "DS_ACCELERATOR": "cpu",
    }
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (proc.stdout + proc.stderr)[-4000:]
    assert not list(tmp_path.glob("ran-*")), "code from a tampered checkpoint ran"
