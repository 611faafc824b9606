"""Start the app: join the cluster at RAY_ADDRESS, else a loopback-only local Ray (preprocessing/local_ray.py), then
Ray Serve's HTTP proxy on `host:port` (loopback unless asked otherwise)."""

from __future__ import annotations

import os

from pipelines.serve.config import TOKEN_ENV, TOKEN_FILE_ENV, ServeParams

APP_NAME = "edtalk"
# Passed to the replicas' environment when set here (a cluster's pods set them themselves).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", TOKEN_ENV, TOKEN_FILE_ENV)


def application(model: str, gen, prep, params: ServeParams, forward_env: bool = False):
    """The Serve application of `model` with the deployment options of `params` (replicas, resources)."""
    from pipelines.serve.app import EDTalkServer

    options = params.deployment_options()
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)} if forward_env else {}
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return EDTalkServer.options(**options).bind(model, gen, prep, params)


def build(args: dict):
    """Application builder for a RayService's serveConfigV2 (and `serve run pipelines.serve.start:build`):
    args `model` (required), `params` (file, default params.yaml), `set` (a list of SECTION.KEY=VALUE)."""
    from pipelines.generate import GenerateParams
    from preprocessing.params import PreprocessParams

    unknown = sorted(set(args) - {"model", "params", "set"})
    if unknown or "model" not in args:
        raise ValueError(
            f"edtalk serve app args: need 'model', may have 'params', 'set'; got unknown {unknown}"
        )
    path, overrides = args.get("params", "params.yaml"), list(args.get("set", []))
    loaded = (GenerateParams.load(path, overrides), PreprocessParams.load(path, overrides))
    return application(args["model"], *loaded, ServeParams.load(path, overrides))


def start(model: str, gen, prep, params: ServeParams, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app (blocks until its replicas are up); returns its base URL."""
    from ray import serve

    from preprocessing import local_ray

    local_ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(model, gen, prep, params, forward_env=True), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    from ray import serve

    serve.shutdown()
