"""Training data: Parquet tables of `edtalk preprocess` -> Ray Datasets of training samples.

Every sample builder is a Ray Data transform seeded by (seed, segment id), so the same seed gives the same samples
in the same order (the runner turns on `preserve_order`), which makes restarts reproduce an uninterrupted run.
Samples hold images as HxWx3 uint8 and masks as HxW uint8; the runner turns them into [-1, 1] / [0, 1] tensors.
A row that cannot be decoded is logged with its id and skipped (one bad row must not abort the dataset).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing import storage
from preprocessing.schema import SAMPLES_PER_FRAME, decode_jpeg, decode_pair, f32_array

log = logging.getLogger(__name__)

UDF_CPUS = 0.25  # fractional, so transforms never starve the read tasks on a 2-core machine
# Decoded training samples up to this size are built once and kept in Ray's object store for the whole run
# (a stage's samples are the same every epoch: seeded by segment); larger sets stream read -> decode every epoch.
CACHE_MB = 1024

RowFn = Callable[[dict], list[dict]]  # one table row -> the training samples built from it


class DataError(ValueError):
    """Training data that cannot be used (missing tables, no rows for a stage)."""


def stable_hash(text: str) -> int:
    """A 32-bit hash of a string that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:4], "little")


def rng_for(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), stable_hash(key)])


# ------------------------------------------------------------------------------------------------ tables, split


def table_files(data_dir: str, table: str) -> list[str]:
    """The Parquet files of one table; a clear error when the preprocess output is missing."""
    uri = storage.join(data_dir, table)
    files = storage.list_files(uri, suffix=".parquet") if storage.exists(uri) else []
    if not files:
        raise DataError(
            f"no Parquet files in {uri}: training reads the output of `edtalk preprocess --output {data_dir}` "
            f"(or set train.data_dir to where it wrote)"
        )
    return files


def segment_splits(data_dir: str) -> dict[str, str]:
    """segment_id -> split, reading only those two columns (cheap even for large tables)."""
    out: dict[str, str] = {}
    for uri in table_files(data_dir, "segments"):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["segment_id", "split"])
        out.update(
            zip(table.column("segment_id").to_pylist(), table.column("split").to_pylist(), strict=True)
        )
    if not out:
        raise DataError(f"{storage.join(data_dir, 'segments')} holds no segments: nothing to train on")
    return out


def train_val_ids(splits: dict[str, str], val_fraction: float) -> tuple[list[str], list[str], str]:
    """(train ids, val ids, how): the data's own `val` rows, else a deterministic hash split of the rest.

    `test` rows are never trained on. With a single usable segment, validation reuses it (said in `how`).
    """
    usable = sorted(s for s, split in splits.items() if split != "test")
    val = sorted(s for s in usable if splits[s] == "val")
    if val:
        return [s for s in usable if splits[s] == "train"], val, "split column"
    if len(usable) == 0:
        raise DataError("every segment is in the test split: nothing to train on")
    if len(usable) == 1:
        return usable, usable, "single segment (validation reuses the training segment)"
    scored = sorted(usable, key=lambda s: (stable_hash("val:" + s), s))
    n_val = max(1, int(round(val_fraction * len(usable))))
    val = sorted(scored[:n_val])
    return [s for s in usable if s not in set(val)], val, f"hash split ({n_val} of {len(usable)} segments)"


def _mask(table: pa.Table, ids: list[str], row_filter: dict[str, Any]):
    mask = pc.is_in(table.column("segment_id"), value_set=pa.array(sorted(ids), pa.string()))
    for column, value in row_filter.items():
        mask = pc.and_(mask, pc.equal(table.column(column), value))
    return mask


def samples_dataset(data_dir: str, table: str, ids: list[str], row_filter: dict[str, Any], fn: RowFn):
    """A Ray Dataset of training samples: the rows of `table` for segments `ids` (and `row_filter`), each turned
    into samples by `fn` in a Ray Data flat_map."""
    import ray.data

    files = table_files(data_dir, table)
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    conditions = dict(row_filter or {})

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(_mask(batch, ids, conditions))

    ds = ray.data.read_parquet(paths, filesystem=fs)
    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=UDF_CPUS).flat_map(fn, num_cpus=UDF_CPUS)


def _nbytes(sample: dict) -> int:
    return sum(np.asarray(v).nbytes for v in sample.values())


