"""DDP: replicated weights, gradients all-reduced in buckets overlapping the backward pass."""
from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Engine


class DDPEngine(Engine):
    kind = "ddp"

    def _wrap(self, module: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _sync_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        # Accumulating micro batches: all-reduce only once, in the last backward of the step.
        return contextlib.nullcontext() if last_micro else self.model.no_sync()
