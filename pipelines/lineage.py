"""MLflow lineage of stage runs: one MLflow run per stage run, resumed across restarts, tagged so any model can be
walked back to its data (DVC hashes), code (git commit) and settings (params), and to the runs it started from.

Recorded in MLflow's own terms as well, so its UI shows the lineage: source tags (Source / Version columns), the
processed tables as dataset inputs (digest = DVC md5), each stage's model as an MLflow 3 logged model with the
upstream stage's model as a model input, the runs of one pipeline invocation nested under its parent run.

Tracking store: $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory (the project root).
Registered models: `<prefix><stage>` (e.g. `edtalk-autoencoder`); each version's source is the run's logged model
(`models:/m-...`), a plain `EDTalk.save_pretrained` folder, so generation loads a version with
`EDTalk.from_pretrained(mlflow.artifacts.download_artifacts("models:/edtalk-autoencoder/3"))` (or `@ALIAS`).
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
PARENT_ENV = "EDTALK_PARENT_RUN_ID"  # the pipeline invocation's parent run (scripts/demo.sh, pipelines/pipeline_run.py)
EXPERIMENT_KIND = "mlflow.experimentKind"  # experiment tag the MLflow 3 UI picks its view by
MODEL_TRAINING = "custom_model_development"  # its model-training view (runs, datasets, models, metrics)
MODEL_TYPE = "edtalk"  # logged models' model_type: an `EDTalk.save_pretrained` folder


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
        if EXPERIMENT_KIND not in exp.tags:  # made before the kind was set (or by hand): same view for all
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).as_uri()
    try:
        # MLflow 3's UI opens an experiment in its GenAI view unless the experiment says it trains models.
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})
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


# ------------------------------------------------------------------------- MLflow's own lineage (what its UI shows)


def source_tags(command: str, git: dict[str, str]) -> dict[str, str]:
    """MLflow's source tags: the runs table's Source column shows `command`, its Version column the commit."""
    tags = {"mlflow.source.name": command, "mlflow.source.type": "JOB"}
    if git.get("git.commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = git["git.commit"]
    return tags


def parent_tags(exp_id: str, uri: str) -> dict[str, str]:
    """{"mlflow.parentRunId": $EDTALK_PARENT_RUN_ID} when it names a run of this experiment in this store: the UI
    nests the run under the pipeline invocation's run. A parent that is not there is named in a warning."""
    parent = os.environ.get(PARENT_ENV, "").strip()
    if not parent:
        return {}
    try:
        run = client(uri).get_run(parent)
    except Exception as exc:
        log.warning("%s=%s is not a run in %s (%s): the run is not nested", PARENT_ENV, parent, uri, exc)
        return {}
    if run.info.experiment_id != exp_id:
        log.warning(
            "%s=%s belongs to experiment %s, not %s: the run is not nested (use one experiment per pipeline)",
            PARENT_ENV,
            parent,
            run.info.experiment_id,
            exp_id,
        )
        return {}
    return {"mlflow.parentRunId": parent}


def _colspec(arrow_type) -> dict:
    """An Arrow type as an MLflow column-spec type (lists as arrays, so the UI shows `frames: array<binary>`)."""
    import pyarrow as pa

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return {"type": "array", "items": _colspec(arrow_type.value_type)}
    names = [
        (pa.types.is_boolean, "boolean"),
        (pa.types.is_int32, "integer"),
        (pa.types.is_integer, "long"),
        (pa.types.is_float32, "float"),
        (pa.types.is_floating, "double"),
        (pa.types.is_string, "string"),
        (pa.types.is_large_string, "string"),
    ]
    return {"type": next((name for ok, name in names if ok(arrow_type)), "binary")}


def data_profile(data_dir: str) -> dict:
    """Counts of a processed folder: segments / pairs / rejects rows (`_stats.json` totals), frames, speakers and
    segments per split (from the segments table's small columns)."""
    import pyarrow.dataset as pads

    uri = storage.join(data_dir, "_stats.json")
    stats = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    profile = {k: int(v) for k, v in (stats.get("totals") or {}).items()}
    seg_dir = storage.join(data_dir, "segments")
    if storage.exists(seg_dir):
        fs, path = storage.resolve(seg_dir)
        cols = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=["speaker", "split", "num_frames"]
        )
        splits = cols.column("split").to_pylist()
        profile["frames"] = int(sum(cols.column("num_frames").to_pylist()))
        profile["speakers"] = len(set(cols.column("speaker").to_pylist()))
        profile["splits"] = {s: splits.count(s) for s in sorted(set(splits))}
    if stats.get("rejects"):
        profile["reject_reasons"] = stats["rejects"]
    return profile


