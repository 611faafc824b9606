"""SynthTalk generator: files, determinism, decoding, audio, landmark/pixel agreement, audio-mouth sync."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import decord
import numpy as np
import pytest
from click.testing import CliRunner

from preprocessing.synthtalk import (
    EMOTIONS,
    FACTOR_NAMES,
    SynthConfig,
    clip_plan,
    generate,
    make_clip,
    preview,
)
from preprocessing.synthtalk.audio import EMOTION_WORDS, SAMPLES_PER_FRAME, synthesize
from preprocessing.synthtalk.identity import sample_identity

REPO = Path(__file__).resolve().parents[1]
SECONDS, SIZE, SEED = 2.0, 128, 7
FRAMES = int(SECONDS * 25)


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("synthtalk")
    return generate(out, identities=2, clips_per_identity=3, seconds=SECONDS, size=SIZE, seed=SEED)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _audio(path: Path) -> np.ndarray:
    reader = decord.AudioReader(str(path), sample_rate=16000, mono=True)
    return reader[:].asnumpy()[0]


def test_files_and_sidecar_contract(synth_set):
    assert len(synth_set) == 6
    for mp4 in synth_set:
        doc = json.loads(mp4.with_suffix(".json").read_text())
        assert set(doc) == {"speaker", "emotion", "split", "fps", "landmarks", "factors", "transcript"}
        assert doc["fps"] == 25.0 and doc["emotion"] in EMOTIONS and doc["split"] in ("train", "val", "test")
        lm = np.asarray(doc["landmarks"])
        assert lm.shape == (FRAMES, 68, 2)
        assert np.all(lm >= 0) and np.all(lm < SIZE)
        assert np.allclose(lm * 16, np.round(lm * 16))  # the 1/16 px drawing grid, stored exactly
        assert set(doc["factors"]) == set(FACTOR_NAMES)
        assert all(len(v) == FRAMES for v in doc["factors"].values())
        assert EMOTIONS[doc["factors"]["emotion"][0]] == doc["emotion"]
        assert mp4.with_suffix(".txt").read_text().strip() == doc["transcript"]
        words = doc["transcript"].split()
        assert words, "every clip says something"
        if doc["emotion"] != "neutral":
            assert set(words) & set(EMOTION_WORDS[doc["emotion"]]), "the transcript carries the emotion"
    splits = {json.loads(p.with_suffix(".json").read_text())["speaker"]: None for p in synth_set}
    assert sorted(splits) == ["synth000", "synth001"]
    last = json.loads(synth_set[-1].with_suffix(".json").read_text())
    assert last["speaker"] == "synth001" and last["split"] == "val"  # the last identity is held out


def test_same_seed_same_bytes_and_other_seed_differs(synth_set, tmp_path):
    again = generate(
        tmp_path / "a", identities=1, clips_per_identity=2, seconds=SECONDS, size=SIZE, seed=SEED
    )
    for new in again:
        old = synth_set[0].parent / new.name
        for suffix in (".mp4", ".json", ".txt"):
            assert _sha(new.with_suffix(suffix)) == _sha(old.with_suffix(suffix)), (
                f"{new.name}{suffix} differs"
            )
    other = generate(
        tmp_path / "b", identities=1, clips_per_identity=1, seconds=SECONDS, size=SIZE, seed=SEED + 1
    )
    assert _sha(other[0]) != _sha(synth_set[0])


def test_decodes_at_25_fps_with_expected_frames(synth_set):
    for mp4 in synth_set[:2]:
        vr = decord.VideoReader(str(mp4))
        assert len(vr) == FRAMES
        assert vr.get_avg_fps() == pytest.approx(25.0)
        assert vr[0].shape == (SIZE, SIZE, 3)


def test_audio_is_16k_speech_like_and_length_matches(synth_set):
    audio = _audio(synth_set[1])
    assert abs(len(audio) - FRAMES * SAMPLES_PER_FRAME) < 1024  # AAC pads to its 1024-sample frames
    clip = make_clip(
        SynthConfig(identities=1, clips_per_identity=2, seconds=SECONDS, size=SIZE, seed=SEED), 0, 1
    )
    n = FRAMES * SAMPLES_PER_FRAME
    assert np.corrcoef(audio[:n], clip.waveform[:n])[0, 1] > 0.9, "decoded audio matches the synthesized one"
    rms = np.sqrt((audio[:n].reshape(FRAMES, -1) ** 2).mean(axis=1))
    assert np.percentile(rms, 10) < 0.1 * np.percentile(rms, 90), "speech has pauses"
    voiced = audio[:n].reshape(FRAMES, -1)[rms > np.percentile(rms, 75)]
    lags = []
    for frame in voiced:
        f = frame - frame.mean()
        ac = np.correlate(f, f, "full")[len(f) - 1 :]
        lo, hi = 16000 // 400, 16000 // 60  # voice pitch range
        lag = lo + int(np.argmax(ac[lo:hi]))
        assert ac[lag] > 0.3 * ac[0], "voiced frames are periodic"
        lags.append(lag)
    spec = np.abs(np.fft.rfft(audio[:n]))
    freqs = np.fft.rfftfreq(n, 1 / 16000)
    centroid = float((spec * freqs).sum() / spec.sum())
    assert 300 < centroid < 3500, f"spectral centroid {centroid:.0f} Hz is not speech-like"


def test_mouth_follows_audio_envelope_at_lag_zero(synth_set):
    for mp4 in synth_set[:3]:
        doc = json.loads(mp4.with_suffix(".json").read_text())
        mouth = np.asarray(doc["factors"]["mouth_open"])
        audio = _audio(mp4)[: FRAMES * SAMPLES_PER_FRAME]
        rms = np.sqrt((audio.reshape(FRAMES, -1) ** 2).mean(axis=1))
        corr = {lag: np.corrcoef(np.roll(rms, lag)[5:-5], mouth[5:-5])[0, 1] for lag in (-5, 0, 5)}
        assert corr[0] > 0.5, corr
        assert corr[0] > corr[-5] + 0.1 and corr[0] > corr[5] + 0.1, corr


def _hull_mask(points: np.ndarray, dilate: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillConvexPoly(
        mask, np.round(cv2.convexHull(points.astype(np.float32)) * 16).astype(np.int32), 1, cv2.LINE_8, 4
    )
    if dilate:
        mask = cv2.dilate(mask, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8))
    return mask.astype(bool)


def _lower_face(lm: np.ndarray) -> np.ndarray:
    """Pixels inside the jaw hull and below the nostrils: only skin, lips and mouth can be there."""
    mask = _hull_mask(lm[:17], 0)
    yy = np.arange(SIZE)[:, None].repeat(SIZE, 1)
    return mask & (yy > lm[31:36, 1].max() + 2)


def test_lip_pixels_lie_inside_the_lip_landmarks(synth_set):
    cfg = SynthConfig(identities=2, clips_per_identity=3, seconds=SECONDS, size=SIZE, seed=SEED)
    checked = 0
    for mp4 in synth_set[:4]:
        identity = int(mp4.stem[5:8])
        clip = make_clip(cfg, identity, int(mp4.stem[-3:]))
        lips = np.array(sample_identity(SEED, identity).lips, np.float32)
        doc = json.loads(mp4.with_suffix(".json").read_text())
        sidecar = np.asarray(doc["landmarks"])
        assert np.array_equal(sidecar, clip.landmarks), "sidecar landmarks are the ones drawn"
        vr = decord.VideoReader(str(mp4))
        mouth = np.asarray(doc["factors"]["mouth_open"])
        for t in (int(np.argmin(mouth)), int(np.argmax(mouth)), FRAMES // 2):
            lm = sidecar[t]
            region = _lower_face(lm)
            # Drawn frame: pixels of exactly the lip colour are inside the outer-lip hull.
            raw = clip.frames[t].astype(np.float32)
            exact = (np.abs(raw - lips).max(axis=2) <= 2) & region
            assert exact.sum() > 15
            assert not (exact & ~_hull_mask(lm[48:60], 1)).any()
            # ...and the hull is mostly lips or mouth, not skin.
            skin = np.array(sample_identity(SEED, identity).skin, np.float32)
            inside = _hull_mask(lm[48:60], 0)
            skin_like = np.abs(raw - skin).max(axis=2) <= 12
            assert (skin_like & inside).sum() < 0.25 * inside.sum()
            # Decoded video (lossy): lip-coloured pixels still sit on the lip landmarks.
            dec = vr[t].asnumpy().astype(np.float32)
            # H.264 halves the chroma resolution, so "lip-coloured" is judged against the skin distance.
            near = (
                np.linalg.norm(dec - lips, axis=2) < min(40.0, 0.45 * np.linalg.norm(lips - skin))
            ) & region
            assert near.sum() > 10
            assert (near & _hull_mask(lm[48:60], 2)).sum() >= 0.97 * near.sum()
            checked += 1
    assert checked == 12


def test_expression_is_audible_and_blinks_are_realistic():
    ident = sample_identity(0, 0)
    loud = {}
    for e in (1, 2, 3):  # happy, sad, angry at full intensity, same speaker and words plan seed
        speech = synthesize(np.random.default_rng(5), 250, e, 1.0, ident.f0, ident.formant_scale)
        loud[EMOTIONS[e]] = float(np.sqrt((speech.waveform**2).mean()))
    assert loud["angry"] > loud["happy"] > loud["sad"]

    cfg = SynthConfig(identities=1, clips_per_identity=1, seconds=60.0, size=SIZE, seed=3)
    factors, _ = clip_plan(cfg, 0, 0)
    for eye in ("blink_left", "blink_right"):
        closed = factors[eye] > 0.05
        edges = np.flatnonzero(np.diff(closed.astype(int)))
        starts, ends = edges[0::2] + 1, edges[1::2] + 1
        durations = (ends - starts[: len(ends)]) / 25
        intervals = np.diff(starts) / 25
        assert 8 <= len(starts) <= 30, len(starts)  # every 2-6 s over a minute
        assert durations.min() >= 0.04 and durations.max() <= 0.4, durations
        assert intervals.min() >= 1.9 and intervals.max() <= 6.5, intervals
        assert factors[eye].max() > 0.8
    assert np.corrcoef(factors["blink_left"], factors["blink_right"])[0, 1] > 0.9  # both eyes blink together
    assert (
        factors["gaze_x"].std() > 0.2 and np.abs(np.diff(factors["yaw"])).max() < 2.0
    )  # gaze moves, head is smooth


def test_preview_and_cli(synth_set, tmp_path):
    png = preview(synth_set[0].parent, tmp_path / "sheet.png", landmarks=True, tile=96)
    sheet = cv2.imread(str(png))
    assert sheet.shape[0] == 18 + 2 * 96 and sheet.shape[1] == 4 * 96  # 2 speakers x 4 emotions (they cycle)

    from pipelines.cli import cli

    runner = CliRunner()
    params = str(REPO / "params.yaml")
    out = tmp_path / "cli"
    args = [
        "synth",
        "--out",
        f"file://{out}",
        "--identities",
        "1",
        "--clips-per-identity",
        "1",
        "--seconds",
        "1",
    ]
    result = runner.invoke(cli, [*args, "--params", params, "--preview"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "_synthtalk.json", "preview.png", "synth000_c000.json", "synth000_c000.mp4", "synth000_c000.txt",
    ]  # fmt: skip
    bad = runner.invoke(cli, [*args, "--params", params, "--set", "synth.size=63"])
    assert bad.exit_code != 0 and "size" in bad.output


@pytest.mark.services
def test_synth_writes_to_object_storage(s3_env):
    bucket = s3_env.create_bucket("synthtalk")
    paths = generate(f"s3://{bucket}/set", identities=1, clips_per_identity=1, seconds=1.0, size=64, seed=0)
    assert paths == [f"s3://{bucket}/set/synth000_c000.mp4"]
    assert [k for k in s3_env.keys(bucket) if not k.endswith("/")] == [
        "set/_synthtalk.json", "set/synth000_c000.json", "set/synth000_c000.mp4", "set/synth000_c000.txt",
    ]  # fmt: skip
