"""Process-group set-up from whichever launcher started us: plain python, torchrun, the deepspeed
launcher (`--local_rank` plus env) or srun (SLURM_* variables). CUDA/NCCL vs CPU/gloo is a setting."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def process_group_backend(backend: str, use_cuda: bool) -> str:
    """The torch.distributed backend string for the setting ``backend`` (auto, gloo, nccl, ...)."""
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl":
        # Small host-side collectives (skip counters, data-stream records) stay on CPU tensors:
        # route those through gloo and everything on the GPU through NCCL, in one process group.
        backend = "cpu:gloo,cuda:nccl"
    return backend


def local_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """This process's device for the setting `device` (train.device: auto = cuda if present | cpu | cuda),
    made the current CUDA device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    if not use_cuda:
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", backend: str = "auto", local_rank: int | None = None,
                     timeout_s: int | None = None) -> DistInfo:
    """Initialise torch.distributed if the environment describes more than one process.

    timeout_s (default $PRETRAIN_DIST_TIMEOUT_S, else 1800): how long a collective waits for a peer.
    A peer whose process dies is noticed at once (its sockets close); a peer whose whole node vanishes
    (power, network) is noticed only after this long, and only then can an elastic launcher restart
    the survivors on a smaller world. Lower it for elastic runs, keeping it above the slowest
    legitimate wait (a checkpoint, an evaluation on rank 0)."""
    if timeout_s is None:
        timeout_s = int(os.environ.get("PRETRAIN_DIST_TIMEOUT_S") or 1800)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if local_rank is None or local_rank < 0:
        local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)

    dev = local_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = process_group_backend(backend, dev.type == "cuda")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def node_name() -> str:
    """This rank's node as the scheduler names it (several SLURM nodes may share one host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def describe_world(info: DistInfo) -> str:
    """Collective: which ranks run on which node, e.g. "2 ranks on 2 nodes: n1 [0], n2 [1]"."""
    names = [node_name()]
    if info.distributed and dist.is_initialized():
        names = [""] * info.world_size
        dist.all_gather_object(names, node_name())
    nodes: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        nodes.setdefault(name, []).append(rank)
    ranks = {n: f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" if r == list(range(r[0], r[-1] + 1)) else
             ",".join(map(str, r)) for n, r in nodes.items()}
    return (f"{info.world_size} rank(s) on {len(nodes)} node(s): "
            + ", ".join(f"{n} [{ranks[n]}]" for n in nodes))


def node_leaders(info: DistInfo) -> list[int]:
    """Collective: the ranks with local rank 0, one per node, in rank order."""
    if not (info.distributed and dist.is_initialized()):
        return [info.rank]
    flags: list[bool] = [False] * info.world_size
    dist.all_gather_object(flags, info.local_rank == 0)
    return [rank for rank, first in enumerate(flags) if first]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity with one process)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity with one process)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return all_reduce_sum(values) / world


def broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """In place: every rank ends with rank ``src``'s values (a no-op with one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s (picklable, small) value on every rank (identity with one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