def estimate_bytes(
    data_dir: str, table: str, ids: list[str], row_filter: dict[str, Any], fn: RowFn, probe_rows: int = 4
) -> tuple[int, int]:
    """(matching rows, estimated bytes of all their decoded samples): the samples of the first `probe_rows`
    matching rows are built here and their mean size per row is scaled by the row count (read from the id and
    filter columns only)."""
    conditions = dict(row_filter or {})
    columns = ["segment_id", *conditions]
    rows = 0
    for uri in table_files(data_dir, table):
        fs, path = storage.resolve(uri)
        part = pq.read_table(path, filesystem=fs, columns=columns)
        rows += int(pc.sum(pc.cast(_mask(part, ids, conditions), pa.int64())).as_py() or 0)
    probed, size = 0, 0
    for uri in table_files(data_dir, table):
        fs, path = storage.resolve(uri)
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=probe_rows):
            part = pa.Table.from_batches([batch])
            for row in part.filter(_mask(part, ids, conditions)).to_pylist():
                size += sum(_nbytes(x) for x in fn(row))
                probed += 1
                if probed >= probe_rows:
                    return rows, size * rows // probed
    return rows, (size * rows // probed) if probed else 0


def fits_cache(estimated_bytes: int, budget_mb: float) -> bool:
    return budget_mb > 0 and estimated_bytes <= budget_mb * 2**20


def cache_if_fits(ds, estimated_bytes: int, budget_mb: float, name: str = "train"):
    """`ds` materialized in Ray's object store when its estimated size fits `budget_mb` (0 = never), else as is.

    Returns (dataset, cached). A materialized dataset is read -> decoded once: every later epoch (and a restarted
    worker) iterates the stored blocks instead of re-running the pipeline, which on small sets costs more than the
    training steps. Built in order (preserve_order), so the samples and their order match the streamed dataset.
    """
    import time

    if not fits_cache(estimated_bytes, budget_mb):
        return ds, False
    # The dataset's own context (a copy taken when it was made): without preserve_order the blocks (and rows) of
    # the flat_map come in completion order, so the cache would differ run to run and break restarts.
    ds.context.execution_options.preserve_order = True
    t0 = time.perf_counter()
    cached = ds.materialize()
    log.info(
        "%s samples cached in the object store: %d rows, %.1f MiB (estimated %.1f), %.1f s",
        name,
        cached.count(),
        cached.size_bytes() / 2**20,
        estimated_bytes / 2**20,
        time.perf_counter() - t0,
    )
    return cached, True


def local_samples(
    data_dir: str,
    table: str,
    ids: list[str],
    row_filter: dict[str, Any],
    fn: RowFn,
    limit: int,
    columns: list[str] | None = None,
) -> list[dict]:
    """The first `limit` samples the same way, read in this process (validation: small, no Ray job needed).
    `columns`: only these (plus segment_id and the filter's) are read; None = all."""
    if columns is not None:
        columns = sorted({*columns, "segment_id", *(row_filter or {})})
    out: list[dict] = []
    for uri in table_files(data_dir, table):
        fs, path = storage.resolve(uri)
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=16, columns=columns):
            rows = pa.Table.from_batches([batch])
            rows = rows.filter(_mask(rows, ids, dict(row_filter or {})))
            for row in rows.to_pylist():
                out.extend(fn(row))
                if len(out) >= limit:
                    return out[:limit]
    return out


# -------------------------------------------------------------------------------------------- sample builders


def _frames(row: dict, indices) -> np.ndarray:
    return np.stack([decode_jpeg(row["frames"][int(i)]) for i in indices])


def _guarded(name: str, key: str, build) -> list[dict]:
    try:
        return list(build())
    except Exception as exc:  # one bad row must not abort the dataset; say which and why
        log.warning("%s: skipping %s: %s: %s", name, key, type(exc).__name__, exc)
        return []


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """(T,68,2) landmarks -> (T,) mouth opening: the distance between the inner-lip midpoints 62 and 66."""
    return np.linalg.norm(landmarks[:, 62] - landmarks[:, 66], axis=-1)


