import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "pretrain" / "main.py")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """The demo data (shapes + digits shards), generated once per test session."""
    from data_pipeline.demo import ensure_demo_data
    from data_pipeline.storage import Storage

    root = str(tmp_path_factory.mktemp("demo_data"))
    ensure_demo_data(root, Storage(), image_size=32)
    return root


def _unmapped_deepspeed_buffers() -> set[Path]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm that no live process maps (its ranks never unlink them)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split()[-1] for line in maps.read_text().splitlines() if "/dev/shm/deepspeed_" in line)
        except OSError:  # the process ended while we looked
            continue
    return {p for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if str(p) not in mapped}


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shm_buffers():
    """Each 2-rank DeepSpeed run on CPU leaves ~140 MB in /dev/shm; the suite starts a dozen. Only
    buffers that appeared during this session and that nothing maps any more are removed."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) if Path("/dev/shm").is_dir() else set()
    yield
    if Path("/dev/shm").is_dir():
        for path in _unmapped_deepspeed_buffers() - before:
            path.unlink(missing_ok=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): a worker takes a whole test file, so a
    module-scoped run is built once; both SLURM files go to one worker (one install, one cluster at a time)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            name = item.path.name
            item.add_marker(pytest.mark.xdist_group("slurm" if name.startswith("test_slurm") else
                                                    str(item.path.relative_to(ROOT))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(run_dir, demo_root, steps=30, every=15, *extra, batch=32) -> list[str]:
    """The demo config shrunk to seconds: the 2-block test model, small batches, 1 few-shot seed."""
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", f"data.root={demo_root}",
            "model.name=mixer_p4_32", f"train.steps={steps}", f"train.global_batch_size={batch}", "optim.lr=3e-3",
            f"checkpoint.every_steps={every}", "train.log_every=5", "optim.warmup_steps=5",
            "data.num_workers=1", "eval.fewshot.shots=[1,5]", "eval.fewshot.seeds=1", *extra]


def run_main(args, launcher=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [MAIN] + list(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


@pytest.fixture
def s3_server():
    """A moto S3 server on a free loopback port with an empty bucket (see tests/servers.py)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    from tests.servers import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def http_server(tmp_path):
    """A threaded HTTP server over a temporary directory (see tests/servers.py)."""
    from tests.servers import HttpServer

    server = HttpServer(tmp_path / "www")
    server.root.mkdir(parents=True, exist_ok=True)
    yield server
    server.stop()


def tiny_trainer(run_dir, demo_root, *overrides):
    """An in-process Trainer on the demo data (2-block test model, no evaluation, no loader workers),
    for tests that drive `Trainer.train_step` themselves."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    return Trainer(load_config(str(ROOT / "configs/demo.yaml"), [
        f"run.dir={run_dir}", f"data.root={demo_root}", "model.name=mixer_p4_32", "train.steps=100",
        "data.num_workers=0", "eval.mode=none", "optim.warmup_steps=2", *overrides]))
