"""Engines: how a model is wrapped, how gradients flow, how a step is taken.

The training loop sees only this interface (`model`, `autocast`, `backward`, `step`, `state_dict`,
`load_state_dict`, `unwrapped`) and never asks which engine it has. `single` and `ddp` live here;
FSDP2 and DeepSpeed plug in behind the same methods.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dist import DistInfo

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """One process's model + optimiser + schedule, with mixed precision and gradient clipping."""

    kind = "single"

    def __init__(self, model: nn.Module, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
                 scheduler_factory: Callable[[torch.optim.Optimizer], Any], *, dist_info: DistInfo,
                 precision: str = "fp32", grad_clip: float = 1.0) -> None:
        self.dist = dist_info
        self.device = dist_info.device
        self._module = model.to(self.device)
        self.model = self._wrap(self._module)
        self.optimizer = optimizer_factory(self._module)
        self.scheduler = scheduler_factory(self.optimizer)
        self.grad_clip = grad_clip
        self.autocast_dtype = PRECISION_DTYPES[precision]
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    @property
    def unwrapped(self) -> nn.Module:
        """The plain model, for evaluation and export."""
        return self._module

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Clip, update, advance the schedule. Returns the pre-clip global grad norm as a tensor
        (no host sync here: the caller decides when to read it)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._module.parameters(), max_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model weights (those are saved separately, as safetensors)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class DDPEngine(Engine):
    """Replicated weights, gradients all-reduced in buckets overlapping the backward pass."""

    kind = "ddp"

    def _wrap(self, module: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)


def build_engine(kind: str, model: nn.Module, dist_info: DistInfo, **kwargs: Any) -> Engine:
    if kind == "ddp" and dist_info.distributed:
        return DDPEngine(model, dist_info=dist_info, **kwargs)
    if kind == "single" and dist_info.distributed:
        raise ValueError("engine.kind 'single' cannot run with world size "
                         f"{dist_info.world_size}; use 'ddp'")
    return Engine(model, dist_info=dist_info, **kwargs)