def mouth_shape(landmarks: np.ndarray) -> np.ndarray:
    """(68,2) landmarks -> (40,) float32: the 20 mouth points (48-67) about their centroid, in a frame turned so
    the eye line is horizontal and scaled by the distance between the eye centres, times 4 (values of order 1).
    What the mouth does, with the head's position, roll and size taken out."""
    lm = np.asarray(landmarks, np.float64)
    left, right = lm[36:42].mean(0), lm[42:48].mean(0)
    axis = right - left
    iod = float(np.linalg.norm(axis))
    if not np.isfinite(iod) or iod < 1e-6:
        return np.zeros(40, np.float32)
    c, s = axis / iod
    rot = np.array([[c, s], [-s, c]])  # rows: the eye line's direction and its normal
    mouth = (lm[48:68] - lm[48:68].mean(0)) @ rot.T / iod
    return (4.0 * mouth).reshape(-1).astype(np.float32)


def frame_pairs(
    per_segment: int,
    seed: int,
    mouth_mask: bool = False,
    mouth_contrast: float = 0.0,
    mouth_swap: float = 0.0,
    with_mouth_shape: bool = False,
) -> RowFn:
    """Segments -> (source, driving) frame pairs of one segment (autoencoder): `per_segment` pairs each. With
    `mouth_mask`, also the driving frame's feathered mouth-region mask (uint8 (S,S), from its landmarks). With
    `mouth_contrast` > 0, that share of the pairs (the first ones, rounded) takes one frame from the segment's most
    closed third and the other from its most open third (by `mouth_opening`, in random order); the rest are drawn
    uniformly. With `mouth_swap` > 0, that share (the last ones) drives with the source frame itself, the other
    frame's mouth pasted in (aligned, feathered: preprocessing.swaps.paste), so only the mouth differs; their
    mouth mask is the pasted region's. With `with_mouth_shape`, also the driving mouth's `mouth_shape` (float32
    (40,), from the landmarks of the frame whose mouth it shows)."""
    for name, share in (("mouth_contrast", mouth_contrast), ("mouth_swap", mouth_swap)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"frame_pairs: {name} must be in [0, 1], got {share}")
    n_contrast = int(round(mouth_contrast * per_segment))
    first_swap = per_segment - int(round(mouth_swap * per_segment))

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            t = int(row["num_frames"])
            if t < 2:
                return
            rng = rng_for(seed, row["segment_id"])
            need = mouth_mask or with_mouth_shape or n_contrast > 0 or first_swap < per_segment
            landmarks = f32_array(row["landmarks"], (t, 68, 2)) if need else None
            closed = opened = None
            if n_contrast and t >= 3:
                order = np.argsort(mouth_opening(landmarks), kind="stable")
                third = max(1, t // 3)
                closed, opened = order[:third], order[-third:]
            for k in range(per_segment):
                if closed is not None and k < n_contrast:
                    a, b = rng.choice(closed), rng.choice(opened)
                    i, j = (a, b) if rng.random() < 0.5 else (b, a)
                else:
                    i, j = rng.choice(t, size=2, replace=False)
                src, drv = _frames(row, (i, j))
                mask = None
                if k >= first_swap:
                    drv, mask = _paste_mouth(drv, landmarks[j], src, landmarks[i])
                sample = {"source": src, "driving": drv}
                if mouth_mask:
                    sample["mouth_mask"] = (
                        mask if mask is not None else _region_mask(landmarks[j], "mouth", drv.shape[0])
                    )
                if with_mouth_shape:
                    sample["mouth_shape"] = mouth_shape(landmarks[j])
                yield sample

        return _guarded("frame_pairs", row["segment_id"], gen)

    return build


def _paste_mouth(img_a: np.ndarray, lm_a: np.ndarray, img_b: np.ndarray, lm_b: np.ndarray):
    """b with a's mouth pasted (aligned, with preprocessing's default feather): (image, mask) uint8."""
    from preprocessing.params import PreprocessParams
    from preprocessing.swaps import paste

    return paste(img_a, lm_a, img_b, lm_b, "mouth", PreprocessParams.mask_feather)


def _region_mask(landmarks: np.ndarray, kind: str, size: int) -> np.ndarray:
    """uint8 (size, size) feathered region mask, made as the swap pairs' masks are (preprocessing.swaps, with
    preprocessing's default feather)."""
    from preprocessing.params import PreprocessParams
    from preprocessing.swaps import region_mask

    feather = PreprocessParams.mask_feather
    return np.round(region_mask(landmarks, kind, size, feather) * 255).astype(np.uint8)


def swap_pairs() -> RowFn:
    """Pairs rows -> decoded mouth- or eye-swap samples (mouth_pose, eye): frames a, b, identity, swaps, masks."""
    keys = ("frame_a", "frame_b", "frame_id", "a_on_b", "b_on_a", "mask_on_b", "mask_on_a")

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            pair = decode_pair(row)
            yield {k: pair[k] for k in keys}

        return _guarded("swap_pairs", row["pair_id"], gen)

    return build


def frame_windows(window: int, per_segment: int, seed: int) -> RowFn:
    """Segments -> (identity frame, driving frame t, the K frames centred on t) samples (expression stage)."""

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            t = int(row["num_frames"])
            if t < 2:
                return
            rng = rng_for(seed, row["segment_id"])
            for _ in range(per_segment):
                i, d = rng.choice(t, size=2, replace=False)
                idx = np.clip(np.arange(d - window // 2, d - window // 2 + window), 0, t - 1)
                frames = _frames(row, [i, *idx])
                yield {"identity": frames[0], "driving": frames[1 + window // 2], "window": frames[1:]}

        return _guarded("frame_windows", row["segment_id"], gen)

    return build


def audio_windows(length: int, per_segment: int, seed: int, require_speech: bool = True) -> RowFn:
    """Segments -> aligned runs of `length` frames with their mel windows and audio (audio stages).

    Yields identity frame, frames (L,S,S,3), mel (L,80,16), audio (L*640,). Segments flagged unusable for audio
    are skipped (they stay in the visual stages).
    """

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            t = int(row["num_frames"])
            if t < length or (require_speech and not row["audio_usable"]):
                return
            rng = rng_for(seed, row["segment_id"])
            mel = f32_array(row["mel"], (t, 80, 16))
            audio = f32_array(row["audio"], (t * SAMPLES_PER_FRAME,))
            for _ in range(per_segment):
                s = int(rng.integers(0, t - length + 1))
                frames = _frames(row, [int(rng.integers(0, t)), *range(s, s + length)])
                yield {
                    "identity": frames[0],
                    "frames": frames[1:],
                    "mel": mel[s : s + length],
                    "audio": audio[s * SAMPLES_PER_FRAME : (s + length) * SAMPLES_PER_FRAME],
                }

        return _guarded("audio_windows", row["segment_id"], gen)

    return build


def sync_pairs(length: int, per_segment: int, seed: int, min_shift: int = 5) -> RowFn:
    """Segments -> (mouth frames, mel) pairs, half in sync and half shifted by >= min_shift frames (SyncNet)."""

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            t = int(row["num_frames"])
            if t < length + min_shift + 1 or not row["audio_usable"]:
                return
            rng = rng_for(seed, row["segment_id"])
            mel = f32_array(row["mel"], (t, 80, 16))
            for k in range(per_segment):
                s = int(rng.integers(0, t - length + 1))
                in_sync = k % 2 == 0
                a = s
                if not in_sync:
                    choices = [x for x in range(t - length + 1) if abs(x - s) >= min_shift]
                    if not choices:
                        continue
                    a = int(rng.choice(choices))
                yield {
                    "frames": _frames(row, range(s, s + length)),
                    "mel": mel[a : a + length],
                    "in_sync": np.float32(in_sync),
                }

        return _guarded("sync_pairs", row["segment_id"], gen)

    return build


# -------------------------------------------------------------------------------------------------- batches


def to_model_inputs(batch: dict, device, image_size: int | None = None) -> dict:
    """A torch batch from Ray -> model inputs: uint8 images (...,H,W,3) -> float [-1,1] (...,3,S,S); uint8 masks
    (B,H,W) -> float [0,1] (B,1,S,S); other tensors move to `device` unchanged. Crops of another side than the
    model's `image_size` S are resized (antialiased), so one preprocessed set serves every model preset."""
    import torch
    import torch.nn.functional as F

    def fit(x: torch.Tensor) -> torch.Tensor:
        if image_size is None or x.shape[-1] == image_size:
            return x
        lead = x.shape[:-3]
        y = F.interpolate(
            x.reshape(-1, *x.shape[-3:]), size=(image_size, image_size), mode="bilinear", antialias=True
        )
        return y.reshape(*lead, *y.shape[-3:])

    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.to(device)
        if value.dtype == torch.uint8 and value.dim() >= 4 and value.shape[-1] == 3:
            value = fit(value.movedim(-1, -3).float() / 127.5 - 1.0)
        elif value.dtype == torch.uint8 and value.dim() == 3:
            value = fit(value.unsqueeze(1).float() / 255.0)
        out[key] = value
    return out
