"""One request's uploads -> an mp4, through pipelines/generate.run (the frames and audio `edtalk generate` makes
for the same inputs and seed).

Uploads are written under a private temporary folder with names chosen here (never the client's), and every
source of the Request is one of those files or a checked keyword, so no request can make the server read or write
a path it names (an emotion must be one the model knows; a transcript is written to a file, not looked up).
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pipelines import generate, video_io
from pipelines.serve.config import ServeParams
from preprocessing.params import PreprocessParams

# PIL format -> the suffix the identity file is written under (pipelines/video_io reads it as an image)
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


class ServeError(ValueError):
    """A request the server refuses: `status` is the HTTP code, the message says what to do instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    field: str  # the form field it came in
    data: bytes


class IdentityCache(OrderedDict):
    """Encoded identities by image sha256, least recently used dropped beyond `size` (0 = keep none)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        if self.size:
            super().__setitem__(key, value)
            while len(self) > self.size:
                self.popitem(last=False)


def input_errors() -> tuple[type[Exception], ...]:
    """The exceptions `edtalk generate` reports as a one-line bad-input error (pipelines/commands/generate.py)."""
    from pipelines.video_io import MediaError
    from preprocessing.audio import AudioError
    from preprocessing.landmarks import FaceNotFoundError, MultipleFacesError

    return (generate.GenerateError, MediaError, AudioError, FaceNotFoundError, MultipleFacesError)


class Engine:
    """A loaded model and its settings; `generate` runs one request at a time (torch uses every core)."""

    def __init__(self, model: str, gen: generate.GenerateParams, prep: PreprocessParams, serve: ServeParams):
        self.spec = model
        self.net, self.folder = generate.load_model(model)
        self.gen, self.prep, self.serve = gen, prep, serve
        self.identities = IdentityCache(serve.identity_cache)
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ the model
    def info(self) -> dict:
        """Which model this is and where it came from: registry name/version and the lineage.json of its folder
        (training run, git commit, data hashes of its inputs, upstream runs)."""
        from pipelines import model_uri
        from pipelines.lineage import LINEAGE_FILE

        version = model_uri.registered_version(self.spec) if model_uri.is_uri(self.spec) else None
        path = self.folder / LINEAGE_FILE
        lineage = json.loads(path.read_text()) if path.is_file() else {}
        return {
            "model": self.spec,
            "name": version.name if version else lineage.get("registered_model") or self.folder.name,
            "version": version.version if version else None,
            "stage": lineage.get("stage", self.folder.name),
            "run_id": lineage.get("run_id"),
            "git_commit": lineage.get("git_commit"),
            "data": lineage.get("inputs", {}),  # processed table -> DVC md5
            "upstream": lineage.get("upstream", {}),
            "image_size": generate.model_size(self.net),
            "emotions": sorted(generate.model_emotions(self.net) or {}),
        }

    # ------------------------------------------------------------------------------------------ a request
    def request(
        self,
        folder: Path,
        identity: Upload,
        audio: Upload | None = None,
        video: Upload | None = None,
        emotion: str | None = None,
        seed: int | None = None,
        transcript: str | None = None,
    ) -> tuple[generate.Request, dict]:
        """The uploads written under `folder` (names chosen here) and checked against the limits -> the Request for
        generate.run, and {temporary path: form field} for error messages."""
        if audio is None and video is None:
            raise ServeError(422, "send an audio file (field 'audio') or a driving video (field 'video')")
        names: dict[str, str] = {}
        req = generate.Request(
            identity=self._identity(identity, folder, names), output=str(folder / "out.mp4")
        )
        if audio is not None:
            req.audio = self._write(audio, folder / "audio", names)
            self._check_length(len(self._load_audio(req.audio)) / video_io.SAMPLE_RATE, "audio")
        if video is not None:
            req.video = self._video(video, folder, names)
        if emotion:
            req.expression = self._emotion(emotion)
        if transcript:
            (folder / "transcript.txt").write_text(transcript, encoding="utf-8")
            req.transcript = str(folder / "transcript.txt")
        req.seed = seed
        return req, names

    def run(self, req: generate.Request, names: dict) -> dict:
        """generate.run, one request at a time; a bad input -> ServeError 422 naming the form field."""
        with self.lock:
            try:
                return generate.run(req, self.net, self.gen, self.prep, self.identities)
            except input_errors() as exc:
                raise ServeError(422, _named(str(exc), names)) from exc

    def generate(self, **uploads) -> tuple[bytes, dict]:
        """The whole mp4's bytes and generate.run's summary (frames, frames_sha256, ...)."""
        with tempfile.TemporaryDirectory(prefix="edtalk-serve-") as tmp:
            req, names = self.request(Path(tmp), **uploads)
            summary = self.run(req, names)
            return Path(req.output).read_bytes(), summary

    def _identity(self, up: Upload, folder: Path, names: dict) -> str:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(up.data)) as img:  # reads the header only
                fmt, (w, h) = img.format, img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise ServeError(
                422,
                f"{up.field}: not a readable image ({exc}); upload a PNG, JPEG, WebP, BMP or TIFF photo with one face",
            ) from exc
        if fmt not in IMAGE_FORMATS:
            raise ServeError(
                422, f"{up.field}: {fmt} images are not accepted; upload PNG, JPEG, WebP, BMP or TIFF"
            )
        if w * h > self.serve.max_image_pixels:
            raise ServeError(
                413,
                f"{up.field}: {w}x{h} is over the limit of {self.serve.max_image_pixels} pixels; upload a smaller image",
            )
        path = folder / f"identity{IMAGE_FORMATS[fmt]}"
        path.write_bytes(up.data)
        names[str(path)] = up.field
        return str(path)

    def _video(self, up: Upload, folder: Path, names: dict) -> str:
        path = self._write(up, folder / "video.mp4", names)
        try:
            frames = video_io.DrivingVideo(path).num_frames
        except input_errors() as exc:
            raise ServeError(422, _named(str(exc), names)) from exc
        self._check_length(frames / video_io.FPS, up.field)
        return path

    def _emotion(self, name: str) -> str:
        known = sorted(generate.model_emotions(self.net) or {})
        if name in ("audio", "identity") or name in known:
            return name
        raise ServeError(
            422, f"emotion {name!r}: not one this model knows; use one of {known} (or 'audio', 'identity')"
        )

    def _check_length(self, seconds: float, field: str) -> None:
        if seconds > self.serve.max_seconds:
            raise ServeError(
                413,
                f"{field}: {seconds:.1f} s is over the limit of {self.serve.max_seconds:g} s; send a shorter clip",
            )

    @staticmethod
    def _write(up: Upload, path: Path, names: dict) -> str:
        path.write_bytes(up.data)
        names[str(path)] = up.field
        return str(path)

    def _load_audio(self, path: str):
        from preprocessing.audio import load_audio

        try:
            return load_audio(path)
        except input_errors() as exc:
            raise ServeError(422, _named(str(exc), {path: "audio"})) from exc


def _named(message: str, names: dict) -> str:
    """An error message with the server's temporary paths replaced by the form fields they came from."""
    for path, field in names.items():
        message = message.replace(path, field)
    return message
