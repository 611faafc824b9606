"""Talking-head generation: one identity image and, per space (mouth, pose, eye, expression), a driving source ->
an mp4 (25 fps, H.264 + AAC) whose length matches the audio (or the driving video).

Sources of a space:
- mouth: `audio` (E_a + MLP), a video, an image, or `identity` (keep the identity image's own mouth);
- pose and eye: a video, an image, `sample` (the conditional flow on the audio, seeded), or `identity`;
- expression: a video, an image, an emotion name (the per-emotion mean weights stored in the model's meta),
  `audio` (speech + optional transcript through the expression predictor), or `identity`;
- `auto` picks the paper's audio-driven setting when there is audio (mouth from audio, pose and eyes sampled,
  expression from the audio when the model has that predictor) and otherwise follows `--video`.

The work streams: the identity is encoded once; the audio and the driving videos are processed in chunks of
`chunk_frames`, each chunk rendered as one batch and handed to the muxer, so memory does not grow with the length.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import video_io
from pipelines.video_io import SAMPLES_PER_FRAME
from preprocessing.local_ray import process_alive
from preprocessing.params import ParamsError, PreprocessParams, build, load_section

log = logging.getLogger(__name__)

SPACES = ("mouth", "pose", "eye", "expression")
MEL_HOP = 200  # samples per mel frame (docs/contracts.md)
# Training stages in order: a folder of stage folders resolves to the latest one present (it holds every module
# trained so far).
STAGE_ORDER = (
    "audio_expression",
    "audio_eye",
    "audio_pose",
    "audio_lip",
    "expression",
    "eye",
    "mouth_pose",
    "autoencoder",
)


class GenerateError(ValueError):
    """An input or option of `edtalk generate` that cannot be used; the message says what to do instead."""


@dataclass
class GenerateParams:
    """The `generate:` section of params.yaml (see the comments there)."""

    chunk_frames: int = 32  # frames decoded, rendered and muxed per step; bounds memory
    render_batch: int = 0  # frames per render call within a chunk; 0 = auto: the whole chunk (GPU, CPU fast path), 1 for the eager model on CPU
    temperature: float = 0.7  # scale of the Gaussian noise the pose/eye flows sample from (0 = the mode)
    seed: int = 0  # seeds the pose/eye flow samples, so a run is reproducible
    crf: int = 18  # x264 constant rate factor (lower = better quality, larger file)
    x264_preset: str = "veryfast"  # x264 speed/size trade-off
    audio_bitrate: int = 128000  # AAC bit rate, bits/s
    crop_driving: bool = True  # find and crop the face of driving videos/images as preprocessing does
    probe_frames: int = 8  # frames of a driving video searched for the face (their union gives one tube box)
    preview: bool = False  # also write NAME_preview.mp4: driving sources side by side with the result
    expression_window_s: float = (
        5.0  # audio-driven expression: one prediction per window this long (training segment length)
    )
    max_seconds: float = 0.0  # stop after this many seconds of output (0 = the whole audio / driving video)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    fast_render: bool = True  # on CPU: render through the fast path (edtalk/fast.py)

    def __post_init__(self) -> None:
        checks = [
            (self.chunk_frames >= 1, "chunk_frames must be >= 1"),
            (self.render_batch >= 0, "render_batch must be >= 0 (0 = auto)"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.crf <= 51, "crf must be in [0, 51]"),
            (
                self.x264_preset
                in ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower"),
                "x264_preset must be an x264 preset name (ultrafast .. slower)",
            ),
            (self.audio_bitrate >= 16000, "audio_bitrate must be >= 16000"),
            (self.probe_frames >= 1, "probe_frames must be >= 1"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.max_seconds >= 0, "max_seconds must be >= 0 (0 = all)"),
            (self.expression_window_s >= 0.5, "expression_window_s must be >= 0.5"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamsError(f"generate params: {message}")

    @classmethod
    def load(cls, path: str | Path | None = "params.yaml", overrides=()) -> GenerateParams:
        return build(cls, load_section(path, "generate", overrides), "generate")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Request:
    """What to generate: the identity, the audio and one source per space (see the module docstring)."""

    identity: str  # image file of any size with one face (or a video: its first frame)
    output: str  # mp4 to write
    audio: str | None = None  # audio (any common format, rate, channels) or a video whose audio track to use
    video: str | None = None  # a driving video for every space left on `auto` (video-driven generation)
    mouth: str = "auto"
    pose: str = "auto"
    eye: str = "auto"
    expression: str = "auto"
    transcript: str | None = None  # text (or a .txt file) for the audio expression predictor
    seed: int | None = None  # overrides params.seed
    temperature: float | None = None  # overrides params.temperature
    preview: bool | None = None  # overrides params.preview
    fragmented: bool = False  # write a fragmented MP4, playable while it is written (a server streams it)


# ----------------------------------------------------------------------------------------------------- the model
def _is_uri(text: str) -> bool:
    return "://" in text or text.startswith(("models:/", "runs:/"))


def resolve_model_dir(model: str | Path) -> Path:
    """A models/ folder, one stage folder, or an MLflow URI (`models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `runs:/ID/path`, any artifact URI) -> the local folder holding config.json and the weights (MLflow artifacts are
    downloaded first, by pipelines.model_uri)."""
    text = str(model)
    if _is_uri(text):
        from pipelines import model_uri

        try:
            local = model_uri.download(text)
        except model_uri.ModelUriError as exc:
            raise GenerateError(str(exc)) from exc
    else:
        local = Path(text)
        if not local.exists():
            raise GenerateError(
                f"model folder {local} does not exist; pass models/STAGE or an MLflow model URI"
            )
    return find_model_folder(local, text)


def find_model_folder(root: Path, name: str) -> Path:
    if (root / "config.json").is_file():
        return root
    for stage in STAGE_ORDER:  # a models/ folder: the latest stage holds every module trained so far
        if (root / stage / "config.json").is_file():
            return root / stage
    found = sorted(p.parent for p in root.rglob("config.json"))
    if len(found) == 1:
        return found[0]
    raise GenerateError(
        f"model {name}: no model folder found in {root} (a folder with config.json written by "
        f"EDTalk.save_pretrained, or a models/ folder with stage folders {list(STAGE_ORDER)}); "
        f"found {[str(p) for p in found] or 'none'}"
    )


def load_model(model: str | Path):
    from edtalk import EDTalk

    folder = resolve_model_dir(model)
    try:
        net = EDTalk.from_pretrained(folder)
    except Exception as exc:
        raise GenerateError(
            f"model {model}: cannot load {folder} with EDTalk.from_pretrained ({exc})"
        ) from exc
    return net.eval(), folder


def pick_device() -> torch.device:
    """The accelerator torch finds, else the CPU (no device names written here)."""
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return acc if acc is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------- the inputs
@functools.lru_cache(maxsize=4)
def _backend(name: str, detect_every: int, detect_max_side: int):
    """Landmark backends load their models once per process (dlib's shape predictor is 100 MB)."""
    from preprocessing.landmarks import make_backend

    return make_backend(name, detect_every, detect_max_side)


class FaceCropper:
    """Finds the face with the preprocessing landmark code and crops it the same way (FOMM-style tube box)."""

    def __init__(self, prep: PreprocessParams):
        self.prep = prep
        backend = prep.landmark_backend if prep.landmark_backend != "sidecar" else "auto"
        self.backend = _backend(backend, prep.detect_every, prep.detect_max_side)

    def identity(self, image: np.ndarray, name: str, size: int) -> np.ndarray:
        """Exactly one face -> its crop (size x size uint8). Errors name the image."""
        from preprocessing import tubes
        from preprocessing.landmarks import MultipleFacesError, detect_single_face

        face = detect_single_face(image, self.backend, name=name)
        faces = distinct_faces(self.face_boxes(image, upright=[face.box]))
        if faces > 1:
            raise MultipleFacesError(
                f"{name}: {faces} faces found (some turned or tilted); crop the image to the one face to animate"
            )
        box = tubes.tube_box(face.landmarks[None], self.prep.crop_scale, self.prep.crop_shift_up)
        return tubes.crop(image[None], box, size)[0]

    def face_boxes(self, image: np.ndarray, upright: list[np.ndarray]) -> list[np.ndarray]:
        """`upright` (the boxes the backend found in the image as it is) plus the boxes found at the ROTATIONS, in
        the image's pixels. With dlib the upright pass adds its CNN detector, which finds turned (profile) and
        tilted faces the HOG detector misses; the rotated passes find faces tilted past what either covers."""
        image = np.ascontiguousarray(image)
        detect = getattr(self.backend, "detect", None)  # dlib: the HOG detector alone (fast)
        boxes = list(upright)
        if detect is not None:
            boxes += list(self.backend.detect_cnn(image))
        for degrees in ROTATIONS:
            turned, back = rotate_image(image, degrees)
            if detect is not None:
                found = detect(cv2_gray(turned))
            else:
                found = [f.box for f in self.backend.faces_in_image(turned)]
            boxes += [rotate_box(box, back) for box in found]
        return boxes

    def video_box(self, video: video_io.DrivingVideo, probes: int) -> np.ndarray:
        """One box for a whole driving video from its face on `probes` evenly spaced frames (largest face)."""
        from preprocessing import tubes

        idx = np.unique(np.linspace(0, video.source_frames - 1, probes).round().astype(int))
        frames = video.reader.get_batch(idx.tolist()).asnumpy()
        marks = []
        for frame in frames:
            faces = self.backend.faces_in_image(np.ascontiguousarray(frame))
            if faces:
                marks.append(faces[0].landmarks)
        if not marks:
            raise GenerateError(
                f"driving video {video.path}: no face found on {len(idx)} probed frames; pass a video showing one "
                "face, or set generate.crop_driving=false if it is already a face crop"
            )
        return tubes.tube_box(np.stack(marks), self.prep.crop_scale, self.prep.crop_shift_up)


ROTATIONS = (-90, -45, 45, 90, 180)  # degrees: identity images are also searched for faces turned this far


def cv2_gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def rotate_image(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The image rotated on a canvas large enough to keep all of it, and the 2x3 map back to its pixels."""
    import cv2

    h, w = image.shape[:2]
    fwd = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(fwd[0, 0]), abs(fwd[0, 1])
    nw, nh = int(np.ceil(w * cos + h * sin)), int(np.ceil(w * sin + h * cos))
    fwd[:, 2] += ((nw - w) / 2, (nh - h) / 2)
    turned = cv2.warpAffine(image, fwd, (nw, nh), borderMode=cv2.BORDER_CONSTANT)
    return turned, cv2.invertAffineTransform(fwd)


def rotate_box(box: np.ndarray, back: np.ndarray) -> np.ndarray:
    """A box found in a rotated image -> the same-sized box around its centre in the original image."""
    centre = back @ np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0])
    half = np.array([box[2] - box[0], box[3] - box[1]]) / 2
    return np.concatenate([centre - half, centre + half]).astype(np.float32)


def distinct_faces(boxes: list[np.ndarray]) -> int:
    """Faces among boxes from several detectors and orientations: boxes whose centres lie within half a face of
    each other are one face; faces smaller than MULTI_FACE_SIDE x the largest are not counted (as detection)."""
    from preprocessing.landmarks import MULTI_FACE_SIDE

    sides = [float(max(b[2] - b[0], b[3] - b[1])) for b in boxes]
    faces: list[tuple[np.ndarray, float]] = []
    for box, side in sorted(zip(boxes, sides, strict=True), key=lambda x: -x[1]):
        centre = (box[:2] + box[2:]) / 2
        if not any(np.linalg.norm(centre - c) < 0.5 * max(side, s) for c, s in faces):
            faces.append((centre, side))
    largest = max(sides, default=0.0)
    return sum(1 for _, side in faces if side >= MULTI_FACE_SIDE * largest)


def to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N,3,H,W] in [-1, 1] -> uint8 [N,H,W,3]."""
    x = images.detach().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    interp = cv2.INTER_AREA if frames.shape[1] > size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def read_identity(path: str) -> np.ndarray:
    """The identity image; a video gives its first frame (e.g. a held-out clip as in the DVC render stage)."""
    if video_io.is_video(path):
        return video_io.DrivingVideo(path).frames(0, 1)[0]
    return video_io.read_image(path)


def load_transcript(text: str | None) -> str:
    if not text:
        return ""
    path = Path(text)
    if path.suffix == ".txt" and path.is_file():
        return path.read_text(encoding="utf-8").strip()
    return text


class DrivingClip:
    """A driving video, cropped to its face with one box, read in chunks on the output timeline."""

    def __init__(self, path: str, size: int, cropper: FaceCropper | None, probes: int):
        self.video = video_io.DrivingVideo(path)
        self.size = size
        self.box = cropper.video_box(self.video, probes) if cropper is not None else None
        self.num_frames = self.video.num_frames

    def frames(self, start: int, stop: int) -> np.ndarray:
        from preprocessing import tubes

        raw = self.video.frames(start, stop)
        if self.box is not None:
            return tubes.crop(raw, self.box, self.size)
        return resize_frames(raw, self.size)


@dataclass
class Plan:
    """Resolved sources: kind per space (audio|sample|identity|video|image|emotion) and its argument."""

    kinds: dict[str, tuple[str, str | None]]
    num_frames: int
    audio: np.ndarray | None  # 16 kHz mono, exactly num_frames * 640 samples when present
    audio_source: str | None

    def describe(self) -> str:
        return ", ".join(f"{s}={k}" + (f"({a})" if a else "") for s, (k, a) in self.kinds.items())


def classify_source(
    space: str, value: str, has_audio: bool, emotions: list[str] | None
) -> tuple[str, str | None]:
    """One space's --SPACE value -> (kind, argument), with a clear error for a value that fits nothing."""
    allowed = {
        "mouth": ("audio", "identity"),
        "pose": ("sample", "identity"),
        "eye": ("sample", "identity"),
        "expression": ("audio", "identity"),
    }[space]
    low = value.lower()
    if low in allowed:
        if low in ("audio", "sample") and not has_audio:
            raise GenerateError(
                f"--{space} {value}: needs audio; pass --audio FILE (or a --video with an audio track)"
            )
        return low, None
    path = Path(value)
    if path.exists():
        if video_io.is_image(path):
            return "image", str(path)
        if video_io.is_video(path):
            return "video", str(path)
        raise GenerateError(
            f"--{space} {value}: not an image ({', '.join(video_io.IMAGE_SUFFIXES)}) or video "
            f"({', '.join(video_io.VIDEO_SUFFIXES)}) file"
        )
    if space == "expression":
        if emotions is None:
            raise GenerateError(
                f"--expression {value}: not a file, and this model stores no per-emotion mean expression weights "
                "(meta 'emotion_means'); use an expression video or image, 'audio' or 'identity', or a model from "
                "a training run with emotion labels"
            )
        if value in emotions:
            return "emotion", value
        raise GenerateError(
            f"--expression {value}: not a file and not an emotion this model knows; known emotions: {emotions} "
            "(or pass a video/image, 'audio' or 'identity')"
        )
    raise GenerateError(
        f"--{space} {value}: no such file; use a video or image path, or one of {list(allowed)}"
    )


def model_emotions(model) -> dict[str, list[float]] | None:
    """The per-emotion mean expression weights stored with the model (meta `emotion_means`), or None."""
    means = getattr(model, "emotion_means", None)
    return dict(means) if means else None


def has_module(model, name: str) -> bool:
    return getattr(model, name, None) is not None


AUTO_AUDIO = {"mouth": "audio", "pose": "sample", "eye": "sample", "expression": "audio"}
AUDIO_MODULE = {
    ("mouth", "audio"): "audio_to_mouth",
    ("pose", "sample"): "pose_flow",
    ("eye", "sample"): "eye_flow",
    ("expression", "audio"): "expression_predictor",
}


def plan_sources(
    req: Request, model, load_audio: Callable[[str], np.ndarray], max_seconds: float = 0.0
) -> Plan:
    """Resolve `auto`, check every source, load the audio and fix the number of output frames."""
    present = getattr(getattr(model, "navigation", None), "spaces", SPACES)
    for space in SPACES:  # a space the model lacks (the authors' EDTalk.pt has no eye space) cannot be driven
        if space not in present and getattr(req, space) != "auto":
            raise GenerateError(
                f"--{space} {getattr(req, space)}: this model has no {space} space; drop --{space}"
            )
    values = {s: getattr(req, s) for s in SPACES if s in present}
    if req.video is not None and not Path(req.video).is_file():
        raise GenerateError(f"--video {req.video}: no such file; pass a driving video")
    # Driving videos open first: a corrupt one is reported as a video problem, not by the audio decoder below.
    for path in {req.video, *values.values()} - {None}:
        if video_io.is_video(path) and Path(path).is_file():
            video_io.DrivingVideo(path)
    audio, audio_source = None, None
    if req.audio is not None:
        audio_source = req.audio
        audio = load_audio(req.audio)
    else:
        # no --audio: the soundtrack comes from the video that drives the mouth, when it has one
        mouth_video = req.video if values["mouth"] == "auto" else values["mouth"]
        if mouth_video and video_io.is_video(mouth_video) and Path(mouth_video).is_file():
            from preprocessing.audio import audio_from_video

            audio = audio_from_video(mouth_video)
            audio_source = mouth_video if audio is not None else None
    has_audio = audio is not None
    emotions = model_emotions(model)
    kinds: dict[str, tuple[str, str | None]] = {}
    for space, value in values.items():
        if value == "auto":
            if req.video is not None:
                value = req.video
            elif not has_audio:
                raise GenerateError(
                    f"--{space} auto: nothing drives it; pass --audio FILE, --video FILE or --{space} SOURCE"
                )
            else:
                value = AUTO_AUDIO[space]
                module = AUDIO_MODULE[(space, value)]
                if not has_module(model, module):
                    # audio-driven default without the module: keep the identity's own weights, and say so
                    log.warning("model has no %s: %s stays as in the identity image", module, space)
                    value = "identity"
        kinds[space] = classify_source(space, value, has_audio, sorted(emotions) if emotions else None)
    for space, (kind, _) in kinds.items():
        module = AUDIO_MODULE.get((space, kind))
        if module is not None and not has_module(model, module):
            raise GenerateError(
                f"--{space} {kind}: this model has no trained {module} (train the audio stages first, or pass a "
                f"video/image for --{space})"
            )
    videos = [arg for kind, arg in kinds.values() if kind == "video"]
    if req.audio is not None:
        num_frames = max(1, math.ceil(len(audio) / SAMPLES_PER_FRAME))
    elif videos:
        # video-driven: the mouth's video sets the length (its own soundtrack is fitted to it)
        num_frames = video_io.DrivingVideo(
            kinds["mouth"][1] if kinds["mouth"][0] == "video" else videos[0]
        ).num_frames
    else:
        raise GenerateError("nothing sets the length of the video: pass --audio FILE or a driving video")
    if max_seconds > 0:
        num_frames = min(num_frames, max(1, round(max_seconds * video_io.FPS)))
    if audio is not None:
        from preprocessing.audio import fit_length

        audio = fit_length(audio, num_frames * SAMPLES_PER_FRAME)
    return Plan(kinds=kinds, num_frames=num_frames, audio=audio, audio_source=audio_source)


# ---------------------------------------------------------------------------------------------------- the output
OUTPUT_SUFFIX = ".mp4"  # the writer makes H.264 + AAC in an MP4 container
PARTIAL = ".partial-"  # NAME.mp4 is written as .NAME.mp4.partial-PID.mp4 beside it, renamed when complete


def check_output(req: Request) -> Path:
    """The --output path, checked before any work: an .mp4 file name in a folder that exists or can be made."""
    out = Path(req.output)
    if out.suffix.lower() != OUTPUT_SUFFIX:
        got = f"extension {out.suffix!r}" if out.suffix else "no extension"
        raise GenerateError(f"--output {out}: {got}; the output is an MP4 (H.264 + AAC): name it NAME.mp4")
    if out.is_dir():
        raise GenerateError(f"--output {out} is an existing folder; give a file name, e.g. {out / 'out.mp4'}")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise GenerateError(f"--output {out}: {folder} is a file, not a folder; choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GenerateError(f"--output {out}: folder {folder} is not writable; choose another output path")
    inputs = [req.identity, req.audio, req.video, *(getattr(req, s) for s in SPACES)]
    if any(v and Path(v).exists() and Path(v).resolve() == out.resolve() for v in inputs):
        raise GenerateError(f"--output {out} is also an input; choose another output path")
    return out


def partial_path(out: Path) -> Path:
    """Where `out` is written until it is complete: hidden, beside it (same file system: the rename is atomic)."""
    return out.with_name(f".{out.name}{PARTIAL}{os.getpid()}{OUTPUT_SUFFIX}")


def remove_stale_partials(out: Path) -> None:
    """Partial files of `out` left by runs that were killed outright (SIGKILL) and whose process is gone."""
    for stale in out.parent.glob(f".{out.name}{PARTIAL}*{OUTPUT_SUFFIX}"):
        pid = stale.name[len(f".{out.name}{PARTIAL}") : -len(OUTPUT_SUFFIX)]
        if pid.isdigit() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ the loop
class Drivers:
    """Per chunk of output frames: the weights of every space that is not kept from the identity, plus the
    cropped driving frames for the preview."""

    def __init__(
        self,
        model,
        plan: Plan,
        req: Request,
        params: GenerateParams,
        cropper,
        size: int,
        device,
        extract=None,
    ):
        self.model, self.plan, self.params, self.device, self.size = model, plan, params, device, size
        # E + navigation on driving frames: EDTalk.extract, or the FastRenderer's (same weights, faster on CPU)
        self.extract = extract or model.extract
        self.seed = params.seed if req.seed is None else req.seed
        self.temperature = params.temperature if req.temperature is None else req.temperature
        self.clips: dict[str, DrivingClip] = {}
        self.clip_spaces: dict[str, list[str]] = {}
        self.fixed: dict[str, torch.Tensor] = {}  # spaces driven by one image or an emotion: [1, n]
        self.image_panels: dict[str, np.ndarray] = {}
        for space, (kind, arg) in plan.kinds.items():
            if kind == "video":
                if arg not in self.clips:
                    self.clips[arg] = DrivingClip(
                        arg, size, cropper if params.crop_driving else None, params.probe_frames
                    )
                self.clip_spaces.setdefault(arg, []).append(space)
            elif kind == "image":
                if arg not in self.image_panels:
                    image = video_io.read_image(arg)
                    crop = (
                        cropper.identity(image, arg, size)
                        if params.crop_driving
                        else resize_frames(image[None], size)[0]
                    )
                    self.image_panels[arg] = crop
                with torch.no_grad():
                    w = self.extract(to_tensor(self.image_panels[arg][None], device), spaces=(space,))
                self.fixed[space] = w[space]
            elif kind == "emotion":
                means = model_emotions(model)
                self.fixed[space] = torch.tensor([means[arg]], dtype=torch.float32, device=device)
        if any(kind in ("audio", "sample") for kind, _ in plan.kinds.values()):
            from preprocessing.audio import mel_window_starts

            self.mel_starts = mel_window_starts(plan.num_frames)
            self.mel_count = len(plan.audio) // MEL_HOP + 1  # mel frames of the whole clip (centred STFT)
        self.reference_mouth = (
            None  # the authors' Audio2Lip: their own mel, windows and smoothing, whole clip
        )
        if plan.kinds["mouth"][0] == "audio":
            from edtalk.reference.audio import is_audio2lip, lip_weights

            if is_audio2lip(model.audio_to_mouth):
                self.reference_mouth = lip_weights(model.audio_to_mouth, plan.audio).to(device)
        self.expression = None
        if plan.kinds.get("expression", ("identity",))[0] == "audio":
            self.expression = self._audio_expression(load_transcript(req.transcript))
        self.noise: dict[str, torch.Tensor] = {}  # flow latents per sampled space, drawn on first use
        self.decode_time = 0.0  # seconds spent decoding and cropping driving frames since the last reset

    def _audio_expression(self, transcript: str) -> torch.Tensor:
        """Per-frame expression weights [T, n_e] from speech (+ transcript), Eq. 15.

        The predictor pools a whole clip into one vector and was trained on segments of at most 5 s, so long
        audio is cut into windows of `expression_window_s` (memory stays bounded: HuBERT's attention is quadratic
        in length), one prediction per window, linearly interpolated between window centres. The transcript has
        no word timings, so every window sees all of it.
        """
        predictor = self.model.expression_predictor
        audio, total = self.plan.audio, self.plan.num_frames
        win = max(1, round(self.params.expression_window_s * video_io.FPS))  # frames per window
        bounds = list(range(0, total, win)) + [total]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < win // 2:  # a short tail joins the previous window
            bounds.pop(-2)
        text = {}
        if transcript:
            ids, mask, available = predictor.tokenize([transcript])
            text = {
                "input_ids": ids.to(self.device),
                "text_mask": mask.to(self.device),
                "text_available": available,
            }
        centres, preds = [], []
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            wave = audio[a * SAMPLES_PER_FRAME : b * SAMPLES_PER_FRAME]
            if len(wave) < 400:  # HuBERT's first convolution needs 25 ms
                wave = np.pad(wave, (0, 400 - len(wave)))
            speech = torch.from_numpy(np.ascontiguousarray(wave))[None].to(self.device)
            with torch.no_grad():
                preds.append(predictor(speech=speech, **text)[0].float().cpu().numpy())
            centres.append((a + b - 1) / 2)
        preds = np.stack(preds)
        t = np.arange(total)
        per_frame = np.stack([np.interp(t, centres, preds[:, j]) for j in range(preds.shape[1])], axis=1)
        return torch.from_numpy(per_frame.astype(np.float32)).to(self.device)

    def mel_chunk(self, start: int, stop: int) -> torch.Tensor:
        """Mel windows of output frames start..stop-1 -> [1, n, 80, 16] (same as mel_windows(audio, T)[start:stop])."""
        from preprocessing.audio import MEL_WINDOW

        idx = self.mel_starts[start:stop, None] + np.arange(MEL_WINDOW)[None, :]
        idx = np.clip(idx, 0, self.mel_count - 1)
        j0, j1 = int(idx.min()), int(idx.max()) + 1
        mel = self._mel_frames(j0, j1)
        windows = np.ascontiguousarray(mel[:, idx - j0].transpose(1, 0, 2), dtype=np.float32)
        return torch.from_numpy(windows).to(self.device)[None]

    def _mel_frames(self, j0: int, j1: int) -> np.ndarray:
        """Log-mel frames j0..j1-1 of the whole clip, computed from a slice of the audio only.

        Mel frame j is centred on sample 200j and sees samples 200j-400 .. 200j+400 (plus one before it, for the
        pre-emphasis). The slice keeps three hops of margin each side, so inside it every needed frame equals the
        whole-clip computation; at the clip's own ends the slice ends there too and the STFT pads as it would.
        """
        from preprocessing.audio import log_mel

        audio = self.plan.audio
        a = max(0, (j0 - 3) * MEL_HOP)
        b = min(len(audio), (j1 + 3) * MEL_HOP)
        mel = log_mel(audio[a:b])
        return mel[:, j0 - a // MEL_HOP : j1 - a // MEL_HOP]

    def _flow_noise(self, space: str) -> torch.Tensor:
        """z for the whole clip, drawn once as ConditionalFlow.sample draws it ([1,T,dim] ~ N(0, temperature^2));
        a few floats per frame, so chunks can share one draw and match an unchunked sample exactly."""
        flow = getattr(self.model, f"{space}_flow")
        offset = SPACES.index(space)  # pose and eyes get different noise from one seed
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 1_000_003 * offset)
        shape = (1, self.plan.num_frames, flow.config.dim)
        return torch.randn(shape, generator=gen, device=self.device) * self.temperature

    def _audio_weights(self, start: int, stop: int, spaces: list[str]) -> dict[str, torch.Tensor]:
        """Mouth from E_a + MLP, pose/eye from the flows. The flows' temporal context sees `margin` frames each
        side, so each chunk is computed with that margin and cut: chunked output equals a whole-clip pass."""
        flows = [s for s in spaces if s != "mouth"]
        margin = max((self._flow_margin(s) for s in flows), default=0)
        a, b = max(0, start - margin), min(self.plan.num_frames, stop + margin)
        feats = self.model.audio_to_mouth.features(self.mel_chunk(a, b))  # [1, b-a, C]
        out = {}
        if "mouth" in spaces:
            out["mouth"] = self.model.audio_to_mouth.head(feats[:, start - a : stop - a])[0]
        for space in flows:
            flow = getattr(self.model, f"{space}_flow")
            if space not in self.noise:
                self.noise[space] = self._flow_noise(space)
            w = flow.inverse(self.noise[space][:, a:b], feats)
            out[space] = w[0, start - a : stop - a]
        return out

    def _flow_margin(self, space: str) -> int:
        cfg = getattr(self.model, f"{space}_flow").config
        return cfg.context_layers * (cfg.context_kernel // 2)

    def chunk(self, start: int, stop: int) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
        n = stop - start
        weights: dict[str, torch.Tensor] = {}
        panels: list[np.ndarray] = []
        for path, clip in self.clips.items():
            t0 = time.perf_counter()
            frames = clip.frames(start, stop)
            self.decode_time += time.perf_counter() - t0
            panels.append(frames)
            weights.update(self.extract(to_tensor(frames, self.device), spaces=tuple(self.clip_spaces[path])))
        for space, w in self.fixed.items():
            weights[space] = w.expand(n, -1)
        audio_spaces = [
            s for s, (k, _) in self.plan.kinds.items() if k in ("audio", "sample") and s != "expression"
        ]
        if self.reference_mouth is not None:
            weights["mouth"] = self.reference_mouth[start:stop]
            audio_spaces.remove("mouth")
        if audio_spaces:
            weights.update(self._audio_weights(start, stop, audio_spaces))
        if self.expression is not None:
            e = self.expression
            weights["expression"] = e.expand(n, -1) if e.shape[0] == 1 else e[start:stop]
        return weights, panels


def render_batched(model, ident, weights: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """model.render (an EDTalk or its FastRenderer) over the frames of `weights` in calls of at most `batch` frames (same output as one call)."""
    n = next(iter(weights.values())).shape[0]
    if batch >= n:
        return model.render(ident, weights)
    return torch.cat(
        [model.render(ident, {k: v[a : a + batch] for k, v in weights.items()}) for a in range(0, n, batch)]
    )


def encode_identity(path: str, cropper: FaceCropper, renderer, size: int, device, cache=None):
    """The identity image -> (its face crop, its encoded Identity). `cache` (a mapping keyed by the file's sha256,
    e.g. a server's per-model cache) returns an image seen before without detecting or encoding it again."""
    key = hashlib.sha256(Path(path).read_bytes()).hexdigest() if cache is not None else None
    if key is not None and key in cache:
        return cache[key]
    crop = cropper.identity(read_identity(path), path, size)
    with torch.no_grad():
        found = crop, renderer.encode_identity(to_tensor(crop[None], device))
    if key is not None:
        cache[key] = found
    return found


def run(
    req: Request, model, params: GenerateParams, prep: PreprocessParams | None = None, identities=None
) -> dict:
    """Generate `req.output`; `model` is a loaded EDTalk or a folder / MLflow URI; `identities`: an identity cache
    (see encode_identity). Returns a summary with the frame count, duration and the time spent per phase (decode,
    drive, render, encode+mux)."""
    from tqdm import tqdm

    from preprocessing.audio import load_audio

    t_start = time.perf_counter()
    out = check_output(req)
    prep = prep or PreprocessParams()
    if params.threads:
        torch.set_num_threads(params.threads)
    if isinstance(model, (str, Path)):
        model, _ = load_model(model)
    model.eval()  # inference: no dropout in the expression predictor
    device = next(model.parameters()).device
    size = model_size(model)
    cropper = FaceCropper(prep)
    # The fast path computes the same frames as model.render (within float rounding, bench/model.py), and the
    # same identity and driving weights as model.encode_identity / model.extract.
    renderer = model.fast_renderer() if params.fast_render and device.type == "cpu" else model
    identity_crop, ident = encode_identity(req.identity, cropper, renderer, size, device, identities)
    plan = plan_sources(req, model, load_audio, params.max_seconds)
    log.info(
        "generating %d frames (%.2f s): %s", plan.num_frames, plan.num_frames / video_io.FPS, plan.describe()
    )
    timers = {"load": 0.0, "decode": 0.0, "drive": 0.0, "render": 0.0, "encode_mux": 0.0}
    with torch.no_grad():
        drivers = Drivers(model, plan, req, params, cropper, size, device, extract=renderer.extract)
    timers["load"] = time.perf_counter() - t_start
    preview = params.preview if req.preview is None else req.preview
    preview_path = out.with_name(out.stem + "_preview.mp4") if preview else None
    sample_rate = video_io.SAMPLE_RATE if plan.audio is not None else None
    writer_args = {"sample_rate": sample_rate, "crf": params.crf, "preset": params.x264_preset,
                   "audio_bitrate": params.audio_bitrate, "fragmented": req.fragmented}  # fmt: skip
    remove_stale_partials(out)
    writer = video_io.VideoWriter(partial_path(out), size, size, **writer_args)
    previewer = None
    digest = hashlib.sha256()  # of the rendered frames before encoding: identical generations, identical hash
    try:
        # auto: whole chunks on GPU and through the fast path (it batches the coarse levels and runs the fine
        # ones frame by frame itself); one frame per call for the eager model on CPU (faster there).
        batched = device.type != "cpu" or renderer is not model
        render_batch = params.render_batch or (params.chunk_frames if batched else 1)
        bar = tqdm(total=plan.num_frames, unit="frame", desc="generate", disable=None)
        for start in range(0, plan.num_frames, params.chunk_frames):
            stop = min(plan.num_frames, start + params.chunk_frames)
            t0 = time.perf_counter()
            with torch.no_grad():
                weights, panels = drivers.chunk(start, stop)
                t1 = time.perf_counter()
                images = render_batched(renderer, ident, weights, render_batch) if weights else None
                if images is None:  # every space kept from the identity: the identity reconstructed
                    images = renderer.render(ident, {}).expand(stop - start, -1, -1, -1)
                frames = to_uint8(images)
            t2 = time.perf_counter()
            audio = (
                None
                if plan.audio is None
                else plan.audio[start * SAMPLES_PER_FRAME : stop * SAMPLES_PER_FRAME]
            )
            digest.update(frames.tobytes())
            writer.write(frames, audio)
            if preview_path is not None:
                still = np.broadcast_to(identity_crop, frames.shape)
                sheet = np.concatenate([still, *panels, frames], axis=2)
                if previewer is None:
                    previewer = video_io.VideoWriter(
                        partial_path(preview_path), sheet.shape[2], size, **writer_args
                    )
                previewer.write(sheet, audio)
            t3 = time.perf_counter()
            timers["decode"] += drivers.decode_time
            drivers.decode_time = 0.0
            timers["drive"] += t1 - t0
            timers["render"] += t2 - t1
            timers["encode_mux"] += t3 - t2
            bar.update(stop - start)
        bar.close()
        t2 = time.perf_counter()
        writer.close()  # flushes the encoders' delayed frames
        if previewer is not None:
            previewer.close()
        timers["encode_mux"] += time.perf_counter() - t2
        # complete: the finished files take their names (a killed run leaves no file under them)
        os.replace(writer.path, out)
        if previewer is not None:
            os.replace(previewer.path, preview_path)
    except BaseException:  # errors, Ctrl-C, SIGTERM (pipelines/signals.py): no partial file stays behind
        for w in (writer, previewer):
            if w is not None and w.container is not None:
                w.__exit__(RuntimeError, None, None)
            elif w is not None:
                w.path.unlink(missing_ok=True)
        raise
    timers["drive"] -= timers["decode"]  # decode time was measured inside the drive phase
    writers = [w for w in (writer, previewer) if w is not None]
    timers["encode"] = sum(w.encode_s for w in writers)
    timers["mux"] = sum(w.mux_s for w in writers)
    timers["other_output"] = (
        timers.pop("encode_mux") - timers["encode"] - timers["mux"]
    )  # hashing, preview sheets
    seconds = time.perf_counter() - t_start
    return {
        "output": str(out),
        "preview": str(preview_path) if preview_path else None,
        "frames": plan.num_frames,
        "seconds": plan.num_frames / video_io.FPS,
        "sources": {s: {"kind": k, "arg": a} for s, (k, a) in plan.kinds.items()},
        "audio_source": plan.audio_source,
        "frames_sha256": digest.hexdigest(),
        "wall_s": seconds,
        "timers_s": timers,
    }


def model_size(model) -> int:
    """The square image side the model was built for."""
    return int(model.config.image_size)
