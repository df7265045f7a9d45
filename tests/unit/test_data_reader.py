"""The fast tar member reader agrees with tarfile on what it reads and on what it refuses."""
import io
import tarfile

import numpy as np
import pytest
from webdataset.tariterators import tar_file_iterator

from data_pipeline.shards.tar_read import _fast_tar_members


def _tar(fmt, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("a/x0.jpg", b"\xff\xd8" + bytes(range(256)) * 3), ("a/x0.cls", b"3"), ("__meta__", b"skip me"),
           ("d" * 150 + "/long.jpg", b"long name member"), ("empty.txt", b""), ("k.cls", b"1" * 512)]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_tarfile(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) < 100]
    data = _tar(fmt, members)
    fast = [(m["fname"], m["data"]) for m in _fast_tar_members(io.BytesIO(data))]
    ref = [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]
    assert fast == ref and len(fast) == len(members) - 1  # the __meta__ member is skipped by both


def test_truncated_and_damaged_archives_raise():
    data = _tar(tarfile.GNU_FORMAT, MEMBERS)
    with pytest.raises(tarfile.ReadError):
        list(_fast_tar_members(io.BytesIO(data[:700])))
    damaged = bytearray(data)
    damaged[10] ^= 0xFF  # inside the first header's name: the checksum no longer matches
    with pytest.raises(tarfile.ReadError):
        list(_fast_tar_members(io.BytesIO(bytes(damaged))))


def test_header_checksum_equals_the_byte_sum():
    from data_pipeline.shards.tar_read import _header_sum

    rng = np.random.default_rng(0)
    randoms = [rng.integers(0, 256, 512, dtype=np.uint8).tobytes() for _ in range(200)]
    for header in [bytes(512), b"\xff" * 512, *randoms]:
        assert _header_sum(header) == sum(header[:148]) + 256 + sum(header[156:])


def test_a_sample_is_parsed_in_place_within_a_run():
    from data_pipeline.shards.tar_read import parse_sample

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in ("a", "b"):
            for ext, payload in (("cls", b"3"), ("jpg", key.encode() * 700)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    middle = next(m["__offset__"] for m in _fast_tar_members(io.BytesIO(data)) if m["fname"] == "b.cls")
    end = next(m["__end__"] for m in _fast_tar_members(io.BytesIO(data)) if m["fname"] == "b.jpg")
    a = parse_sample(data, "u", 0, middle)
    assert a == parse_sample(data[:middle], "u") and a["__key__"] == "a" and a["cls"] == b"3"
    b = parse_sample(data, "u", middle, end)
    assert b["__key__"] == "b" and b["jpg"] == b"b" * 700
    assert parse_sample(data, "u", 0, middle - 1) is None, "a range that cuts a member holds no whole sample"
    assert parse_sample(data, "u", 512, middle) is None, "a range that starts inside a member is not a sample"
