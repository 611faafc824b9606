"""Paths and URIs -> pyarrow filesystems, so every path argument may be local or on object storage.

Accepted forms: a local path (relative or absolute), `file:///abs/path`, `s3://bucket/key`, `gs://bucket/key`.

S3 is configured by the usual environment, read when a filesystem is first built:
  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL   e.g. `http://minio:9000` (an `http://` endpoint turns TLS off)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (optional)
  AWS_REGION or AWS_DEFAULT_REGION
GCS uses Google's default credentials; STORAGE_EMULATOR_HOST (the emulators' convention) overrides the endpoint.

Functions return URIs in the same form they were given (a local path stays a local path string), so results can
be handed back to any function here, to Ray Data (`filesystem=`), or to pyarrow.parquet.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs")

_cache: dict[tuple, pafs.FileSystem] = {}
_cache_lock = threading.Lock()


class StorageError(ValueError):
    """A URI that cannot be used (unknown scheme, missing bucket, ...)."""


def _split(uri: str | os.PathLike) -> tuple[str, str]:
    """-> (scheme, rest): ("", local path) for local paths and file://, ("s3", "bucket/key") for s3://."""
    text = os.fspath(uri)
    if not isinstance(text, str) or not text:
        raise StorageError(f"empty path or URI {uri!r}: give a local path or an s3://, gs://, file:// URI")
    if "://" not in text:
        return "", text
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        # file:///abs/path -> /abs/path; file://host/path is not a local file.
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{text!r}: file:// URIs must be local (file:///absolute/path)")
        return "file", parsed.path
    if scheme in ("s3", "s3a"):
        scheme = "s3"
    elif scheme in ("gs", "gcs"):
        scheme = "gs"
    else:
        raise StorageError(
            f"{text!r}: unsupported URI scheme {scheme!r}; use a local path or an s3://, gs://, file:// URI"
        )
    rest = rest.strip("/")
    if not rest:
        raise StorageError(f"{text!r}: the URI names no bucket; use {scheme}://BUCKET/PATH")
    return scheme, rest


def _endpoint(url: str | None) -> tuple[str | None, str | None]:
    """`http://host:port` -> ("http", "host:port"); a bare `host:port` means https."""
    if not url:
        return None, None
    if "://" in url:
        parsed = urlparse(url)
        return parsed.scheme, parsed.netloc + parsed.path.rstrip("/")
    return "https", url


