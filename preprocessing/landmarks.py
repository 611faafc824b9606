"""68-point face landmarks (iBUG 300-W convention) for videos and still images.

Backends:
- `dlib`: works offline (dlib-bin + face-recognition-models). HOG detection on a downscaled frame every
  `detect_every` frames and whenever tracking is lost; between detections the box is carried from the previous
  frame's landmarks; the 68-point shape predictor runs on every frame.
- `face_alignment`: S3FD + FAN (batched). Needs its weights in the torch hub cache; raises a clear error otherwise.
- `sidecar`: landmarks given in `NAME.json` (e.g. SynthTalk), resampled onto the output timeline.
- `auto`: face_alignment when its weights are present, else dlib.

`detect_single_face(image)` is the still-image entry point (used by generation): exactly one face or an error.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FA_WEIGHTS = ("s3fd-619a316812.pth", "2DFAN4-11f355bf06.pth.tar")
# a second detection counts as a face when its side is at least this x the largest one's
MULTI_FACE_SIDE = 0.5
# between full detections the face is re-detected in a window ROI_SPAN x its box, scaled so the face is ROI_FACE px
ROI_SPAN = 1.5
CNN_MAX_SIDE = 320  # still images: longest side the CNN fallback detector sees
ROI_FACE = 90.0


class FaceNotFoundError(ValueError):
    """No face in an image."""


class MultipleFacesError(ValueError):
    """More than one face in an image where exactly one is required."""


class LandmarkBackendError(RuntimeError):
    """A landmark backend that cannot run here (missing weights or packages)."""


@dataclass
class Face:
    landmarks: np.ndarray  # (68, 2) float32, image pixels (x, y)
    box: np.ndarray  # (4,) float32 x0, y0, x1, y1 of the detection


@dataclass
class Track:
    """Landmarks of the main face over a video, with the detector's face counts to judge the video by."""

    landmarks: (
        np.ndarray
    )  # (T, 68, 2) float32 source pixels; rows where valid is False are filled from neighbours
    valid: np.ndarray  # (T,) bool: the face was found (detected or tracked) in this frame
    probes: int  # frames the detector ran on
    hits: int  # probes with at least one face
    multi: int  # probes with two or more faces


def landmark_box(points: np.ndarray) -> np.ndarray:
    """(…, 68, 2) -> (…, 4) tight box x0, y0, x1, y1."""
    return np.concatenate([points.min(axis=-2), points.max(axis=-2)], axis=-1)


