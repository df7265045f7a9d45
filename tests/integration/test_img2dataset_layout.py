"""Shards as img2dataset writes them (LAION, DataComp, CC12M): ``000000000.jpg/.json/.txt``, the label in the
JSON (``--save_additional_columns '["label"]'``), indexed with ``--label json:label`` and trained on."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from data_pipeline.errors import DataSpecError
from data_pipeline.index import main as index_main
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.storage import Storage
from tests.conftest import ROOT, run_main, tiny_args

CLASSES = ["cat", "dog", "eel"]


def _img2dataset_shards(root, shards: int = 2, per_shard: int = 24) -> None:
    """img2dataset's webdataset output: ``{shard:05d}.tar`` holding ``{shard:05d}{index:04d}.jpg/.json/.txt``
    (the caption in .txt, the source row's extra columns in .json) plus ``{shard:05d}_stats.json``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                key, label = f"{s:05d}{i:04d}", CLASSES[(s * per_shard + i) % 3]
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
                meta = {"label": label, "caption": f"a photo of a {label}", "url": f"https://example.com/{key}.jpg",
                        "key": key, "status": "success", "error_message": None, "width": 48, "height": 40,
                        "original_width": 48, "original_height": 40, "exif": "{}", "sha256": None}
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": meta["caption"].encode(),
                         "json": json.dumps(meta, indent=4).encode()})
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))


