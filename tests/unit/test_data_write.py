"""The shard writer CLI: folder / list / re-shard inputs, resize, manifest with checksums, S3 output."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline.shards.manifest import read_manifest
from data_pipeline.shards.tar_read import raw_samples
from data_pipeline.storage import Storage
from data_pipeline.shards.spec import expand_urls
from tests.conftest import ROOT


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "data_pipeline.write", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir()
        for i in range(4 + c):
            img = Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8))
            img.save(root / name / f"img.{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def _read(manifest_path):
    return [s for s in raw_samples(expand_urls(str(manifest_path), Storage()), Storage())]


def test_folder_to_shards_with_resize_and_manifest(folder, tmp_path):
    r = _cli("--folder", folder, "--out", tmp_path / "out", "--samples-per-shard", 4, "--resize", 32,
             "--processes", 2, "--shuffle-seed", 0)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(str(tmp_path / "out" / "train.json"), Storage())
    assert manifest["classes"] == ["cat", "dog", "eel"] and manifest["num_samples"] == 15
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 4, 3]
    for s in manifest["shards"]:
        assert hashlib.sha256((tmp_path / "out" / s["url"]).read_bytes()).hexdigest() == s["sha256"]
    samples = _read(tmp_path / "out" / "train.json")
    assert len({s["__key__"] for s in samples}) == 15
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and min(img.size) == 32
        assert s["__key__"].split("_")[0] == ["cat", "dog", "eel"][int(s["cls"])]


def test_reshard_keeps_every_sample(folder, tmp_path):
    assert _cli("--folder", folder, "--out", tmp_path / "a", "--samples-per-shard", 2).returncode == 0
    r = _cli("--shards", tmp_path / "a" / "train.json", "--out", tmp_path / "b", "--prefix", "re",
             "--shard-mb", 0.01)
    assert r.returncode == 0, r.stderr
    before = {(s["__key__"], s["jpg"]) for s in _read(tmp_path / "a" / "train.json")}
    after = {(s["__key__"], s["jpg"]) for s in _read(tmp_path / "b" / "re.json")}
    assert before == after  # JPEGs pass through unchanged without --resize


def test_list_file_to_s3(folder, tmp_path, s3_server):
    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))
    (tmp_path / "list.txt").write_text("# path label\n" + "".join(f"{p}\t{i % 3}\n" for i, p in enumerate(paths)))
    r = _cli("--list", tmp_path / "list.txt", "--out", s3_server.url("lst"), "--samples-per-shard", 5,
             "--s3-endpoint", s3_server.endpoint)
    assert r.returncode == 0, r.stderr
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    assert json.loads(fs.cat(f"{s3_server.bucket}/lst/train.json"))["format_version"] == 2
    manifest = read_manifest(s3_server.url("lst/train.json"), Storage(s3_endpoint=s3_server.endpoint))
    assert manifest["num_samples"] == len(paths) and len(manifest["shards"]) == 3


def test_bad_list_line_is_one_line_error(tmp_path):
    (tmp_path / "list.txt").write_text("a.jpg 1\nb.jpg cat\n")
    r = _cli("--list", tmp_path / "list.txt", "--out", tmp_path / "o", "--samples-per-shard", 5)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "list.txt:2" in r.stderr


def test_clashing_keys_are_an_error_naming_both_files(tmp_path):
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "in" / "c").mkdir(parents=True)
    for name in ("a.b.jpg", "a_b.jpg", "a_b.png"):
        img.save(tmp_path / "in" / "c" / name)
    r = _cli("--folder", tmp_path / "in", "--out", tmp_path / "o", "--samples-per-shard", 5)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "c/a.b.jpg and " in r.stderr and "c/a_b.jpg both become sample key 'c_a_b'" in r.stderr
    assert not (tmp_path / "o" / "train.json").exists()


def test_output_is_read_by_webdataset_and_reshard_with_a_key_in_two_sources_is_an_error(folder, tmp_path):
    import webdataset as wds

    assert _cli("--folder", folder, "--out", tmp_path / "a", "--samples-per-shard", 4).returncode == 0
    manifest = read_manifest(str(tmp_path / "a" / "train.json"), Storage())
    urls = [str(tmp_path / "a" / s["url"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))  # the real library's reader
    assert len(samples) == manifest["num_samples"] == 15
    assert len({s["__key__"] for s in samples}) == 15 and all({"jpg", "cls"} <= s.keys() for s in samples)
    r = _cli("--shards", f"{tmp_path}/a/train.json::{tmp_path}/a/train-000000.tar", "--out", tmp_path / "b",
             "--samples-per-shard", 4)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "both become sample key" in r.stderr, r.stderr


def _labels_in_order(manifest_path):
    return [int(s["cls"]) for s in _read(manifest_path)]


def test_shuffles_by_default_seeded_and_no_shuffle_keeps_the_folder_order(folder, tmp_path):
    for name, extra in (("a", []), ("b", []), ("c", ["--shuffle-seed", 1]), ("d", ["--no-shuffle"])):
        r = _cli("--folder", folder, "--out", tmp_path / name, "--samples-per-shard", 4, *extra)
        assert r.returncode == 0, r.stderr
    in_class_order = [0] * 4 + [1] * 5 + [2] * 6
    assert _labels_in_order(tmp_path / "d" / "train.json") == in_class_order
    shuffled = _labels_in_order(tmp_path / "a" / "train.json")
    assert sorted(shuffled) == in_class_order and shuffled != in_class_order
    assert _labels_in_order(tmp_path / "b" / "train.json") == shuffled  # seed 0 by default: the same order
    assert _labels_in_order(tmp_path / "c" / "train.json") != shuffled


def test_progress_counts_images_not_shards(folder, tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_pipeline.write", "--folder", str(folder), "--out",
                        str(tmp_path / "o"), "--processes", "1"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    # 15 images in one 256 MB shard: the bar ends at 15/15 images, not at 1/1 shard
    assert "15/15" in r.stderr and "img" in r.stderr, r.stderr
