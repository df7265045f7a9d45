"""A Trainer whose start fails after the process group is up (here: a missing manifest) reports one
line and leaves no process group behind, on every rank of a real two-process gloo group."""
import json
import os

import torch.multiprocessing as mp

from tests.conftest import free_port, tiny_args


def _rank(rank: int, port: int, args: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from pretrain.main import main

    rc = main(args)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rc": rc, "initialized": dist.is_initialized()}, f)


def test_failed_start_destroys_process_group(tmp_path, demo_root, capfd):
    missing = tmp_path / "nowhere" / "train.json"
    args = tiny_args(tmp_path / "run", demo_root, 4, 2, f"data.train={missing}", "data.num_workers=0")
    out = str(tmp_path / "result")
    mp.start_processes(_rank, args=(free_port(), args, out), nprocs=2, start_method="spawn", join=True)
    results = [json.loads(open(f"{out}.{r}").read()) for r in range(2)]
    assert results == [{"rc": 2, "initialized": False}] * 2
    err = capfd.readouterr().err
    assert str(missing) in err and "Traceback" not in err