def _s3_filesystem() -> pafs.FileSystem:
    env = os.environ
    scheme, endpoint = _endpoint(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"))
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region is None and endpoint is not None:
        region = (
            "us-east-1"  # S3-compatible servers ignore it; leaving it unset makes the SDK probe EC2 metadata
        )
    key = ("s3", scheme, endpoint, region, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SESSION_TOKEN"))
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = pafs.S3FileSystem(
                access_key=env.get("AWS_ACCESS_KEY_ID"),
                secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
                session_token=env.get("AWS_SESSION_TOKEN"),
                region=region,
                scheme=scheme,
                endpoint_override=endpoint,
                allow_bucket_creation=True,  # makedirs("s3://new-bucket/...") works on a fresh server
            )
            _cache[key] = fs
    return fs


def _gcs_filesystem() -> pafs.FileSystem:
    scheme, endpoint = _endpoint(os.environ.get("STORAGE_EMULATOR_HOST"))
    key = ("gs", scheme, endpoint)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            if endpoint is None:
                fs = pafs.GcsFileSystem()
            else:
                fs = pafs.GcsFileSystem(anonymous=True, scheme=scheme, endpoint_override=endpoint)
            _cache[key] = fs
    return fs


_local = pafs.LocalFileSystem()


def clear_cache() -> None:
    """Forget cached filesystems (after changing the S3/GCS environment in the same process)."""
    with _cache_lock:
        _cache.clear()


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A path or URI -> (pyarrow filesystem, path inside it). Local paths come back absolute."""
    scheme, rest = _split(uri)
    if scheme in ("", "file"):
        return _local, os.path.abspath(os.path.expanduser(rest))
    if scheme == "s3":
        return _s3_filesystem(), rest
    return _gcs_filesystem(), rest


def is_remote(uri: str | os.PathLike) -> bool:
    """True for object storage (s3://, gs://), False for local paths and file:// URIs."""
    return _split(uri)[0] in REMOTE_SCHEMES


def local_path_or_none(uri: str | os.PathLike) -> Path | None:
    """The local Path of a local path or file:// URI; None for object storage."""
    scheme, rest = _split(uri)
    return None if scheme in REMOTE_SCHEMES else Path(os.path.expanduser(rest))


def join(uri: str | os.PathLike, *parts: str) -> str:
    """URI-aware join: join("s3://b/data", "segments", "x.parquet") -> "s3://b/data/segments/x.parquet"."""
    text = os.fspath(uri)
    scheme, _ = _split(text)
    if scheme == "":
        return os.path.join(text, *parts)
    clean = [p.strip("/") for p in parts if p.strip("/")]
    return posixpath.join(text.rstrip("/"), *clean) if clean else text


def _with_path(uri: str | os.PathLike, path: str) -> str:
    """Rebuild a URI of the same form as `uri` for `path` (a path inside uri's filesystem)."""
    scheme, _ = _split(uri)
    if scheme == "":
        return path
    if scheme == "file":
        return "file://" + path
    return f"{scheme}://{path}"


def exists(uri: str | os.PathLike) -> bool:
    """True when a file or directory (an object prefix, on S3/GCS) exists at uri."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    """True when uri is a directory (on object storage: a prefix with objects under it, or a bucket)."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str | os.PathLike, suffix: str | None = None, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under a directory (or [uri] for a file), optionally only those ending in suffix.

    Hidden files (name starting with ".", e.g. the temp files of write_bytes_atomic) are left out.
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(
            f"{os.fspath(uri)!r} does not exist: check the path (and for s3:// the bucket)"
        )
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    out = [
        _with_path(uri, i.path)
        for i in infos
        if i.type == pafs.FileType.File
        and not i.base_name.startswith(".")
        and (suffix is None or i.base_name.endswith(suffix))
    ]
    return sorted(out)


def makedirs(uri: str | os.PathLike) -> None:
    """Create a directory and its parents (creates the bucket on S3 when it is missing); no error if present."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of a file."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"cannot read {os.fspath(uri)!r}: no such file ({exc})") from exc


def write_bytes_atomic(uri: str | os.PathLike, data: bytes) -> None:
    """Write a whole file so that readers see either the old content or the new one, never a part.

    Locally: a temp name in the same directory, then a rename. On S3/GCS an object appears only when its upload
    completes, so one put is already atomic.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def open_input(uri: str | os.PathLike) -> pafs.NativeFile:
    """A seekable binary input file (what pyarrow.parquet and decoders need); use it as a context manager."""
    fs, path = resolve(uri)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"cannot open {os.fspath(uri)!r}: no such file ({exc})") from exc


def open_output(uri: str | os.PathLike) -> pafs.NativeFile:
    """A binary output stream (parent directories created locally); use it as a context manager."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open_output_stream(path)


def download(uri: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy a file or a whole directory into local_dir, keeping its name; returns the local copy's path.

    download("s3://b/data/segments", "/tmp/x") -> /tmp/x/segments (with everything under it).
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"cannot download {os.fspath(uri)!r}: it does not exist")
    name = posixpath.basename(path.rstrip("/")) or "root"
    target = Path(local_dir).expanduser().absolute() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if info.type == pafs.FileType.Directory:
        target.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=_local)
    return target


def upload(local_path: str | os.PathLike, uri: str | os.PathLike) -> str:
    """Copy a local file to uri, or a local directory's contents under uri (uri is the destination itself).

    upload("/tmp/x/segments", "s3://b/data/segments") -> s3://b/data/segments/<files>. Returns uri.
    """
    src = Path(local_path).expanduser().absolute()
    if not src.exists():
        raise FileNotFoundError(f"cannot upload {os.fspath(local_path)!r}: no such file or directory")
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        # A plain copy; copy_files would also do, but shutil keeps file modes.
        if src.is_dir():
            shutil.copytree(src, path, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copy2(src, path)
        return os.fspath(uri)
    if src.is_dir():
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(src), path, source_filesystem=_local, destination_filesystem=fs)
    return os.fspath(uri)
