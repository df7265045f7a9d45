"""Engines behind one interface: single | ddp | fsdp | deepspeed (see base.py for the interface)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ENGINE_OPTIONS, DeepSpeedOptions, FSDPOptions, TorchFTOptions
from ..dist import DistInfo
from .base import PRECISION_DTYPES, Engine


def effective_kind(kind: str, dist_info: DistInfo) -> str:
    """The engine that really runs: DDP on one process is the single-process engine."""
    return "single" if kind == "ddp" and not dist_info.distributed else kind


def build_engine(kind: str, model: nn.Module, dist_info: DistInfo, *,
                 options: DeepSpeedOptions | FSDPOptions | None = None, micro_batch_size: int | None = None,
                 fault_tolerance: TorchFTOptions | None = None, loader: Any = None, **common: Any) -> Engine:
    """common: optimizer_factory, scheduler_factory, precision, grad_clip, accum_steps, activation_checkpointing,
    backend (every engine). ``options``: the typed options of `kind` (config.engine_options; None: defaults);
    ``micro_batch_size``: what DeepSpeed's JSON names (ignored by the engines that do not need it).
    ``fault_tolerance``: torchft's replica groups around a single, ddp or fsdp engine (`ft.py`; fsdp: HSDP),
    which lays ``loader`` out over each step's quorum."""
    if kind == "single" and dist_info.distributed:
        raise ValueError(f"engine.kind 'single' cannot run with world size {dist_info.world_size}; use 'ddp'")
    kind = effective_kind(kind, dist_info)
    wanted = ENGINE_OPTIONS.get(kind)
    if options is not None and not isinstance(options, wanted or ()):
        raise TypeError(f"engine {kind!r} takes {wanted.__name__ if wanted else 'no options'}, "
                        f"not {type(options).__name__}")
    if fault_tolerance is not None:
        if kind not in ("single", "ddp", "fsdp") or loader is None:
            raise TypeError("torchft fault tolerance wraps the single, ddp or fsdp engine and needs the training "
                            "loader")
        from .ft import fault_tolerant
        own = {"options": options or FSDPOptions()} if kind == "fsdp" else {}
        engine = fault_tolerant(_engine_class(kind))(model, dist_info=dist_info, **own, **common)
        engine._setup_ft(fault_tolerance, loader)
        return engine
    if kind == "ddp":
        from .ddp import DDPEngine
        return DDPEngine(model, dist_info=dist_info, **common)
    if kind == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine(model, dist_info=dist_info, options=options or FSDPOptions(), **common)
    if kind == "deepspeed":
        from .deepspeed import DeepSpeedEngine  # imported late: DeepSpeed is slow to import
        if micro_batch_size is None:
            raise TypeError("the deepspeed engine needs micro_batch_size")
        return DeepSpeedEngine(model, dist_info=dist_info, options=options or DeepSpeedOptions(),
                               micro_batch_size=micro_batch_size, **common)
    return Engine(model, dist_info=dist_info, **common)


def _engine_class(kind: str) -> type[Engine]:
    if kind == "ddp":
        from .ddp import DDPEngine
        return DDPEngine
    if kind == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine
    return Engine


__all__ = ["Engine", "PRECISION_DTYPES", "build_engine", "effective_kind"]
