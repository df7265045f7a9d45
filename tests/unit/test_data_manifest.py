"""Manifest format 2: header + shard table + offsets file; format 1 still read and converted; labels."""
from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pytest

from data_pipeline.errors import DataSpecError
from data_pipeline.image.transforms import TrainTransform
from data_pipeline.index import main as index_main
from data_pipeline.shards.labels import BadLabel, LabelReader, parse_label_source
from data_pipeline.shards.manifest import read_index, read_manifest
from data_pipeline.shards.offsets import ShardOffsets
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage, StorageError
from data_pipeline.stream.train_loader import TrainLoader

PER_SHARD, SHARDS = 20, 6


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2")
    rng = np.random.default_rng(0)
    jpgs = [encode_jpeg(rng.integers(0, 255, (16 + i % 5, 16, 3), dtype=np.uint8)) for i in range(8)]
    manifest = write_shards(((f"k{i:04d}", jpgs[i % 8], i % 7) for i in range(PER_SHARD * SHARDS)), str(root),
                            "train", PER_SHARD, storage=Storage())
    return root, manifest


def _loader(spec, **kw):
    args = dict(batch_size=8, transform=TrainTransform(16), seed=1, num_workers=0, shuffle_buffer=30,
                storage=Storage())
    args.update(kw)
    return TrainLoader(spec, **args)


def _keys(loader, n):
    it = iter(loader)
    out = [k for _ in range(n) for k in next(it).keys]
    it.close()
    return out


def test_format_2_files_header_and_a_rank_holds_no_per_sample_array(written):
    root, manifest = written
    assert sorted(p.name for p in root.glob("train.*")) == ["train.json", "train.offsets", "train.shards.npz"]
    header = json.loads((root / "train.json").read_text())
    assert header["format_version"] == 2 and header["num_samples"] == PER_SHARD * SHARDS and "shards" not in header
    assert os.path.getsize(root / "train.offsets") == 8 * SHARDS * (PER_SHARD + 1)
    m = read_index(str(root / "train.json"), Storage())
    assert [m.table.url(i) for i in range(SHARDS)] == [str(root / s["url"]) for s in manifest["shards"]]
    assert m.table.counts.tolist() == [PER_SHARD] * SHARDS and m.table.sizes.tolist() == [s["bytes"] for s in
                                                                                          manifest["shards"]]
    source = _loader(str(root / "train.json")).sources[0]
    # What a DataLoader worker inherits: numpy arrays and a few objects, nothing per sample or per shard.
    assert isinstance(source.counts, np.ndarray) and not source.offsets._cache
    assert len(pickle.dumps(source)) < 4096


def test_the_rank_never_reads_offsets_and_a_worker_missing_them_names_the_shard(written, tmp_path):
    root, _ = written
    for name in ("train.json", "train.shards.npz"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    for i in range(SHARDS):
        (tmp_path / f"train-{i:06d}.tar").symlink_to(root / f"train-{i:06d}.tar")
    loader = TrainLoader(str(tmp_path / "train.json"), batch_size=8, transform=TrainTransform(16), seed=1,
                         num_workers=0, storage=Storage(give_up_after_s=0.5, backoff_s=0.1))  # no offsets file
    # a missing local file is permanent (one line at once); object storage would retry within its budget
    with pytest.raises(StorageError, match=r"cannot read .*train-0000\d\d.tar \(not found\).*train.offsets"):
        next(iter(loader))


def test_worker_offsets_cache_is_bounded(written):
    root, _ = written
    m = read_index(str(root / "train.json"), Storage())
    offs = ShardOffsets([m.table], [m.offsets], Storage(), cache_bytes=2 * 8 * (PER_SHARD + 1))
    runs = [offs.get(i) for i in range(SHARDS)]
    assert all(len(r) == PER_SHARD + 1 and (np.diff(r) > 0).all() for r in runs)
    assert len(offs._cache) == 2 and offs.bytes_read == 8 * SHARDS * (PER_SHARD + 1)


def test_format_1_is_read_with_the_convert_command_then_converted_in_place(written, tmp_path, caplog):
    root, manifest = written
    for i in range(SHARDS):
        (tmp_path / f"train-{i:06d}.tar").symlink_to(root / f"train-{i:06d}.tar")
    old = {k: v for k, v in manifest.items() if k not in ("format_version", "label")}  # today's writer's JSON
    old["shards"] = [{k: v for k, v in s.items() if k != "bytes"} for s in manifest["shards"]]
    spec = str(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps(old))
    reference = _keys(_loader(str(root / "train.json")), 6)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        assert _keys(_loader(spec), 6) == reference
    assert any(f"python -m data_pipeline.index --convert {spec}" in r.getMessage() for r in caplog.records)
    assert index_main(["--convert", spec]) == 0
    assert json.loads((tmp_path / "train.json").read_text())["format_version"] == 2
    assert read_manifest(spec, Storage(), offsets=True)["shards"][0]["offsets"] == manifest["shards"][0]["offsets"]
    assert _keys(_loader(spec, num_workers=2), 6) == reference


def test_bytes_read_per_delivered_byte_with_offset_reads_counted(written):
    root, manifest = written
    sizes = {f"k{i:04d}": s["offsets"][j + 1] - s["offsets"][j]
             for n, s in enumerate(manifest["shards"]) for j, i in enumerate(range(n * PER_SHARD, (n + 1) * PER_SHARD))}
    loader = _loader(str(root / "train.json"), num_workers=2, batch_size=4, shuffle_buffer=20)
    it = iter(loader)
    delivered = sum(sizes[k] for _ in range(PER_SHARD * SHARDS // 4) for k in next(it).keys)
    it.close()
    assert delivered <= loader.bytes_read <= 1.1 * delivered


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(b"not a zip"), r"shard table .*train.shards.npz.* is unreadable"),
    (lambda p: p.unlink(), r"shard table .*train.shards.npz.* not found"),
])
def test_damaged_or_missing_table_is_one_line_naming_it(written, tmp_path, damage, match):
    root, _ = written
    for name in ("train.json", "train.shards.npz"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    damage(tmp_path / "train.shards.npz")
    with pytest.raises(DataSpecError, match=match) as err:
        _loader(str(tmp_path / "train.json"))
    assert "\n" not in str(err.value)


def test_a_newer_format_is_refused_naming_the_version(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"format_version": 9, "num_samples": 1}))
    with pytest.raises(DataSpecError, match="format_version 9"):
        read_index(str(tmp_path / "m.json"), Storage())


def test_label_sources():
    s = {"__key__": "a", "cls": b"3", "txt": b" dog\n",
         "json": json.dumps({"label": "eel", "id": 2, "f": 1.5}).encode()}
    assert LabelReader("cls", None)(s) == 3
    assert LabelReader("txt", ["cat", "dog", "eel"])(s) == 1
    assert LabelReader("json:label", ["cat", "dog", "eel"])(s) == 2
    assert LabelReader("json:id", None)(s) == 2
    assert LabelReader("json:nope", None)(s) is None and LabelReader("cls", None)({"__key__": "b"}) is None
    for source, classes, why in (("json:f", None, "not a class index"), ("json:label", None, "lists no classes"),
                                 ("txt", ["cat"], "not one of")):
        with pytest.raises(BadLabel, match=why):
            LabelReader(source, classes)(s)
    with pytest.raises(ValueError, match="cls, txt or json:FIELD"):
        parse_label_source("caption")
