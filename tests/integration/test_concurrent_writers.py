"""One writer per output: a second `python -m data_pipeline.index` (or `data_pipeline.write`) on the same
--out, started while the first runs, is refused with one line naming the first, which finishes with one
correct manifest; a rerun after a kill takes the dead process's claim over and removes its temporary files.
Real processes throughout (the CLIs as subprocesses; shards served slowly so the two runs overlap)."""
import functools
import json
import os
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from data_pipeline.shards.manifest import read_manifest
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from data_pipeline.storage.claim import OutputBusy, claim
from tests.conftest import ROOT

SHARDS, PER = 12, 4
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class _GatedHandler(SimpleHTTPRequestHandler):
    """After the first two GETs, every GET waits for `gate`: the first indexer is held mid-run (holding
    its claim) until the test has started the second and seen what became of it."""
    requests = 0
    gate = threading.Event()

    def do_GET(self):
        type(self).requests += 1
        if type(self).requests > 2:
            self.gate.wait(120)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "www"
    jpg = encode_jpeg(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    write_shards(((f"k{i:04d}", jpg, i % 3) for i in range(SHARDS * PER)), str(root), "train", PER, storage=Storage())
    return root


@pytest.fixture
def gated_http(shards):
    _GatedHandler.requests = 0
    _GatedHandler.gate.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_GatedHandler, directory=str(shards)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _GatedHandler.gate.set()
    server.shutdown()
    server.server_close()


def _index(spec, out, cwd):
    return subprocess.Popen([sys.executable, "-m", "data_pipeline.index", spec, "--out", str(out), "--threads", "1",
                             "--no-progress"], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_second_indexer_on_the_same_out_is_refused_naming_the_first(gated_http, tmp_path):
    spec, out = f"{gated_http}/train-{{000000..{SHARDS - 1:06d}}}.tar", tmp_path / "m" / "train.json"
    out.parent.mkdir()
    first = _index(spec, out, tmp_path)
    deadline = time.time() + 120
    while _GatedHandler.requests < 3:  # the first is indexing, held at the gate: it holds the claim
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    t0 = time.monotonic()
    second = _index(spec, out, tmp_path)
    try:
        err2 = second.communicate(timeout=90)[1]
        print(f"second indexer refused {time.monotonic() - t0:.1f}s after its start")
    finally:
        _GatedHandler.gate.set()  # the first goes on (and, were the second not refused, the second too)
    out1, err1 = first.communicate(timeout=120)
    if second.returncode is None:
        err2 = second.communicate(timeout=120)[1]
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 2, err2[-2000:]
    lines = err2.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} is being indexed into by another process: host ")
    assert f"pid {first.pid}," in lines[0] and "data_pipeline.index" in lines[0]
    m = read_manifest(str(out), Storage(), offsets=True)
    assert m["num_samples"] == SHARDS * PER and len(m["shards"]) == SHARDS
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json", "train.offsets", "train.shards.npz"]


def test_rerun_after_a_kill_takes_the_claim_over_and_cleans_up(shards, tmp_path):
    out = tmp_path / "m" / "train.json"
    out.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid of this host that no longer exists: the killed indexer
    (out.parent / "train.json.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                                              "started": time.time(), "command": "index"}))
    leftovers = ["train.offsets.tmp-0badc0de", "train.shards.npz.tmp-0badc0de", "train.json.tmp-0badc0de"]
    for name in leftovers:
        (out.parent / name).write_bytes(b"half")
    r = subprocess.run([sys.executable, "-m", "data_pipeline.index", str(shards / "train-{000000..000002}.tar"),
                        "--out", str(out), "--no-progress"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "taking over the claim" in r.stderr and "removed 3 temporary file(s)" in r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json", "train.offsets", "train.shards.npz"]


def test_writer_on_a_claimed_out_is_refused_and_cleans_after_a_kill(shards, tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "train-000000.tar.tmp-0badc0de").write_bytes(b"half a shard")  # a killed writer's
    cmd = [sys.executable, "-m", "data_pipeline.write", "--shards", str(shards / "train-{000000..000002}.tar"),
           "--out", str(out), "--samples-per-shard", "5", "--processes", "1", "--no-progress"]
    with claim(str(out / "train.json"), Storage(), "written"):  # this test process is the first writer
        r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [
            r.stderr.strip()] and f"is being written by another process: host {os.uname().nodename}, pid " \
            f"{os.getpid()}," in r.stderr
        with pytest.raises(OutputBusy):
            with claim(str(out / "train.json"), Storage(), "written"):
                pass
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                     "train.json", "train.offsets", "train.shards.npz"]


def test_claim_on_object_storage_is_a_conditional_create(s3_server):
    """On S3 the claim is a PUT with If-None-Match (moto's server implements it): a second one is refused,
    and the output can be claimed again once released."""
    out = s3_server.url("data/train.json")
    with claim(out, s3_server.storage, "indexed into"):
        with pytest.raises(OutputBusy, match=r"data/train.json is being indexed into by another process: host "):
            with claim(out, s3_server.storage, "indexed into"):
                pass
    with claim(out, s3_server.storage, "written"):
        pass
    fs, path = s3_server.storage.fs(out + ".lock")
    assert not fs.exists(path)
