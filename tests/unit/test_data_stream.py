"""Training stream: sharding, determinism, exact resume, corrupt data; eval batches."""
import json
import logging

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from data_pipeline.errors import DataSpecError
from data_pipeline.stream.eval_stream import eval_batches
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from data_pipeline.demo_data.synthetic import render_batch
from data_pipeline.stream.train_loader import TrainLoader
from data_pipeline.image.transforms import EvalTransform, TrainTransform

SIZE = 12
NUM_SHARDS, PER_SHARD = 8, 12


def _samples(n, seed=0):
    images = render_batch(np.random.default_rng(seed), [i % 10 for i in range(n)], SIZE)
    for i in range(n):
        yield f"s{i:04d}", encode_jpeg(images[i]), i % 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shards(_samples(NUM_SHARDS * PER_SHARD), str(root), "train", PER_SHARD, storage=Storage())
    return str(root / "train.json")


def _loader(spec, **kw):
    args = dict(batch_size=5, transform=TrainTransform(SIZE, scale=(0.3, 1.0)), seed=3, num_workers=2,
                shuffle_buffer=16)
    args.update(kw)
    return TrainLoader(spec, **args, storage=Storage())


def _take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()  # stops the DataLoader workers now rather than at garbage collection
    return out


def _same(a, b):
    return (a.keys == b.keys and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images))


def test_batch_format(dataset):
    (batch,) = _take(_loader(dataset, num_workers=0), 1)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (5, SIZE, SIZE, 3)
    assert batch.labels.dtype == torch.int64 and batch.labels.shape == (5,)
    assert len(batch.keys) == 5
    # Labels of the test set are key index % 10.
    assert batch.labels.tolist() == [int(k[1:]) % 10 for k in batch.keys]


def test_ranks_and_workers_cover_one_epoch_exactly(dataset):
    # 96 samples over 2 ranks: 48 = 12 batches of 4 per rank and epoch.
    keys = []
    for rank in range(2):
        loader = _loader(dataset, batch_size=4, rank=rank, world_size=2, num_workers=2)
        keys += [k for b in _take(loader, 12) for k in b.keys]
        (source,) = loader.state_dict()["sources"]
        assert source["epoch"] == 0 and source["consumed"] == [0, NUM_SHARDS * PER_SHARD]
    assert len(keys) == len(set(keys)) == NUM_SHARDS * PER_SHARD


def test_more_ranks_than_samples_is_a_clear_error(dataset):
    with pytest.raises(DataSpecError, match="cannot feed 200 ranks"):
        _loader(dataset, world_size=200)


