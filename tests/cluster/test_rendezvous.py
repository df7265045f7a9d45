"""Where the nodes meet (cluster/rendezvous.py): the reach check between "nodes" that are threads on
loopback, its one-line failures, NodeAddr for names that do not resolve, and the elastic torchrun plan."""
import shlex
import threading

from cluster.launch import ELASTIC_RDZV_CONF, main as launch_main
from cluster.rendezvous import check_reachable, node_address
from tests.conftest import free_port


def run_nodes(addr: str, port: int, nnodes: int, timeout_s: float = 10) -> list[str | None]:
    results: list[str | None] = [None] * nnodes

    def node(rank: int) -> None:
        results[rank] = check_reachable(addr, port, rank, nnodes, timeout_s)

    threads = [threading.Thread(target=node, args=(r,)) for r in reversed(range(nnodes))]  # clients first
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_every_node_reaches_the_master():
    assert run_nodes("127.0.0.1", free_port(), 3) == [None, None, None]
    assert check_reachable("127.0.0.1", free_port(), 0, 1) is None  # one node: nothing to check


def test_unreachable_master_one_line_each():
    port = free_port()
    # Not an address of this machine (TEST-NET-1): node 0 cannot listen there.
    err = check_reachable("192.0.2.1", port, 0, 2, timeout_s=1)
    assert err and "master 192.0.2.1:" in err and "cannot be bound" in err and "\n" not in err
    # Nobody listens: a client gives up at its deadline, naming the master and the last error.
    err = check_reachable("127.0.0.1", port, 1, 2, timeout_s=0.5)
    assert err and f"cannot reach the master 127.0.0.1:{port} within 0.5s" in err and "refused" in err.lower()
    # Node 0 waits for the others only until its deadline.
    err = check_reachable("127.0.0.1", port, 0, 3, timeout_s=0.5)
    assert err and "only 0 of 2 other node(s) reached the master" in err


def test_node_address_from_slurm_when_the_name_does_not_resolve(slurm2):
    assert node_address("n2") == "127.0.0.1"  # NodeAddr of n2 in the test cluster
    assert node_address("localhost") == "localhost"  # a name that resolves is kept
    assert node_address("no-such-node-x") == "no-such-node-x"  # unknown to DNS and SLURM: unchanged


def test_elastic_torchrun_plan(capsys):
    assert launch_main(["--dry-run", "--nodelist", "node[1-4]", "--master-addr", "10.0.0.1", "--min-nodes", "2",
                        "--max-restarts", "3", "--", "--config", "configs/l16.yaml"]) == 0
    cmd = shlex.split(capsys.readouterr().out.splitlines()[-1].split("] ", 1)[1])
    assert cmd[cmd.index("--nnodes") + 1] == "2:4" and cmd[cmd.index("--max_restarts") + 1] == "3"
    assert cmd[cmd.index("--rdzv_conf") + 1] == ELASTIC_RDZV_CONF
    assert launch_main(["--dry-run", "--nodelist", "node[1-4]", "--master-addr", "10.0.0.1", "--"]) == 0
    fixed = capsys.readouterr().out
    assert "--nnodes 4 " in fixed and "--max_restarts 0 " in fixed and "--rdzv_conf" not in fixed
