"""Shared test settings: everything runs offline, on CPU, with real components run small."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Set before any test imports Ray, DeepSpeed or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "edtalk-torch-extensions"))

# Loopback service fixtures (S3, PostgreSQL, MLflow server, two-node Ray) for @pytest.mark.services tests.
pytest_plugins = ["services"]

REPO_ROOT = Path(__file__).resolve().parents[1]
MEDIA = REPO_ROOT.parent / "shared" / "media"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """The real talking-face clips of ../shared/media (read-only; never copied into the repo)."""
    if not (MEDIA / "MANIFEST.md").exists():
        pytest.fail(f"real test media not found at {MEDIA}: the project expects ../shared/media beside it")
    return MEDIA


# ------------------------------------------------------------------------ training/generate/evaluate fixtures
# One tiny dataset, one local Ray instance and one trained autoencoder -> mouth_pose chain for the whole session:
# each costs seconds to minutes, and every training test module used to build its own. MLflow stores stay per module.

TRAIN_PARAMS = str(REPO_ROOT / "params.yaml")


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray instance (2 CPUs) for in-process training and preprocessing. Tests that start a cluster of their
    own give its address to subprocesses (RAY_ADDRESS in their env) and are unaffected. A module that shuts Ray
    down is tolerated: the training runner starts a local instance again when none is running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    if started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, local_ray) -> Path:
    """3 SynthTalk speakers x one 2 s clip (one in val), preprocessed to 64 px crops with sidecar landmarks."""
    from preprocessing.params import PreprocessParams
    from preprocessing.pipeline import run
    from preprocessing.synthtalk import SynthConfig, generate_set

    root = tmp_path_factory.mktemp("train-data")
    cfg = SynthConfig.from_dict(
        {"identities": 3, "clips_per_identity": 1, "seconds": 2.0, "val_identities": 1, "test_identities": 0}
    )
    generate_set(cfg, root / "raw")
    params = PreprocessParams(size=64, landmark_backend="sidecar", workers=1, pairs_per_segment=2)
    run(str(root / "raw"), str(root / "processed"), params, progress=False)
    assert list((root / "processed" / "pairs").glob("*.parquet")), "preprocessing wrote no pairs"
    return root / "processed"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A fresh MLflow store (sqlite) per test module, set as $MLFLOW_TRACKING_URI while the module runs: modules
    count the runs of a stage in it, so they must not see each other's (cheap: an empty sqlite file)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mp.undo()


def train_overrides(data: Path | str, out: Path | str, **extra) -> list[str]:
    """--set overrides for a few-step run on `data` with every output under `out` (2 workers, half a CPU each)."""
    values = {
        "train.data_dir": data,
        "train.models_dir": Path(out) / "models",
        "train.metrics_dir": Path(out) / "metrics",
        "train.storage_path": Path(out) / "ray",
        "train.workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.batch_size": 2,
        "train.log_every": 2,
        "train.checkpoint_every": 2,
        "train.sample_every": 2,
        "autoencoder.steps": 4,
        "autoencoder.pairs_per_segment": 4,
        "autoencoder.w_shape": 1.0,  # so the chain and the fault test train, checkpoint and drop an auxiliary head
        # the locality term from micro-step 2, its directions renewed every 2 from the Jacobian sums of the last 2
        # batches, summed over the 2 workers. The checkpoint at step 2 holds micro-step 1's sums between two
        # renewals: the fault test's restart must restore them (and the buffers) for its weights to match.
        "autoencoder.w_local": 0.1,
        "autoencoder.local_start": 2,
        "autoencoder.local_every": 2,
        "autoencoder.local_batches": 2,
        "autoencoder.local_frames": 4,  # the driver stores the mouth-local directions with the model ...
        "mouth_pose.steps": 2,
        "mouth_pose.mouth_bases": "local",  # ... and mouth_pose holds its mouth bank there, inside DeepSpeed
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@dataclass
class TrainedChain:
    """autoencoder (2 workers, 4 steps) then mouth_pose (1 worker, 2 steps), trained once on `tiny_data`."""

    out: Path  # out/models/{autoencoder,mouth_pose}, out/metrics/STAGE.json, out/ray
    autoencoder: dict  # run_stage's metrics of each stage
    mouth_pose: dict
    tracking_uri: str  # the MLflow store holding their runs and registered versions (the chain's own)
    parent_run_id: str = (
        ""  # the pipeline-invocation run both stage runs are nested under ($EDTALK_PARENT_RUN_ID)
    )

    @property
    def models(self) -> Path:
        return self.out / "models"


@pytest.fixture(scope="session")
def trained_chain(tiny_data, tmp_path_factory) -> TrainedChain:
    """models/autoencoder and models/mouth_pose (with lineage.json and MLflow runs in the chain's own store,
    `tracking_uri`): copy them (never write into them) where a test needs an upstream model."""
    from pipelines.train.runner import run_stage

    out = tmp_path_factory.mktemp("trained-chain")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    # Its own store only while it trains: the modules' `tracking` stores stay theirs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        from pipelines import pipeline_run

        parent = pipeline_run.start("trained_chain", TRAIN_PARAMS, "autoencoder mouth_pose")
        mp.setenv("EDTALK_PARENT_RUN_ID", parent)
        ae = run_stage("autoencoder", TRAIN_PARAMS, train_overrides(tiny_data, out))
        one_worker = train_overrides(tiny_data, out, **{"train.workers": 1})
        mouth_pose = run_stage("mouth_pose", TRAIN_PARAMS, one_worker)
        pipeline_run.main(["end", parent, "FINISHED"])
    return TrainedChain(out, ae, mouth_pose, uri, parent)


def pytest_addoption(parser):
    # tests/test_learning_stages.py: rewrite tests/golden/learning.json from this run instead of comparing with it.
    parser.addoption("--update-golden", action="store_true", help="regenerate tests/golden/*.json")
