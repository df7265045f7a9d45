"""Hostile shard contents end in a counted skip naming the sample, never a crash, a crash loop or a memory spike:
labels outside the head or not integers, image headers asking for billions of pixels, key names that are not
UTF-8, region boxes that would wrap in the C extension."""
from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from data_pipeline.image import transforms
from data_pipeline.image.limits import ImageTooLarge
from data_pipeline.image.transforms import EvalTransform, TrainTransform, partial_decode_missing
from data_pipeline.shards.index import build_index
from data_pipeline.shards.labels import BadLabel, LabelReader
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.shards.tar_read import parse_sample, raw_samples
from data_pipeline.shards.tar_write import encode_jpeg
from data_pipeline.storage import Storage
from data_pipeline.stream.decode import decode_sample
from data_pipeline.stream.eval_stream import eval_batches
from data_pipeline.stream.train_loader import TrainLoader

SIZE = 12
HOSTILE_CLS = {"h-big": b"100000", "h-super": "\u00b2".encode(), "h-nines": b"9" * 23, "h-neg": b"-1",
               "h-float": b"3.0", "h-empty": b""}


def _jpg(seed: int) -> bytes:
    return encode_jpeg(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hostile_labels(tmp_path_factory):
    """Two shards of 8-class samples with six hostile .cls members among them; the indexer's manifest."""
    root = tmp_path_factory.mktemp("labels")
    hostile = iter(HOSTILE_CLS.items())
    for s in range(2):
        with TarWriter(str(root / f"l-{s}.tar")) as w:
            for i in range(8):
                w.write({"__key__": f"g{s}{i}", "jpg": _jpg(i), "cls": str(i).encode()})
                if i % 3 == 0 and (h := next(hostile, None)):
                    w.write({"__key__": h[0], "jpg": _jpg(i), "cls": h[1]})
    build_index(str(root / "l-{0..1}.tar"), str(root / "l.json"), Storage(), progress=False)
    return str(root / "l.json")


def _loader(spec, **kw):
    return TrainLoader(spec, batch_size=4, transform=TrainTransform(SIZE), seed=0, num_workers=0, shuffle_buffer=4,
                       storage=Storage(), **kw)


def test_labels_outside_the_head_are_counted_skips_and_resume_does_not_crash_loop(hostile_labels, caplog):
    loader = _loader(hostile_labels, num_classes=8)  # the head has 8 classes; one label claims 100000
    it = iter(loader)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        batches = [next(it) for _ in range(6)]  # 22 samples a epoch: all of epoch 0
    it.close()
    assert all(int(b.labels.max()) < 8 and int(b.labels.min()) >= 0 for b in batches)
    assert loader.skipped["bad_label"] == len(HOSTILE_CLS) and sum(loader.skipped.values()) == len(HOSTILE_CLS)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert all(key in messages for key in HOSTILE_CLS)
    assert "class index 100000, outside the 8 classes" in messages
    # Exact resume lands on the same hostile samples: skipped again, never raised.
    first = _loader(hostile_labels, num_classes=8)
    it = iter(first)
    [next(it) for _ in range(2)]
    it.close()
    second = _loader(hostile_labels, num_classes=8)
    second.load_state_dict(first.state_dict())
    it = iter(second)
    again = [next(it) for _ in range(4)]
    it.close()
    assert [b.keys for b in again] == [b.keys for b in batches[2:]]


def test_the_manifest_table_records_each_shards_label_range(hostile_labels, tmp_path):
    from data_pipeline.errors import DataSpecError
    from data_pipeline.shards.tar_write import write_shards

    indexed = read_manifest(hostile_labels, Storage())
    assert [s["labels"] for s in indexed["shards"]] == [[0, 100000], [0, 7]]  # refused labels are not counted
    written = write_shards(((f"w{i}", _jpg(i), 2 + i % 3) for i in range(6)), str(tmp_path), "w", 3,
                           storage=Storage())
    assert [s["labels"] for s in read_manifest(str(tmp_path / "w.json"), Storage())["shards"]] == [[2, 4], [2, 4]]
    # A manifest whose header says fewer classes than its table records stops the loader at start, one line.
    header = json.loads((tmp_path / "w.json").read_text())
    (tmp_path / "w.json").write_text(json.dumps(dict(header, num_classes=3)))
    with pytest.raises(DataSpecError, match=r"shard .*w-00000\d.tar holds class index 4, but the manifest says "
                                            r"num_classes 3; rebuild it"):
        _loader(str(tmp_path / "w.json"))
    assert written["num_classes"] == 5


def test_eval_sets_skip_bad_labels(hostile_labels):
    keys = [k for b in eval_batches(hostile_labels.replace("l.json", "l-{0..1}.tar"), batch_size=5,
                                    transform=EvalTransform(SIZE), storage=Storage(), num_classes=8) for k in b.keys]
    assert len(keys) == 16 and not set(keys) & set(HOSTILE_CLS)


@pytest.mark.parametrize("member,data", [
    ("cls", b"100000"), ("cls", "\u00b2".encode()), ("cls", b"9" * 23), ("cls", b"-3"), ("cls", b"\xff\xfe"),
    ("cls", b" 8 "), ("json", b'{"label": 8}'), ("json", b'{"label": -1}'), ("json", b'{"label": 2.0}'),
    ("json", b'{"label": [1]}'), ("json", b'{"label": true}'), ("json", b'{"label": ' + b"9" * 5000 + b"}"),
    ("json", b"[" * 100000), ("json", b'{"label": 99999999999999999999999}'),
])
def test_label_reader_refuses_what_no_head_can_take(member, data):
    reader = LabelReader("cls" if member == "cls" else "json:label", None, num_classes=8)
    with pytest.raises(BadLabel):
        reader({member: data})
    out = decode_sample({"__key__": "k", "__url__": "u.tar", "jpg": _jpg(0), member: data},
                        lambda b: np.zeros((2, 2, 3), np.uint8), reader)
    assert out == "bad_label" and "sample k in u.tar" in out.detail


def test_label_reader_accepts_labels_inside_the_head():
    assert LabelReader("cls", None, num_classes=8)({"cls": b" 7\n"}) == 7
    assert LabelReader("json:label", None, num_classes=8)({"json": b'{"label": 0}'}) == 0
    assert LabelReader("cls", None)({"cls": b"2147483647"}) == 2**31 - 1  # no count known: int64-safe only


def bomb(width: int = 20000, height: int = 20000, progressive: bool = True) -> bytes:
    """A few hundred bytes of valid JPEG whose frame header claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buf, "JPEG", progressive=progressive, quality=50)
    data, i = bytearray(buf.getvalue()), 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no frame header")


def test_bomb_is_refused_by_every_cpu_path_before_decoding():
    data = bomb()
    assert len(data) < 600
    with pytest.raises(ImageTooLarge, match="20000x20000"):
        TrainTransform(SIZE)(data, np.random.default_rng(0))
    with pytest.raises(ImageTooLarge):
        EvalTransform(SIZE)(data)
    with pytest.raises(ImageTooLarge):
        transforms.decode_image(data)
    from data_pipeline.image.gpu_decode import CropPlanner

    with pytest.raises(ImageTooLarge):  # the GPU path's CPU half: nvJPEG never sees it
        CropPlanner(TrainTransform(SIZE))(data, np.random.default_rng(0))
    png = io.BytesIO()
    Image.new("L", (300, 200)).save(png, "PNG")
    with pytest.raises(ImageTooLarge, match="300x200"):  # PIL's path: the size from the header, before load
        TrainTransform(SIZE, max_pixels=50_000)(png.getvalue(), np.random.default_rng(0))
    out = decode_sample({"__key__": "b", "__url__": "u.tar", "jpg": data, "cls": b"1"},
                        lambda b: TrainTransform(SIZE)(b, np.random.default_rng(0)))
    assert out == "bad_image" and "above data.max_image_pixels" in out.detail
    # A limit above the image lets it through (the default fits a 150 MP photo).
    assert TrainTransform(SIZE, max_pixels=16 * 16)(bomb(16, 16), np.random.default_rng(0)).shape == (SIZE, SIZE, 3)


@pytest.mark.skipif(transforms._jpeg_region is None, reason=partial_decode_missing() or "built")
def test_the_c_extension_checks_the_header_before_it_allocates():
    out = np.empty((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="above the limit of 1000000"):
        transforms._jpeg_region.decode_region(bomb(), out, 1, 0, 0, 1_000_000)


_RSS_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from data_pipeline.image.transforms import EvalTransform, TrainTransform
    from data_pipeline.shards.tar_write import encode_jpeg
    from data_pipeline.stream.decode import decode_sample
    from tests.unit.test_data_hostile import bomb
    train, ev = TrainTransform(224), EvalTransform(224)
    warm = encode_jpeg(np.zeros((300, 300, 3), np.uint8))
    train(warm, np.random.default_rng(0)), ev(warm)  # imports and first-call allocations, before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for fn in (lambda b: train(b, np.random.default_rng(0)), ev):
        assert decode_sample({"__key__": "b", "__url__": "u", "jpg": bomb(), "cls": b"1"}, fn) == "bad_image"
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_a_20000_squared_header_adds_at_most_32_mib_to_a_workers_peak():
    """Peak RSS of a fresh process: 1.16 GB and 7.5 s per sample before the header check (2 cores)."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) <= 32


def test_the_configs_default_limit_is_the_decoders():
    from data_pipeline.image.limits import DEFAULT_MAX_IMAGE_PIXELS
    from pretrain.config import DataConfig

    assert DataConfig.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS


def test_writer_skips_a_bomb(tmp_path):
    from data_pipeline.write import prepare, write

    with pytest.raises(ImageTooLarge):
        prepare(bomb(), None, 90)
    items = [("a", _jpg(0), 0), ("b", bomb(), 1), ("c", _jpg(2), 1)]
    manifest = write(items, str(tmp_path), "t", storage=Storage(), samples_per_shard=8, progress=False)
    assert manifest["num_samples"] == 2 and manifest["skipped"] == 1  # counted and logged, the write goes on


def _tar_member(name: bytes, data: bytes) -> bytes:
    info = bytearray(512)
    info[:len(name)] = name
    info[100:108], info[108:116], info[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    info[124:136], info[136:148], info[156:157] = b"%011o\0" % len(data), b"00000000000\0", b"0"
    info[257:265] = b"ustar\x0000"
    info[148:156] = b" " * 8
    info[148:156] = b"%06o\0 " % sum(info)
    return bytes(info) + data + b"\0" * (-len(data) % 512)


def test_a_key_name_that_is_not_utf8_is_read_named_and_the_shard_kept(tmp_path, caplog, monkeypatch):
    from data_pipeline.shards import tar_read

    monkeypatch.setattr(tar_read, "_warned_names", [0])  # the first few are named per process
    tar = b"".join(_tar_member(k + e, d) for k in (b"k0", b"caf\xe9", b"k2")
                   for e, d in ((b".jpg", _jpg(0)), (b".cls", b"1"))) + b"\0" * 1024
    (tmp_path / "u-0.tar").write_bytes(tar)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        samples = list(raw_samples([str(tmp_path / "u-0.tar")], Storage()))
    assert [s["__key__"] for s in samples] == ["k0", "caf\\xe9", "k2"]  # no damaged-shard marker after it
    assert any("not UTF-8" in r.getMessage() and "caf\\xe9" in r.getMessage() for r in caplog.records)
    build_index(str(tmp_path / "u-0.tar"), str(tmp_path / "u.json"), Storage(), progress=False)
    entry = read_manifest(str(tmp_path / "u.json"), Storage(), offsets=True)["shards"][0]
    assert entry["num_samples"] == 3  # the indexer keeps the rest of the shard
    # The worker's per-sample read of that byte range: the sample, not "the offsets do not match".
    o = entry["offsets"]
    sample = parse_sample(tar[o[1]:o[2]], "u-0.tar")
    assert sample is not None and sample["__key__"] == "caf\\xe9"
    batch = next(iter(_loader(str(tmp_path / "u.json"))))
    assert sorted(batch.keys)[:3] == ["caf\\xe9", "k0", "k2"] and torch.all(batch.labels == 1)


@pytest.mark.skipif(transforms._jpeg_region is None, reason=partial_decode_missing() or "built")
@pytest.mark.parametrize("left,top,w", [(2**32 - 8, 0, 16), (0, 2**32 - 1, 4), (-1, 0, 4), (2**64, 0, 4),
                                        (61, 0, 4)])
def test_region_boxes_that_would_wrap_are_value_errors(left, top, w):
    data = encode_jpeg(np.zeros((64, 64, 3), np.uint8))
    out = np.empty((4, w, 3), np.uint8)
    with pytest.raises(ValueError):
        transforms._jpeg_region.decode_region(data, out, 1, left, top)
