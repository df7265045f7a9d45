"""Markers are replaced whole: a write killed at any moment leaves the previous marker (or none),
never a torn one; a reader takes an unreadable marker for absent and says so."""
import logging
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from pretrain.atomic import write_atomic
from pretrain.checkpoint import Checkpointer
from pretrain.dist import DistInfo

N = 4 << 20  # large enough that a write takes a while: a kill lands mid-write if writes could tear

WRITER = f"""
import sys, fsspec
from pretrain.atomic import write_atomic
fs, path = fsspec.filesystem("file"), sys.argv[1]
write_atomic(fs, path, b"A" * {N})
print("ready", flush=True)
i = 0
while True:
    i += 1
    write_atomic(fs, path, (b"B" if i % 2 else b"A") * {N})
"""


def test_killed_writes_leave_a_whole_marker(tmp_path):
    path = tmp_path / "latest"
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = path.read_bytes()
        assert data in (b"A" * N, b"B" * N), f"torn marker: {len(data)} bytes"


def test_interrupted_write_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    write_atomic(fs, str(tmp_path / "latest"), b"step_0000001")

    def fail(*args):
        raise KeyboardInterrupt  # as a signal arriving mid-write would

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(fs, str(tmp_path / "latest"), b"step_0000002")
    assert (tmp_path / "latest").read_bytes() == b"step_0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


@pytest.mark.parametrize("content, said", [(b"\xff\xfe\x00", "unreadable"), (b"", "not a checkpoint name"),
                                           (b"step_00", "not a checkpoint name")])
def test_unreadable_marker_is_absent_and_said(tmp_path, caplog, content, said):
    ckpt = Checkpointer(str(tmp_path), DistInfo(rank=0, world_size=1, local_rank=0, device=None))
    os.makedirs(ckpt.root)
    assert ckpt.read_latest() is None  # missing: absent, nothing to say
    (tmp_path / "checkpoints/latest").write_bytes(content)
    (tmp_path / "checkpoints/.latest.abc.tmp").write_bytes(b"step_000")  # a killed write's leftover
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert ckpt.read_latest() is None
    assert said in caplog.text and "treating it as absent" in caplog.text
    write_atomic(ckpt.fs, f"{ckpt.root}/latest", b"step_0000007")
    assert ckpt.read_latest() == "step_0000007"
    ckpt._purge()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest"]
