"""`edtalk generate` refuses an identity image with a second face that is tilted or turned (issue 23 item 9).

The images are built at test time from the ../shared/media portraits: a frontal face beside a rotated copy of
another portrait, which dlib's HOG detector alone does not see."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edtalk import EDTalk, ModelConfig
from pipelines import video_io
from pipelines.cli import cli
from pipelines.generate import FaceCropper, rotate_image
from preprocessing.landmarks import MultipleFacesError
from preprocessing.params import PreprocessParams

PORTRAITS = ("SadTalker__happy.png", "SadTalker__happy1.png", "LivePortrait__d19.jpg")


@pytest.fixture(scope="module")
def cropper():
    return FaceCropper(PreprocessParams(landmark_backend="dlib"))


def _pair(media_dir, other: str, degrees: float) -> np.ndarray:
    """SadTalker__happy.png beside `other` rotated by `degrees` (same height)."""
    front = video_io.read_image(media_dir / "images" / "SadTalker__happy.png")
    turned, _ = rotate_image(video_io.read_image(media_dir / "images" / other), degrees)
    side = cv2.resize(turned, front.shape[1::-1], interpolation=cv2.INTER_AREA)
    return np.concatenate([front, side], axis=1)


@pytest.mark.parametrize(("other", "degrees"), [("SadTalker__happy1.png", 60), ("LivePortrait__d19.jpg", 90),
                                                ("LivePortrait__d19.jpg", 180)])  # fmt: skip
def test_a_tilted_second_face_is_found(media_dir, cropper, other, degrees):
    image = _pair(media_dir, other, degrees)
    assert len(cropper.backend.faces_in_image(image)) == 1  # what the upright detector alone sees
    with pytest.raises(MultipleFacesError, match=r"pair\.png: 2 faces found"):
        cropper.identity(image, "pair.png", 64)


def test_single_portraits_are_still_one_face(media_dir, cropper):
    for name in PORTRAITS:
        crop = cropper.identity(video_io.read_image(media_dir / "images" / name), name, 64)
        assert crop.shape == (64, 64, 3)


def test_generate_refuses_the_two_face_image_in_one_line(media_dir, tmp_path):
    torch.manual_seed(0)
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(tmp_path / "model")
    identity = tmp_path / "pair.png"
    cv2.imwrite(str(identity), cv2.cvtColor(_pair(media_dir, "LivePortrait__d19.jpg", 90), cv2.COLOR_RGB2BGR))
    out = tmp_path / "out.mp4"
    args = ["generate", "--model", str(tmp_path / "model"), "--identity", str(identity), "--audio",
            str(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav"), "-o", str(out),
            "--set", "preprocess.landmark_backend=dlib"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    message = res.output.strip()
    assert res.exit_code == 1 and "\n" not in message, res.output
    assert message.startswith(f"Error: {identity}: 2 faces found"), message
    assert not out.exists()
