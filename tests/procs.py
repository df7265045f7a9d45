"""Process trees on loopback for the multi-process tests and benches (elastic torchrun, torchft replica
groups): each started in a session of its own with its own log, waited on while watched, killed whole."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import psutil

from tests.conftest import ROOT, free_port


def wait_until(cond: Callable[[], bool], timeout: float, what: str, logs: Iterable[Path] = (),
               procs: Iterable[subprocess.Popen] = ()) -> None:
    """Poll `cond` until it holds; an AssertionError with the tail of each of `logs` after `timeout` s, or
    as soon as one of `procs` has exited."""
    deadline, procs = time.time() + timeout, list(procs)
    while not cond():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(f"no {what} after {timeout}s\n" + "\n".join(p.read_text()[-3000:] for p in logs))
        time.sleep(0.05)


def kill_node(agent_pid: int) -> None:
    """SIGKILL an agent and everything under it at once: its rank (torchrun starts each worker in a
    session of its own, so the agent's process group alone would leave the rank running) and the
    rank's data-loader workers. This is what the survivors see when a node dies."""
    agent = psutil.Process(agent_pid)
    for proc in [agent, *agent.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


class Procs:
    """Named process trees, each logging to `<tmp>/<name>.log`; `stop` kills whatever is still running."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, cmd: list[str], **env: str) -> Path:
        log = self.logs[name] = self.tmp / f"{name}.log"
        with log.open("w") as f:
            self.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**self.env, **env},
                                                cwd=ROOT, start_new_session=True)
        return log

    def torchrun(self, name: str, script: str, args: list[str], *, nproc: int = 1, nnodes: str = "1",
                 endpoint: str | None = None, extra: tuple[str, ...] = (), **env: str) -> Path:
        """`script` under torchrun (c10d rendezvous of its own unless `endpoint` is shared)."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc_per_node", str(nproc),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint or f"127.0.0.1:{free_port()}", "--rdzv_id",
               name if endpoint is None else "shared", *extra, script, *args]
        return self.start(name, cmd, **env)

    def kill(self, name: str) -> None:
        kill_node(self.procs[name].pid)
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_node(proc.pid)
            proc.wait()
