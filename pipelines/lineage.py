"""MLflow lineage of stage runs: one MLflow run per stage run, resumed across restarts, tagged so any model can be
walked back to its data (DVC hashes), code (git commit) and settings (params), and to the runs it started from.

Tracking store: $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory (the project root).
Registered models: `<prefix><stage>` (e.g. `edtalk-autoencoder`); each version's source is the run's `model/`
artifact, a plain `EDTalk.save_pretrained` folder, so generation loads a version with
`EDTalk.from_pretrained(mlflow.artifacts.download_artifacts("models:/edtalk-autoencoder/3"))`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from preprocessing import storage

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_ID_FILE = (
    "mlflow_run.json"  # in the Ray run dir: a restarted or re-run driver continues the same MLflow run
)
LINEAGE_FILE = "lineage.json"  # next to each stage's model: how the next stage finds its upstream run
MODEL_ARTIFACT = "model"


# ------------------------------------------------------------------------------------------------- tracking


def tracking_uri() -> str:
    """The tracking URI, with a relative sqlite path made absolute (Ray workers run in other directories)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def client(uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def experiment_id(name: str, uri: str) -> str:
    """Get or create the experiment; with a local sqlite store its artifacts live in mlartifacts/ beside the db."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage run
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(prefix: str, value: Any, out: dict[str, str] | None = None) -> dict[str, str]:
    """Nested params -> {"a.b.c": "value"} for MLflow params/tags (values as strings, MLflow's limit 6000)."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]
    return out


def start_or_resume(run_dir: str, experiment: str, run_name: str, uri: str) -> tuple[str, str, bool]:
    """(run id, experiment id, resumed): the run recorded in run_dir, else a new one recorded there."""
    c = client(uri)
    record = storage.join(run_dir, RUN_ID_FILE)
    if storage.exists(record):
        data = json.loads(storage.read_bytes(record))
        if data.get("tracking_uri") == uri:
            try:
                run = c.get_run(data["run_id"])
                c.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, run.info.experiment_id, True
            except Exception as exc:
                log.warning(
                    "MLflow run %s in %s is gone (%s); starting a new run", data["run_id"], record, exc
                )
    exp_id = experiment_id(experiment, uri)
    run = c.create_run(exp_id, run_name=run_name)
    storage.makedirs(run_dir)
    payload = {"run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": uri}
    storage.write_bytes_atomic(record, json.dumps(payload, indent=1).encode())
    return run.info.run_id, exp_id, False


def log_params(run_id: str, params: dict, uri: str) -> None:
    """Log params once; a resumed run that already has them keeps them (MLflow params are immutable)."""
    from mlflow.entities import Param

    c = client(uri)
    have = c.get_run(run_id).data.params
    flat = flatten("", params)
    changed = {k for k, v in flat.items() if k in have and have[k] != v}
    if changed:
        log.warning(
            "resumed run %s: params differ from the first attempt for %s (kept the first)", run_id, changed
        )
    new = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i : i + 100])


_TAG_CHAR = re.compile(r"[^\w./\- ]")


def tag_key(prefix: str, path: str) -> str:
    """An MLflow tag key `prefix.path` that MLflow accepts for any path or URI.

    MLflow allows only alphanumerics, `_ - . / space` (and `:` off Windows) and rejects keys that a path
    normalisation would change (`//`, `./`, `..` segments, a trailing `/`). Local relative paths pass unchanged
    (`dvc.md5.data/processed`); `s3://bucket/x` becomes `dvc.md5.s3/bucket/x`; other characters become `_`.
    """
    text = str(path).replace("://", "/").replace("\\", "/")
    text = _TAG_CHAR.sub("_", text)
    parts = [p for p in text.split("/") if p]
    parts = ["_" * len(p) if set(p) == {"."} else p for p in parts]  # `.` / `..` segments would resolve away
    return f"{prefix}.{'/'.join(parts)}" if parts else prefix


def set_tags(run_id: str, tags: dict[str, Any], uri: str) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        client(uri).log_batch(run_id, tags=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int, uri: str) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
    if items:
        client(uri).log_batch(run_id, metrics=items)


def log_image(run_id: str, image, artifact_file: str, uri: str) -> None:
    client(uri).log_image(run_id, image, artifact_file=artifact_file)


