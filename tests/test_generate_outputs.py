"""`edtalk generate`'s output: bad -o paths are refused before any work, a killed run leaves no partial file,
and a corrupt driving video is named as such (issue 23 items 10, 11, 12)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edtalk import EDTalk, ModelConfig
from pipelines import video_io
from pipelines.cli import cli
from pipelines.generate import Request, partial_path, plan_sources, remove_stale_partials
from preprocessing.audio import load_audio

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(folder)
    return folder


def _bad_outputs(tmp: Path, audio: str) -> dict[str, tuple[str, str]]:
    (tmp / "afile").write_text("x")
    (tmp / "folder.mp4").mkdir()
    return {  # case -> (--output, what the message must say)
        "parent is a file": (str(tmp / "afile" / "out.mp4"), "is a file, not a folder"),
        "existing folder": (str(tmp / "folder.mp4"), "is an existing folder"),
        "no extension": (str(tmp / "out"), "no extension"),
        "webm": (str(tmp / "out.webm"), "extension '.webm'"),
        "an input": (audio, "is also an input"),
    }


def test_bad_output_paths_fail_before_any_work(tmp_path, media_dir):
    """Each bad -o gives one line naming --output, before the model is even looked for (it does not exist)."""
    identity = str(media_dir / "images" / "SadTalker__happy.png")
    audio = str(tmp_path / "speech.mp4")  # an input that an -o could overwrite
    Path(audio).write_bytes((media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4").read_bytes())
    for case, (output, says) in _bad_outputs(tmp_path, audio).items():
        args = ["generate", "--model", str(tmp_path / "no-model"), "--identity", identity, "--audio", audio]
        res = CliRunner().invoke(cli, [*args, "-o", output])
        assert res.exit_code == 1, (case, res.output, res.exception)
        message = res.output.strip()
        assert message.startswith("Error: --output") and says in message and "\n" not in message, (
            case,
            message,
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.webm").exists()


def test_corrupt_driving_video_is_reported_as_a_video_problem(tmp_path):
    junk = tmp_path / "drive.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    req = Request(identity="unused.png", output=str(tmp_path / "o.mp4"), video=str(junk))
    with pytest.raises(video_io.MediaError, match=r"driving video .*drive\.mp4 cannot be decoded"):
        plan_sources(req, None, load_audio)


def test_stale_partial_of_a_killed_run_is_removed(tmp_path):
    """SIGKILL cannot be caught: its hidden partial file is removed by the next run, a live run's is kept."""
    out = tmp_path / "out.mp4"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = partial_path(out).with_name(f".out.mp4.partial-{int(gone.stdout)}.mp4")
    mine = partial_path(out)
    for p in (stale, mine):
        p.write_bytes(b"partial")
    remove_stale_partials(out)
    assert not stale.exists() and mine.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_generate_leaves_no_partial_output(sig, tiny_model, media_dir, tmp_path):
    """A real signal while frames are being written: no out.mp4, no partial file, no /tmp/edtalk-* folder."""
    out = tmp_path / "out.mp4"
    cmd = [sys.executable, "-m", "pipelines.cli", "generate", "--model", str(tiny_model), "--identity",
           str(media_dir / "images" / "SadTalker__happy.png"), "--audio",
           str(media_dir / "audio" / "SadTalker__chinese_news.wav"), "-o", str(out),
           "--set", "generate.chunk_frames=1", "--set", "preprocess.landmark_backend=dlib"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "edtalk-*")))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list(tmp_path.glob("*out.mp4*")):  # the writer is open: frames follow
                time.sleep(1.0)
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        proc.send_signal(sig)
        log = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a killed run left files"
    assert proc.returncode == 128 + sig, log[-2000:]
    assert "partial outputs were removed" in log
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "edtalk-*"))) <= temp_before
