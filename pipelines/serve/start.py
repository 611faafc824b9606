"""Start the app: join the cluster at RAY_ADDRESS, else a loopback-only local Ray (preprocessing/local_ray.py), then
Ray Serve's HTTP proxy on `host:port` (loopback unless asked otherwise)."""

from __future__ import annotations

import os

from pipelines.serve.config import TOKEN_ENV, TOKEN_FILE_ENV, ServeParams

APP_NAME = "edtalk"
# Passed to the replicas' environment when set here (a cluster's pods set them themselves).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", TOKEN_ENV, TOKEN_FILE_ENV)


def start(model: str, gen, prep, params: ServeParams, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app (blocks until its replicas are up); returns its base URL."""
    from ray import serve

    from pipelines.serve.app import EDTalkServer
    from preprocessing import local_ray

    local_ray.init()
    serve.start(http_options={"host": host, "port": port})
    options = params.deployment_options()
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    app = EDTalkServer.options(**options).bind(model, gen, prep, params)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    from ray import serve

    serve.shutdown()
