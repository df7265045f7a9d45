"""Memory estimate for a run: device memory on a GPU, host memory on every machine, printed before the
run starts, and checked against what the machine has (a run that cannot fit stops before step 1).

Model states, bytes per parameter, following the ZeRO paper's accounting:
  single / ddp / fsdp   weights 4 (fp32), gradients 4, Adam 8 (m, v); autocast / FSDP's mixed
                        precision cast on the fly
  deepspeed             weights and gradients 2 in bf16/fp16 (4 in fp32), optimiser 12
                        (fp32 master copy + m + v)
Sharding divides by the world size: fsdp shards all three; ZeRO-1 the optimiser, ZeRO-2 also the
gradients, ZeRO-3 also the weights. fsdp and ZeRO-3 add the working copy of gathered blocks (the
current one and the prefetched next). Offloaded optimiser states live in host memory.

Activations kept for backward, per image and Mixer block (N tokens, width C, hidden D_S, D_C):
  4*N*C (two LayerNorm inputs and outputs) + 2*C*D_S (token MLP pre/post GELU)
  + 2*N*D_C (channel MLP pre/post GELU), in the compute precision. With activation checkpointing
  only each block's input (N*C) is kept, plus one block's full set during its recompute. Backward
  needs one more block's worth for the gradients flowing through it, and autocast keeps a half copy
  of the weights while the forward runs.
The optimiser step (foreach AdamW) allocates one fp32 copy of the rank's parameters (sqrt(v)); it
runs after the activations are freed, so the larger of the two counts.

Host memory, besides the model states on a CPU run:
  runtime      the Python process with torch and the libraries loaded (measured, RUNTIME_BYTES)
  checkpoint   a save's host copies: the consolidated fp32 weights (rank 0; every rank under
               ddp/single) and, with checkpoint.async_save, the rank's optimiser state (and weight
               shard) staged while training goes on
  workers      each data-loader worker process (WORKER_BYTES) plus the batches it has prefetched
Norms' statistics, the stem, the head and allocator slack are left out: it is an estimate;
bench/memory_estimate.py compares it with measured peaks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

GIB = 2**30
# Measured (bench/memory_estimate.py, torch 2.13 CPU): the PSS of a started trainer before its model is
# built, and of one idle data-loader worker (a forked process shares the parent's pages; PSS counts its share).
RUNTIME_BYTES = 330 * 2**20
WORKER_BYTES = 60 * 2**20
PREFETCH_BATCHES = 2  # torch DataLoader's prefetch_factor: batches each worker holds ready


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # bytes on each device
    grads: int
    optimizer: int
    gathered: int  # fsdp / ZeRO-3 working copy of gathered block weights
    activations: int  # saved for backward, + one block's backward workspace and the autocast weight copies
    optimizer_host: int = 0  # offloaded optimiser states (host memory, not device)
    step_temp: int = 0  # the optimiser step's temporary (after the activations are freed)
    checkpoint: int = 0  # host copies a save holds (consolidated weights, async staging)
    async_checkpoint: bool = False  # the staging copy lives on while the next steps train
    workers: int = 0  # data-loader worker processes (host)
    runtime: int = RUNTIME_BYTES  # the process itself (host)
    device_type: str = "cpu"

    @property
    def total(self) -> int:
        """Peak bytes of model states and activations on the compute device (host memory on a CPU run)."""
        return self.params + self.grads + self.optimizer + self.gathered + max(self.activations, self.step_temp)

    @property
    def host(self) -> int:
        """Peak host bytes of one rank: its process, its workers, the save's copies (and, on a CPU run, the
        model states). An async save's copy overlaps training; a synchronous one only the model states."""
        states = self.total if self.device_type == "cpu" else 0
        resident = self.params + self.optimizer + self.gathered if self.device_type == "cpu" else 0
        peak = states + self.checkpoint if self.async_checkpoint else max(states, resident + self.checkpoint)
        return peak + self.optimizer_host + self.workers + self.runtime

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        states = (f"params {g(self.params)} + grads {g(self.grads)} + optimizer {g(self.optimizer)} + gathered "
                  f"{g(self.gathered)} + max(activations {g(self.activations)}, optimizer step {g(self.step_temp)})")
        host = (f"runtime {g(self.runtime)} + data workers {g(self.workers)} + checkpoint copies "
                f"{g(self.checkpoint)}{' (async: during training)' if self.async_checkpoint else ''}")
        if self.optimizer_host:
            host += f" + offloaded optimizer {g(self.optimizer_host)}"
        if self.device_type == "cpu":
            return f"{states} + {host} = {g(self.host)} GiB host memory per rank"
        return f"{states} = {g(self.total)} GiB per device; host: {host} = {g(self.host)} GiB per rank"


