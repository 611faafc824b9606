"""MLflow model URIs -> a local model folder, in one place for `edtalk generate`, `edtalk evaluate` (and a server):

- `models:/NAME/VERSION` and `models:/NAME@ALIAS`: a registered version (an alias such as `candidate`, set by
  `edtalk evaluate --alias`, resolves to the version it points at now);
- `models:/m-...`: a logged model; `runs:/RUN_ID/path` and any other artifact URI: downloaded as they are.

The registry is asked first, so a missing name, version or alias is a one-line error saying which and what exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


class ModelUriError(ValueError):
    """A model URI that names nothing the tracking store has; the message says what to use instead."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_id: str | None  # the MLflow 3 logged model behind the version, when it has one


def is_uri(text: str) -> bool:
    return "://" in text or text.startswith(("models:/", "runs:/"))


def registered_version(uri: str, tracking_uri: str | None = None) -> RegisteredVersion | None:
    """The registered version `models:/NAME/VERSION` or `models:/NAME@ALIAS` names (None for other URIs)."""
    from mlflow import MlflowClient

    m = _REGISTERED.match(uri)
    if m is None:
        return None
    name, version, alias = m["name"], m["version"], m["alias"]
    c = MlflowClient(tracking_uri=tracking_uri)
    try:
        model = c.get_registered_model(name)
    except Exception as exc:
        raise ModelUriError(
            f"model {uri}: no registered model {name!r} in {c.tracking_uri} ({type(exc).__name__}); check the name "
            "and MLFLOW_TRACKING_URI"
        ) from exc
    if alias is not None:
        if alias not in (model.aliases or {}):
            raise ModelUriError(
                f"model {uri}: {name!r} has no alias {alias!r} (aliases: {dict(model.aliases or {}) or 'none'}); "
                f"set one with `edtalk evaluate --model models:/{name}/N --alias {alias}`"
            )
        found = c.get_model_version_by_alias(name, alias)
    else:
        try:
            found = c.get_model_version(name, version)
        except Exception as exc:
            latest = max((int(v.version) for v in c.search_model_versions(f"name='{name}'")), default=None)
            raise ModelUriError(
                f"model {uri}: {name!r} has no version {version} (latest: {latest}); pass an existing version"
            ) from exc
    # The version's logged model: its model_id (not kept by every registry store), else its `models:/m-...` source.
    model_id = getattr(found, "model_id", None)
    if not model_id and (found.source or "").startswith("models:/m-"):
        model_id = found.source[len("models:/") :]
    return RegisteredVersion(name, str(found.version), model_id)


def download(uri: str, tracking_uri: str | None = None) -> Path:
    """The local folder holding the model `uri` names (MLflow caches nothing: a fresh download each call)."""
    import mlflow

    found = registered_version(uri, tracking_uri)
    target = f"models:/{found.name}/{found.version}" if found else uri  # an alias is read once, here
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=target, tracking_uri=tracking_uri))
    except Exception as exc:  # MlflowException, OSError: name the URI and how to check it
        raise ModelUriError(
            f"model {uri}: cannot download it from MLflow ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check the URI and MLFLOW_TRACKING_URI"
        ) from exc