def test_img2dataset_shards_index_with_json_label_and_train_on_every_sample(tmp_path, capsys):
    shards = tmp_path / "laion"
    _img2dataset_shards(shards)
    pattern, manifest = str(shards / "{00000..00001}.tar"), str(shards / "train.json")

    # Without --label the indexer refuses, in one line naming the shard, a key and the members it has.
    assert index_main([pattern, "--out", manifest, "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "00000.tar" in err and "'000000000'" in err, err
    assert "members: jpg, json, txt" in err and "--label" in err and "json:FIELD" in err, err
    assert not os.path.exists(manifest)

    assert index_main([pattern, "--out", manifest, "--no-progress", "--label", "json:label"]) == 0
    m = read_manifest(manifest, Storage())
    assert m["classes"] == CLASSES and m["num_classes"] == 3 and m["label"] == "json:label"
    assert m["num_samples"] == 48 and m["format_version"] == 2

    # data.max_skip_fraction=0: a single sample without a usable label stops the run.
    run = run_main(tiny_args(tmp_path / "run", str(tmp_path / "unused"), 6, 6, "data.prepare=none",
                             f"data.train={manifest}", "data.val=''", "data.label=json:label", "model.num_classes=3",
                             "eval.mode=none", "data.max_skip_fraction=0", "train.log_every=2", batch=16))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipping sample" not in run.stderr, run.stderr[-3000:]

    # The default data.label (cls) on these shards: one line at start-up saying what to set.
    from data_pipeline.image.transforms import TrainTransform
    from data_pipeline.stream.train_loader import TrainLoader

    with pytest.raises(DataSpecError, match=r"indexed with --label json:label and data.label is cls: set data.label="):
        TrainLoader(manifest, batch_size=4, transform=TrainTransform(32), seed=0, storage=Storage())


def test_dotted_keys_name_the_members_present_and_the_writer_refuses_them(tmp_path, caplog):
    from data_pipeline.shards.tar_write import ShardWriter
    from data_pipeline.stream.decode import decode_sample

    with TarWriter(str(tmp_path / "d.tar")) as w:  # legal for webdataset's TarWriter, read back as key "a"
        w.write({"__key__": "a.b.c", "jpg": b"x", "cls": b"1"})
    from data_pipeline.shards.tar_read import raw_samples

    sample = next(raw_samples([str(tmp_path / "d.tar")], Storage()))
    assert sample["__key__"] == "a"
    assert decode_sample(sample, lambda b: b) == "missing_member"
    assert any("members: b.c.cls, b.c.jpg" in r.getMessage() and "first dot" in r.getMessage()
               for r in caplog.records)
    import fsspec

    writer = ShardWriter(fsspec.filesystem("file"), str(tmp_path), "w.tar", "t")
    with pytest.raises(ValueError, match=r"sample key 'a.b.c' must .* contain no '.*'a_b_c'"):
        writer.write("a.b.c", b"x", 1)
    writer.abort()


def _img2dataset_python() -> str | None:
    """An interpreter with img2dataset: $IMG2DATASET_PYTHON, or this one."""
    candidate = os.environ.get("IMG2DATASET_PYTHON", sys.executable)
    ok = subprocess.run([candidate, "-c", "import img2dataset"], capture_output=True).returncode == 0
    return candidate if ok else None


@pytest.mark.skipif(_img2dataset_python() is None,
                    reason="img2dataset is not installed (set IMG2DATASET_PYTHON to an interpreter that has it): "
                           "its dependencies take minutes to install and one download takes ~35 s on 2 cores, "
                           "so make test checks its layout only (the test above)")
def test_real_img2dataset_output_indexes_with_json_label(tmp_path, http_server):
    for i in range(9):
        Image.fromarray(np.full((40, 40, 3), i * 20, np.uint8)).save(http_server.root / f"{i}.jpg")
    rows = "url,caption,label\n" + "".join(f"{http_server.url(f'{i}.jpg')},picture {i},{CLASSES[i % 3]}\n"
                                           for i in range(9))
    (tmp_path / "list.csv").write_text(rows)
    code = ("from img2dataset import download; download(url_list=%r, input_format='csv', url_col='url', "
            "caption_col='caption', save_additional_columns=['label'], output_format='webdataset', "
            "output_folder=%r, processes_count=1, thread_count=4, resize_mode='no', number_sample_per_shard=5, "
            "distributor='multiprocessing', enable_wandb=False)") % (str(tmp_path / "list.csv"), str(tmp_path / "out"))
    done = subprocess.run([_img2dataset_python(), "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tars = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert tars == ["00000.tar", "00001.tar"]
    manifest = str(tmp_path / "out" / "train.json")
    assert index_main([str(tmp_path / "out" / "{00000..00001}.tar"), "--out", manifest, "--no-progress",
                       "--label", "json:label"]) == 0
    m = read_manifest(manifest, Storage())
    assert m["num_samples"] == 9 and m["classes"] == CLASSES
    shutil.rmtree(tmp_path / "out" / "_tmp", ignore_errors=True)
    assert ROOT.exists()


def _keyed_labels(manifest: str) -> dict[str, int]:
    from data_pipeline.shards.spec import expand_urls
    from data_pipeline.shards.tar_read import raw_samples

    return {s["__key__"]: int(s["cls"]) for s in raw_samples(expand_urls(manifest, Storage()), Storage())}


def test_resharding_img2dataset_shards_takes_label(tmp_path, capsys):
    from data_pipeline.write import main as write_main

    _img2dataset_shards(tmp_path / "laion")
    out = tmp_path / "re"
    # Without --label: one line naming a sample, its members and the option, not a warning per sample.
    assert write_main(["--shards", str(tmp_path / "laion"), "--out", str(out), "--samples-per-shard", "10",
                       "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no label in cls (members: jpg, json, txt)" in err and "--label" in err, err
    assert write_main(["--shards", str(tmp_path / "laion"), "--out", str(out), "--samples-per-shard", "10",
                       "--label", "json:label", "--no-progress"]) == 0
    m = read_manifest(str(out / "train.json"), Storage())
    assert m["classes"] == CLASSES and m["num_samples"] == 48
    labels = _keyed_labels(str(out / "train.json"))
    assert labels == {f"{s:05d}{i:04d}": (s * 24 + i) % 3 for s in range(2) for i in range(24)}


def _two_manifests(tmp_path) -> tuple[str, str]:
    """img2dataset shards indexed with --label json:label, and the writer's shards (labels in .cls)."""
    from data_pipeline.shards.tar_write import encode_jpeg, write_shards

    _img2dataset_shards(tmp_path / "laion")
    json_manifest = str(tmp_path / "laion" / "train.json")
    assert index_main([str(tmp_path / "laion"), "--out", json_manifest, "--no-progress", "--label", "json:label"]) == 0
    jpg = encode_jpeg(np.zeros((40, 48, 3), np.uint8))
    write_shards([(f"c{i}", jpg, i % 3) for i in range(24)], str(tmp_path / "cls"), "train", 12, storage=Storage())
    return json_manifest, str(tmp_path / "cls" / "train.json")


def test_labels_per_source_and_the_start_check_catches_a_mismatch_both_ways(tmp_path, demo_root):
    from omegaconf import OmegaConf

    from data_pipeline.image.transforms import TrainTransform
    from data_pipeline.stream.sources import DataSource
    from data_pipeline.stream.train_loader import TrainLoader
    from pretrain.build import check_data
    from pretrain.config import load_config

    json_manifest, cls_manifest = _two_manifests(tmp_path)
    # A json:label source mixed with a .cls one, each read from where its labels are: no sample skipped.
    loader = TrainLoader([DataSource(json_manifest, label="json:label"), DataSource(cls_manifest)], batch_size=8,
                         transform=TrainTransform(32), seed=0, num_workers=0, storage=Storage())
    batches = [b for _, b in zip(range(6), loader)]
    assert {s for b in batches for s in b.sources} == {0, 1}
    assert sum(loader.skipped.values()) == 0 and all(0 <= int(x) < 3 for b in batches for x in b.labels)
    with pytest.raises(DataSpecError, match=r"indexed with --label cls and data.sources.0.label is json:label"):
        TrainLoader([DataSource(cls_manifest, label="json:label")], batch_size=8, transform=TrainTransform(32),
                    seed=0, storage=Storage())

    demo = str(ROOT / "configs/demo.yaml")

    def check(*overrides, sources=None):
        config = tmp_path / "mixed.yaml"  # data.sources as a config file gives it, each entry's label included
        config.write_text(f"include: {demo}\n" + OmegaConf.to_yaml({"data": {"train": "", "sources": sources}})
                          if sources else f"include: {demo}\n")
        cfg = load_config(str(config), [f"data.root={demo_root}", "eval.mode=none", *overrides])
        check_data(cfg, Storage(), str(config))

    check(f"data.train={json_manifest}", "data.label=json:label")
    check(sources=[{"train": json_manifest, "label": "json:label"}, {"train": cls_manifest}])
    # labels in the JSON read as .cls ...
    with pytest.raises(DataSpecError) as e:
        check(f"data.train={json_manifest}")
    assert str(e.value) == (f"data.train: {json_manifest}: its manifest was indexed with --label json:label and "
                            "data.label is cls: set data.label=json:label, or index the shards again with --label cls")
    # ... and .cls labels read from the JSON, which would skip every sample
    with pytest.raises(DataSpecError, match=r"^data.sources.1.train: .*indexed with --label cls and data.label is "
                                            r"json:label: set data.label=cls"):
        check("data.label=json:label", sources=[{"train": json_manifest}, {"train": cls_manifest}])