def activation_elements_per_image(model: nn.Module, checkpointing: bool = False) -> int:
    n, c = model.num_tokens, model.embed_dim
    per_block = []
    for block in model.blocks:
        d_s, d_c = block.mlp_tokens.fc1.out_features, block.mlp_channels.fc1.out_features
        per_block.append(4 * n * c + 2 * c * d_s + 2 * n * d_c)
    if checkpointing:
        return len(per_block) * n * c + max(per_block)
    return sum(per_block)


def backward_elements_per_image(model: nn.Module) -> int:
    """The gradients flowing through one block in backward: its largest activations, in and out."""
    n, c = model.num_tokens, model.embed_dim
    block = max(model.blocks, key=lambda b: b.mlp_channels.fc1.out_features)
    return 2 * max(n * c, n * block.mlp_channels.fc1.out_features, c * block.mlp_tokens.fc1.out_features)


def estimate_memory(model: nn.Module, *, engine: str, world_size: int, micro_batch_size: int,
                    precision: str = "fp32", zero_stage: int = 0, offload_optimizer: bool = False,
                    activation_checkpointing: bool = False, device_type: str = "cpu",
                    async_checkpoint: bool = False, num_workers: int = 0, image_size: int = 224,
                    rank: int = 0) -> MemoryEstimate:
    n_params = sum(p.numel() for p in model.parameters())
    half = precision in ("bf16", "fp16")
    compute_bytes = 2 if half else 4
    if engine == "deepspeed":
        w_bytes = g_bytes = compute_bytes
        o_bytes = 12
        shard_o, shard_g, shard_p = zero_stage >= 1, zero_stage >= 2, zero_stage >= 3
    else:
        w_bytes, g_bytes, o_bytes = 4, 4, 8
        shard_o = shard_g = shard_p = engine == "fsdp"
    part = lambda total, sharded: -(-total // world_size) if sharded else total  # noqa: E731 (ceil)
    params = part(n_params * w_bytes, shard_p)
    grads = part(n_params * g_bytes, shard_g)
    optimizer = part(n_params * o_bytes, shard_o)
    gathered = 0
    if shard_p and world_size > 1:
        largest_block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        gathered = 2 * largest_block * compute_bytes
    per_image = (activation_elements_per_image(model, activation_checkpointing)
                 + backward_elements_per_image(model))
    activations = micro_batch_size * per_image * compute_bytes
    if half and engine != "deepspeed":  # autocast's cache of half weights, kept until the forward ends
        activations += part(n_params * 2, shard_p)
    step_temp = part(n_params * 4, shard_o)  # foreach AdamW: sqrt(v) for the rank's fp32 parameters
    host = 0
    if offload_optimizer and engine == "deepspeed":
        optimizer, host = 0, optimizer
    # A save: the consolidated fp32 weights (gathered onto rank 0 by the sharding engines), and with
    # async_save the rank's optimiser state (rank 0 only for single/ddp) and sharded weights staged on the host.
    sharded = engine == "fsdp" or engine == "deepspeed"
    checkpoint = n_params * 4 if (rank == 0 or not sharded) else 0
    if async_checkpoint and (rank == 0 or sharded):
        checkpoint += (optimizer or host) + (params if sharded else 0)
    # Each worker: its process, and the uint8 batches it has decoded ahead of the trainer.
    workers = num_workers * (WORKER_BYTES + PREFETCH_BATCHES * micro_batch_size * 3 * image_size ** 2)
    return MemoryEstimate(params, grads, optimizer, gathered, activations, host, step_temp, checkpoint,
                          async_checkpoint, workers, RUNTIME_BYTES, device_type)


@dataclass(frozen=True)
class MachineMemory:
    """What one rank may use: bytes free for it (its share of the host's, or its GPU's), and the total."""
    available: int
    total: int
    what: str  # "host memory (4 ranks on this host)" / "GPU 0 (NVIDIA H100)"


def host_memory(local_ranks: int) -> MachineMemory:
    """This host's memory available to each of its `local_ranks` ranks: MemAvailable (and a cgroup limit,
    as SLURM and containers set), plus what this process already holds (it is part of the estimate)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    total, available = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            total, available = min(total, int(limit)), min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    own = _own_rss()
    return MachineMemory(max(0, available) // max(1, local_ranks) + own, total // max(1, local_ranks),
                         f"host memory ({local_ranks} rank{'s' if local_ranks > 1 else ''} on this host)")


def _own_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