def fill_invalid(landmarks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Copy the nearest valid frame's landmarks into invalid frames (needs at least one valid frame)."""
    if valid.all() or not valid.any():
        return landmarks
    good = np.flatnonzero(valid)
    pos = np.searchsorted(good, np.arange(len(valid)))
    left = good[np.clip(pos - 1, 0, len(good) - 1)]
    right = good[np.clip(pos, 0, len(good) - 1)]
    t = np.arange(len(valid))
    nearest = np.where(np.abs(t - left) <= np.abs(right - t), left, right)
    return landmarks[nearest]


def dlib_model_dir() -> Path:
    """The folder of face-recognition-models' .dat files, found without importing the package (it needs
    pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarkBackendError(
            "the dlib backend needs the face-recognition-models package (pip install face-recognition-models)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibBackend:
    """HOG face detector + 68-point shape predictor, with box tracking between detections."""

    name = "dlib"
    detector_min_face_px = (
        40  # HOG's 80 px window on a frame upsampled once (frames under 400 px); 80 px on larger ones
    )

    def __init__(self, detect_every: int = 10, detect_max_side: int = 320):
        import dlib

        path = dlib_model_dir() / "shape_predictor_68_face_landmarks.dat"
        if not path.exists():
            raise LandmarkBackendError(
                f"dlib shape predictor not found at {path}; reinstall face-recognition-models"
            )
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(path))
        self.rect = dlib.rectangle
        self.detect_every = detect_every
        self.detect_max_side = detect_max_side
        self._cnn = None

    def detect(self, gray: np.ndarray) -> list[np.ndarray]:
        """Face boxes (x0, y0, x1, y1 in full-frame pixels), largest first. Downscaled first; full size on a miss."""
        scale = min(1.0, self.detect_max_side / max(gray.shape))
        boxes = []
        if scale < 1.0:
            small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            boxes = [
                np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32) / scale
                for r in self.detector(small, 0)
            ]
        if not boxes:
            boxes = [
                np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32)
                for r in self.detector(gray, 0)
            ]
        if not boxes and max(gray.shape) < 400:
            # small frames: upsample once so faces of 40-80 px are found (then judged by min_face_px); dlib returns
            # the boxes in the original image's coordinates
            boxes = [
                np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32)
                for r in self.detector(gray, 1)
            ]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def shape(self, gray: np.ndarray, box: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        s = self.predictor(gray, self.rect(x0, y0, x1, y1))
        return np.array([(p.x, p.y) for p in s.parts()], np.float32)

    @staticmethod
    def count_faces(boxes: list[np.ndarray]) -> int:
        if not boxes:
            return 0
        side0 = boxes[0][2] - boxes[0][0]
        return sum(1 for b in boxes if (b[2] - b[0]) >= MULTI_FACE_SIDE * side0)

    def detect_cnn(self, rgb: np.ndarray) -> list[np.ndarray]:
        """dlib's MMOD CNN detector (slow on CPU, ~1 s, but finds faces HOG misses): the still-image fallback."""
        if self._cnn is None:
            import dlib

            self._cnn = dlib.cnn_face_detection_model_v1(
                str(dlib_model_dir() / "mmod_human_face_detector.dat")
            )
        scale = min(1.0, CNN_MAX_SIDE / max(rgb.shape[:2]))
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        found = [d.rect for d in self._cnn(np.ascontiguousarray(small), 0)]
        boxes = [np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32) / scale for r in found]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def faces_in_image(self, rgb: np.ndarray) -> list[Face]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes = self.detect(gray) or self.detect_cnn(rgb)
        boxes = boxes[: self.count_faces(boxes)]
        return [Face(self.shape(gray, b), b) for b in boxes]

    def detect_near(self, gray: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """Re-detect the face around its last box: HOG on a small window where the face is ~ROI_FACE px (cheap,
        and the shape predictor gets the kind of box it was trained on, so it does not drift)."""
        side = float(box[2] - box[0])
        cx, cy = (box[:2] + box[2:]) / 2
        half = ROI_SPAN * side / 2
        h, w = gray.shape
        x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
        x1, y1 = int(min(w, cx + half)), int(min(h, cy + half))
        if x1 - x0 < 16 or y1 - y0 < 16:
            return None
        # small faces are enlarged (up to 2x) so HOG's 80 px window still fits them
        scale = min(2.0, ROI_FACE / max(side, 1.0))
        window = gray[y0:y1, x0:x1]
        if scale != 1.0:
            interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
            window = cv2.resize(window, None, fx=scale, fy=scale, interpolation=interp)
        found = [
            np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32) / scale + [x0, y0, x0, y0]
            for r in self.detector(window, 0)
        ]
        if not found:
            return None
        return min(found, key=lambda b: np.abs((b[:2] + b[2:]) / 2 - (cx, cy)).sum())

    def track(self, frames: np.ndarray) -> Track:
        """Full-frame detection every `detect_every` frames (and after a loss) to find and count faces; between,
        detection in a small window around the last box; the shape predictor on every frame."""
        t_len = len(frames)
        out = np.zeros((t_len, 68, 2), np.float32)
        valid = np.zeros(t_len, bool)
        probes = hits = multi = 0
        box = None  # the current detector box of the followed face
        force = False
        for t in range(t_len):
            gray = cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY)
            if force or t % self.detect_every == 0 or box is None and t % self.detect_every == 0:
                probes += 1
                boxes = self.detect(gray)
                n = self.count_faces(boxes)
                hits += n > 0
                multi += n > 1
                force = False
                if boxes:
                    if box is not None:  # keep following the same person
                        centre = (box[:2] + box[2:]) / 2
                        boxes = sorted(boxes[:n], key=lambda b: np.abs((b[:2] + b[2:]) / 2 - centre).sum())
                    box = boxes[0]
                elif box is None:
                    continue
            elif box is None:
                continue
            else:
                near = self.detect_near(gray, box)
                if near is None:
                    force = True  # keep the last box for this frame, look at the whole frame on the next
                else:
                    box = near
            out[t], valid[t] = self.shape(gray, box), True
        return Track(fill_invalid(out, valid), valid, probes, hits, multi)


