"""The whole preprocessing job on real media with real Ray, run once per session; many checks on its output.

The input is a JSONL manifest of real clips (capped at 4 s each) plus bad files made here; a second run adds one
file; a third run (through the CLI) must process nothing.
"""

from __future__ import annotations

import json
import shutil

import av
import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from testkit import write_video

from preprocessing import schema
from preprocessing.dataset import read_rows
from preprocessing.landmarks import DlibBackend
from preprocessing.params import PreprocessParams

# one real Ray run of ~700 frames (about 40 s on an idle 2-core machine) shared by every test here
pytestmark = pytest.mark.slow

MAX_S = 4.0
REAL = [
    "edge_cases/DPE__s.mp4",  # no audio stream
    "edge_cases/LivePortrait__d18.mp4",  # 30 fps, digital-silence track
    "edge_cases/LivePortrait__d12.mp4",  # music, fast head motion
    "videos/EDTalk__mouth_source.mp4",  # silent video + .wav sidecar
    "videos/LivePortrait__d20.mp4",  # speech
]
ADDED = "videos/EDTalk__uncrop_Obama.mp4"


def first_frames(path, n):
    with av.open(str(path)) as c:
        out = []
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, media_dir):
    """Bad files -> the reason each must be rejected with."""
    d = tmp_path_factory.mktemp("bad")
    (d / "zero.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes((media_dir / ADDED).read_bytes()[:150_000])
    (d / "text.mp4").write_text("not a video at all\n")
    shutil.copy(media_dir / "images" / "SadTalker__happy.png", d / "image.mp4")
    a = first_frames(media_dir / "edge_cases" / "DPE__s.mp4", 1)[0]
    write_video(d / "one_frame.mp4", [a])
    b = first_frames(media_dir / "videos" / "EDTalk__mouth_source.mp4", 1)[0]
    write_video(d / "two_faces.mp4", [np.concatenate([a, b], axis=1)] * 40)
    write_video(d / "no_face.mp4", [np.full((128, 128, 3), 90 + i, np.uint8) for i in range(40)])
    small = np.full((360, 360, 3), 120, np.uint8)  # a real face ~40 px wide, under min_face_px=48
    small[130:210, 130:210] = cv2.resize(a, (80, 80), interpolation=cv2.INTER_AREA)
    write_video(d / "small_face.mp4", [small] * 40)
    return {
        str(d / "zero.mp4"): schema.UNREADABLE,
        str(d / "truncated.mp4"): schema.UNREADABLE,
        str(d / "text.mp4"): schema.UNREADABLE,
        str(d / "image.mp4"): schema.UNREADABLE,
        str(d / "one_frame.mp4"): schema.TOO_SHORT,
        str(d / "two_faces.mp4"): schema.MULTIPLE_FACES,
        str(d / "no_face.mp4"): schema.NO_FACE,
        str(d / "small_face.mp4"): schema.FACE_TOO_SMALL,
    }


@pytest.fixture(scope="session")
def run_output(tmp_path_factory, media_dir, bad_inputs):
    """Run 1 (real + bad), run 2 (one file added): returns (output dir, stats1, stats2, manifest path)."""
    import ray

    from preprocessing.pipeline import run

    d = tmp_path_factory.mktemp("pre")
    manifest = d / "inputs.jsonl"
    rows = [{"path": str(media_dir / p), "speaker": p.split("__")[0].split("/")[-1]} for p in REAL]
    rows += [{"path": p} for p in bad_inputs]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "out"
    params = PreprocessParams(max_seconds_per_video=MAX_S, workers=2)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        stats1 = run(str(manifest), str(out), params, progress=False)
        with manifest.open("a") as f:
            f.write(json.dumps({"path": str(media_dir / ADDED), "split": "val"}) + "\n")
        stats2 = run(str(manifest), str(out), params, progress=False)
        yield out, stats1, stats2, manifest
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def segments(run_output):
    out = run_output[0]
    return [schema.decode_segment(r) for r in read_rows(str(out), "segments")]


def by_source(segments, name):
    found = [s for s in segments if s["source"].endswith(name)]
    assert found, f"no segments for {name}"
    return found


def test_every_input_ends_in_segments_or_rejects(run_output, media_dir, bad_inputs):
    out, stats1, stats2, _ = run_output
    rejects = {r["source"]: r for r in read_rows(str(out), "rejects")}
    seg_sources = {r["source"] for r in read_rows(str(out), "segments", columns=["source"])}
    for p in REAL + [ADDED]:
        assert str(media_dir / p) in seg_sources, (p, rejects.get(str(media_dir / p)))
    for path, reason in bad_inputs.items():
        assert path in rejects, f"{path} neither processed nor rejected"
        assert rejects[path]["reason"] == reason, rejects[path]
        assert rejects[path]["message"], rejects[path]
    assert not seg_sources & set(rejects)
    assert stats1["inputs"] == len(REAL) + len(bad_inputs) and stats1["processed"] == stats1["inputs"]
    assert sum(stats1["rejects"].values()) == len(bad_inputs) and not stats1["errors"]
    assert stats1["rejects"][schema.UNREADABLE] == 4


def test_adding_a_file_processes_only_that_file_and_a_rerun_nothing(run_output, media_dir):
    from pipelines.cli import cli

    out, stats1, stats2, manifest = run_output
    assert stats2["processed"] == 1 and stats2["skipped"] == stats1["processed"]
    assert [s["source"] for s in stats2["sources"]] == [str(media_dir / ADDED)]
    result = CliRunner().invoke(
        cli,
        ["preprocess", "--input", str(manifest), "--output", str(out), "--no-progress"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    stats3 = json.loads((out / "_stats.json").read_text())
    assert stats3["processed"] == 0 and stats3["segments"] == 0 and stats3["skipped"] == stats3["inputs"]
    assert "already done" in result.output
    assert stats3["totals"]["segments"] == stats1["segments"] + stats2["segments"]


def test_stats_file_counts(run_output):
    out, stats1, _, _ = run_output
    for key in ("inputs", "segments", "frames", "pairs", "rejects", "seconds", "frames_per_s"):
        assert key in stats1
    assert stats1["frames"] == sum(s["frames"] for s in stats1["sources"]) > 0
    assert stats1["pairs"] == 4 * stats1["segments"]  # 2 mouth + 2 eye per segment
    # the wall clock split into start-up, processing and tail adds up to the run's seconds
    ph = stats1["phases"]
    assert ph["startup"] > 0 and ph["processing"] > 0 and ph["tail"] >= 0
    assert abs(ph["startup"] + ph["processing"] + ph["tail"] - stats1["seconds"]) < 0.05
    assert 0.0 < ph["worker_busy_share"] <= 1.0
    for s in stats1["sources"]:
        assert s["started_at"] <= s["ended_at"]
        assert abs((s["ended_at"] - s["started_at"]) - s["seconds"]) < 0.05


def test_audio_flags(segments):
    for s in by_source(segments, "DPE__s.mp4"):
        assert not s["has_audio"] and not s["audio_usable"] and "no_audio" in s["flags"]
        assert not s["audio"].any()
    for name in ("LivePortrait__d18.mp4", "LivePortrait__d12.mp4"):
        for s in by_source(segments, name):
            assert s["has_audio"] and "no_speech" in s["flags"] and not s["audio_usable"], (
                name,
                s["speech_ratio"],
            )
    for s in by_source(segments, "EDTalk__mouth_source.mp4"):
        assert s["has_audio"] and "sidecar_audio" in s["flags"] and s["audio_usable"], s["speech_ratio"]
        assert s["audio"].std() > 1e-3
    d20 = by_source(segments, "LivePortrait__d20.mp4")  # speech, with pauses: most of it usable
    usable = sum(s["num_frames"] for s in d20 if s["audio_usable"]) / sum(s["num_frames"] for s in d20)
    assert usable > 0.5 and all(set(s["flags"]) <= {"no_speech"} for s in d20)
    assert all(("no_speech" in s["flags"]) != s["audio_usable"] for s in d20)


def test_frames_timeline_and_arrays(segments):
    for s in segments:
        t = s["num_frames"]
        assert s["frames"].shape == (t, 256, 256, 3) and s["size"] == 256 and s["fps"] == 25
        assert s["landmarks"].shape == (t, 68, 2) and s["mel"].shape == (t, 80, 16)
        assert s["audio"].shape == (t * 640,) and 3 <= t <= 125
        assert s["split"] == ("val" if s["source"].endswith(ADDED) else "train")
    d18 = sorted(by_source(segments, "LivePortrait__d18.mp4"), key=lambda s: s["start_frame"])
    assert sum(s["num_frames"] for s in d18) == round(MAX_S * 25)  # 30 fps in, 25 fps out
    assert [s["start_frame"] for s in d18] == list(np.cumsum([0] + [s["num_frames"] for s in d18[:-1]]))
    assert by_source(segments, "DPE__s.mp4")[0]["speaker"] == "DPE"


def test_crops_centre_the_face_and_landmarks_lie_on_it(segments):
    detector = DlibBackend()
    for s in segments:
        lms = s["landmarks"]
        centre = (lms.min(1) + lms.max(1)) / 2
        # one box per tube: the face is centred on average (its landmark box sits crop_shift_up lower, for the
        # forehead) and stays near the centre while the head moves
        expected = np.array([128, 128 + 256 * 0.12 / 1.8])
        assert np.all(np.abs(centre.mean(0) - expected) < 0.08 * 256), (s["segment_id"], centre.mean(0))
        assert np.all(np.abs(centre - expected) < 0.25 * 256), s["segment_id"]
        assert np.all(lms[:, 48:68, 1] > 128), s["segment_id"]  # mouth in the lower half
        assert np.all(lms[:, 36:48, 1].mean(1) < lms[:, 48:68, 1].mean(1))  # eyes above the mouth
        # an independent detection on the stored crop finds the same landmarks
        t = s["num_frames"] // 2
        gray = cv2.cvtColor(s["frames"][t], cv2.COLOR_RGB2GRAY)
        boxes = detector.detect(gray)
        assert boxes, s["segment_id"]
        ref = detector.shape(gray, boxes[0])
        assert np.linalg.norm(ref - lms[t], axis=1).mean() < 0.06 * np.ptp(ref[:, 0]), s["segment_id"]


def test_swap_pairs_change_only_the_masked_region(run_output, segments):
    out = run_output[0]
    seg_frames = {s["segment_id"]: s for s in segments}
    pairs = [schema.decode_pair(r) for r in read_rows(str(out), "pairs")]
    assert {p["kind"] for p in pairs} == {"mouth", "eye"}
    for p in pairs:
        seg = seg_frames[p["segment_id"]]
        a, b, i = p["index_a"], p["index_b"], p["index_id"]
        assert len({a, b, i}) == 3 and max(a, b, i) < seg["num_frames"]
        for img, mask, base in (
            (p["a_on_b"], p["mask_on_b"], p["frame_b"]),
            (p["b_on_a"], p["mask_on_a"], p["frame_a"]),
        ):
            diff = np.abs(img.astype(np.int16) - base.astype(np.int16)).max(axis=2)
            outside, inside = mask == 0, mask > 200
            assert 0.002 < inside.mean() < 0.2, p["pair_id"]
            assert np.mean(diff[outside] > 12) < 0.003, p["pair_id"]  # JPEG noise only outside the mask
        if p["kind"] == "mouth":
            ys, _ = np.nonzero(p["mask_on_b"] > 128)
            lm_b = seg["landmarks"][b]
            assert abs(ys.mean() - lm_b[48:60, 1].mean()) < 12  # the mask sits on b's mouth
    mouth_masks = [p["mask_on_b"] for p in pairs if p["kind"] == "mouth"]
    assert all(np.nonzero(m > 128)[0].mean() > 128 for m in mouth_masks)


def test_ray_loaders_read_the_tables(run_output, segments):
    import ray

    from preprocessing import load_rejects, load_segments

    out = str(run_output[0])
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    ds = load_segments(out, columns=["segment_id", "num_frames"])
    assert ds.count() == len(segments)
    assert {r["reason"] for r in load_rejects(out).take_all()} >= {schema.UNREADABLE, schema.MULTIPLE_FACES}
