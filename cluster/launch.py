"""Start pretrain/main.py on this node of a (SLURM) allocation, or print what every node would run.

  srun --ntasks-per-node=1 python -m cluster.launch --launcher torchrun --nproc-per-node 8 -- --config configs/l16.yaml
  python -m cluster.launch --dry-run --nodelist 'gpu[01-04]' --nproc-per-node 8 -- --config configs/l16.yaml

Launchers (one process per node for torchrun and deepspeed, one per GPU for srun):
  torchrun   torch.distributed.run with c10d rendezvous at the first node (the default)
  deepspeed  the deepspeed launcher with a generated hostfile, --no_ssh (srun already placed us)
  srun       this process becomes the rank itself (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)

Everything a node needs comes from SLURM's environment (SLURM_JOB_NODELIST, SLURM_NODEID,
SLURM_JOB_ID, SLURM_CPUS_PER_TASK) or the options, so the same line works on every node.

Preemption: SLURM's warning signal (SIGUSR1) goes to every process of the job step. The launcher
processes ignore it (the ranks install their own handler, see pretrain/preemption.py); the ranks
checkpoint and exit with REQUEUE_EXIT_CODE, and this wrapper makes that the node's exit code even
though torchrun itself would report any non-zero rank as a plain failure.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cluster.hostlist import HostlistError, expand_hostlist, hostfile_text
from cluster.rendezvous import default_port, node_address
from pretrain.exit_codes import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "pretrain" / "main.py")
LAUNCHERS = ("torchrun", "deepspeed", "srun")
# Elastic torchrun: a node whose agent stops its heartbeat (1 s) is dropped from the rendezvous after
# 3 missed ones, and a round that has its minimum of nodes waits 2 s for more (defaults: 15 s and 30 s).
ELASTIC_RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=2,join_timeout=300"


@dataclass(frozen=True)
class Plan:
    launcher: str
    hosts: list[str]
    nproc_per_node: int
    master_addr: str
    master_port: int
    job_id: str
    cpus_per_node: int | None
    hostfile: str
    min_nodes: int = 0  # torchrun: carry on with this many nodes when others are lost (0: all of them)
    max_restarts: int = 0  # torchrun: restarts of the worker group (after a failure or a lost node)

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_nodes", min(self.min_nodes or self.nnodes, self.nnodes))

    @property
    def nnodes(self) -> int:
        return len(self.hosts)


def plan_from(args: argparse.Namespace, env: dict[str, str]) -> Plan:
    nodelist = args.nodelist or env.get("SLURM_JOB_NODELIST") or "localhost"
    hosts = expand_hostlist(nodelist)
    job_id = env.get("SLURM_JOB_ID", "local")
    cpus = args.cpus_per_node or int(env.get("SLURM_CPUS_ON_NODE", "0") or 0) or None
    return Plan(launcher=args.launcher, hosts=hosts, nproc_per_node=args.nproc_per_node,
                # A node name that does not resolve (NodeName != NodeAddr) is replaced by SLURM's NodeAddr;
                # MASTER_ADDR in the environment wins, as it does for the ranks (node_env).
                master_addr=args.master_addr or env.get("MASTER_ADDR") or node_address(hosts[0]),
                master_port=args.master_port or int(env.get("MASTER_PORT") or default_port(job_id)),
                job_id=job_id, cpus_per_node=cpus,
                hostfile=args.hostfile or os.path.join(tempfile.gettempdir(), f"mixer-hostfile-{job_id}"),
                min_nodes=args.min_nodes, max_restarts=args.max_restarts)


def node_env(plan: Plan) -> dict[str, str]:
    """Variables set for the launcher and the ranks (existing values in the environment win)."""
    env = {"MASTER_ADDR": plan.master_addr, "MASTER_PORT": str(plan.master_port),
           # Async NCCL error handling turns a dead peer into an error instead of a hang until the timeout.
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}
    if plan.cpus_per_node:  # each rank gets its share of the node's cores, not all of them
        env["OMP_NUM_THREADS"] = str(max(1, plan.cpus_per_node // plan.nproc_per_node))
    return env


def node_command(plan: Plan, node_rank: int, main_args: list[str]) -> list[str]:
    """The exact command node `node_rank` runs (for srun: each of its ranks)."""
    if plan.launcher == "torchrun":
        elastic = plan.min_nodes < plan.nnodes or plan.max_restarts > 0
        nnodes = f"{plan.min_nodes}:{plan.nnodes}" if plan.min_nodes < plan.nnodes else str(plan.nnodes)
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes,
                "--nproc_per_node", str(plan.nproc_per_node), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{plan.master_addr}:{plan.master_port}", "--rdzv_id", plan.job_id,
                "--max_restarts", str(plan.max_restarts), *(["--rdzv_conf", ELASTIC_RDZV_CONF] if elastic else []),
                MAIN, *main_args]
    if plan.launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", plan.hostfile, "--no_ssh",
                "--node_rank", str(node_rank), "--master_addr", plan.master_addr,
                "--master_port", str(plan.master_port), MAIN, *main_args]
    return [sys.executable, MAIN, *main_args]


def dry_run(plan: Plan, main_args: list[str]) -> str:
    per_node = "1" if plan.launcher != "srun" else str(plan.nproc_per_node)
    lines = [f"# {plan.launcher}: {plan.nnodes} node(s) x {plan.nproc_per_node} process(es), "
             f"rendezvous {plan.master_addr}:{plan.master_port}",
             f"# srun --nodes {plan.nnodes} --ntasks-per-node {per_node} starts on each node:"]
    if plan.launcher == "deepspeed":
        hosts = hostfile_text(plan.hosts, plan.nproc_per_node).replace("\n", "; ")
        lines.append(f"# hostfile {plan.hostfile}: {hosts}")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in node_env(plan).items())
    for rank, host in enumerate(plan.hosts):
        lines.append(f"[{host}] {env} {shlex.join(node_command(plan, rank, main_args))}")
    return "\n".join(lines)


def _report(failures: dict) -> None:
    """One line per distinct reason: the message a rank left in its error file (pretrain/main.py's
    `report`), else how it ended (exit code, or the signal that killed it) with its rank and node. Left
    out: preempted ranks (exit 75, said by the rank), ranks torchrun itself stopped (SIGTERM) after
    another one failed, and survivors that only lost their connection to the rank that died (their
    line is printed only when no rank is to blame)."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()

    def message(f) -> str | None:
        text = f.error_file_data.get("message")  # torchrun's placeholder without an error file: "<NONE>"
        return text if isinstance(text, str) and text != "<NONE>" else None

    def cause(f) -> bool:  # what ended the run, rather than a consequence of it
        return f.exitcode not in (REQUEUE_EXIT_CODE, -signal.SIGTERM) and not f.error_file_data.get("lost_peer")
    any_cause = any(cause(f) for f in failures.values())
    seen: set[str] = set()
    for rank, failure in sorted(failures.items()):
        if failure.exitcode == REQUEUE_EXIT_CODE or (any_cause and not cause(failure)):
            continue  # preempted (said by the rank); stopped by torchrun, or lost its peer, after another failed
        if message(failure):
            line = f"error: {message(failure)}"
        elif failure.exitcode < 0:
            name = failure.signal_name()
            line = (f"error: rank {rank} (local rank {failure.local_rank}) on node {node} was killed by {name}"
                    + (" (out of memory? the kernel's OOM killer sends SIGKILL; see dmesg)" if name == "SIGKILL"
                       else ""))
        else:
            line = (f"error: rank {rank} (local rank {failure.local_rank}) on node {node} exited with code "
                    f"{failure.exitcode} without reporting an error (e.g. on import); see its output above")
        if line not in seen:
            seen.add(line)
            print(line, file=sys.stderr)


