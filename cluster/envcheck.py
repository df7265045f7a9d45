"""Check a node before training starts: GPUs visible, NCCL usable, run dir writable, data reachable.

  python -m cluster.envcheck --gpus-per-node 8 --config configs/l16.yaml [key=value ...]
  srun --ntasks-per-node=1 python -m cluster.envcheck ...     # every node of an allocation

Prints one line per check (`ok` or `FAIL` with what is wrong and where) and exits 1 if any failed,
so a broken node costs seconds instead of a hung rendezvous or a crash an hour into the run.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from cluster.rendezvous import check_reachable, endpoint, node_name

if TYPE_CHECKING:  # imported where used: a check that does not need it costs no start-up
    from omegaconf import DictConfig

    from data_pipeline.storage import Storage


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def check_gpus(expected: int) -> Check:
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if seen < expected:
        return Check("gpus", False, f"expected {expected} GPU(s), CUDA sees {seen} (CUDA_VISIBLE_DEVICES={visible}, "
                                    f"torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return Check("gpus", True, f"{seen} visible, {expected} needed")


def check_nccl() -> Check:
    import torch
    import torch.distributed as dist

    if not dist.is_nccl_available():
        return Check("nccl", False, f"torch {torch.__version__} was built without NCCL")
    version = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "?"
    ifnames = os.environ.get("NCCL_SOCKET_IFNAME", "")
    if ifnames and not ifnames.startswith(("^", "=")):  # a prefix list of interfaces to use
        present = os.listdir("/sys/class/net") if os.path.isdir("/sys/class/net") else []
        wanted = [n for n in ifnames.split(",") if n]
        if not any(p.startswith(w) for w in wanted for p in present):
            return Check("nccl", False, f"NCCL_SOCKET_IFNAME={ifnames} matches no interface here "
                                        f"({', '.join(present) or 'none'})")
    return Check("nccl", True, f"NCCL {version}" + (f", NCCL_SOCKET_IFNAME={ifnames}" if ifnames else ""))


def check_writable(url: str) -> Check:
    """The run's own start check (pretrain/run_lease.py): a directory, not a file or below one, where a probe
    file can be written and removed, and so can one in its checkpoint dir."""
    from pretrain.run_lease import check_run_dir

    try:
        check_run_dir(url)
    except Exception as e:  # noqa: BLE001 -- any storage error is the answer: say which and where
        return Check("run dir", False, f"{url}: not writable from {socket.gethostname()} "
                                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return Check("run dir", True, f"{url} writable")


def check_data(cfg: DictConfig, storage: Storage, where: str) -> Check:
    """Every data path the run reads (training, data.val, each enabled evaluator's splits: the trainer's own
    start check, pretrain/data_check.py), read through the run's storage handle (``data.storage``: endpoint,
    profile, anonymous access; transient failures retried within ``data.storage.give_up_after_s``)."""
    from data_pipeline.errors import DataSpecError
    from pretrain.data_check import check_path, data_paths, label_key

    paths = data_paths(cfg)
    try:
        for key, spec in paths:
            check_path(key, spec, storage, where, label_key(cfg, key))
    except DataSpecError as e:  # one line naming the key and the URL
        return Check("data", False, str(e))
    return Check("data", True, f"{', '.join(k for k, _ in paths)}: first shard of each reachable")


def check_master() -> Check:
    """The master address resolves and, in a job of several nodes, every node reaches it (collective
    over the nodes: node 0 listens, the others connect; see cluster/rendezvous.py)."""
    nnodes, node_rank = int(os.environ.get("SLURM_NNODES", "1")), int(os.environ.get("SLURM_NODEID", "0"))
    addr = os.environ.get("MASTER_ADDR")
    if not addr and nnodes == 1:
        return Check("master", True, "MASTER_ADDR unset (set by cluster.launch)")
    addr, port = endpoint(dict(os.environ))
    try:
        resolved = socket.gethostbyname(addr)
    except OSError as e:
        return Check("master", False, f"MASTER_ADDR {addr} does not resolve here ({e})")
    error = check_reachable(addr, port, node_rank, nnodes)
    if error:
        return Check("master", False, error)
    return Check("master", True, f"MASTER_ADDR {addr} -> {resolved}" + (f", port {port} reached by all {nnodes} nodes"
                                                                          if nnodes > 1 else ""))


def check_decode() -> Check:
    """Not a failure: a node without the partial JPEG decoder trains, with about 25 % more input CPU."""
    from data_pipeline.image.transforms import partial_decode_missing

    missing = partial_decode_missing()
    return Check("jpeg decode", True, f"whole images: {missing}" if missing else "partial (libjpeg-turbo regions)")


def run_checks(gpus_per_node: int, run_dir: str | None, data: tuple[DictConfig, Storage, str] | None) -> list[Check]:
    """``data``: the run's config, the storage handle its data is read through and the config file's name
    (None: no data check)."""
    checks: list[Callable[[], Check]] = [check_master]
    if gpus_per_node > 0:
        checks += [lambda: check_gpus(gpus_per_node), check_nccl]
    if run_dir:
        checks.append(lambda: check_writable(run_dir))
    if data:
        checks += [lambda: check_data(*data), check_decode]
    return [check() for check in checks]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs this node must show (0: a CPU run)")
    p.add_argument("--config", help="the run's config: its run.dir must be writable and every data path "
                                     "it reads reachable")
    p.add_argument("--run-dir", help="check this directory / URL is writable (default: the config's run.dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    run_dir, data = args.run_dir, None
    if args.config:
        from pretrain.build import build_storage
        from pretrain.config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        run_dir = run_dir or cfg.run.dir
        if cfg.data.prepare != "demo":  # demo data is generated on start
            data = (cfg, build_storage(cfg), args.config)
    host = node_name()
    results = run_checks(args.gpus_per_node, run_dir, data)
    for c in results:
        print(f"envcheck [{host}] {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}",
              file=sys.stdout if c.ok else sys.stderr)
    failed = [c.name for c in results if not c.ok]
    if failed:
        print(f"error: envcheck [{host}]: {', '.join(failed)} failed; see the lines above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
