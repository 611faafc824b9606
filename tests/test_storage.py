"""preprocessing.storage on local paths and file:// URIs (fast; the S3 round trips are in test_storage_s3.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from preprocessing import storage


def test_resolve_forms(tmp_path, monkeypatch):
    fs, path = storage.resolve(tmp_path / "a.bin")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.bin")
    fs, path = storage.resolve(f"file://{tmp_path}/a.bin")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.bin")
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("rel/x")[1] == str(tmp_path / "rel" / "x")  # relative paths become absolute
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert not storage.is_remote("/x") and not storage.is_remote("file:///x")
    assert storage.local_path_or_none(f"file://{tmp_path}") == tmp_path
    assert storage.local_path_or_none("s3://b/k") is None


def test_bad_uris_name_the_input():
    with pytest.raises(storage.StorageError, match="hdfs://nn/x.*unsupported URI scheme"):
        storage.resolve("hdfs://nn/x")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.resolve("s3://")
    with pytest.raises(storage.StorageError, match="empty path"):
        storage.resolve("")


def test_join():
    assert storage.join("s3://b/data/", "segments", "/x.parquet") == "s3://b/data/segments/x.parquet"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.join("file:///tmp/d", "x") == "file:///tmp/d/x"
    assert storage.join("d", "e", "f") == "d/e/f"


def test_s3_endpoint_from_environment(monkeypatch):
    storage.clear_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs, path = storage.resolve("s3://bucket/a/b")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b"
    opts = fs.__reduce__()[1][0]  # the options pyarrow pickles, i.e. what a Ray worker would rebuild
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("127.0.0.1:1", "http", "us-east-1")
    assert opts["allow_bucket_creation"]
    assert storage.resolve("s3://other/x")[0] is fs  # cached per endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the S3-specific variable wins
    fs2, _ = storage.resolve("s3://bucket/a")
    assert fs2 is not fs and fs2.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:2"
    storage.clear_cache()


def test_write_read_list_exists(tmp_path):
    root = f"file://{tmp_path}/out"
    assert not storage.exists(root)
    storage.write_bytes_atomic(storage.join(root, "segments", "a.parquet"), b"A")
    storage.write_bytes_atomic(storage.join(root, "segments", "sub", "b.parquet"), b"B")
    storage.write_bytes_atomic(storage.join(root, "_stats.json"), b"{}")
    storage.write_bytes_atomic(storage.join(root, "_stats.json"), b'{"n": 1}')  # overwrite
    assert (
        storage.exists(root)
        and storage.is_dir(root)
        and not storage.is_dir(storage.join(root, "_stats.json"))
    )
    assert storage.read_bytes(storage.join(root, "_stats.json")) == b'{"n": 1}'
    assert storage.list_files(root, suffix=".parquet") == [
        f"file://{tmp_path}/out/segments/a.parquet",
        f"file://{tmp_path}/out/segments/sub/b.parquet",
    ]
    assert storage.list_files(storage.join(root, "segments"), recursive=False) == [
        f"file://{tmp_path}/out/segments/a.parquet"
    ]
    # A plain path lists as plain paths; no temp files are left behind.
    plain = storage.list_files(tmp_path / "out")
    assert plain == sorted(str(p) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert len(plain) == 3
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.list_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(tmp_path / "missing.bin")


def test_atomic_write_leaves_old_content_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    storage.write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(target, object())  # fails mid-write
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_streams_work_with_parquet(tmp_path):
    uri = storage.join(f"file://{tmp_path}", "t", "x.parquet")
    table = pa.table({"a": [1, 2, 3]})
    with storage.open_output(uri) as f:
        pq.write_table(table, f)
    with storage.open_input(uri) as f:
        assert pq.read_table(f).equals(table)


def test_download_upload_files_and_directories(tmp_path):
    src = tmp_path / "src" / "models"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"w")
    (src / "sub" / "c.json").write_bytes(b"c")
    dest = f"file://{tmp_path}/remote/models"
    assert storage.upload(src, dest) == dest
    assert storage.list_files(dest) == [f"{dest}/sub/c.json", f"{dest}/w.bin"]
    got = storage.download(dest, tmp_path / "back")
    assert got == tmp_path / "back" / "models"
    assert (got / "w.bin").read_bytes() == b"w" and (got / "sub" / "c.json").read_bytes() == b"c"
    one = storage.download(f"{dest}/w.bin", tmp_path / "one")
    assert one == tmp_path / "one" / "w.bin" and one.read_bytes() == b"w"
    storage.upload(src / "w.bin", tmp_path / "single" / "w2.bin")
    assert (tmp_path / "single" / "w2.bin").read_bytes() == b"w"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.download(f"{dest}/none", tmp_path)
