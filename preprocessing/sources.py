"""Input sources: a directory, a glob, a single file or a manifest (CSV / JSONL) -> one Source per video, with its
sidecars, labels and content hash.

Content hash (what makes re-runs incremental): sha256 over the file size and three 1 MiB samples (start, middle,
end), so hashing a large remote video reads at most 3 MiB. Two files that differ only outside those samples and
have the same size would share a hash; for real encoded video that does not happen in practice.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from preprocessing import storage

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
SAMPLE = 1 << 20
MANIFEST_COLUMNS = ("path", "speaker", "emotion", "split", "transcript")


class SourceError(ValueError):
    """An input specification that cannot be turned into sources."""


@dataclass
class Source:
    uri: str  # the video (local path or URI)
    speaker: str = ""  # "" -> taken from the sidecar JSON, else the file stem
    emotion: str = ""
    split: str = ""  # "" -> sidecar JSON, else params.default_split
    transcript: str | None = None  # from the manifest (None: not given)
    wav: str | None = None  # sidecar NAME.wav
    txt: str | None = None  # sidecar NAME.txt
    json: str | None = None  # sidecar NAME.json
    hash: str = ""  # content hash (see module docstring)
    size: int = -1  # bytes (-1: unknown); the largest inputs are scheduled first

    def to_dict(self) -> dict:
        return asdict(self)


def _stem_uri(uri: str) -> str:
    return uri[: -len(posixpath.splitext(uri)[1])] if posixpath.splitext(uri)[1] else uri


def _attach_sidecars(src: Source, known: set[str] | None) -> Source:
    stem = _stem_uri(src.uri)
    for suffix in ("wav", "txt", "json"):
        candidate = f"{stem}.{suffix}"
        present = candidate in known if known is not None else storage.exists(candidate)
        if present:
            setattr(src, suffix, candidate)
    return src


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob(pattern: str) -> list[str]:
    # list the deepest wildcard-free folder, then match; `**` crosses folders like fnmatch's `*` does
    parts = pattern.replace("\\", "/").split("/")
    fixed = []
    for part in parts:
        if _is_glob(part):
            break
        fixed.append(part)
    base = "/".join(fixed) or "."
    if not storage.exists(base):
        raise SourceError(f"input {pattern!r}: the folder {base!r} does not exist")
    files = storage.list_files(base)
    # compare in the same form as the listing (absolute for local paths)
    absolute = storage.local_path_or_none(pattern) is not None and not os.path.isabs(pattern)
    pat = os.path.join(os.path.abspath(base), pattern[len(base) :].lstrip("/")) if absolute else pattern
    listed = [os.path.abspath(f) if absolute else f for f in files]
    return [f for f in listed if fnmatch.fnmatch(f, pat)]


def _read_manifest(uri: str) -> list[dict]:
    text = storage.read_bytes(uri).decode("utf-8")
    if uri.lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"manifest {uri}: line {n} is not JSON ({exc})") from exc
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise SourceError(
                f"manifest {uri}: row {n} has no 'path'; columns are {', '.join(MANIFEST_COLUMNS)}"
            )
    return rows


def discover(input_spec: str) -> list[Source]:
    """The sources named by a directory, glob, video file or manifest (sorted by URI, duplicates of a path once)."""
    spec = os.fspath(input_spec)
    if _is_glob(spec):
        files = _glob(spec)
        known = set(files)
        videos = [f for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
        return [_attach_sidecars(Source(uri=v), known) for v in sorted(set(videos))]
    if not storage.exists(spec):
        raise SourceError(
            f"input {spec!r} does not exist: give a folder, a glob, a video or a CSV/JSONL manifest"
        )
    if storage.is_dir(spec):
        files = storage.list_files(spec)
        known = set(files)
        videos = [f for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
        return [_attach_sidecars(Source(uri=v), known) for v in videos]
    if spec.lower().endswith(MANIFEST_SUFFIXES):
        base = posixpath.dirname(spec) if storage.is_remote(spec) else os.path.dirname(os.path.abspath(spec))
        out, seen = [], set()
        for row in _read_manifest(spec):
            path = str(row["path"])
            if "://" not in path and not os.path.isabs(path):
                path = storage.join(base, path)
            if path in seen:
                continue
            seen.add(path)
            transcript = row.get("transcript")
            src = Source(
                uri=path,
                speaker=str(row.get("speaker") or ""),
                emotion=str(row.get("emotion") or ""),
                split=str(row.get("split") or ""),
                transcript=str(transcript) if transcript not in (None, "") else None,
            )
            out.append(_attach_sidecars(src, None))
        return out
    return [_attach_sidecars(Source(uri=spec), None)]


def content_hash(uri: str) -> str:
    """sha256 of size + first, middle and last MiB (hex, first 32 chars)."""
    return _hash_and_size(uri)[0]


def _hash_and_size(uri: str) -> tuple[str, int]:
    fs, path = storage.resolve(uri)
    h = hashlib.sha256()
    with fs.open_input_file(path) as f:
        size = f.size()
        h.update(str(size).encode())
        for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            f.seek(offset)
            h.update(f.read(min(SAMPLE, size - offset)))
    return h.hexdigest()[:32], size


def hash_all(sources: list[Source], threads: int = 8) -> list[Source]:
    """Fill in `hash` for every source (IO-bound: a thread pool). Unreadable files get a hash of their URI so they
    can still be rejected and recorded once."""

    def one(src: Source) -> Source:
        try:
            src.hash, src.size = _hash_and_size(src.uri)
        except OSError:
            src.hash = "path-" + hashlib.sha256(src.uri.encode()).hexdigest()[:27]
        return src

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, sources))