def dataset_entity(data_dir: str, table: str, digest: str):
    """The processed table `table` of `data_dir` as an MLflow dataset: named `<folder>/<table>`, its source the
    table's URI, `digest` (the folder's DVC md5) as digest, the table's declared schema and the folder's profile.
    MLflow keys datasets by (experiment, name, digest): every stage and evaluation reading the same table of the
    same data logs the very same dataset."""
    from mlflow.entities import Dataset

    from preprocessing.schema import TABLES

    table_uri = storage.join(data_dir, table)
    local = storage.local_path_or_none(table_uri)
    source_type = "local" if local is not None else table_uri.split("://", 1)[0]
    schema = [{"name": f.name, **_colspec(f.type)} for f in TABLES[table]]
    return Dataset(
        name=f"{Path(str(data_dir).rstrip('/')).name}/{table}",
        digest=digest,
        source_type=source_type,
        source=json.dumps({"uri": str(local) if local is not None else table_uri}),
        schema=json.dumps({"mlflow_colspec": schema}),
        profile=json.dumps(data_profile(data_dir)),
    )


def data_digest(data_dir: str, known: str | None = None) -> str:
    """The dataset digest: the DVC md5 of the processed folder (already computed: `known`), else the md5 of its
    `_stats.json` (remote or unhashed data: what preprocessing wrote last, 32 hex digits)."""
    if known and known not in ("remote", "missing", "not-hashed"):
        return known
    uri = storage.join(data_dir, "_stats.json")
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{data_dir} has no _stats.json: run `edtalk preprocess --output {data_dir}` first"
        )
    return hashlib.md5(storage.read_bytes(uri)).hexdigest()


def log_inputs(
    run_id: str, uri: str, datasets: list[tuple[Any, dict[str, str]]] = (), model_ids: list[str] = ()
) -> None:
    """Datasets (entity, input tags such as mlflow.data.context) and logged models as the run's inputs."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

    client(uri).log_inputs(
        run_id,
        datasets=[DatasetInput(d, [InputTag(k, str(v)) for k, v in tags.items()]) for d, tags in datasets],
        models=[LoggedModelInput(m) for m in model_ids if m],
    )


def log_logged_model(run_id: str, exp_id: str, name: str, model_dir: str | Path, tags: dict, uri: str) -> str:
    """The model folder as an MLflow 3 logged model produced by the run (its output); returns the model id. A re-run
    of a run that already logged it returns that model."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    c = client(uri)
    known = c.get_run(run_id).data.tags.get("model_id")
    if known:
        return known
    model = c.create_logged_model(
        exp_id,
        name=name,
        source_run_id=run_id,
        model_type=MODEL_TYPE,
        tags={k: str(v) for k, v in tags.items()},
    )
    try:
        c.log_model_artifacts(model.model_id, str(model_dir))
    except BaseException:
        c.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    c.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    set_tags(run_id, {"model_id": model.model_id}, uri)
    return model.model_id


# --------------------------------------------------------------------------------------------- the end of a run


def register(run_id: str, model_id: str, name: str, uri: str) -> str:
    """A new version of registered model `name` from the run's logged model (once per run: a re-run of a finished
    run returns the version it made). Returns the version."""
    c = client(uri)
    tags = c.get_run(run_id).data.tags
    if tags.get("registered_model_version") and tags.get("registered_model_name") == name:
        return tags["registered_model_version"]
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, description="EDTalk pipeline stage model (edtalk.EDTalk folder)")
        except Exception:  # created concurrently
            c.get_registered_model(name)
    version = c.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
    ).version
    set_tags(run_id, {"registered_model_name": name, "registered_model_version": version}, uri)
    return str(version)


def tag_model_hash(
    model_id: str, model_dir: str, uri: str, name: str | None = None, version: str | None = None
):
    """The DVC md5 of the final model folder (what dvc.lock records for it) on the logged model and the registered
    version, so a version is found from `dvc.lock` and back (not for remote folders: their store versions them)."""
    digest = input_hashes([model_dir])[model_dir]
    if digest in ("remote", "missing"):
        return
    c = client(uri)
    c.set_logged_model_tags(model_id, {"dvc.md5": digest})
    if name and version:
        c.set_model_version_tag(name, version, "dvc.md5", digest)


def write_lineage(model_dir: str, payload: dict) -> None:
    storage.write_bytes_atomic(storage.join(model_dir, LINEAGE_FILE), json.dumps(payload, indent=1).encode())