class FaceAlignmentBackend:
    """The face_alignment package (S3FD detector + 2D FAN), batched over frames."""

    name = "face_alignment"
    detector_min_face_px = 16  # S3FD's smallest anchor

    def __init__(self, batch_size: int = 16):
        missing = missing_face_alignment_weights()
        if missing:
            folder = torch_checkpoint_dir()
            raise LandmarkBackendError(
                f"face_alignment weights missing: {', '.join(missing)}; put them in {folder} "
                "(set TORCH_HOME to move that folder), or use preprocess.landmark_backend=dlib"
            )
        import face_alignment
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.fa = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, flip_input=False
        )
        self.batch_size = batch_size

    def faces_in_image(self, rgb: np.ndarray) -> list[Face]:
        result = self.fa.get_landmarks_from_image(rgb, return_bboxes=True)
        lms, _, boxes = result if isinstance(result, tuple) else (result, None, None)
        if not lms:
            return []
        boxes = boxes if boxes is not None else [landmark_box(p) for p in lms]
        return [
            Face(np.asarray(p, np.float32)[:, :2], np.asarray(b[:4], np.float32))
            for p, b in zip(lms, boxes, strict=True)
        ]

    def track(self, frames: np.ndarray) -> Track:
        import torch

        t_len = len(frames)
        out = np.zeros((t_len, 68, 2), np.float32)
        valid = np.zeros(t_len, bool)
        hits = multi = 0
        centre = None
        for i in range(0, t_len, self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(frames[i : i + self.batch_size])).permute(
                0, 3, 1, 2
            )
            results = self.fa.get_landmarks_from_batch(batch)
            for j, pts in enumerate(results):
                if pts is None or len(pts) == 0:
                    continue
                faces = np.asarray(pts, np.float32).reshape(-1, 68, 2)
                hits += 1
                multi += len(faces) > 1
                if centre is not None:
                    faces = faces[np.argsort([np.abs(f.mean(0) - centre).sum() for f in faces])]
                out[i + j], valid[i + j] = faces[0], True
                centre = faces[0].mean(0)
        return Track(fill_invalid(out, valid), valid, t_len, hits, multi)


class SidecarBackend:
    """Landmarks from a sidecar JSON (`landmarks`: per-frame 68x2 at `fps`), resampled to the output timeline."""

    name = "sidecar"

    def __init__(self, landmarks: list | np.ndarray, fps: float):
        arr = np.asarray(landmarks, np.float32)
        if arr.ndim != 3 or arr.shape[1:] != (68, 2):
            raise ValueError(f"sidecar landmarks must have shape (T, 68, 2), got {arr.shape}")
        self.landmarks = arr
        self.fps = float(fps)

    def track_at(self, count: int, out_fps: float) -> Track:
        idx = np.clip(
            np.floor(np.arange(count) / out_fps * self.fps + 1e-6).astype(int), 0, len(self.landmarks) - 1
        )
        lms = self.landmarks[idx]
        valid = np.isfinite(lms).all(axis=(1, 2))
        return Track(fill_invalid(np.nan_to_num(lms), valid), valid, count, int(valid.sum()), 0)


def torch_checkpoint_dir() -> Path:
    """Where torch.hub keeps checkpoints (<hub dir>/checkpoints), found without importing torch when it is not
    imported yet: choosing a landmark backend must not cost a worker torch's import (~0.7 s, ~200 MB) when the
    answer is dlib. Same rule as torch.hub.get_dir(): $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else
    ~/.cache/torch/hub; once torch is imported its own answer (set_dir included) wins."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir()) / "checkpoints"
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        torch_home = os.path.join(cache, "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def missing_face_alignment_weights() -> list[str]:
    folder = torch_checkpoint_dir()
    return [name for name in FA_WEIGHTS if not (folder / name).exists()]


def make_backend(name: str = "auto", detect_every: int = 10, detect_max_side: int = 320):
    """A video/image landmark backend by name (`sidecar` is built per video from its JSON, not here)."""
    if name == "auto":
        name = "face_alignment" if not missing_face_alignment_weights() else "dlib"
    if name == "dlib":
        return DlibBackend(detect_every, detect_max_side)
    if name == "face_alignment":
        return FaceAlignmentBackend()
    raise ValueError(
        f"unknown landmark backend {name!r}: use auto, dlib or face_alignment (or sidecar per video)"
    )


def detect_single_face(image: np.ndarray, backend="auto", name: str = "image") -> Face:
    """The 68 landmarks and box of the one face in an RGB image (H, W, 3) uint8.

    Raises FaceNotFoundError / MultipleFacesError naming `name`. `backend` is a backend object or a name.
    """
    if isinstance(backend, str):
        backend = make_backend(backend)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB image of shape (H, W, 3), got {image.shape}")
    faces = backend.faces_in_image(np.ascontiguousarray(image, dtype=np.uint8))
    if not faces:
        raise FaceNotFoundError(
            f"{name}: no face found; use a frontal portrait with the face clearly visible"
        )
    if len(faces) > 1:
        raise MultipleFacesError(
            f"{name}: {len(faces)} faces found; crop the image to the one face to animate"
        )
    return faces[0]
