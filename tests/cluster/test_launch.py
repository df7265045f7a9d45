"""The per-node launch plan and its dry run: the exact command every node of an allocation runs."""
import shlex

import pytest

from cluster.launch import MAIN, default_port, main

SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[001-002,010]", "SLURM_JOB_ID": "123456", "SLURM_CPUS_ON_NODE": "64"}


@pytest.fixture
def slurm_env(monkeypatch):
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)


def dry_run(capsys, *args: str) -> list[str]:
    assert main(["--dry-run", *args, "--", "--config", "configs/l16.yaml", "run.dir=/shared/runs/l16"]) == 0
    return capsys.readouterr().out.splitlines()


def node_lines(lines: list[str]) -> dict[str, list[str]]:
    out = {}
    for line in lines:
        if line.startswith("["):
            host, cmd = line[1:].split("] ", 1)
            out[host] = shlex.split(cmd)
    return out


def test_torchrun_plan_from_slurm_env(slurm_env, capsys):
    nodes = node_lines(dry_run(capsys, "--nproc-per-node", "8"))
    assert list(nodes) == ["gpu001", "gpu002", "gpu010"]
    port = default_port("123456")
    for cmd in nodes.values():  # the same line on every node: the rendezvous assigns node ranks
        env = dict(a.split("=", 1) for a in cmd[:cmd.index("-m") - 1])  # the leading VAR=value words
        assert env["MASTER_ADDR"] == "gpu001" and env["MASTER_PORT"] == str(port)
        assert env["OMP_NUM_THREADS"] == "8"  # 64 cores / 8 ranks
        i = cmd.index("torch.distributed.run")
        assert cmd[i + 1:i + 11] == ["--nnodes", "3", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
                                     "--rdzv_endpoint", f"gpu001:{port}", "--rdzv_id", "123456"]
        assert cmd[cmd.index(MAIN) + 1:] == ["--config", "configs/l16.yaml", "run.dir=/shared/runs/l16"]


def test_deepspeed_plan_has_node_ranks_and_hostfile(slurm_env, capsys):
    lines = dry_run(capsys, "--launcher", "deepspeed", "--nproc-per-node", "4", "--hostfile", "/tmp/hf")
    assert "# hostfile /tmp/hf: gpu001 slots=4; gpu002 slots=4; gpu010 slots=4; " in lines
    nodes = node_lines(lines)
    for rank, (host, cmd) in enumerate(nodes.items()):
        assert "deepspeed.launcher.runner" in cmd and "--no_ssh" in cmd
        assert cmd[cmd.index("--node_rank") + 1] == str(rank)
        assert cmd[cmd.index("--master_addr") + 1] == "gpu001"


def test_srun_plan_runs_ranks_directly(slurm_env, capsys):
    lines = dry_run(capsys, "--launcher", "srun", "--nproc-per-node", "8")
    assert "# srun --nodes 3 --ntasks-per-node 8 starts on each node:" in lines
    cmd = node_lines(lines)["gpu010"]
    assert "python" in cmd[cmd.index(MAIN) - 1] and "-m" not in cmd  # the interpreter runs main.py itself


def test_outside_slurm_and_bad_nodelist(monkeypatch, capsys):
    for k in SLURM_ENV:
        monkeypatch.delenv(k, raising=False)
    nodes = node_lines(dry_run(capsys))
    assert list(nodes) == ["localhost"]
    assert main(["--dry-run", "--nodelist", "gpu[1-", "--"]) == 2
    assert "unbalanced brackets" in capsys.readouterr().err
