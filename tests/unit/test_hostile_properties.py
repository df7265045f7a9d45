"""Property-based tests over hostile input, the way libjpeg-turbo and Pillow are fuzzed: tar members, labels,
manifest tables and JPEG headers drawn by hypothesis. Each property is what the run relies on: the reader
answers with a sample, a counted skip or one ``DataSpecError``/``ValueError``, never another exception.

``make test`` runs a few dozen derandomized examples per property (seconds); ``make fuzz`` runs the same
properties with ``FUZZ_EXAMPLES`` examples each, randomized (docs/testing.md).
"""
from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.errors import DataSpecError
from data_pipeline.image import transforms
from data_pipeline.image.transforms import EvalTransform, TrainTransform, partial_decode_missing
from data_pipeline.shards.labels import BadLabel, LabelReader
from data_pipeline.shards.manifest import read_index
from data_pipeline.shards.table import ShardTable
from data_pipeline.shards.tar_read import SHARD_ERROR_KEY, parse_sample, raw_samples
from data_pipeline.shards.tar_write import encode_jpeg
from data_pipeline.storage import Storage
from data_pipeline.stream.decode import decode_sample

_FUZZ = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def budget(examples: int) -> settings:
    """``examples`` derandomized examples in ``make test``; ``FUZZ_EXAMPLES`` random ones under ``make fuzz``."""
    return settings(max_examples=_FUZZ or examples, deadline=None, derandomize=not _FUZZ, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    head = bytearray(512)
    head[:len(name[:100])] = name[:100]
    head[100:108], head[108:116], head[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    head[124:136], head[136:148], head[156:157] = b"%011o\0" % len(data), b"00000000000\0", kind
    head[257:265] = b"ustar\x0000"
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head) + data + b"\0" * (-len(data) % 512)


JPG = encode_jpeg(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
names = st.binary(min_size=1, max_size=40) | st.sampled_from([b"a.jpg", b"a.cls", b"b.b.jpg", b"__x__", b"./c.jpg"])
members = st.lists(st.tuples(names, st.binary(max_size=64) | st.just(JPG), st.sampled_from([b"0", b"5", b"L", b"x"])),
                   max_size=6)


@budget(40)
@given(members, st.booleans(), st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
       st.integers(0, 4096))
def test_a_tar_of_any_members_reads_as_samples_or_one_damaged_shard_marker(tmp_path_factory, parts, damaged,
                                                                           flips, cut):
    data = bytearray(b"".join(_member(*p) for p in parts) + b"\0" * 1024)
    if damaged:
        for at, value in flips:  # header fields, sizes, checksums, names
            if at < len(data):
                data[at] = value
        data = data[:cut]
    path = tmp_path_factory.mktemp("tar") / "s.tar"
    path.write_bytes(bytes(data))
    samples = list(raw_samples([str(path)], Storage()))
    for sample in samples:
        assert isinstance(sample["__key__"], str)
        assert sample["__key__"] == SHARD_ERROR_KEY or all(isinstance(v, bytes) for k, v in sample.items()
                                                            if not k.startswith("__"))
    if not damaged:  # any member names (not UTF-8 included), kinds and sizes: the whole shard is read
        assert not any(s["__key__"] == SHARD_ERROR_KEY for s in samples), samples[-1]
    out = parse_sample(bytes(data[:cut]), "s.tar")  # a worker's byte range: the sample, or None
    assert out is None or isinstance(out, dict)


json_values = st.integers() | st.floats() | st.text(max_size=5) | st.booleans() | st.none() | st.lists(st.integers())


@budget(60)
@given(st.sampled_from(["cls", "txt", "json:label"]), st.binary(max_size=40) | st.text(max_size=30).map(str.encode)
       | st.builds(lambda v: json.dumps({"label": v}).encode(), json_values), st.integers(1, 1000))
def test_a_label_member_of_any_bytes_is_an_index_in_the_head_or_a_bad_label(source, data, num_classes):
    classes = ["cat", "dog"] if source != "cls" else None
    reader = LabelReader(source, classes, num_classes=num_classes)
    member = source.split(":")[0]
    try:
        y = reader({member: data})
    except BadLabel as exn:
        assert str(exn)
        return
    assert y is None or (isinstance(y, int) and 0 <= y < num_classes)


def _table_bytes(n: int) -> bytes:
    return ShardTable.from_entries([{"url": f"s-{i}.tar", "num_samples": i + 1, "bytes": 100 * i}
                                    for i in range(n)]).save()


@budget(40)
@given(st.integers(1, 4), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 3000), st.dictionaries(st.sampled_from(["num_shards", "num_samples", "table", "offsets",
                                                               "format_version", "num_classes"]),
                                             st.integers(-2, 10**12) | st.text(max_size=8) | st.none(), max_size=3))
def test_a_damaged_manifest_or_shard_table_is_one_data_spec_error(tmp_path_factory, n, flips, cut, header_edits):
    root = tmp_path_factory.mktemp("manifest")
    table = bytearray(_table_bytes(n))
    for at, value in flips:
        if at < len(table):
            table[at] = value
    (root / "m.shards.npz").write_bytes(bytes(table[:cut] if cut < len(table) else table))
    header = {"format_version": 2, "num_shards": n, "num_samples": n * (n + 1) // 2, "table": "m.shards.npz",
              "num_classes": 3, **header_edits}
    (root / "m.json").write_text(json.dumps(header))
    try:
        m = read_index(str(root / "m.json"), Storage())
    except DataSpecError:
        return
    assert len(m.table) == n and all(isinstance(m.table.url(i), str) for i in range(n))


def _sof_jpeg(progressive: bool, grey: bool) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L" if grey else "RGB", (24, 16), 90).save(buf, "JPEG", progressive=progressive, quality=60)
    return buf.getvalue()


BASES = [_sof_jpeg(p, g) for p in (False, True) for g in (False, True)]


def _with_size(data: bytes, width: int, height: int) -> bytes:
    out, i = bytearray(data), 2
    while i + 4 <= len(out):
        marker, length = out[i + 1], struct.unpack(">H", out[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[i + 5:i + 9] = struct.pack(">HH", height, width)
            break
        i += 2 + length
    return bytes(out)


jpeg_headers = st.builds(
    lambda base, w, h, flips: _flip(_with_size(base, w, h), flips),
    st.sampled_from(BASES), st.integers(0, 65535), st.integers(0, 65535),
    st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=4))


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        if at < len(out):
            out[at] = value
    return bytes(out)


@budget(60)
@given(jpeg_headers)
def test_a_jpeg_of_any_header_is_pixels_or_a_bad_image_and_never_a_large_allocation(data):
    """The header may claim up to 65535 x 65535: with the limit at 1 M pixels nothing large is ever allocated
    (each example runs in milliseconds; before the check one such header cost seconds and gigabytes)."""
    train, ev = TrainTransform(16, max_pixels=1_000_000), EvalTransform(16, max_pixels=1_000_000)
    for fn in (lambda b: train(b, np.random.default_rng(0)), ev):
        out = decode_sample({"__key__": "k", "__url__": "u.tar", "jpg": data, "cls": b"0"}, fn)
        assert out == "bad_image" or (out[0].shape == (16, 16, 3) and out[1] == 0)


@pytest.mark.skipif(transforms._jpeg_region is None, reason=partial_decode_missing() or "built")
@budget(60)
@given(jpeg_headers, st.sampled_from([1, 2, 4, 8]), st.integers(-2, 2**33), st.integers(-2, 2**33),
       st.integers(1, 40), st.integers(1, 40))
def test_the_c_extension_answers_any_header_and_box_with_pixels_or_value_error(data, d, left, top, w, h):
    out = np.zeros((h, w, 3), np.uint8)
    try:
        transforms._jpeg_region.decode_region(data, out, d, left, top, 1_000_000)
    except ValueError:
        return
    assert 0 <= left and 0 <= top  # a box it accepted lies inside the image
