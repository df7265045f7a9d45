"""Elastic exact resume, even epoch ends and layout-independent order, with real torchrun processes.

The loader runs in tests/drivers/data_loader_run.py under torchrun (gloo); shards live on local disk
or on a moto S3 server on loopback. Global batch 24 divides by 1, 2, 3 and 4 ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
DRIVER = str(ROOT / "tests" / "drivers" / "data_loader_run.py")
GLOBAL_BATCH = 24


def write_uneven(root: Path, prefix: str, sizes: list[int]) -> tuple[str, list[str]]:
    """One manifest per shard (unequal sizes), joined into one ``::`` spec; returns (spec, all keys)."""
    jpg = encode_jpeg(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    specs, keys = [], []
    for i, n in enumerate(sizes):
        shard = [(f"{prefix}{i}_{j:03d}", jpg, j % 10) for j in range(n)]
        write_shards(shard, str(root), f"{prefix}{i}", n, storage=Storage())
        specs.append(str(root / f"{prefix}{i}.json"))
        keys += [k for k, _, _ in shard]
    return "::".join(specs), keys


def launch(out: Path, sources, nproc: int, workers: int, steps: int, state: Path | None = None,
           s3_endpoint: str = "", env_extra: dict | None = None, timeout: int = 240) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", DRIVER, "--sources", json.dumps(sources),
           "--global-batch", str(GLOBAL_BATCH), "--workers", str(workers), "--steps", str(steps),
           "--out", str(out), "--s3-endpoint", s3_endpoint]
    if state is not None:
        cmd += ["--state", str(state)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"keys.rank{i}.json").read_text()) for i in range(nproc)]


def all_keys(ranks: list[dict]) -> list[str]:
    return [k for r in ranks for b in r["batches"] for k in b]


def check_elastic(tmp_path: Path, sources, epoch_keys: list[str], first_steps: int, s3_endpoint: str = ""):
    total_steps = len(epoch_keys) // GLOBAL_BATCH
    first = launch(tmp_path / "a", sources, nproc=2, workers=2, steps=first_steps, s3_endpoint=s3_endpoint)
    states = [r["state"] for r in first]
    assert all(s == states[0] for s in states), "state_dict must be the same global record on every rank"
    before = all_keys(first)
    assert len(before) == first_steps * GLOBAL_BATCH
    for name, nproc, workers in (("b", 1, 3), ("c", 4, 1)):
        after = launch(tmp_path / name, sources, nproc=nproc, workers=workers, steps=total_steps - first_steps,
                       state=tmp_path / "a" / "state.pt", s3_endpoint=s3_endpoint)
        lengths = {len(r["batches"]) for r in after}
        assert lengths == {total_steps - first_steps}, "every rank takes the same number of batches"
        union = before + all_keys(after)
        assert len(union) == len(set(union)), f"{name}: a sample was delivered twice"
        assert sorted(union) == sorted(epoch_keys), f"{name}: the epoch's key set is not covered exactly"


def test_elastic_resume_local_2x2_to_1x3_and_4x1(tmp_path):
    spec, keys = write_uneven(tmp_path / "shards", "a", [10, 20, 30, 40, 50, 90])  # 240 = 10 global batches
    check_elastic(tmp_path, [[spec, 1.0]], keys, first_steps=4)


def test_elastic_resume_two_weighted_sources_from_s3(tmp_path, s3_server):
    import s3fs

    # 3:1 weights; 216 + 72 samples = 12 global batches of 18 + 6, so both epochs end together.
    # After 4 steps 144 + 48 remain: divisible by 1, 2, 3 and 4 ranks, so nothing is dropped at the end.
    spec_a, keys_a = write_uneven(tmp_path / "shards", "a", [16, 50, 70, 80])
    spec_b, keys_b = write_uneven(tmp_path / "shards", "b", [30, 42])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.put(str(tmp_path / "shards") + "/", s3_server.url("train") + "/", recursive=True)
    sources = [[spec.replace(str(tmp_path / "shards"), s3_server.url("train")), weight]
               for spec, weight in ((spec_a, 3.0), (spec_b, 1.0))]
    check_elastic(tmp_path, sources, keys_a + keys_b, first_steps=4, s3_endpoint=s3_server.endpoint)


def test_uneven_shards_give_every_rank_the_same_batches(tmp_path):
    sizes = [10, 25, 40, 55, 70, 85, 89]  # 374 samples over 3 ranks: 124 each, 2 dropped at the epoch end
    spec, keys = write_uneven(tmp_path / "shards", "u", sizes)
    steps = 124 // (GLOBAL_BATCH // 3)  # 15.5 -> the 16th batch crosses into epoch 1
    ranks = launch(tmp_path / "run", [[spec, 1.0]], nproc=3, workers=2, steps=steps + 1, timeout=120)
    assert {len(r["batches"]) for r in ranks} == {steps + 1}
    epoch0 = [k for r in ranks for k in [x for b in r["batches"] for x in b][:124]]
    assert len(epoch0) == len(set(epoch0)) == 372 and set(epoch0) <= set(keys)
    assert ranks[0]["state"]["sources"][0]["dropped"] == 2 and ranks[0]["state"]["sources"][0]["epoch"] == 1


def test_order_independent_of_hash_seed_and_worker_count(tmp_path):
    spec, _ = write_uneven(tmp_path / "shards", "d", [30, 50, 70])
    one = launch(tmp_path / "one", [[spec, 1.0]], nproc=2, workers=1, steps=8, env_extra={"PYTHONHASHSEED": "1"})
    three = launch(tmp_path / "three", [[spec, 1.0]], nproc=2, workers=3, steps=8,
                   env_extra={"PYTHONHASHSEED": "2"})
    assert [r["batches"] for r in one] == [r["batches"] for r in three]
    saved = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
    assert saved == torch.load(tmp_path / "three" / "state.pt", weights_only=True)
