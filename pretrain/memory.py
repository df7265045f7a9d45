"""Per-device memory estimate for a run, printed before it starts (so that an H/14 launch that
cannot fit fails in the log's first lines, not after the data is warm).

Bytes per parameter, following the ZeRO paper's accounting:
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
  only each block's input (N*C) is kept, plus one block's full set during its recompute.
Norms' statistics, the stem, the head and allocator slack are left out: it is an estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # bytes on each device
    grads: int
    optimizer: int
    gathered: int  # fsdp / ZeRO-3 working copy of gathered block weights
    activations: int
    optimizer_host: int = 0  # offloaded optimiser states (host memory, not device)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        line = (f"params {g(self.params)} + grads {g(self.grads)} + optimizer {g(self.optimizer)} + gathered "
                f"{g(self.gathered)} + activations {g(self.activations)} = {g(self.total)} GiB per device")
        if self.optimizer_host:
            line += f" (+ {g(self.optimizer_host)} GiB optimizer states in host memory)"
        return line


def activation_elements_per_image(model: nn.Module, checkpointing: bool = False) -> int:
    n, c = model.num_tokens, model.embed_dim
    per_block = []
    for block in model.blocks:
        d_s, d_c = block.mlp_tokens.fc1.out_features, block.mlp_channels.fc1.out_features
        per_block.append(4 * n * c + 2 * c * d_s + 2 * n * d_c)
    if checkpointing:
        return len(per_block) * n * c + max(per_block)
    return sum(per_block)


def estimate_memory(model: nn.Module, *, engine: str, world_size: int, micro_batch_size: int,
                    precision: str = "fp32", zero_stage: int = 0, offload_optimizer: bool = False,
                    activation_checkpointing: bool = False) -> MemoryEstimate:
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
    activations = micro_batch_size * activation_elements_per_image(model, activation_checkpointing) * compute_bytes
    host = 0
    if offload_optimizer and engine == "deepspeed":
        optimizer, host = 0, optimizer
    return MemoryEstimate(params, grads, optimizer, gathered, activations, host)
