"""The node-local shard cache (data.cache) over moto S3: one download per node, eviction, damaged copies,
a full disk, resume from a warm cache. Real processes, a real S3 server, a real (small) tmpfs."""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from data_pipeline.image.transforms import TrainTransform
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from data_pipeline.storage.cache import ShardCache
from data_pipeline.stream.train_loader import TrainLoader

N, PER_SHARD, BATCH = 120, 10, 8
EPOCH = N // BATCH  # batches per epoch on one rank
OFFSETS = 8 * (PER_SHARD + 1) * (N // PER_SHARD)  # bytes of all shards' sample offsets (read from the manifest)


def _upload(tmp_path, server, side: int = 12) -> tuple[str, int]:
    """Shards on the S3 server; their manifest's URL and the bytes of all shards."""
    import s3fs

    rng = np.random.default_rng(0)
    samples = [(f"k{i:04d}", encode_jpeg(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)), i % 10)
               for i in range(N)]
    local = tmp_path / "shards"
    write_shards(samples, str(local), "train", PER_SHARD, storage=Storage())
    total = sum(p.stat().st_size for p in local.glob("*.tar"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint})
    fs.put(str(local) + "/", server.url("shards") + "/", recursive=True)
    shutil.rmtree(local)
    return server.url("shards/train.json"), total


def _loader(spec, endpoint, cache=None, workers=0, rank=0, world=1):
    return TrainLoader(spec, batch_size=BATCH, transform=TrainTransform(8), seed=1, num_workers=workers,
                       shuffle_buffer=20, storage=Storage(s3_endpoint=endpoint), cache=cache, rank=rank,
                       world_size=world)


def _take(loader, n: int) -> tuple[list[str], int]:
    it = iter(loader)
    keys = [k for _ in range(n) for k in next(it).keys]
    it.close()
    return keys, loader.bytes_read


def _copies(d) -> list[str]:
    return sorted(p for p in os.listdir(d) if p.endswith(".shard"))


