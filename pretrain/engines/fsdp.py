"""FSDP2: `fully_shard` per Mixer block, then the root (stem, final norm, head).

Each block's weights are gathered just before it runs and, with `reshard_after_forward`, freed
right after, so a rank holds one block's full weights at a time. Mixed precision is FSDP's own
policy (compute in bf16/fp16, gradients reduced in fp32) rather than autocast. The optimiser and
its state hold only this rank's shards; checkpoints go through torch.distributed.checkpoint, which
reshards on load, so a run may resume on any world size. Loading unpickles nothing as code: DCP's
pickled `.metadata` through an allow-list of its own classes, everything else weights-only.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..config import FSDPOptions
from .base import Engine, OptimizerFactory, SchedulerFactory, StateWriter, ensure_process_group
from .safe_load import forced_weights_only, read_dcp_metadata


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with its `.metadata` pickle read through an allow-list (safe_load.py), once,
    before DCP starts: a refusal is then one error, not DCP's logged tracebacks and retries."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        with open(os.path.join(path, ".metadata"), "rb") as f:
            self.metadata = read_dcp_metadata(f)
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never retries with per-rank metadata
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class FSDPEngine(Engine):
    kind = "fsdp"
    shards_weights = True
    state_has_weights = True

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory, scheduler_factory: SchedulerFactory,
                 *, options: FSDPOptions, **common: Any) -> None:
        self.reshard_after_forward = options.reshard_after_forward
        super().__init__(model, optimizer_factory, scheduler_factory, **common)

    def _setup(self, model, optimizer_factory, scheduler_factory) -> None:
        ensure_process_group(self.dist, self.backend)
        self._module = model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        # The root's own parameters are used last (norm, head): keeping them gathered saves an all-gather.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        self.model = model
        self.optimizer = optimizer_factory(model)  # built on the sharded (DTensor) parameters
        self.scheduler = scheduler_factory(self.optimizer)
        if self.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # agrees on inf across ranks
            self.scaler = ShardedGradScaler(self.device.type)
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts per block

    def _clip(self) -> torch.Tensor:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # Gradients are reduce-scattered in every micro batch's backward: FSDP2's no-sync mode keeps
    # unsharded gradients outside `.grad`, which a skipped step could not drop cleanly.

    def resume_blocker(self, saved: dict[str, Any]) -> str | None:
        if saved.get("engine") != "fsdp":
            return f"it was written by engine {saved.get('engine')!r}, this run uses 'fsdp'"
        return None  # DCP reshards to any world size

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float().clone() for k, v in full.items()} if self.dist.is_main else {}

    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def snapshot_state(self, directory: str, *, background: bool, group: Any = None) -> StateWriter:
        """This rank's shards through torch.distributed.checkpoint. In the background DCP's own
        async_save stages the shards in host memory here and writes them on its thread (its
        collectives on `group`, which the training loop never uses)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state, path = {"model": model_sd, "optim": optim_sd}, os.path.join(directory, "dcp")
        scaler = StateWriter.files([(os.path.join(directory, "scaler.pt"), {"scaler": self.scaler.state_dict()})]
                                   if self.dist.is_main else [])
        if not background:
            return StateWriter([lambda: dcp.save(state, checkpoint_id=path, process_group=group), scaler.finish])
        pending = dcp.async_save(state, checkpoint_id=path, process_group=group)
        pending = getattr(pending, "upload_completion", pending)  # newer torch: an AsyncSaveResponse
        return StateWriter([pending.result, scaler.finish])

    def load_state(self, directory: str, saved_layout: dict[str, Any]) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        path = os.path.join(directory, "dcp")
        # Nothing in DCP's files is unpickled as code: the metadata through an allow-list, the tensors
        # and the byte items (optimizer hyper-parameters) weights-only (see safe_load.py).
        try:
            with forced_weights_only():
                dcp.load(state, storage_reader=_SafeReader(path), planner=DefaultLoadPlanner())
        except CheckpointException as e:  # a BaseException carrying each rank's error: re-raise the first
            raise next(iter(e.failures.values()))[0] from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(os.path.join(directory, "scaler.pt"), map_location="cpu", weights_only=True)
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
