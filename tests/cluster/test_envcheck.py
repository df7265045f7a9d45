"""Node checks before a job starts: each problem is one line naming what is wrong and where."""
import os

import pytest
import torch

from cluster.envcheck import main
from data_pipeline.shards.tar_write import write_shards
from tests.servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def test_cpu_node_with_writable_run_dir_passes(tmp_path, capsys):
    assert main(["--config", DEMO, f"run.dir={tmp_path}/run"]) == 0
    out = capsys.readouterr().out
    assert f"ok   run dir: {tmp_path}/run writable" in out
    assert list((tmp_path / "run").iterdir()) == []  # the probe removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions; needs a normal user")
def test_read_only_run_dir_fails_as_user(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    assert main(["--run-dir", str(tmp_path / "ro")]) == 1
    assert "not writable" in capsys.readouterr().err


def test_unwritable_run_dir_and_missing_data_fail_with_one_line_each(tmp_path, capsys):
    (tmp_path / "file").write_text("x")  # a file where the run dir should be: nothing can go under it
    code = main(["--config", DEMO, f"run.dir={tmp_path}/file/run", "data.prepare=none",
                 f"data.train={tmp_path}/shards/train.json", "eval.mode=none"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert [line.split()[2] for line in err[:-1]] == ["FAIL", "FAIL"]
    assert f"{tmp_path}/file/run: not writable" in err[0]
    assert f"data.train: manifest '{tmp_path}/shards/train.json' not found" in err[1]
    assert err[-1].endswith("run dir, data failed; see the lines above")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a node without the GPUs it needs")
def test_missing_gpus_and_nccl(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["--gpus-per-node", "8"]) == 1
    err = capsys.readouterr().err
    assert "FAIL gpus: expected 8 GPU(s), CUDA sees 0 (CUDA_VISIBLE_DEVICES=," in err


def test_bad_config_and_unresolvable_master(tmp_path, capsys, monkeypatch):
    assert main(["--config", DEMO, "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    assert main(["--run-dir", str(tmp_path)]) == 1
    assert "FAIL master: MASTER_ADDR no-such-host.invalid does not resolve here" in capsys.readouterr().err


def test_data_check_reads_object_storage_through_data_storage(s3_server, tmp_path, capsys, monkeypatch):
    """The data check goes through the run's storage handle (data.storage.*), not fsspec's environment: with
    no AWS_ENDPOINT_URL, a manifest on the moto server is reachable exactly when data.storage.s3_endpoint
    points at it, and otherwise one line names the manifest."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    write_shards([(f"k{i}", b"x", i % 2) for i in range(4)], s3_server.url("shards"), "train", 2,
                 storage=s3_server.storage)
    manifest = s3_server.url("shards/train.json")
    args = ["--config", DEMO, f"run.dir={tmp_path}/run", "data.prepare=none", f"data.train={manifest}",
            "data.storage.give_up_after_s=1", "eval.mode=none"]

    assert main(args + [f"data.storage.s3_endpoint={s3_server.endpoint}"]) == 0
    assert "ok   data: data.train: first shard of each reachable" in capsys.readouterr().out

    assert main(args + [f"data.storage.s3_endpoint=http://127.0.0.1:{free_port()}"]) == 1  # nothing listens
    fails = [line for line in capsys.readouterr().err.splitlines() if "FAIL" in line]
    assert len(fails) == 1 and "FAIL data:" in fails[0] and f"gave up on {manifest} after" in fails[0], fails
