"""Engines behind one interface: single | ddp | fsdp | deepspeed (see base.py for the interface)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..dist import DistInfo
from .base import PRECISION_DTYPES, Engine


def effective_kind(kind: str, dist_info: DistInfo) -> str:
    """The engine that really runs: DDP on one process is the single-process engine."""
    return "single" if kind == "ddp" and not dist_info.distributed else kind


def build_engine(kind: str, model: nn.Module, dist_info: DistInfo, **kwargs: Any) -> Engine:
    """kwargs: optimizer_factory, scheduler_factory, precision, grad_clip, accum_steps,
    activation_checkpointing, backend, and engine options (zero_stage, offload_optimizer,
    micro_batch_size for deepspeed; reshard_after_forward for fsdp)."""
    if kind == "single" and dist_info.distributed:
        raise ValueError(f"engine.kind 'single' cannot run with world size {dist_info.world_size}; use 'ddp'")
    kind = effective_kind(kind, dist_info)
    if kind == "ddp":
        from .ddp import DDPEngine
        return DDPEngine(model, dist_info=dist_info, **kwargs)
    if kind == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine(model, dist_info=dist_info, **kwargs)
    if kind == "deepspeed":
        from .deepspeed import DeepSpeedEngine  # imported late: DeepSpeed is slow to import
        return DeepSpeedEngine(model, dist_info=dist_info, **kwargs)
    return Engine(model, dist_info=dist_info, **kwargs)


__all__ = ["Engine", "PRECISION_DTYPES", "build_engine", "effective_kind"]
