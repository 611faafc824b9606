"""The preprocessing job: sources -> Ray Data (one row per pending source) -> per-source Parquet files + _stats.json.

Each source's result is written atomically as `segments/<hash>.parquet` (+ `pairs/<hash>.parquet`) or
`rejects/<hash>.parquet` by the worker that processed it, so a source is done exactly when one of those files
exists: a re-run skips done sources, a new file is processed alone, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import sys
import tempfile
import time
import traceback
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import schema, storage
from preprocessing.finished import reconcile
from preprocessing.params import ParamsError, PreprocessParams
from preprocessing.sources import Source, discover, hash_all

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INTERNAL_SUFFIX = ".internal.parquet"  # rejects/<hash>.internal.parquet: an internal error, retried on re-run
# A video with no face found whose frames are this small is looked at again enlarged to ENLARGE_TO px: a face found
# then was too small for the detector (face_too_small), not absent (no_face).
SMALL_FRAME = 256
ENLARGE_TO = 320


# ---- per-source work ---------------------------------------------------------------------------------------------


class _Clock:
    """Seconds spent per stage of one source (reported in _stats.json and used by bench/preprocess.py)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


def _parquet_bytes(rows: list[dict], table_schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist(rows, schema=table_schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _resample_per_frame(values: list, count: int, src_fps: float, fps: float) -> list:
    idx = np.clip(np.floor(np.arange(count) / fps * src_fps + 1e-6).astype(int), 0, max(len(values) - 1, 0))
    return [values[i] for i in idx] if values else []


class SourceProcessor:
    """Processes one source row end to end and writes its files; never raises (errors become rejects).

    A class so Ray Data keeps one per actor: the landmark model and optional speech models load once per worker.
    """

    def __init__(self, params: dict, output: str):
        self.p = PreprocessParams(**params)
        self.output = output
        self._backend = None
        self._encoder = None
        self._transcriber = None
        self._limit_threads()
        self._warm_up()

    def _limit_threads(self) -> None:
        """One worker = its share of CPUs: OpenCV and torch default to a thread per core, which makes one worker
        take more than its share and the workers contend instead of scaling. torch is not imported for this: a
        dlib run never needs it (its import cost each worker ~0.7 s of start-up and ~200 MB); OMP_NUM_THREADS
        sizes its pool if a torch model (face_alignment, speech encoder, ASR) imports it later, and
        `_torch_threads` sets it again after such a model is built."""
        import cv2

        self._threads = max(1, math.floor(self.p.cpus_per_worker))
        cv2.setNumThreads(self._threads)
        os.environ["OMP_NUM_THREADS"] = str(self._threads)
        self._torch_threads()

    def _torch_threads(self) -> None:
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self._threads)

    def _warm_up(self) -> None:
        """Pay one-time costs (landmark model load, librosa's first-call JIT) when the worker starts, so each
        source's timing is its own."""
        from preprocessing import audio

        audio.mel_windows(np.zeros(2 * schema.SAMPLES_PER_FRAME, np.float32), 2)
        if self.p.landmark_backend != "sidecar":
            self.backend()

    # lazily built models ------------------------------------------------------------------------------------------
    def backend(self):
        if self._backend is None:
            from preprocessing.landmarks import make_backend

            name = "auto" if self.p.landmark_backend == "sidecar" else self.p.landmark_backend
            self._backend = make_backend(name, self.p.detect_every, self.p.detect_max_side)
            self._torch_threads()
        return self._backend

    def encoder(self):
        if self._encoder is None and self.p.speech_encoder:
            from preprocessing.audio import SpeechEncoder

            self._encoder = SpeechEncoder(self.p.speech_encoder)
            self._torch_threads()
        return self._encoder

    def transcriber(self):
        if self._transcriber is None and self.p.asr_model:
            from preprocessing.audio import Transcriber

            self._transcriber = Transcriber(self.p.asr_model)
            self._torch_threads()
        return self._transcriber

    # entry point ---------------------------------------------------------------------------------------------------
    def __call__(self, row: dict) -> dict:
        src = Source(**row)
        t0, c0, started = time.monotonic(), time.process_time(), time.time()
        summary = {
            "source": src.uri,
            "hash": src.hash,
            "status": "",
            "reason": "",
            "segments": 0,
            "frames": 0,
        }
        summary.update({"pairs": 0, "flags": [], "seconds": 0.0})
        try:
            result = self.process(src)
            summary.update(result, status="segments")
            self._clear_internal(src)
        except schema.RejectError as exc:
            self.reject(src, exc.step, exc.reason, exc.message)
            summary.update(status="rejected", reason=exc.reason)
            self._clear_internal(src)
        except Exception as exc:  # a bug or an unforeseen input: recorded, the run goes on
            tb = traceback.format_exc(limit=4)
            log.error("preprocess %s: %s", src.uri, tb)
            try:
                self.reject(
                    src, "internal", schema.INTERNAL_ERROR, f"{src.uri}: {type(exc).__name__}: {exc}\n{tb}"
                )
                summary.update(status="rejected", reason=schema.INTERNAL_ERROR)
            except Exception as exc2:  # cannot even write the reject (storage down): report, do not mark done
                summary.update(status="error", reason=f"{type(exc2).__name__}: {exc2}")
        summary["seconds"] = time.monotonic() - t0
        # wall-clock bounds (epoch seconds): the run's start-up, idle and tail time are read from them
        summary["started_at"], summary["ended_at"] = started, time.time()
        # CPU seconds of this worker process (decoder threads included): throughput per core on a shared machine
        summary["cpu_seconds"] = time.process_time() - c0
        return summary

    def reject(self, src: Source, step: str, reason: str, message: str) -> None:
        row = schema.reject_row(src.uri, src.hash, step, reason, message)
        data = _parquet_bytes([row], schema.REJECTS)
        # internal errors (bugs) get their own name: recorded, but retried by the next run
        name = f"{src.hash}{INTERNAL_SUFFIX}" if reason == schema.INTERNAL_ERROR else f"{src.hash}.parquet"
        storage.write_bytes_atomic(storage.join(self.output, "rejects", name), data)

    def _clear_internal(self, src: Source) -> None:
        """Drop an internal-error record of an earlier run once the source has a real outcome."""
        stale = storage.join(self.output, "rejects", f"{src.hash}{INTERNAL_SUFFIX}")
        if storage.exists(stale):
            fs, path = storage.resolve(stale)
            fs.delete_file(path)

    def process(self, src: Source) -> dict:
        with tempfile.TemporaryDirectory(prefix="edtalk-pre-") as tmp:
            local, wav = self._localise(src, tmp)
            return self._process_local(src, local, wav)

    def _localise(self, src: Source, tmp: str) -> tuple[str, str | None]:
        """Decoders need local files: object-storage sources (and their .wav sidecar) are copied to tmp first."""
        local = storage.local_path_or_none(src.uri)
        if local is not None:
            wav_local = storage.local_path_or_none(src.wav) if src.wav else None
            return str(local), (str(wav_local) if wav_local else None)
        try:
            path = str(storage.download(src.uri, tmp))
        except Exception as exc:
            raise schema.RejectError(schema.UNREADABLE, "read", f"{src.uri}: cannot be read ({exc})") from exc
        wav = str(storage.download(src.wav, os.path.join(tmp, "wav"))) if src.wav else None
        return path, wav

    def _sidecar(self, src: Source) -> dict:
        from preprocessing.sidecars import SidecarError, parse

        if not src.json:
            return {}
        try:
            return parse(storage.read_bytes(src.json), src.json)
        except (SidecarError, OSError) as exc:
            raise schema.RejectError(schema.UNREADABLE, "sidecar", str(exc)) from exc

    def _process_local(self, src: Source, path: str, wav_path: str | None) -> dict:
        from preprocessing import audio, swaps, tubes
        from preprocessing.decode import decode_video
        from preprocessing.landmarks import SidecarBackend

        p = self.p
        clock = _Clock()
        side = self._sidecar(src)
        speaker = (
            src.speaker
            or str(side.get("speaker") or "")
            or posixpath.splitext(posixpath.basename(src.uri))[0]
        )
        emotion = src.emotion or str(side.get("emotion") or "")
        split = src.split or str(side.get("split") or "") or p.default_split
        if split not in SPLITS:
            raise schema.RejectError(
                schema.UNREADABLE,
                "labels",
                f"{src.uri}: split {split!r} is not one of {SPLITS}; fix its label",
            )

        # 1. decode onto the 25 fps timeline
        video = decode_video(path, p.fps, p.max_seconds_per_video, p.decode_timeout_s)
        frames = video.frames
        count = len(frames)
        clock.lap("decode")
        min_frames = max(3, int(round(p.min_seconds * p.fps)))
        if count < min_frames:
            raise schema.RejectError(
                schema.TOO_SHORT,
                "decode",
                f"{src.uri}: {count} frame(s) at {p.fps:g} fps ({video.duration:.2f} s), fewer than "
                f"preprocess.min_seconds={p.min_seconds:g} s",
            )

        # 2. landmarks
        use_sidecar = p.landmark_backend == "sidecar" or (
            p.landmark_backend == "auto" and "landmarks" in side
        )
        if use_sidecar:
            if "landmarks" not in side:
                raise schema.RejectError(
                    schema.NO_FACE,
                    "landmarks",
                    f"{src.uri}: landmark_backend=sidecar but no NAME.json with 'landmarks' next to it",
                )
            track = SidecarBackend(side["landmarks"], float(side.get("fps") or video.source_fps)).track_at(
                count, p.fps
            )
        else:
            track = self.backend().track(frames)
            if not track.valid.any() or track.hits / max(track.probes, 1) < p.min_face_fraction:
                self._reject_small_face(src, frames)
        self._judge(src, track)
        _, sides = tubes.face_geometry(track.landmarks[track.valid])
        if float(np.median(sides)) < p.min_face_px:
            raise schema.RejectError(
                schema.FACE_TOO_SMALL,
                "landmarks",
                f"{src.uri}: the face is {np.median(sides):.0f} px (landmark box), below preprocess.min_face_px="
                f"{p.min_face_px}; use a higher-resolution video",
            )

        clock.lap("landmarks")

        # 3. audio: the container's track, else the .wav sidecar
        flags: list[str] = []
        wave = None
        try:
            wave = audio.audio_from_video(path)
        except audio.AudioError as exc:
            log.warning("%s: audio track unusable (%s); treating the video as silent", src.uri, exc)
        if wave is None and wav_path:
            try:
                wave = audio.load_audio(wav_path)
                flags.append(schema.FLAG_SIDECAR_AUDIO)
            except audio.AudioError as exc:
                log.warning("%s: sidecar audio unusable (%s)", src.wav, exc)
        has_audio = wave is not None
        if has_audio:
            wave = audio.fit_length(wave, count * schema.SAMPLES_PER_FRAME)
            speech = audio.speech_mask(wave, count)
            video_speech = float(speech.mean())
        else:
            flags.append(schema.FLAG_NO_AUDIO)
            wave = np.zeros(count * schema.SAMPLES_PER_FRAME, np.float32)
            speech = np.zeros(count, bool)
            video_speech = 0.0

        clock.lap("audio")

        # 4. transcript of the whole video (manifest, .txt, .json); per-segment ASR below when none
        from preprocessing.transcripts import TranscriptError, resolve_transcript

        try:
            text, _ = resolve_transcript(src.uri, src.transcript, side or None, None, None)
        except TranscriptError as exc:
            raise schema.RejectError(schema.UNREADABLE, "transcript", f"{src.uri}: {exc}") from exc

        # 5. tubes, segments, pairs
        factors = side.get("factors") if isinstance(side.get("factors"), dict) else None
        if factors:
            ffps = float(side.get("fps") or video.source_fps)
            factors = {k: _resample_per_frame(list(v), count, ffps, p.fps) for k, v in factors.items()}
        rng = np.random.default_rng([p.seed, int(hashlib.sha256(src.hash.encode()).hexdigest()[:8], 16)])
        seg_rows, pair_rows = [], []
        for n, (start, end) in enumerate(
            tubes.split_segments(track.landmarks, p.segment_frames, p.tube_min_iou)
        ):
            seg_id = f"{src.hash[:16]}_{n:03d}"
            lms_src = track.landmarks[start:end]
            box = tubes.tube_box(lms_src, p.crop_scale, p.crop_shift_up)
            crops = tubes.crop(frames[start:end], box, p.size)
            lms = tubes.to_crop(lms_src, box, p.size)
            jpegs = [schema.encode_jpeg(f, p.jpeg_quality) for f in crops]
            clock.lap("crop_encode")
            t_len = end - start
            seg_wave = wave[start * schema.SAMPLES_PER_FRAME : end * schema.SAMPLES_PER_FRAME]
            ratio = float(speech[start:end].mean()) if has_audio else 0.0
            # speech needs both: the video as a whole (a music track has speech-like bursts) and this segment
            speaks = has_audio and video_speech >= p.min_speech_ratio and ratio >= p.min_speech_ratio
            seg_flags = list(flags)
            if has_audio and not speaks:
                seg_flags.append(schema.FLAG_NO_SPEECH)
            states, dim = None, 0
            if self.encoder() is not None and has_audio:
                arr = self.encoder().states(seg_wave, t_len)
                states, dim = schema.f32_bytes(arr), int(arr.shape[1])
            seg_text = text
            if not seg_text and self.transcriber() is not None and speaks:
                seg_text = self.transcriber().transcribe(seg_wave).strip()
            mel = audio.mel_windows(seg_wave, t_len)
            clock.lap("audio_features")
            seg_rows.append(
                {
                    "segment_id": seg_id,
                    "source": src.uri,
                    "source_hash": src.hash,
                    "speaker": speaker,
                    "emotion": emotion,
                    "split": split,
                    "start_frame": start,
                    "num_frames": t_len,
                    "fps": p.fps,
                    "size": p.size,
                    "frames": jpegs,
                    "landmarks": schema.f32_bytes(lms),
                    "box": [float(v) for v in box],
                    "audio": schema.f32_bytes(seg_wave),
                    "mel": schema.f32_bytes(mel),
                    "has_audio": has_audio,
                    "speech_ratio": ratio,
                    "audio_usable": speaks,
                    "flags": seg_flags,
                    "transcript": seg_text,
                    "speech_states": states,
                    "speech_states_dim": dim,
                    "factors": json.dumps({k: v[start:end] for k, v in factors.items()}) if factors else None,
                }
            )
            for kind in swaps.KINDS:
                made = swaps.make_pairs(crops, lms, kind, p.pairs_per_segment, p.mask_feather, rng)
                for k, pair in enumerate(made):
                    a, b, i = pair["index_a"], pair["index_b"], pair["index_id"]
                    pair_rows.append(
                        {
                            "pair_id": f"{seg_id}_{kind}{k}",
                            "segment_id": seg_id,
                            "kind": kind,
                            "index_a": a,
                            "index_b": b,
                            "index_id": i,
                            "frame_a": seg_rows[-1]["frames"][a],
                            "frame_b": seg_rows[-1]["frames"][b],
                            "frame_id": seg_rows[-1]["frames"][i],
                            "a_on_b": schema.encode_jpeg(pair["a_on_b"], p.jpeg_quality),
                            "b_on_a": schema.encode_jpeg(pair["b_on_a"], p.jpeg_quality),
                            "mask_on_b": schema.encode_png(pair["mask_on_b"]),
                            "mask_on_a": schema.encode_png(pair["mask_on_a"]),
                        }
                    )
            clock.lap("pairs")
        if not seg_rows:
            raise schema.RejectError(
                schema.NO_FACE,
                "tubes",
                f"{src.uri}: no steady face tube of at least {tubes.MIN_PIECE} frames (the face jumps every few frames)",
            )
        # pairs first: the segments file is the "done" marker
        storage.write_bytes_atomic(
            storage.join(self.output, "pairs", f"{src.hash}.parquet"), _parquet_bytes(pair_rows, schema.PAIRS)
        )
        storage.write_bytes_atomic(
            storage.join(self.output, "segments", f"{src.hash}.parquet"),
            _parquet_bytes(seg_rows, schema.SEGMENTS),
        )
        clock.lap("write")
        all_flags = sorted({f for r in seg_rows for f in r["flags"]})
        return {
            "stage_seconds": {k: round(v, 4) for k, v in clock.times.items()},
            "segments": len(seg_rows),
            "frames": int(sum(r["num_frames"] for r in seg_rows)),
            "pairs": len(pair_rows),
            "flags": all_flags,
            "decoded_frames": count,
            # frames in face tubes too short to keep (between cuts / big moves); reported, not silent
            "frames_left_out": count - int(sum(r["num_frames"] for r in seg_rows)),
        }

    def _reject_small_face(self, src: Source, frames: np.ndarray) -> None:
        """No face found in a small video: look at three frames enlarged; a face found there is too small for the
        detector, and is reported as face_too_small with its size."""
        import cv2

        from preprocessing.landmarks import landmark_box

        side = min(frames.shape[1:3])
        if side >= SMALL_FRAME or not len(frames):
            return
        scale = ENLARGE_TO / side
        for t in np.linspace(0, len(frames) - 1, 3).astype(int):
            big = cv2.resize(frames[t], None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            faces = self.backend().faces_in_image(big)
            if not faces:
                continue
            box = landmark_box(faces[0].landmarks) / scale
            face = float(max(box[2] - box[0], box[3] - box[1]))
            if face < max(self.p.min_face_px, self.backend().detector_min_face_px):
                raise schema.RejectError(
                    schema.FACE_TOO_SMALL,
                    "landmarks",
                    f"{src.uri}: the face is about {face:.0f} px in a {frames.shape[2]}x{frames.shape[1]} video, "
                    f"too small for the {self.backend().name} face detector (it finds faces from about "
                    f"{self.backend().detector_min_face_px} px) and below preprocess.min_face_px={self.p.min_face_px}; "
                    "use a higher-resolution video",
                )

    def _judge(self, src: Source, track) -> None:
        p = self.p
        probes = max(track.probes, 1)
        if track.multi / probes >= p.multi_face_fraction:
            raise schema.RejectError(
                schema.MULTIPLE_FACES,
                "landmarks",
                f"{src.uri}: two or more faces in {track.multi} of {track.probes} probed frames; "
                "crop the video to one speaker",
            )
        if not track.valid.any() or track.hits / probes < p.min_face_fraction:
            raise schema.RejectError(
                schema.NO_FACE,
                "landmarks",
                f"{src.uri}: a face was found in {track.hits} of {track.probes} probed frames (needs "
                f"preprocess.min_face_fraction={p.min_face_fraction:g}); is this a talking-face video?",
            )


# ---- the job -------------------------------------------------------------------------------------------------------


def done_hashes(output: str) -> set[str]:
    """Hashes of the sources that already have a segments or rejects file under `output` (internal-error records
    do not count: those sources are tried again)."""
    done = set()
    for table in ("segments", "rejects"):
        folder = storage.join(output, table)
        if storage.exists(folder):
            done.update(
                posixpath.basename(f)[: -len(".parquet")]
                for f in storage.list_files(folder, ".parquet")
                if not f.endswith(INTERNAL_SUFFIX)
            )
    return done


def preflight(params: PreprocessParams) -> None:
    """Fail before starting Ray when the configuration cannot work, instead of rejecting every video."""
    if params.landmark_backend == "face_alignment":
        from preprocessing.landmarks import make_backend, missing_face_alignment_weights

        if missing_face_alignment_weights():
            make_backend("face_alignment")  # raises LandmarkBackendError saying which files to put where
    for key in ("speech_encoder", "asr_model"):
        folder = getattr(params, key)
        if folder and not storage.exists(folder):
            raise ParamsError(f'preprocess.{key}={folder!r} does not exist: give a local model folder or ""')


def _totals(output: str) -> dict:
    """Row counts of the whole output folder (all runs), from Parquet footers only."""
    totals = {}
    for table in ("segments", "pairs", "rejects"):
        folder = storage.join(output, table)
        n = 0
        if storage.exists(folder):
            for f in storage.list_files(folder, ".parquet"):
                with storage.open_input(f) as fh:
                    n += pq.ParquetFile(fh).metadata.num_rows
        totals[table] = n
    return totals


def run(input_spec: str, output: str, params: PreprocessParams, progress: bool = True) -> dict:
    """Process every source of `input_spec` not yet done in `output`; write `_stats.json`; return the stats."""
    t0, wall0 = time.monotonic(), time.time()
    sources = hash_all(discover(input_spec))
    unique: dict[str, Source] = {}
    duplicates = []
    for src in sources:
        if src.hash in unique:
            duplicates.append({"source": src.uri, "same_content_as": unique[src.hash].uri})
            log.warning("%s has the same content as %s: processed once", src.uri, unique[src.hash].uri)
        else:
            unique[src.hash] = src
    preflight(params)
    storage.makedirs(output)
    done = done_hashes(output)
    renamed, label_changes = reconcile(output, sources, done)
    pending = [s for h, s in unique.items() if h not in done]
    log.info(
        "preprocess: %d input(s), %d already done, %d to process",
        len(sources),
        len(unique) - len(pending),
        len(pending),
    )
    results = _run_ray(pending, output, params, progress) if pending else []

    seconds = time.monotonic() - t0
    phases = _phases(results, wall0, wall0 + seconds, max(1, min(params.workers, len(pending))))
    rejects: dict[str, int] = {}
    for r in results:
        if r["status"] == "rejected":
            rejects[r["reason"]] = rejects.get(r["reason"], 0) + 1
    frames = sum(r["frames"] for r in results)
    stats = {
        "inputs": len(sources),
        "skipped": len(unique) - len(pending),
        "processed": len(pending),
        "duplicates": duplicates,
        "renamed": renamed,
        "label_changes": label_changes,
        "segments": sum(r["segments"] for r in results),
        "frames": frames,
        "decoded_frames": sum(r.get("decoded_frames", 0) for r in results),
        "frames_left_out": sum(r.get("frames_left_out", 0) for r in results),
        "pairs": sum(r["pairs"] for r in results),
        "rejects": rejects,
        "errors": [{"source": r["source"], "error": r["reason"]} for r in results if r["status"] == "error"],
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 2) if seconds > 0 else 0.0,
        "phases": phases,
        "totals": _totals(output),
        "params": asdict(params),
        "sources": sorted(results, key=lambda r: r["source"]),
    }
    storage.write_bytes_atomic(storage.join(output, "_stats.json"), json.dumps(stats, indent=2).encode())
    return stats


def _phases(results: list[dict], start: float, end: float, workers: int) -> dict:
    """Where the wall clock of a run went: `startup` (discovery, hashing, Ray and worker start until the first
    source starts), `processing` (first start to last end), `tail` (last end to the run's end: collecting the
    results, stats); `worker_busy_share`: summed per-source seconds / (workers x processing), below 1 when a
    worker waited for work or the run ended on one long input."""
    stamped = [r for r in results if "started_at" in r and "ended_at" in r]
    if not stamped:
        return {"startup": round(end - start, 3), "processing": 0.0, "tail": 0.0, "worker_busy_share": 0.0}
    first = min(r["started_at"] for r in stamped)
    last = max(r["ended_at"] for r in stamped)
    span = max(last - first, 1e-9)
    busy = sum(r["ended_at"] - r["started_at"] for r in stamped)
    return {
        "startup": round(first - start, 3),
        "processing": round(span, 3),
        "tail": round(max(end - last, 0.0), 3),
        "worker_busy_share": round(busy / (workers * span), 3),
    }


def _run_ray(pending: list[Source], output: str, params: PreprocessParams, progress: bool) -> list[dict]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from preprocessing import local_ray

    local_ray.init(log_to_driver=True)  # RAY_ADDRESS's cluster, else a loopback-only local instance
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    workers = max(1, min(params.workers, len(pending)))
    # Largest inputs first (longest-processing-time order): the last video no longer runs alone while the other
    # workers idle. A fixed pool of `workers` actors: an autoscaling pool starts with one and adds the rest late.
    ordered = sorted(pending, key=lambda s: -s.size)
    ds = ray.data.from_items([s.to_dict() for s in ordered], override_num_blocks=len(ordered))
    ds = ds.map(
        SourceProcessor,
        fn_constructor_kwargs={"params": params.to_dict(), "output": output},
        compute=ActorPoolStrategy(size=workers),
        num_cpus=params.cpus_per_worker,
    )
    return ds.take_all()


def summary_table(stats: dict) -> str:
    """A short human-readable table of a run's stats."""
    lines = [
        f"{'inputs':<22}{stats['inputs']:>10}",
        f"{'already done':<22}{stats['skipped']:>10}",
        f"{'processed':<22}{stats['processed']:>10}",
        f"{'segments':<22}{stats['segments']:>10}",
        f"{'frames':<22}{stats['frames']:>10}",
        f"{'pairs':<22}{stats['pairs']:>10}",
    ]
    for reason, n in sorted(stats["rejects"].items()):
        lines.append(f"{'rejected: ' + reason:<22}{n:>10}")
    if stats["duplicates"]:
        lines.append(f"{'duplicate content':<22}{len(stats['duplicates']):>10}")
    if stats["errors"]:
        lines.append(f"{'errors (not recorded)':<22}{len(stats['errors']):>10}")
    lines.append(f"{'seconds':<22}{stats['seconds']:>10.1f}")
    lines.append(f"{'frames/s':<22}{stats['frames_per_s']:>10.1f}")
    t = stats["totals"]
    lines.append(
        f"{'output totals':<22}{t['segments']:>4} segments, {t['pairs']} pairs, {t['rejects']} rejects"
    )
    return "\n".join(lines)
