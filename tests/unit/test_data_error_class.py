"""Errors in the right class: what a retry cannot heal (a damaged local index, EINVAL, ENOTDIR, EACCES,
EROFS, MemoryError) stops at once with one line naming the file and the rebuild command; a remote store
that refuses connections is retried within the budget, never called "not found"."""
from __future__ import annotations

import errno
import shutil
import time

import numpy as np
import pytest

from data_pipeline.errors import DataSpecError
from data_pipeline.image.transforms import TrainTransform
from data_pipeline.shards.manifest import read_index
from data_pipeline.shards.table import ShardTable
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import RetryBudget, Storage, StorageError, exists
from data_pipeline.stream.train_loader import TrainLoader
from tests.conftest import free_port

PER_SHARD, SHARDS = 10, 3
BUDGET = Storage(give_up_after_s=20.0, backoff_s=0.1)  # a retried error would spend 20 s before "gave up"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("errclass")
    jpgs = [encode_jpeg(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)) for i in range(4)]
    write_shards(((f"k{i:04d}", jpgs[i % 4], i % 3) for i in range(PER_SHARD * SHARDS)), str(root), "train",
                 PER_SHARD, storage=Storage())
    return root


def _copy(root, dst):
    shutil.copytree(root, dst)
    return dst


def _first_batch(spec):
    loader = TrainLoader(spec, batch_size=4, transform=TrainTransform(16), seed=1, num_workers=0, storage=BUDGET)
    it = iter(loader)
    try:
        return next(it)
    finally:
        it.close()


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_damaged_local_offsets_file_is_one_line_with_the_rebuild_command(written, tmp_path, damage):
    root = _copy(written, tmp_path / "d")
    offsets = root / "train.offsets"
    data = offsets.read_bytes()
    offsets.write_bytes(np.random.default_rng(5).bytes(len(data)) if damage == "random" else data[:len(data) // 2])
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        _first_batch(str(root / "train.json"))
    message = str(e.value)
    assert "\n" not in message and str(offsets) in message and "python -m data_pipeline.index" in message
    assert "gave up" not in message and time.monotonic() - t0 < BUDGET.give_up_after_s


def test_table_counts_beyond_the_shard_sizes_are_refused_at_read(written, tmp_path):
    root = _copy(written, tmp_path / "c")
    table_path = root / "train.shards.npz"
    table = ShardTable.load(table_path.read_bytes(), str(root))
    counts = table.counts.copy()
    counts[1] = 10**12
    bad = ShardTable(table.names, table.name_ends, counts, table.sizes, table.offsets_at, table.sha256)
    table_path.write_bytes(bad.save())
    header = (root / "train.json").read_text()
    (root / "train.json").write_text(header.replace(f'"num_samples": {PER_SHARD * SHARDS}',
                                                    f'"num_samples": {int(counts.sum())}'))
    with pytest.raises(DataSpecError, match=r"train.shards.npz.*shard 1 holds 1000000000000 samples.*"
                                            r"rebuild it with python -m data_pipeline.index"):
        read_index(str(root / "train.json"), BUDGET)


@pytest.mark.parametrize("error", [OSError(errno.EINVAL, "Invalid argument"), NotADirectoryError(errno.ENOTDIR, "x"),
                                   PermissionError(errno.EACCES, "x"), OSError(errno.EROFS, "x"), MemoryError()])
def test_local_errors_no_wait_heals_are_permanent(tmp_path, error):
    budget = RetryBudget(str(tmp_path / "train.offsets"), BUDGET)
    with pytest.raises(StorageError, match=r"cannot read .*train.offsets \("):
        budget.failed(error)
    assert budget.attempts == 0


def test_remote_eio_and_timeouts_stay_transient(tmp_path):
    budget = RetryBudget("s3://bucket/train.offsets", Storage(give_up_after_s=5.0, backoff_s=0.01))
    budget.failed(OSError(errno.EINVAL, "Invalid argument"))  # a remote store's odd answer: retried
    budget.failed(TimeoutError("timed out"))
    assert budget.attempts == 2


def test_connection_refused_on_a_remote_url_is_retried_not_not_found():
    url = f"http://127.0.0.1:{free_port()}/x.tar"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"gave up on .*x.tar after \d+s"):
        exists(Storage(give_up_after_s=1.0, backoff_s=0.1), url)
    took = time.monotonic() - t0
    assert took >= 1.0
    print(f"connection refused: retried, gave up {took:.1f}s after the first attempt (1 s budget)")


def test_start_check_says_gave_up_for_a_store_that_refuses_connections():
    from pretrain.data_check import check_path

    url = f"http://127.0.0.1:{free_port()}/val-{{000000..000001}}.tar"
    with pytest.raises(DataSpecError) as e:
        check_path("data.val", url, Storage(give_up_after_s=1.0, backoff_s=0.1), "demo.yaml")
    assert "gave up" in str(e.value) and "not found" not in str(e.value)
