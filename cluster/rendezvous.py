"""Where the nodes of a job meet: the master address and port, and a pre-flight check that every node
reaches it.

  python -m cluster.rendezvous       # "ADDR PORT" for this SLURM job (see cluster/slurm/pretrain.sbatch)

The reach check runs as part of `python -m cluster.envcheck`, on every node of the job.

The master is the first node of the job. Its name is used when it resolves here; on clusters whose node
names are not DNS names (SLURM's NodeName differs from NodeAddr), `scontrol show node` gives the
address SLURM itself uses to reach it. The port is derived from the job id, the same on every node
without any of them talking to each other.

The check binds the master address on node 0 and has every other node connect to it within a few
seconds. A node that cannot reach the master (wrong address, firewall, different network) then fails
with one line naming both ends, instead of hanging in the rendezvous until the collective timeout.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

from cluster.hostlist import HostlistError, expand_hostlist

CHECK_TIMEOUT_S = 30.0  # long enough for srun to start the task on every node, short against a queue wait


def default_port(job_id: str) -> int:
    """The same port on every node without talking to each other; jobs sharing a node differ."""
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def node_address(name: str) -> str:
    """An address for node `name` that every node can use: the name itself when it resolves, else
    SLURM's NodeAddr for it, else the name unchanged (a dry run away from the cluster)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "-o", "show", "node", name], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        if fields.get("NodeAddr"):
            return fields["NodeAddr"]
    return name


def endpoint(env: dict[str, str]) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for this job: the environment's values win, else the first node."""
    addr = env.get("MASTER_ADDR") or node_address(expand_hostlist(env.get("SLURM_JOB_NODELIST") or "localhost")[0])
    port = int(env.get("MASTER_PORT") or default_port(env.get("SLURM_JOB_ID", "local")))
    return addr, port


def node_name() -> str:
    """This node as SLURM names it (several slurmds may share one host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def check_reachable(addr: str, port: int, node_rank: int, nnodes: int,
                    timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """Collective over the nodes (one call on each): None when every node reached addr:port, else
    this node's one-line reason. Node 0 listens there; the others connect and send their names."""
    me = node_name()
    if nnodes <= 1:
        return None
    deadline = time.monotonic() + timeout_s
    if node_rank == 0:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the launcher binds this port next
            try:
                srv.bind((addr, port))
            except OSError as e:
                return (f"master {addr}:{port} cannot be bound on node {me} (node 0): {e.strerror or e}; "
                        "MASTER_ADDR must be an address of the first node")
            srv.listen(nnodes)
            seen: list[str] = []
            while len(seen) < nnodes - 1:
                srv.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    conn, _ = srv.accept()
                except OSError:  # timeout
                    return (f"only {len(seen)} of {nnodes - 1} other node(s) reached the master {addr}:{port} "
                            f"on {me} within {timeout_s:g}s (reached: {', '.join(seen) or 'none'})")
                with conn:
                    conn.settimeout(5)
                    # Read to EOF: the peer closes first, so no TIME_WAIT is left on the port here.
                    seen.append(b"".join(iter(lambda: conn.recv(256), b"")).decode(errors="replace") or "?")
            return None
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))) as c:
                c.sendall(me.encode())
            return None
        except OSError as e:  # refused: node 0 is not listening yet, try again
            last = e.strerror or str(e) or type(e).__name__
            time.sleep(0.2)
    return f"node {me} (node {node_rank}) cannot reach the master {addr}:{port} within {timeout_s:g}s ({last})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    try:
        addr, port = endpoint(dict(os.environ))
    except HostlistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(addr, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