def _rank(spec, endpoint, cache_dir, rank, out):
    loader = _loader(spec, endpoint, ShardCache(cache_dir, 1 << 30), rank=rank, world=2)
    keys, read = _take(loader, N // 2 // BATCH)
    out.put((rank, keys, read))


def _shard_gets(caplog) -> dict[str, int]:
    """GET requests per shard object, from the moto server's request log (it runs in this process)."""
    gets: dict[str, int] = {}
    for r in caplog.records:
        m = re.search(r'GET /\S+/(train-\d+\.tar)', r.getMessage())
        if r.name == "werkzeug" and m:
            gets[m.group(1)] = gets.get(m.group(1), 0) + 1
    return gets


def test_two_ranks_of_a_node_share_one_download_per_shard(tmp_path, s3_server, caplog):
    spec, total = _upload(tmp_path, s3_server)
    caplog.set_level(logging.INFO, logger="werkzeug")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(spec, s3_server.endpoint, str(tmp_path / "cache"), r, out))
             for r in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    keys = [k for _, ks, _ in got for k in ks]
    assert len(keys) == len(set(keys)) == 2 * (N // 2 // BATCH) * BATCH  # the epoch, split over the two ranks
    # Each shard came from storage once for the node: one GET per shard, and the bytes of the set once.
    assert _shard_gets(caplog) == {f"train-{i:06d}.tar": 1 for i in range(N // PER_SHARD)}
    assert total <= sum(read for _, _, read in got) <= total + 2 * OFFSETS
    assert len(_copies(tmp_path / "cache")) == N // PER_SHARD


def test_full_cache_reads_nothing_from_storage_in_epoch_two_and_on_resume(tmp_path, s3_server):
    spec, total = _upload(tmp_path, s3_server)
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
    plain, _ = _take(_loader(spec, s3_server.endpoint, workers=2), 2 * EPOCH)
    first = _loader(spec, s3_server.endpoint, cache, workers=2)
    keys, read = _take(first, EPOCH + 3)  # one epoch and three batches into the second
    assert keys == plain[:len(keys)] and total <= read <= total + 2 * OFFSETS  # offsets: per worker
    state = first.state_dict()
    # A restart: a new loader (new worker processes) resumes from the saved position on the warm cache.
    resumed = _loader(spec, s3_server.endpoint, ShardCache(str(tmp_path / "cache"), 1 << 30), workers=2)
    resumed.load_state_dict(state)
    rest, read = _take(resumed, EPOCH - 3)
    assert keys + rest == plain and read <= 2 * OFFSETS  # the manifest's offsets, no shard byte


def test_local_shards_are_never_copied(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"k{i:04d}", encode_jpeg(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)), 0) for i in range(40)]
    write_shards(samples, str(tmp_path / "shards"), "train", PER_SHARD, storage=Storage())
    loader = TrainLoader(str(tmp_path / "shards/train.json"), batch_size=BATCH, transform=TrainTransform(8), seed=1,
                         num_workers=0, storage=Storage(), cache=ShardCache(str(tmp_path / "cache"), 1 << 30))
    _take(loader, 5)
    assert not (tmp_path / "cache").exists() or not _copies(tmp_path / "cache")


def test_half_cache_keeps_a_stable_half_and_never_reads_more_than_no_cache(tmp_path, s3_server):
    spec, total = _upload(tmp_path, s3_server)
    shard = total // (N // PER_SHARD)
    _, plain = _take(_loader(spec, s3_server.endpoint), 2 * EPOCH)
    cache = ShardCache(str(tmp_path / "cache"), total // 2 + shard // 2)
    loader = _loader(spec, s3_server.endpoint, cache)
    it = iter(loader)
    for _ in range(EPOCH):
        next(it)
        assert sum(os.path.getsize(tmp_path / "cache" / c) for c in _copies(tmp_path / "cache")) <= cache.max_bytes
    epoch1 = loader.bytes_read
    for _ in range(EPOCH):
        next(it)
    it.close()
    epoch2 = loader.bytes_read - epoch1
    assert epoch1 <= total + OFFSETS  # the first epoch: each shard once at most
    assert epoch2 <= 0.6 * plain / 2  # the second: the cached half is not read again


def test_eviction_is_lru_and_skips_a_copy_being_read(tmp_path, s3_server):
    spec, total = _upload(tmp_path, s3_server)
    from data_pipeline.shards.manifest import read_index  # noqa: PLC0415 - the manifest's sizes

    urls = read_index(spec, Storage(s3_endpoint=s3_server.endpoint)).table
    storage = Storage(s3_endpoint=s3_server.endpoint)
    size = [int(urls.sizes[i]) for i in range(3)]
    cache = ShardCache(str(tmp_path / "cache"), size[0] + size[1] + size[2] // 2)  # room for two shards
    a, read_a = cache.open(urls.url(0), size[0], storage)
    b, _ = cache.open(urls.url(1), size[1], storage)
    b.close()  # b: used after a, but no longer read; a is the least recently used and still being read
    c, read_c = cache.open(urls.url(2), size[2], storage)
    assert read_a == size[0] and read_c == size[2] and c is not None
    assert os.path.exists(cache.path(urls.url(0))) and not os.path.exists(cache.path(urls.url(1)))
    a.close()
    c.close()
    d, _ = cache.open(urls.url(1), size[1], storage)  # now a, the least recently used, goes
    assert d is not None and not os.path.exists(cache.path(urls.url(0))) and os.path.exists(cache.path(urls.url(2)))
    d.close()
    assert cache.evicted == 2


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_a_damaged_copy_is_fetched_again(tmp_path, s3_server, caplog, damage):
    spec, total = _upload(tmp_path, s3_server)
    cache_dir = tmp_path / "cache"
    plain, _ = _take(_loader(spec, s3_server.endpoint), EPOCH)
    _take(_loader(spec, s3_server.endpoint, ShardCache(str(cache_dir), 1 << 30)), EPOCH)
    victim = cache_dir / _copies(cache_dir)[3]
    n = victim.stat().st_size
    with open(victim, "r+b") as f:
        if damage == "overwrite":
            f.seek(0)
            f.write(b"\0" * 1024)  # same size, zeroed header: a reader would find no sample
        else:
            f.truncate(n // 2)
    with caplog.at_level(logging.WARNING):
        keys, read = _take(_loader(spec, s3_server.endpoint, ShardCache(str(cache_dir), 1 << 30)), EPOCH)
    assert keys == plain and n <= read <= n + OFFSETS  # just that shard again, and every sample right
    assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] and victim.stat().st_size == n


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (root only): a cache disk that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_cache_disk_is_one_warning_and_the_run_streams_on(tmp_path, s3_server, small_disk, caplog):
    spec, total = _upload(tmp_path, s3_server, side=256)  # noise JPEGs: about 8 MiB in all, twice the disk
    assert total > 2 * (4 << 20)
    plain, plain_read = _take(_loader(spec, s3_server.endpoint), EPOCH)
    with caplog.at_level(logging.WARNING):
        keys, read = _take(_loader(spec, s3_server.endpoint, ShardCache(str(small_disk / "c"), 1 << 30)), EPOCH)
    assert keys == plain
    full = [r.getMessage() for r in caplog.records if "cannot take more shards" in r.getMessage()]
    assert len(full) == 1 and str(small_disk) in full[0]
    assert 0 < len(_copies(small_disk / "c")) < N // PER_SHARD  # what fitted is cached; the rest streamed
    assert read <= plain_read * 1.05
    # A later run on the still-full disk (the mark left by an earlier run, before this process started) warns once.
    old = time.time() - 3600
    os.utime(small_disk / "c" / "cache-disk-full", (old, old))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        keys, _ = _take(_loader(spec, s3_server.endpoint, ShardCache(str(small_disk / "c"), 1 << 30)), EPOCH)
    assert keys == plain and len([r for r in caplog.records if "cannot take more shards" in r.getMessage()]) == 1


def test_a_dead_process_download_is_cleared_and_its_lock_taken_over(tmp_path, s3_server):
    spec, _ = _upload(tmp_path, s3_server)
    from data_pipeline.shards.manifest import read_index  # noqa: PLC0415

    table = read_index(spec, Storage(s3_endpoint=s3_server.endpoint)).table
    url, size = table.url(0), int(table.sizes[0])
    cache = ShardCache(str(tmp_path / "cache"), 2 * size)
    os.makedirs(cache.dir)
    dead = cache.path(table.url(1)) + ".tmp.otherhost.1234"  # a download cut short by a crash
    with open(dead, "wb") as f:
        f.write(b"\0" * 2 * size)  # as big as the whole cache
    lock = cache.path(url) + ".lock"  # and a lock its process never removed
    open(lock, "w").close()
    old = time.time() - 120
    os.utime(dead, (old, old))
    os.utime(lock, (old, old))
    copy, read = cache.open(url, size, Storage(s3_endpoint=s3_server.endpoint))
    assert copy is not None and read == size and not os.path.exists(dead) and not os.path.exists(lock)
    copy.close()
