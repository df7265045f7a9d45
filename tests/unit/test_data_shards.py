"""Shard writing/reading: round trip, manifest, atomic publication."""
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.storage import Storage
from data_pipeline.demo_data.synthetic import render_batch


def _samples(n, size=16, seed=0):
    images = render_batch(np.random.default_rng(seed), [i % 3 for i in range(n)], size)
    return [(f"k{i:03d}", images[i], i % 3) for i in range(n)]


def _read_tar(path):
    members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    return members


@pytest.mark.parametrize("as_file_url", [False, True])
def test_round_trip_keys_labels_pixels(tmp_path, as_file_url):
    samples = _samples(10)
    out = f"file://{tmp_path}" if as_file_url else str(tmp_path)
    manifest = write_shards(((k, encode_jpeg(img), y) for k, img, y in samples), out, "train", 4,
                            classes=["a", "b", "c"], storage=Storage())

    assert [s["url"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["num_samples"] == 10 and manifest["num_classes"] == 3 and manifest["classes"] == ["a", "b", "c"]
    header = json.loads((tmp_path / "train.json").read_text())  # format 2: a small header, no per-shard list
    assert header["format_version"] == 2 and header["num_shards"] == 3 and "shards" not in header
    assert {k: header[k] for k in ("num_samples", "classes", "num_classes", "label")} == \
        {k: manifest[k] for k in ("num_samples", "classes", "num_classes", "label")}
    full = read_manifest(f"{out}/train.json", Storage(), offsets=True)["shards"]
    assert [{k: v for k, v in s.items() if k != "url"} for s in full] == \
        [{k: v for k, v in s.items() if k != "url"} for s in manifest["shards"]]
    assert not list(tmp_path.glob("*tmp*")), "temporary files left behind"

    read = read_manifest(f"{out}/train.json", Storage())
    got = {}
    for shard in read["shards"]:
        path = shard["url"].removeprefix("file://")
        assert path.startswith("/"), "shard urls must be absolute"
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]
        members = _read_tar(path)
        assert len(members) == 2 * shard["num_samples"]
        for name, data in members.items():
            key, ext = name.split(".")
            got.setdefault(key, {})[ext] = data
    assert sorted(got) == [k for k, _, _ in samples]
    for key, img, label in samples:
        assert int(got[key]["cls"].decode("ascii")) == label
        pixels = np.asarray(Image.open(io.BytesIO(got[key]["jpg"])).convert("RGB"), dtype=np.float32)
        assert pixels.shape == img.shape
        assert np.abs(pixels - img).mean() < 8.0  # JPEG q90 4:4:4 on noisy 16 px images (typically ~5)


def test_same_samples_give_identical_shards(tmp_path):
    data = [(k, encode_jpeg(img), y) for k, img, y in _samples(6)]
    a = write_shards(data, str(tmp_path / "a"), "x", 4, storage=Storage())
    b = write_shards(data, str(tmp_path / "b"), "x", 4, storage=Storage())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["classes"] is None and a["num_classes"] == 3


def test_crash_mid_write_publishes_only_complete_shards(tmp_path):
    def samples():
        for i, (k, img, y) in enumerate(_samples(7)):
            if i == 6:
                raise RuntimeError("simulated crash")
            yield k, encode_jpeg(img), y

    with pytest.raises(RuntimeError):
        write_shards(samples(), str(tmp_path), "train", 4, storage=Storage())
    # Shard 0 (4 samples) was complete; shard 1 was half written and must not carry a published name.
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar"]
    assert len(_read_tar(tmp_path / "train-000000.tar")) == 8
    assert not (tmp_path / "train.json").exists()
    assert not list(tmp_path.glob("*tmp*")), "an exception should also remove the partial file"


def test_rejects_keys_that_webdataset_would_split(tmp_path):
    with pytest.raises(ValueError, match="key"):
        write_shards([("a.b", b"x", 0)], str(tmp_path), "t", 4, storage=Storage())


def test_rejects_label_outside_classes(tmp_path):
    with pytest.raises(ValueError, match="label"):
        write_shards([("a", b"x", 3)], str(tmp_path), "t", 4, classes=["x", "y"], storage=Storage())


def test_read_manifest_missing_or_invalid(tmp_path):
    with pytest.raises(DataSpecError, match="not found"):
        read_manifest(str(tmp_path / "nope.json"), Storage())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataSpecError, match="bad.json"):
        read_manifest(str(tmp_path / "bad.json"), Storage())


def test_encode_jpeg_checks_input():
    with pytest.raises(ValueError):
        encode_jpeg(np.zeros((4, 4), np.uint8))
    data = encode_jpeg(np.full((8, 8, 3), 200, np.uint8))
    assert data[:2] == b"\xff\xd8"
