"""preprocessing.storage against a real S3-compatible server (moto) on loopback, configured only by environment."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from preprocessing import storage

pytestmark = pytest.mark.services


def test_round_trip_through_s3(s3_env, tmp_path):
    root = "s3://edtalk-storage-test/runs/one"
    storage.makedirs(root)  # creates the bucket: a fresh server has none
    assert "edtalk-storage-test" in {b["Name"] for b in s3_env.client().list_buckets()["Buckets"]}

    storage.write_bytes_atomic(storage.join(root, "_stats.json"), b'{"n": 2}')
    table = pa.table({"segment_id": ["a", "b"], "num_frames": pa.array([3, 4], pa.int32())})
    with storage.open_output(storage.join(root, "segments", "part-0.parquet")) as f:
        pq.write_table(table, f)

    # What landed is plain S3 objects, seen by another client (boto3); makedirs leaves a "dir/" marker object.
    assert s3_env.keys("edtalk-storage-test", "runs/one/") == [
        "runs/one/",
        "runs/one/_stats.json",
        "runs/one/segments/part-0.parquet",
    ]
    assert storage.exists(root) and storage.is_dir(storage.join(root, "segments"))
    assert not storage.exists(storage.join(root, "nothing"))
    assert storage.read_bytes(storage.join(root, "_stats.json")) == b'{"n": 2}'
    assert storage.list_files(root, suffix=".parquet") == [f"{root}/segments/part-0.parquet"]
    with storage.open_input(storage.join(root, "segments", "part-0.parquet")) as f:
        assert pq.read_table(f).equals(table)

    # pyarrow datasets (what Ray Data uses) read through the same filesystem.
    fs, path = storage.resolve(storage.join(root, "segments"))
    assert pads.dataset(path, filesystem=fs, format="parquet").to_table().equals(table)

    # Whole directories both ways.
    local = storage.download(root, tmp_path / "dl")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "_stats.json",
        "segments/part-0.parquet",
    ]
    storage.upload(local, "s3://edtalk-storage-test/runs/copy")
    assert storage.list_files("s3://edtalk-storage-test/runs/copy") == [
        "s3://edtalk-storage-test/runs/copy/_stats.json",
        "s3://edtalk-storage-test/runs/copy/segments/part-0.parquet",
    ]
    with pytest.raises(FileNotFoundError, match="s3://edtalk-storage-test/runs/none"):
        storage.read_bytes("s3://edtalk-storage-test/runs/none")


def test_endpoint_comes_from_environment(s3_env, monkeypatch):
    # With the endpoint pointed at a closed port the same call fails, instead of silently reaching real AWS or
    # a cached filesystem of the old endpoint.
    from services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    storage.clear_cache()
    with pytest.raises(OSError):
        storage.write_bytes_atomic("s3://edtalk-storage-test/x", b"x")
