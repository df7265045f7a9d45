"""Data that is all bad, through pretrain/main.py: a manifest whose offsets are shifted by one byte, a
shard of nothing but undecodable images, a local shard the manifest lists that does not exist. Each
stops with one line naming the real cause -- never an empty batch, a NaN loss and "lower optim.lr"."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from tests.conftest import ROOT, run_main

pytestmark = pytest.mark.slow


def args(run_dir, spec, *extra) -> list[str]:
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", "data.prepare=none",
            f"data.train={spec}", "data.val=''", "eval.fewshot.enabled=false", "eval.linear_probe.enabled=false",
            "model.name=mixer_p4_32", "train.steps=40", "train.global_batch_size=16", "train.log_every=10",
            "checkpoint.every_steps=5", "data.num_workers=1", "optim.warmup_steps=2", *extra]


def write(root, images) -> str:
    samples = [(f"s{i:04d}", img, i % 10) for i, img in enumerate(images)]
    write_shards(samples, str(root), "train", samples_per_shard=40, storage=Storage())
    return str(root / "train.json")


def good_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def one_error_line(r) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "lower optim.lr" not in r.stderr and "non-finite" not in r.stderr and "Traceback" not in r.stderr
    return errors[0]


def test_manifest_offsets_shifted_by_one_byte(tmp_path):
    spec = write(tmp_path / "shards", good_images(160))
    offsets = tmp_path / "shards" / json.loads(open(spec).read())["offsets"]  # format 2: one int64 file
    shifted = np.fromfile(offsets, "<i8")
    assert len(shifted) == 160 + 4, "the writer records per-sample offsets (n + 1 per shard)"
    (shifted + 1).astype("<i8").tofile(offsets)
    t0 = time.monotonic()
    r = run_main(args(tmp_path / "run", spec))
    took = time.monotonic() - t0
    line = one_error_line(r)
    assert "data.max_skip_fraction=0.01" in line and "bad_shard" in line
    assert "the manifest's offsets do not match the shard" in line and "python -m data_pipeline.index" in line
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*")), "a checkpoint of a run on no data"
    print(f"shifted manifest: stopped {took:.1f}s after start")


def test_shard_of_undecodable_images(tmp_path):
    spec = write(tmp_path / "shards", [b"\xff\xd8\xff\xe0 not a jpeg at all" + bytes([i]) for i in range(40)])
    t0 = time.monotonic()
    r = run_main(args(tmp_path / "run", spec))
    took = time.monotonic() - t0
    line = one_error_line(r)
    assert "data.max_skip_fraction=0.01" in line and "bad_image" in line and "undecodable image" in line
    assert "train-000000.tar" in line
    print(f"undecodable shard: stopped {took:.1f}s after start")


def test_missing_local_shard_is_one_line_at_once(tmp_path):
    """A local file does not come back by waiting: no retries (object storage keeps its budget)."""
    spec = write(tmp_path / "shards", good_images(160))
    (tmp_path / "shards" / "train-000002.tar").unlink()
    t0 = time.monotonic()
    r = run_main(args(tmp_path / "run", spec, "data.storage.give_up_after_s=600"))
    took = time.monotonic() - t0
    line = one_error_line(r)
    assert f"cannot read {tmp_path / 'shards' / 'train-000002.tar'} (not found)" in line
    assert "retry" not in r.stderr
    assert took < 60, took  # the start-up and a few steps; not the 600 s budget
    print(f"missing local shard: stopped {took:.1f}s after start")


def test_random_values_in_a_local_offsets_file_are_one_line_with_the_rebuild_command(tmp_path):
    """Offsets that cannot be byte positions (a damaged file) are not a storage outage: one line naming the
    offsets file and the rebuild command at the step that reads them, not the retry budget (EINVAL retried)."""
    spec = write(tmp_path / "shards", good_images(160))
    offsets = tmp_path / "shards" / "train.offsets"
    offsets.write_bytes(np.random.default_rng(1).bytes(offsets.stat().st_size))
    t0 = time.monotonic()
    r = run_main(args(tmp_path / "run", spec, "data.storage.give_up_after_s=600"))
    took = time.monotonic() - t0
    line = one_error_line(r)
    assert f"{offsets}: the offsets of shard " in line and "python -m data_pipeline.index" in line
    assert "retry" not in r.stderr and "gave up" not in line
    print(f"random offsets: stopped {took:.1f}s after start")


def test_table_counts_of_10_to_the_12_stop_at_start(tmp_path):
    from data_pipeline.shards.table import ShardTable

    spec = write(tmp_path / "shards", good_images(160))
    table_path = tmp_path / "shards" / "train.shards.npz"
    t = ShardTable.load(table_path.read_bytes(), "")
    counts = t.counts.copy()
    counts[0] = 10**12
    table_path.write_bytes(ShardTable(t.names, t.name_ends, counts, t.sizes, t.offsets_at, t.sha256).save())
    header = json.loads(open(spec).read())
    header["num_samples"] = int(counts.sum())
    open(spec, "w").write(json.dumps(header))
    t0 = time.monotonic()
    r = run_main(args(tmp_path / "run", spec, "data.storage.give_up_after_s=600"))
    took = time.monotonic() - t0
    line = one_error_line(r)
    assert f"shard table '{table_path}'" in line and "1000000000000 samples" in line
    assert "rebuild it with python -m data_pipeline.index" in line and "retry" not in r.stderr
    print(f"table counts 10^12: stopped {took:.1f}s after start")
