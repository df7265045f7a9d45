"""Demo data generation: idempotent, parameter-aware, never half-published, on disk and on object storage."""
import json
import os

import pytest

from data_pipeline.demo import ensure_demo_data, main
from data_pipeline.errors import DataSpecError
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.storage import Storage

LOCAL = Storage()  # local paths: no object storage settings

SMALL = dict(image_size=16, num_train=40, num_val=20, samples_per_shard=10, seed=0)


def test_ensure_demo_data_is_idempotent_and_regenerates_on_change(tmp_path):
    root = str(tmp_path / "demo")
    data = ensure_demo_data(root, **SMALL, storage=LOCAL)
    assert data.train == f"{root}/shapes/train.json" and data.digits_test == f"{root}/digits/test.json"
    assert read_manifest(data.train, LOCAL)["num_samples"] == 40 and read_manifest(data.val, LOCAL)["num_samples"] == 20
    assert read_manifest(data.digits_train, LOCAL)["num_samples"] == 1000
    marker = tmp_path / "demo" / "DONE.json"
    shard = tmp_path / "demo" / "shapes" / "train-000000.tar"
    stamps = (marker.stat().st_mtime_ns, shard.stat().st_mtime_ns, shard.stat().st_ino)

    assert ensure_demo_data(root, **SMALL, storage=LOCAL) == data
    assert (marker.stat().st_mtime_ns, shard.stat().st_mtime_ns, shard.stat().st_ino) == stamps

    ensure_demo_data(root, **dict(SMALL, num_train=30), storage=LOCAL)
    assert json.loads(marker.read_text())["num_train"] == 30
    assert read_manifest(data.train, LOCAL)["num_samples"] == 30
    assert sorted(os.listdir(tmp_path)) == ["demo"], "temporary directories left behind"


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DataSpecError, match="refusing"):
        ensure_demo_data(str(tmp_path), **SMALL, storage=LOCAL)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_prints_manifests(tmp_path, capsys):
    main(["--out", str(tmp_path / "d"), "--image-size", "16", "--num-train", "20", "--num-val", "10",
          "--samples-per-shard", "10"])
    out = capsys.readouterr().out
    assert f"{tmp_path}/d/shapes/train.json" in out and "digits_test" in out


def test_an_interrupted_generation_is_never_taken_as_done(tmp_path):
    root = str(tmp_path / "demo")
    ensure_demo_data(root, **SMALL, storage=LOCAL)
    (tmp_path / "demo" / "DONE.json").unlink()  # as if the writer died before its last file
    (tmp_path / "demo" / "shapes" / "train-000000.tar").write_bytes(b"half")
    data = ensure_demo_data(root, **SMALL, storage=LOCAL)
    assert (tmp_path / "demo" / "DONE.json").exists()
    assert read_manifest(data.train, LOCAL)["num_samples"] == 40
    assert (tmp_path / "demo" / "shapes" / "train-000000.tar").stat().st_size > 1000


def test_demo_data_on_object_storage(s3_server):
    """Object storage has no directory rename: the data is written in place and DONE.json comes last."""
    storage = Storage(s3_endpoint=s3_server.endpoint)
    root = f"s3://{s3_server.bucket}/demo"
    data = ensure_demo_data(root, **SMALL, storage=storage)
    assert data.train == f"{root}/shapes/train.json"
    manifest = read_manifest(data.train, storage)
    assert manifest["num_samples"] == 40
    fs, _ = storage.fs(root)
    assert all(fs.exists(shard["url"]) for shard in manifest["shards"])
    assert json.loads(fs.cat_file(f"{s3_server.bucket}/demo/DONE.json"))["num_train"] == 40
    assert ensure_demo_data(root, **SMALL, storage=storage) == data  # found complete: not written again
