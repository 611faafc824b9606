"""Generation streams: peak memory for 60 s of audio is about that of 5 s (measured in fresh subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from edtalk import EDTalk, ModelConfig
from preprocessing.audio import load_audio

# Runs in a subprocess: warm up (imports, model, landmark models, codecs) on 1 s, then measure how far the peak
# resident set grows while generating the clip under test.
PROBE = r"""
import json, resource, sys
from pipelines.generate import GenerateParams, Request, load_model, run
from preprocessing.params import PreprocessParams

model_dir, identity, warm, audio, out = sys.argv[1:6]
model, _ = load_model(model_dir)
prep = PreprocessParams(landmark_backend="dlib")
params = GenerateParams(chunk_frames=32, threads=1)
run(Request(identity=identity, audio=warm, output=out), model, params, prep)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = run(Request(identity=identity, audio=audio, output=out), model, params, prep)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"frames": res["frames"], "base_kb": base, "peak_kb": peak}))
"""


def _measure(model_dir, identity, warm, audio, out) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir), str(identity), str(warm), str(audio), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes, 5 s + 60 s of tiny-model video: ~35 s on an idle 2-core machine
def test_peak_memory_does_not_grow_with_audio_length(tmp_path, media_dir):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    EDTalk(ModelConfig.preset("tiny")).save_pretrained(model_dir)
    speech = load_audio(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav")  # 8 s of real speech
    long = np.tile(speech, 8)[: 60 * 16000]
    paths = {}
    for name, seconds in (("warm", 1), ("short", 5), ("long", 60)):
        paths[name] = tmp_path / f"{name}.wav"
        sf.write(paths[name], long[: seconds * 16000], 16000)
    identity = media_dir / "images" / "SadTalker__happy.png"
    short = _measure(model_dir, identity, paths["warm"], paths["short"], tmp_path / "s.mp4")
    long_ = _measure(model_dir, identity, paths["warm"], paths["long"], tmp_path / "l.mp4")
    assert (short["frames"], long_["frames"]) == (125, 1500)
    grow = (short["peak_kb"] - short["base_kb"]) / 1024, (long_["peak_kb"] - long_["base_kb"]) / 1024
    print(
        f"growth {grow[0]:.1f} MB (5 s) vs {grow[1]:.1f} MB (60 s); peak RSS {short['peak_kb'] / 1024:.0f} MB (5 s) vs {long_['peak_kb'] / 1024:.0f} MB (60 s)"
    )
    grow_short = (short["peak_kb"] - short["base_kb"]) / 1024
    grow_long = (long_["peak_kb"] - long_["base_kb"]) / 1024
    # Holding the 60 s of output alone would take 1500 x 64 x 64 x 3 floats = 74 MB; streaming stays flat.
    assert grow_long < 1.3 * grow_short + 25, (
        f"peak RSS grew {grow_long:.1f} MB for 60 s vs {grow_short:.1f} MB for 5 s"
    )
    assert long_["peak_kb"] < 1.3 * short["peak_kb"] + 25 * 1024