def end_run(run_id: str, uri: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------------------------- provenance


def git_info(root: str | Path = ".") -> dict[str, str]:
    """The commit of the code and whether the working tree differs from it ("unknown" outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC 3 records for a local file or directory (directories: md5 of the sorted file list + ".dir")."""
    path = Path(path)
    if path.is_file():
        return _md5_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot hash {path}: no such file or directory")
    entries = [
        {"md5": _md5_file(p), "relpath": p.relative_to(path).as_posix()}
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


# The code a training stage runs (also its code deps in dvc.yaml): a change here starts a new run.
CODE_PATHS = (
    "edtalk",
    "pipelines/train",
    "pipelines/lineage.py",
    "preprocessing/schema.py",
    "preprocessing/storage.py",
)


def code_md5() -> str:
    """md5 over the Python sources of CODE_PATHS (found beside the installed packages): part of a run's
    fingerprint, so changed code starts a new run instead of resuming a finished one."""
    import pipelines

    root = Path(pipelines.__file__).resolve().parent.parent
    h = hashlib.md5()
    for rel in CODE_PATHS:
        path = root / rel
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for p in files:
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def dvc_lock_hashes(stage: str, root: str | Path = ".") -> dict[str, str]:
    """path -> md5 of the stage's deps as recorded in dvc.lock (the last `dvc repro` of it), or {}."""
    lock = Path(root, "dvc.lock")
    if not lock.exists():
        return {}
    doc = yaml.safe_load(lock.read_text()) or {}
    deps = ((doc.get("stages") or {}).get(stage) or {}).get("deps") or []
    return {d["path"]: d.get("md5") or d.get("hash", "") for d in deps if "path" in d}


def input_hashes(paths: list[str], compute: bool = True) -> dict[str, str]:
    """DVC-style md5 of each local input path (remote URIs are named, not hashed: their store versions them)."""
    out = {}
    for p in paths:
        local = storage.local_path_or_none(p)
        if local is None:
            out[p] = "remote"
        elif not local.exists():
            out[p] = "missing"
        else:
            out[p] = dvc_md5(local) if compute else "not-hashed"
    return out


def read_upstream(models_dir: str, upstream: tuple[str, ...] | list[str]) -> dict[str, dict]:
    """stage -> the lineage.json its model folder carries; a missing one is a clear error (run that stage first)."""
    out = {}
    for name in upstream:
        uri = storage.join(models_dir, name, LINEAGE_FILE)
        if not storage.exists(uri):
            raise FileNotFoundError(
                f"upstream stage {name!r} has no {uri}: train it first (`edtalk train {name}` or `dvc repro {name}`)"
            )
        out[name] = json.loads(storage.read_bytes(uri))
    return out


def stats_tags(data_dir: str) -> tuple[dict[str, str], dict | None]:
    """Scalar fields of the dataset's _stats.json as `data.stats.*` tags, and the whole document."""
    uri = storage.join(data_dir, "_stats.json")
    if not storage.exists(uri):
        return {}, None
    doc = json.loads(storage.read_bytes(uri))
    flat = flatten("data.stats", doc)
    return {k: v for k, v in flat.items() if len(v) <= 250}, doc


# --------------------------------------------------------------------------------------------- the end of a run


def log_model_and_register(run_id: str, model_dir: str | Path, name: str | None, uri: str) -> str | None:
    """Log the model folder as the run's `model/` artifact and, when `name` is given, register it as a new version
    of that registered model (a plain-artifact version: source = the artifact folder). Returns the version."""
    c = client(uri)
    c.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    if not name:
        return None
    run = c.get_run(run_id)
    registered = run.data.tags.get("registered_model_version")
    if registered and run.data.tags.get("registered_model_name") == name:
        return registered  # a re-run of a finished run: the version exists already
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, description="EDTalk pipeline stage model (edtalk.EDTalk folder)")
        except Exception:  # created concurrently
            c.get_registered_model(name)
    source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
    version = c.create_model_version(name, source=source, run_id=run_id).version
    set_tags(run_id, {"registered_model_name": name, "registered_model_version": version}, uri)
    return str(version)


def write_lineage(model_dir: str, payload: dict) -> None:
    storage.write_bytes_atomic(storage.join(model_dir, LINEAGE_FILE), json.dumps(payload, indent=1).encode())
