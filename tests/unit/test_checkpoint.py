"""Checkpoints: round trip, atomic publication, corruption detection, retention, RNG restore."""
import json
import random

import numpy as np
import pytest
import torch

from pretrain.checkpoint import CheckpointError, Checkpointer, capture_rng, restore_rng
from pretrain.dist import DistInfo

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def save(ck, step, value=0.0):
    model = {"w": torch.full((3, 2), float(value)), "b": torch.arange(4.0)}
    engine = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}}
    return ck.save(step, model, engine, rank_state={"step": step, "data": {"pos": [step, 2]}},
                   extra_metadata={"engine": "single"}, config_yaml="a: 1\n")


def test_round_trip(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE)
    path = save(ck, 5, value=1.5)
    assert path.endswith("checkpoints/step_0000005")
    loaded = ck.load_latest()
    assert loaded.step == 5
    assert torch.equal(loaded.model["w"], torch.full((3, 2), 1.5))
    assert torch.equal(loaded.engine["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    assert loaded.rank_state["data"] == {"pos": [5, 2]}
    meta = json.loads((tmp_path / "checkpoints/step_0000005/metadata.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "engine.pt", "config.yaml", "rank_00000.pt"}


def test_partial_save_is_ignored_and_corruption_falls_back(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), ONE)
    save(ck, 10, value=1.0)
    save(ck, 20, value=2.0)
    # A save that died before publication: only the .tmp directory exists.
    (tmp_path / "checkpoints/step_0000030.tmp").mkdir()
    (tmp_path / "checkpoints/step_0000030.tmp/model.safetensors").write_bytes(b"half")
    assert ck.list_steps() == [10, 20]
    # Flip one byte of the newest model file: the checksum catches it, the previous one is used.
    f = tmp_path / "checkpoints/step_0000020/model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ck.load(20)
    loaded = ck.load_latest()
    assert loaded.step == 10 and float(loaded.model["w"][0, 0]) == 1.0
    assert "skipping checkpoint" in caplog.text


def test_directory_without_metadata_is_not_a_checkpoint(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE)
    save(ck, 1)
    (tmp_path / "checkpoints/step_0000001/metadata.json").unlink()
    assert ck.load_latest() is None


def test_keep_last(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE, keep_last=2)
    for s in (1, 2, 3, 4):
        save(ck, s)
    assert ck.list_steps() == [3, 4]


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    save(Checkpointer(str(tmp_path), ONE), 3)
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match="written by 1 ranks, this run has 2"):
        Checkpointer(str(tmp_path), two).load_latest()


def test_pickled_code_is_refused(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE)
    save(ck, 1)
    # Replace engine.pt by a pickle that would call a function, and fix its checksum so that only
    # the weights_only loader stands in the way.
    import hashlib
    import io
    buf = io.BytesIO()
    torch.save({"x": print}, buf)  # a callable is outside the weights_only allow-list
    d = tmp_path / "checkpoints/step_0000001"
    (d / "engine.pt").write_bytes(buf.getvalue())
    meta = json.loads((d / "metadata.json").read_text())
    meta["files"]["engine.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|not allowed"):
        ck.load(1)


def test_rng_capture_restore():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
