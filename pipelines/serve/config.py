"""The `serve:` section of params.yaml (see the comments there)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from preprocessing.params import ParamsError, build, load_section

TOKEN_ENV = "EDTALK_SERVE_TOKEN"  # the bearer token itself (never in params)
TOKEN_FILE_ENV = "EDTALK_SERVE_TOKEN_FILE"  # or a file holding it (e.g. a mounted Kubernetes Secret)


@dataclass
class ServeParams:
    max_seconds: float = 60.0  # longest audio or driving video accepted, seconds; longer -> 413
    max_image_pixels: int = 16_000_000  # largest identity image, width x height; larger -> 413
    max_upload_bytes: int = 50_000_000  # largest request body, bytes; larger -> 413
    max_pending: int = 4  # requests one replica admits (rendering + waiting); more -> 503 with Retry-After
    retry_after_s: int = 5  # the Retry-After header of a 503, seconds
    identity_cache: int = 64  # encoded identities kept per replica, keyed by the image's sha256
    min_replicas: int = 1  # autoscaling lower bound (= max_replicas: a fixed number of replicas)
    max_replicas: int = 1  # autoscaling upper bound
    target_ongoing_requests: float = 2.0  # autoscaling aims at this many requests per replica
    num_cpus: float = 1.0  # CPUs reserved per replica
    num_gpus: float = 0.0  # GPUs per replica (a GPU cluster); 0 = CPU fast path

    def __post_init__(self) -> None:
        checks = [
            (self.max_seconds > 0, "max_seconds must be > 0"),
            (self.max_image_pixels >= 64 * 64, "max_image_pixels must be >= 4096"),
            (self.max_upload_bytes >= 1024, "max_upload_bytes must be >= 1024"),
            (self.max_pending >= 1, "max_pending must be >= 1"),
            (self.retry_after_s >= 1, "retry_after_s must be >= 1"),
            (self.identity_cache >= 0, "identity_cache must be >= 0"),
            (1 <= self.min_replicas <= self.max_replicas, "need 1 <= min_replicas <= max_replicas"),
            (self.target_ongoing_requests > 0, "target_ongoing_requests must be > 0"),
            (self.num_cpus > 0 and self.num_gpus >= 0, "num_cpus must be > 0 and num_gpus >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamsError(f"serve params: {message}")

    @classmethod
    def load(cls, path: str | Path | None = "params.yaml", overrides=()) -> ServeParams:
        return build(cls, load_section(path, "serve", overrides), "serve")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def deployment_options(self) -> dict:
        """Ray Serve options of the deployment: replicas or autoscaling bounds, resources, request cap (the app's
        own admission count answers 503 first; Ray's cap only has to let those requests through)."""
        scaling = (
            {"num_replicas": self.min_replicas}
            if self.min_replicas == self.max_replicas
            else {
                "autoscaling_config": {
                    "min_replicas": self.min_replicas,
                    "max_replicas": self.max_replicas,
                    "target_ongoing_requests": self.target_ongoing_requests,
                }
            }
        )
        return {
            **scaling,
            "max_ongoing_requests": self.max_pending + 16,  # + /health, /model and the requests answered 503
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
