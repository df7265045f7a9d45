"""Checkpoints with a real single-process engine: round trip, atomic publication, corruption
detection, retention, pickled code refused, RNG restore."""
import hashlib
import io
import json
import random
from functools import partial

import numpy as np
import pytest
import torch

from pretrain.checkpoint import CheckpointError, Checkpointer, CheckpointReader, capture_rng, restore_rng
from pretrain.dist import DistInfo
from pretrain.engines import Engine
from pretrain.optim import build_optimizer, build_scheduler

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_engine(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    return Engine(model, partial(build_optimizer, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
                  partial(build_scheduler, total_steps=10, warmup_steps=2, schedule="linear", end_ratio=0.0),
                  dist_info=ONE)


def train_steps(engine, n):
    for _ in range(n):
        engine.backward(engine.model(torch.randn(5, 4)).square().mean())
        engine.step()


def save(ck, engine, step):
    return ck.save(step, engine, shared_state={"step": step, "scheduler": engine.scheduler_state(),
                                               "data": {"pos": [step, 2]}},
                   rank_state={"rng": capture_rng()}, metadata={"engine": engine.kind}, config_yaml="a: 1\n")


def weights(engine):
    return {k: v.clone() for k, v in engine.unwrapped.state_dict().items()}


def test_round_trip_restores_weights_optimizer_and_schedule(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE)
    a = make_engine()
    train_steps(a, 3)
    path = save(ck, a, 3)
    assert path.endswith("checkpoints/step_0000003")
    b = make_engine(seed=1)
    restored = ck.restore(b)
    b.load_scheduler_state(restored.shared["scheduler"])
    assert restored.step == 3 and restored.shared["data"] == {"pos": [3, 2]} and restored.rank_state
    for k, v in weights(a).items():
        assert torch.equal(v, b.unwrapped.state_dict()[k])
    assert b.lr == a.lr
    # The same next step from both: optimiser moments came back too.
    torch.manual_seed(7)
    train_steps(a, 1)
    torch.manual_seed(7)
    train_steps(b, 1)
    for k, v in weights(a).items():
        assert torch.equal(v, b.unwrapped.state_dict()[k])
    meta = json.loads((tmp_path / "checkpoints/step_0000003/metadata.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "engine/engine.pt", "config.yaml", "rank_00000.pt",
                                  "shared.pt"}
    assert meta["layout"] == {"engine": "single", "world_size": 1}
    assert (tmp_path / "checkpoints/latest").read_text() == "step_0000003"


def test_partial_save_is_ignored_and_corruption_falls_back(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), ONE)
    e = make_engine()
    save(ck, e, 10)
    first = weights(e)
    train_steps(e, 1)
    save(ck, e, 20)
    # A save that died before publication: only the .tmp directory exists.
    (tmp_path / "checkpoints/step_0000030.tmp").mkdir()
    (tmp_path / "checkpoints/step_0000030.tmp/model.safetensors").write_bytes(b"half")
    assert ck.list_steps() == [10, 20]
    # Flip one byte of the newest engine state: the checksum catches it, the previous one is used.
    f = tmp_path / "checkpoints/step_0000020/engine/engine.pt"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ck.verify(20)
    fresh = make_engine(seed=3)
    assert ck.restore(fresh).step == 10
    assert all(torch.equal(v, fresh.unwrapped.state_dict()[k]) for k, v in first.items())
    assert "skipping checkpoint" in caplog.text


def test_missing_file_or_metadata_is_not_a_checkpoint(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE)
    save(ck, make_engine(), 1)
    save(ck, make_engine(), 2)
    (tmp_path / "checkpoints/step_0000002/rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ck.verify(2)
    (tmp_path / "checkpoints/step_0000001/metadata.json").unlink()
    # Neither verifies: the resume stops (one line naming each and the ways out), it never starts over.
    with pytest.raises(CheckpointError) as e:
        ck.restore(make_engine())
    assert "step_0000001: no metadata.json" in str(e.value) and "step_0000002/rank_00000.pt: missing" in str(e.value)
    assert "checkpoint.resume=step_0000002" in str(e.value) and "run.dir" in str(e.value) and "\n" not in str(e.value)


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_no_checkpoint_verifies_stops_and_keeps_them_all(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), ONE)
    e = make_engine()
    for step in (3, 6):
        train_steps(e, 1)
        save(ck, e, step)
    trained = weights(e)
    for step in (3, 6):
        _flip_last_byte(tmp_path / f"checkpoints/step_{step:07d}/model.safetensors")
    before = _tree(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies") as err:
        ck.restore(make_engine(seed=1))
    message = str(err.value)
    for step in (3, 6):
        assert f"step_{step:07d}/model.safetensors: checksum mismatch" in message
    assert "checkpoint.resume=step_0000006" in message and "a new run.dir" in message
    assert _tree(tmp_path / "checkpoints") == before  # nothing deleted, nothing rewritten
    # The way out the line names: take step 6 anyway (weights-only loading still guards against code).
    fresh = make_engine(seed=2)
    restored = ck.restore(fresh, pick=6)
    assert restored.step == 6 and "although it failed verification" in caplog.text
    flipped = {k for k, v in trained.items() if not torch.equal(v, fresh.unwrapped.state_dict()[k])}
    assert len(flipped) <= 1  # the one tensor holding the flipped byte; everything else is the saved state
    # A run resumed so, once it has saved a verified newer checkpoint, continues from that one (a requeue).
    train_steps(fresh, 1)
    save(ck, fresh, 7)
    assert ck.restore(make_engine(), pick=6).step == 7
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=step_0000005: no such checkpoint .* step_0000003"):
        ck.restore(make_engine(), pick=5)


def test_retention_never_deletes_what_the_new_save_does_not_supersede(tmp_path):
    """A run resumed from an older checkpoint saves below later step directories: those stay, and so
    does the checkpoint just written (keep_last counts only what it supersedes)."""
    ck = Checkpointer(str(tmp_path), ONE, keep_last=1)
    e = make_engine()
    save(ck, e, 9)
    save(ck, e, 3)
    assert ck.list_steps() == [3, 9]
    save(ck, e, 4)
    assert ck.list_steps() == [4, 9]


def test_keep_last_plus_every_mth(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE, keep_last=2, keep_every=3)
    e = make_engine()
    for s in range(1, 8):
        save(ck, e, s)
    assert ck.list_steps() == [3, 6, 7]


def test_other_engine_layout_loads_weights_and_says_so(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), ONE)
    e = make_engine()
    train_steps(e, 2)
    save(ck, e, 2)
    meta_path = tmp_path / "checkpoints/step_0000002/metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["layout"] = {"engine": "deepspeed", "world_size": 4, "zero_stage": 3}
    meta_path.write_text(json.dumps(meta))
    fresh = make_engine(seed=5)
    restored = ck.restore(fresh)
    assert restored.step == 2 and restored.rank_state is not None
    assert all(torch.equal(v, fresh.unwrapped.state_dict()[k]) for k, v in weights(e).items())
    assert "optimizer state not restored because it was written by engine 'deepspeed'" in caplog.text


def test_pickled_code_is_refused(tmp_path):
    ck = Checkpointer(str(tmp_path), ONE)
    save(ck, make_engine(), 1)
    # Replace the engine state by a pickle that would call a function, and fix its checksum so that
    # only the weights_only loader stands in the way.
    buf = io.BytesIO()
    torch.save({"x": print}, buf)  # a callable is outside the weights_only allow-list
    d = tmp_path / "checkpoints/step_0000001"
    (d / "engine/engine.pt").write_bytes(buf.getvalue())
    meta = json.loads((d / "metadata.json").read_text())
    meta["files"]["engine/engine.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|not allowed"):
        ck.restore(make_engine())


def _rewrite_metadata(step_dir, **changes):
    meta = json.loads((step_dir / "metadata.json").read_text())
    meta.update(changes)
    (step_dir / "metadata.json").write_text(json.dumps(meta))
    return meta


def test_reader_needs_no_process_group_and_checks_what_it_reads(tmp_path):
    """The one reader (resume, evaluation and export read through it): steps, newest valid, weights and
    config checked against their sha256 and the format version; each problem one line naming the file."""
    e = make_engine()
    save(Checkpointer(str(tmp_path), ONE), e, 1)
    save(Checkpointer(str(tmp_path), ONE), e, 2)
    reader = CheckpointReader(str(tmp_path))
    assert reader.list_steps() == [1, 2] and reader.newest_valid()[0] == 2
    assert all(torch.equal(reader.read_weights(2)[k], v) for k, v in weights(e).items())
    assert reader.read_config(2) == "a: 1\n"
    assert CheckpointReader.locate(str(tmp_path))[1] is None
    located, step = CheckpointReader.locate(str(tmp_path / "checkpoints/step_0000002"))
    assert step == 2 and located.list_steps() == [1, 2]
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        CheckpointReader.locate(str(tmp_path / "nothing"))

    d2 = tmp_path / "checkpoints/step_0000002"
    _rewrite_metadata(d2, format_version=1)  # a checkpoint of another version of this code
    for read in (reader.read_weights, reader.read_config, reader.verify):
        with pytest.raises(CheckpointError, match=r"step_0000002: format_version 1 != 2$"):
            read(2)
    skipped = []
    assert reader.newest_valid(reader.read_weights, skipped=skipped.append)[0] == 1
    assert len(skipped) == 1 and "format_version" in skipped[0]

    d1 = tmp_path / "checkpoints/step_0000001"
    data = bytearray((d1 / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (d1 / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        reader.read_weights(1)
    assert str(exc.value) == f"{d1}/model.safetensors: checksum mismatch (file corrupt or partly written)"
    # Bytes that match their (rewritten) checksum but are no safetensors file: one line as well.
    (d1 / "model.safetensors").write_bytes(b"not safetensors")
    _rewrite_metadata(d1, files={**json.loads((d1 / "metadata.json").read_text())["files"],
                                 "model.safetensors": hashlib.sha256(b"not safetensors").hexdigest()})
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be loaded: SafetensorError") as exc:
        reader.read_weights(1)
    assert "\n" not in str(exc.value)
    assert reader.newest_valid(reader.read_weights, skipped=skipped.append) is None
    with pytest.raises(CheckpointError, match="step_0000007: no such checkpoint"):
        reader.read_weights(7)


def test_rng_capture_restore():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_round_trip_on_s3_with_latest_marker(s3_server, monkeypatch):
    """The same layout on object storage (a real S3 server on loopback): files written in place, the
    metadata and then `latest` last; a save that never wrote its metadata is skipped on restore."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # s3fs/botocore read the endpoint from here
    import fsspec

    run = s3_server.url("runs/ckpt")
    ck = Checkpointer(run, ONE)
    a = make_engine()
    train_steps(a, 2)
    save(ck, a, 2)
    train_steps(a, 1)
    save(ck, a, 3)
    fs, root = fsspec.core.url_to_fs(run)
    assert fs.cat_file(f"{root}/checkpoints/latest").decode().strip() == "step_0000003"
    fs.rm(f"{root}/checkpoints/step_0000003/metadata.json")  # as if the writer died before publishing
    b = make_engine(seed=1)
    restored = Checkpointer(run, ONE).restore(b)
    assert restored.step == 2
    # Only unpublished saves left (a kill during the first save): not checkpoints, so the run starts at 0;
    # a published one that fails its checksums stops the resume instead.
    fs.rm(f"{root}/checkpoints/step_0000002", recursive=True)
    assert Checkpointer(run, ONE).restore(make_engine()) is None
    save(ck, a, 4)
    fs.pipe_file(f"{root}/checkpoints/step_0000004/shared.pt", b"damaged")
    with pytest.raises(CheckpointError, match="no checkpoint in s3://.* verifies"):
        Checkpointer(run, ONE).restore(make_engine())


def test_async_save_snapshots_the_step_while_training_goes_on(tmp_path):
    """async_save: save() returns after the host copy; steps taken while the checkpoint thread writes
    do not leak into it, a second save waits for the first, and leftovers of crashed saves go."""
    (tmp_path / "checkpoints/step_0000009.tmp").mkdir(parents=True)  # a save that died long ago
    ck = Checkpointer(str(tmp_path), ONE, async_save=True)
    a = make_engine()
    train_steps(a, 3)
    at_save = weights(a)
    path = save(ck, a, 3)
    train_steps(a, 2)  # changes weights and moments in place while step 3 may still be written
    save(ck, a, 5)
    ck.wait()
    assert path.endswith("step_0000003") and ck.list_steps() == [3, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000005"]
    assert not list(tmp_path.rglob(".stage"))
    b = make_engine(seed=1)
    restored = Checkpointer(str(tmp_path), ONE).restore(b)
    assert restored.step == 5
    ck.verify(3)
    three = ck.read_weights(3)
    assert all(torch.equal(three[k], v) for k, v in at_save.items())
    assert not all(torch.equal(three[k], v) for k, v in weights(a).items())


def test_failed_async_save_raises_on_wait_and_keeps_the_previous(tmp_path, monkeypatch):
    from pretrain.engines.base import StateWriter

    ck = Checkpointer(str(tmp_path), ONE, async_save=True)
    e = make_engine()
    save(ck, e, 1)

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(e, "snapshot_state", lambda *a, **k: StateWriter([disk_full]))
    save(ck, e, 2)  # returns: the failure happens on the checkpoint thread
    with pytest.raises(CheckpointError, match="step_0000002: checkpoint not saved .*No space left"):
        ck.wait()
    assert ck.list_steps() == [1] and (tmp_path / "checkpoints/latest").read_text() == "step_0000001"
    assert ck.restore(make_engine()).step == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, mode):
    """model.safetensors (written by safetensors, which creates its files 0600) gets the mode of every
    other file of the checkpoint, so an evaluation job of another user of the group can read it."""
    import os
    import stat

    old = os.umask(umask)
    try:
        path = save(Checkpointer(str(tmp_path), ONE), make_engine(), 1)
    finally:
        os.umask(old)
    files = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
    assert os.path.join(path, "model.safetensors") in files
    assert {f: stat.S_IMODE(os.stat(f).st_mode) for f in files} == {f: mode for f in files}
