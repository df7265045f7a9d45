"""Real SLURM clusters for the tests: Debian's slurm-wlm and munge, started from a tmp dir.

`slurm`: one node, `localhost`. `slurm2`: two nodes, `n1` and `n2`, each its own slurmd (own port,
spool, log and pid file: `slurmd -N n1`, `slurmd -N n2`) on this machine, at NodeAddr 127.0.0.1.
The names n1/n2 resolve nowhere, as on clusters whose node names are not their addresses.

The fixtures install the packages when they are missing and they may (root, apt-get present), write
a munge key and slurm.conf (this machine's CPUs per node, one partition, requeue on, no cgroups,
free ports), start munged, slurmctld and the slurmds in the foreground as their own children, wait
for `sinfo` to show the nodes idle, point SLURM_CONF at the cluster, and stop everything afterwards.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")


def _have_slurm() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS)


def _install_or_skip() -> None:
    if _have_slurm():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM (slurm-wlm, munge) is not installed and cannot be installed here "
                    "(needs root and apt-get): apt-get install -y slurm-wlm munge")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0 or not _have_slurm():
        pytest.skip(f"SLURM packages could not be installed: apt-get install slurm-wlm munge failed "
                    f"({(r.stderr.strip().splitlines() or ['?'])[-1]})")


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Slurm:
    conf: Path
    root: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=kw.pop("env", self.env()), timeout=60, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float, log: Path | None = None) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.time() > deadline:
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                raise AssertionError(f"job {job_id} is {info['JobState']} after {timeout}s, "
                                     f"waiting for {states}\n{tail}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all held open while picking (one at a time, the kernel may repeat one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_conf(root: Path, nodes: tuple[str, ...]) -> Path:
    cpus = os.cpu_count() or 1
    mem_mb = max(256, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2 // len(nodes))
    for d in ("state", "spool"):
        (root / d).mkdir()
    # One slurmd per node on this machine: each needs its own port (Port= on its NodeName line) and,
    # through %n (the node name), its own spool dir, log and pid file.
    ctld_port, *node_ports = _free_ports(1 + len(nodes))
    node_lines = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={mem_mb} "
                           "State=UNKNOWN" for n, port in zip(nodes, node_ports))
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=mixertest
# Job ids (and so the rendezvous ports cluster/rendezvous.py derives from them) that differ between
# clusters: two test sessions on one machine must not both start at job 1, port 20001.
FirstJobId={random.randrange(100, 12000)}
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after it (default 120 s); keep the test short.
AuthInfo=socket={root}/munge.socket,cred_expire=5
SlurmctldPort={ctld_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/linear
SchedulerType=sched/builtin
# The main scheduling pass every 2 s (default 60): a requeued job starts again at once.
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _cluster(tmp_path_factory, nodes: tuple[str, ...]):
    """Start a cluster of `nodes` (all on this machine), yield it, stop it (a generator fixture body)."""
    _install_or_skip()
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)
    conf = _write_conf(root, nodes)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = Slurm(conf=conf, root=root)
    env = cluster.env()
    procs: list[subprocess.Popen] = []
    old = os.environ.get("SLURM_CONF")

    def start(*cmd: str) -> None:
        log = (root / f"{'-'.join(Path(c).name for c in cmd[:3:2])}.out").open("w")
        procs.append(subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def idle() -> bool:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return sorted(line.strip() for line in out if line.strip()) == sorted(f"{n} idle" for n in nodes)

    try:
        start(_exe("munged"), "-F", "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
              f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed")
        _wait_for(lambda: (root / "munge.socket").exists(), 20, "munged socket", cluster)
        start(_exe("slurmctld"), "-D", "-i", "-f", str(conf))
        for node in nodes:
            start(_exe("slurmd"), "-D", "-N", node, "-f", str(conf))
        _wait_for(idle, 60, f"node(s) {','.join(nodes)} idle in sinfo", cluster)
        os.environ["SLURM_CONF"] = str(conf)
        yield cluster
    finally:
        if os.environ.get("SLURM_CONF") == str(conf):
            os.environ.pop("SLURM_CONF")
            if old:
                os.environ["SLURM_CONF"] = old
        subprocess.run(["scancel", "--partition", "debug"], env=env, capture_output=True, timeout=30)
        time.sleep(1)
        for p in reversed(procs):  # slurmds, slurmctld, munged: the processes this fixture started
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    yield from _cluster(tmp_path_factory, ("localhost",))


@pytest.fixture(scope="session")
def slurm2(tmp_path_factory):
    """Two nodes, n1 and n2 (see the module docstring); jobs submitted with --nodes 2 span both."""
    yield from _cluster(tmp_path_factory, ("n1", "n2"))


def _wait_for(cond, timeout: float, what: str, cluster: Slurm) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise RuntimeError(f"SLURM test cluster: no {what} after {timeout}s\n{cluster.logs()}")
        time.sleep(0.3)