def test_same_seed_same_sequence_other_seed_differs(dataset):
    a, b = _take(_loader(dataset), 8), _take(_loader(dataset), 8)
    assert all(_same(x, y) for x, y in zip(a, b))
    c = _take(_loader(dataset, seed=4), 8)
    assert [x.keys for x in a] != [x.keys for x in c]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(dataset, num_workers):
    # 96 samples, batch 5: the run crosses an epoch boundary (mid-batch) and N=7 is odd, so with two
    # workers the resumed loader must start with the second worker.
    n, m = 7, 18
    reference = _take(_loader(dataset, num_workers=num_workers), n + m)

    first = _loader(dataset, num_workers=num_workers)
    it = iter(first)
    before = [next(it) for _ in range(n)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    for _ in range(3):
        next(it)  # delivered after the save: must not leak into the saved position
    it.close()

    second = _loader(dataset, num_workers=num_workers)
    second.load_state_dict(state)
    after = _take(second, m)
    assert second.state_dict()["sources"][0]["epoch"] >= 1, "test should cross an epoch boundary"
    assert len(before + after) == len(reference)
    for i, (got, want) in enumerate(zip(before + after, reference)):
        assert _same(got, want), f"batch {i} differs"


def test_resume_under_another_seed_or_window_is_refused(dataset):
    state = _loader(dataset, num_workers=2).state_dict()
    _loader(dataset, num_workers=0, rank=1, world_size=2).load_state_dict(state)  # other layouts are fine
    with pytest.raises(DataSpecError, match="seed"):
        _loader(dataset, num_workers=2, seed=9).load_state_dict(state)
    with pytest.raises(DataSpecError, match="window"):
        _loader(dataset, num_workers=2, shuffle_buffer=7).load_state_dict(state)


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory):
    """3 readable shards holding 3 bad samples, plus a truncated one; a manifest from the indexer."""
    from data_pipeline.shards.index import build_index
    from data_pipeline.shards.manifest import read_manifest

    root = tmp_path_factory.mktemp("corrupt")
    good = list(_samples(18, seed=1))
    shards = [good[0:6], good[6:12], good[12:18]]
    bad = {"bad_image": "x0001", "missing_member": "x0002", "bad_label": "x0003"}
    for i, members in enumerate(shards):
        with TarWriter(str(root / f"c-{i}.tar")) as w:
            for key, jpg, label in members:
                w.write({"__key__": key, "jpg": jpg, "cls": str(label).encode()})
                if i == 0 and key == "s0002":
                    w.write({"__key__": bad["bad_image"], "jpg": jpg[: len(jpg) // 3], "cls": b"1"})
                if i == 1 and key == "s0008":
                    w.write({"__key__": bad["missing_member"], "jpg": jpg})  # no .cls
                if i == 2 and key == "s0014":
                    w.write({"__key__": bad["bad_label"], "jpg": jpg, "cls": b"cat"})
    cut = [(f"t{i}", jpg, label) for i, (_, jpg, label) in enumerate(_samples(6, seed=2))]
    with TarWriter(str(root / "c-3.tar")) as w:
        for key, jpg, label in cut:
            w.write({"__key__": key, "jpg": jpg, "cls": str(label).encode()})
    build_index(str(root / "c-3.tar"), str(root / "whole.json"), Storage(), progress=False)
    whole = read_manifest(str(root / "whole.json"), Storage(), offsets=True)["shards"][0]["offsets"]
    data = (root / "c-3.tar").read_bytes()
    cut_at = len(data) // 2 + 100
    (root / "c-3.tar").write_bytes(data[:cut_at])  # truncated mid-member
    complete = [k for (k, _, _), end in zip(cut, whole[1:]) if end <= cut_at]  # whole samples before the cut
    build_index(str(root / "c-{0..3}.tar"), str(root / "c.json"), Storage(), progress=False)
    return str(root / "c.json"), [k for k, _, _ in good], complete, bad


def test_corrupt_samples_are_skipped_counted_logged_and_replaced(corrupt_dataset, caplog):
    manifest, good_keys, complete, bad = corrupt_dataset
    assert 0 < len(complete) < 6
    batches = []
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        loader = _loader(manifest, num_workers=0, batch_size=1, shuffle_buffer=4)
        it = iter(loader)
        while loader.state_dict()["sources"][0]["epoch"] == 0:
            batches.append(next(it).keys)
    it.close()
    # Constant batch shapes: an unusable sample's slot holds another (earlier) sample instead.
    assert all(len(keys) == 1 for keys in batches)
    epoch0 = [k for keys in batches[:-1] for k in keys]  # the last batch is already the first of epoch 1
    assert not set(bad.values()) & set(epoch0)
    # Every complete sample of the truncated shard is delivered, once; nothing after the cut.
    assert set(epoch0) == set(good_keys) | set(complete)
    counts = loader.skipped
    assert counts == {"bad_image": 1, "bad_label": 1, "missing_member": 1, "bad_shard": 0}
    assert len(epoch0) - len(set(epoch0)) == 3 and loader.delivered == len(set(epoch0)) + 1
    messages = [r.getMessage() for r in caplog.records]
    for kind, key in bad.items():
        assert any(key in msg and "c-" in msg for msg in messages), kind


def test_shards_without_a_manifest_stop_at_once_with_the_index_command(tmp_path):
    spec = str(tmp_path / "none-{0..1}.tar")
    with pytest.raises(DataSpecError, match=r"python -m data_pipeline.index '.*none-\{0..1\}.tar' --out"):
        _loader(spec, num_workers=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_batches_cover_every_sample_once_across_ranks(dataset, num_workers):
    keys = []
    for rank in range(2):
        for batch in eval_batches(dataset, batch_size=7, transform=EvalTransform(SIZE), rank=rank, world_size=2,
                                  num_workers=num_workers, storage=Storage()):
            assert batch.images.shape[1:] == (SIZE, SIZE, 3) and len(batch.keys) <= 7
            keys += batch.keys
    assert len(keys) == len(set(keys)) == NUM_SHARDS * PER_SHARD


def test_eval_batches_rank_without_shards_yields_nothing(dataset):
    urls = [f"{dataset[:-len('train.json')]}train-00000{i}.tar" for i in range(2)]
    per_rank = [[k for b in eval_batches(urls, batch_size=4, transform=EvalTransform(SIZE), rank=r, world_size=3,
                                         storage=Storage())
                 for k in b.keys] for r in range(3)]
    assert per_rank[2] == [] and len(per_rank[0]) == len(per_rank[1]) == PER_SHARD


def test_exact_resume_over_corrupt_data_keeps_counts(corrupt_dataset):
    urls = corrupt_dataset[0]  # the manifest
    kw = dict(num_workers=2, batch_size=3, shuffle_buffer=4)
    reference_loader = _loader(urls, **kw)
    reference = _take(reference_loader, 16)

    first = _loader(urls, **kw)
    before = _take(first, 5)
    second = _loader(urls, **kw)
    second.load_state_dict(first.state_dict())
    after = _take(second, 11)
    assert all(_same(a, b) for a, b in zip(before + after, reference))
    # Skips inside the region dropped on resume are neither lost nor counted twice.
    assert second.skipped == reference_loader.skipped and sum(second.skipped.values()) >= 5


def test_weighted_sources_mix_in_proportion_whatever_the_worker_count(tmp_path):
    from data_pipeline.stream.sources import DataSource

    for prefix, n, per in (("a", 60, 15), ("b", 30, 10)):
        write_shards(((f"{prefix}{i:03d}", jpg, c) for i, (_, jpg, c) in enumerate(_samples(n))), str(tmp_path), prefix,
                     per, storage=Storage())
    sources = [DataSource(str(tmp_path / "a.json"), 3.0, "big"), DataSource(str(tmp_path / "b.json"), 1.0, "small")]
    loader = _loader(sources, batch_size=8, num_workers=0)
    batches = _take(loader, 20)
    keys = [k for b in batches for k in b.keys]
    assert sum(k.startswith("a") for k in keys) == 120 and sum(k.startswith("b") for k in keys) == 40
    metrics = loader.metrics()
    assert metrics["data/big/requested_share"] == 0.75 and metrics["data/big/observed_share"] == 0.75
    assert metrics["data/small/epoch"] == 1.0  # 40 draws from 30 samples: into its second epoch
    resumed = _loader(sources, batch_size=8, num_workers=2)
    resumed.load_state_dict(_loader(sources, batch_size=8, num_workers=0).state_dict())
    assert [b.keys for b in _take(resumed, 20)] == [b.keys for b in batches]


def test_resampled_mode_runs_and_refuses_an_exact_state(dataset):
    loader = _loader(dataset, epoch_mode="resampled", num_workers=0)
    batches = _take(loader, 30)  # 150 draws from 96 samples: crosses an epoch
    assert all(len(b) == 5 for b in batches) and loader.state_dict()["epoch_mode"] == "resampled"
    with pytest.raises(DataSpecError, match="epoch_mode"):
        _loader(dataset).load_state_dict(loader.state_dict())


def test_replica_groups_leaving_and_joining_consume_each_sample_once(dataset):
    """Fault-tolerant training's use of the loader (pretrain/engines/ft.py): live iterators re-laid out over
    each step's quorum, a step that is not committed rewound on every group, a group that joins continuing
    from a peer's position. What the committed steps drew is each sample once, and every group's position
    counts exactly that."""
    groups = {g: _loader(dataset, batch_size=2, num_workers=1) for g in "ABC"}
    live = {g: iter(loader) for g, loader in groups.items()}
    keys: list[str] = []

    def layout(members: str) -> None:
        for slot, g in enumerate(members):
            groups[g].restart(slot, len(members))

    def step(members: str, commit: bool = True) -> list[str]:
        drawn = []
        for g in members:
            groups[g].mark()
            drawn += next(live[g]).keys
        if commit:
            keys.extend(drawn)
        else:
            for g in members:
                groups[g].rewind()
        return drawn

    layout("ABC")
    for _ in range(3):
        step("ABC")
    failed = step("ABC", commit=False)  # C died during the step: no update anywhere, its samples go back
    del live["C"]
    layout("AB")
    for _ in range(5):
        step("AB")
    groups["C"] = _loader(dataset, batch_size=2, num_workers=1)  # a replacement, recovered from a peer
    groups["C"].load_position(groups["A"].position())
    live["C"] = iter(groups["C"])
    layout("ABC")
    for _ in range(9):
        step("ABC")
    for it in live.values():
        it.close()
    positions = [groups[g].position()["sources"][0] for g in "ABC"]
    assert positions[0] == positions[1] == positions[2]
    consumed = sum(positions[0]["consumed"][i + 1] - positions[0]["consumed"][i]
                   for i in range(0, len(positions[0]["consumed"]), 2))
    assert len(keys) == len(set(keys)) == consumed == 3 * 6 + 5 * 4 + 9 * 6
    assert positions[0]["epoch"] == 0 and len(failed) == 6