def run_torchrun(argv: list[str]) -> int:
    """torchrun in this process, quiet on failure: each distinct one-line error the ranks left is
    printed once, and torchrun's ChildFailedError report (40 lines, printed by the @record around its
    `main`) and its per-process failure log are left out."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its 4-line banner
    os.environ["MIXER_LAUNCH_REPORTS"] = "1"  # ranks leave their error line in torchrun's error file
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        _report(e.failures)
        codes = {failure.exitcode for failure in e.failures.values()}
        return REQUEUE_EXIT_CODE if codes == {REQUEUE_EXIT_CODE} else max(1, *codes)
    except SignalException:
        # SIGTERM reached the launcher too (a scheduler signals the whole job): torchrun has passed
        # it on to the ranks and waited for them, and they checkpointed on their way out.
        return REQUEUE_EXIT_CODE
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, main_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python -m cluster.launch [options] -- [pretrain/main.py arguments]")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--nodelist", help="SLURM node list (default: $SLURM_JOB_NODELIST, else localhost)")
    p.add_argument("--node-rank", type=int, default=None, help="default: $SLURM_NODEID")
    p.add_argument("--master-addr", help="default: the first host of the node list")
    p.add_argument("--master-port", type=int, help="default: derived from $SLURM_JOB_ID")
    p.add_argument("--cpus-per-node", type=int, help="default: $SLURM_CPUS_ON_NODE; sets OMP_NUM_THREADS")
    p.add_argument("--hostfile", help="deepspeed hostfile to write (default: in $TMPDIR, per job)")
    p.add_argument("--min-nodes", type=int, default=0,
                   help="torchrun, elastic: go on with this many nodes when others are lost (default: all)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun: restart the ranks this often, after a crash or on fewer nodes (default 0)")
    p.add_argument("--dry-run", action="store_true", help="print every node's command and exit")
    args = p.parse_args(ours)
    try:
        plan = plan_from(args, dict(os.environ))
    except HostlistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dry_run(plan, main_args))
        return 0

    node_rank = args.node_rank if args.node_rank is not None else int(os.environ.get("SLURM_NODEID", "0"))
    for key, value in node_env(plan).items():
        os.environ.setdefault(key, value)
    cmd = node_command(plan, node_rank, main_args)
    if plan.launcher == "srun":
        os.execv(cmd[0], cmd)  # become the rank: signals and the exit code are then the rank's own
    # Ignored dispositions survive fork and exec: the launcher keeps running through SIGUSR1, and
    # the ranks replace it with their own handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if plan.launcher == "deepspeed":
        Path(plan.hostfile).write_text(hostfile_text(plan.hosts, plan.nproc_per_node))
        code = subprocess.run(cmd).returncode
        return REQUEUE_EXIT_CODE if code == REQUEUE_EXIT_CODE else code
    return run_torchrun(cmd[3:])


if __name__ == "__main__":
    sys.exit(main())
