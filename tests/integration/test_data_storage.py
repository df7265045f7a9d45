"""Shards over real servers: HTTP and moto S3, including a server stopped and restarted mid-epoch."""
from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage, StorageError
from data_pipeline.stream.train_loader import TrainLoader
from data_pipeline.image.transforms import TrainTransform

N, PER_SHARD, BATCH = 120, 10, 8


def _write(root) -> list[str]:
    jpg = encode_jpeg(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    samples = [(f"k{i:04d}", jpg, i % 10) for i in range(N)]
    write_shards(samples, str(root), "train", PER_SHARD, storage=Storage())
    return [k for k, _, _ in samples]


def _epoch_with_outage(spec: str, server, storage: Storage, caplog) -> tuple[list[str], float]:
    """Read one epoch; stop the server after 3 batches and bring it back 1.5 s later.

    Returns the keys and the longest wait for one batch (>= the outage when the outage was hit)."""
    loader = TrainLoader(spec, batch_size=BATCH, transform=TrainTransform(8), seed=1, num_workers=0,
                         shuffle_buffer=20, storage=storage)
    keys, it, longest = [], iter(loader), 0.0
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        for step in range(N // BATCH):
            if step == 3:
                server.stop()
                threading.Timer(1.5, server.start).start()
            t0 = time.monotonic()
            keys += next(it).keys
            longest = max(longest, time.monotonic() - t0)
    return keys, longest


def test_http_server_restart_mid_epoch_loses_and_repeats_nothing(tmp_path, http_server, caplog):
    keys = _write(http_server.root / "shards")
    # block_size 0: stream each shard in one GET (Python's http.server has no range requests).
    storage = Storage(retries=8, backoff_s=0.2, extra={"http": {"block_size": 0}})
    got, longest = _epoch_with_outage(http_server.url("shards/train.json"), http_server, storage, caplog)
    assert len(got) == len(set(got)) and sorted(got) == keys
    assert longest > 1.0 and any("retry" in r.getMessage() for r in caplog.records), "the outage was never hit"


def test_s3_server_restart_mid_epoch_loses_and_repeats_nothing(tmp_path, s3_server, caplog):
    import s3fs

    keys = _write(tmp_path / "shards")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.put(str(tmp_path / "shards") + "/", s3_server.url("shards") + "/", recursive=True)
    shutil.rmtree(tmp_path / "shards")
    got, longest = _epoch_with_outage(s3_server.url("shards/train.json"), s3_server, s3_server.storage, caplog)
    assert len(got) == len(set(got)) and sorted(got) == keys
    # botocore's own retries may ride out the outage before ours are needed: the stall proves it was hit.
    assert longest > 1.0, "the outage was never hit"


def _upload(tmp_path, server) -> list[str]:
    import s3fs

    keys = _write(tmp_path / "shards")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint})
    fs.put(str(tmp_path / "shards") + "/", server.url("shards") + "/", recursive=True)
    shutil.rmtree(tmp_path / "shards")
    return keys


def _loader(spec, storage, workers=0):
    return TrainLoader(spec, batch_size=BATCH, transform=TrainTransform(8), seed=1, num_workers=workers,
                       shuffle_buffer=20, storage=storage)


def test_permanent_errors_stop_at_once_naming_the_url(s3_server, monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot read foo://b/train.json \(unknown URL scheme\)"):
        _loader("foo://b/train.json", Storage())
    missing_bucket = f"s3://no-{s3_server.bucket}/train.json"
    with pytest.raises(StorageError, match=rf"cannot read {missing_bucket} \(NoSuchBucket\)"):
        _loader(missing_bucket, s3_server.storage)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fresh = replace(s3_server.storage, extra={"s3": {"skip_instance_cache": True}})
    with pytest.raises(StorageError, match=rf"cannot read {s3_server.url('x.json')} \(NoCredentialsError\)"):
        _loader(s3_server.url("x.json"), fresh)
    assert time.monotonic() - t0 < 10  # no retry of any of them


def test_s3_gone_for_good_stops_within_the_budget_naming_the_shard(tmp_path, s3_server):
    _upload(tmp_path, s3_server)
    it = iter(_loader(s3_server.url("shards/train.json"), replace(s3_server.storage, give_up_after_s=2.0)))
    next(it)
    s3_server.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"gave up on s3://.*/shards/train-0000\d\d.tar after \d+s") as err:
        for _ in range(N // BATCH):
            next(it)
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 2.0 + 5  # the budget, plus the attempt in flight


def test_s3_restarted_empty_then_refilled_within_the_budget_is_bit_exact(tmp_path, s3_server, caplog):
    """moto killed, restarted without the objects (NoSuchKey for a while), objects put back: the epoch
    goes on with the same batches, pixels included, as an undisturbed one."""
    import boto3

    keys = _upload(tmp_path, s3_server)
    spec, storage = s3_server.url("shards/train.json"), replace(s3_server.storage, backoff_s=0.2)
    reference = list(itertools.islice(iter(_loader(spec, storage)), N // BATCH))
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    saved = {o["Key"]: client.get_object(Bucket=s3_server.bucket, Key=o["Key"])["Body"].read()
             for o in client.list_objects_v2(Bucket=s3_server.bucket)["Contents"]}

    def restart_empty_then_refill() -> None:
        s3_server.stop()
        time.sleep(1.5)  # as in the restart test above: moto's server does not rebind sooner
        s3_server.start()
        for key in saved:
            client.delete_object(Bucket=s3_server.bucket, Key=key)
        time.sleep(2.0)
        for key, body in saved.items():
            client.put_object(Bucket=s3_server.bucket, Key=key, Body=body)

    # num_workers 0: forked workers would hold the listening socket, and moto could not restart on its port.
    got, it = [], iter(_loader(spec, storage))
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        for step in range(N // BATCH):
            if step == 3:
                outage = threading.Thread(target=restart_empty_then_refill)
                outage.start()
                time.sleep(2.5)  # the objects are gone now
            got.append(next(it))
    outage.join()
    assert any("FileNotFoundError" in r.getMessage() for r in caplog.records), "no missing object was retried"
    assert [b.keys for b in got] == [b.keys for b in reference]
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(got, reference))
    assert sorted(k for b in got for k in b.keys) == keys


def test_missing_object_is_retried_then_stops_naming_it(tmp_path, http_server):
    _write(http_server.root / "shards")
    (http_server.root / "shards" / "train-000003.tar").unlink()
    storage = Storage(backoff_s=0.1, give_up_after_s=1.0, extra={"http": {"block_size": 0}})
    it = iter(_loader(http_server.url("shards/train.json"), storage))
    # The manifest says it exists: a store being restored answers "not found" for a while, so it is
    # retried, and after the budget the run stops instead of training on a silently smaller data set.
    with pytest.raises(StorageError, match=r"gave up on http://.*/shards/train-000003.tar after"):
        for _ in range(N // BATCH):
            next(it)
