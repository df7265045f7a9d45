"""The engine interface and the single-process engine it is built on.

The training loop sees only these methods (`model`, `autocast`, `recover_live`, `begin_step`, `backward`,
`step`, `skip_step`, `committed`, `lr`, `loss_scale`, `unwrapped`, `close`, and the checkpoint hooks) and
never asks which engine it has. A step is `begin_step`, `accum_steps` calls of `backward`, then one `step` (or
`skip_step`); a step that is not `committed` (fault tolerance: the quorum dropped it) never happened and
is done again with the same samples.

Checkpoint hooks, all collective (every rank calls them):
  consolidated_state_dict()      full fp32 weights on rank 0 (what export and evaluation read)
  load_consolidated_state_dict() the same, back into whatever sharding the engine has
  snapshot_state(dir) / load_state(dir, saved_layout)  the engine's own optimiser state, in its own
                                 format; the snapshot is written by `StateWriter.finish`, possibly on
                                 the checkpoint thread while training goes on
  layout() / resume_blocker(saved)   what a saved state needs from the run that loads it
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..dist import DistInfo, process_group_backend

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to `precision`'s dtype on `device` (fp32: none): the training step's, and evaluation's."""
    dtype = PRECISION_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class PinnedBuffers:
    """Page-locked host tensors reused from one snapshot to the next for an asynchronous checkpoint's
    device-to-host copy: pinned memory copies at full bus speed without a staging copy, and reusing it
    spares allocating and page-locking gigabytes at every save. Reuse is safe because the Checkpointer
    waits until the previous save is written before it takes the next snapshot. Costs one host copy
    of the state, held for the run (pageable snapshots cost the same, but only while a save is in flight)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def copy(self, key: tuple, tensor: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = self._buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return buf.copy_(tensor.detach(), non_blocking=True)  # the caller synchronises once for all


def host_copy(obj: Any, pinned: PinnedBuffers | None = None, _key: tuple = ()) -> Any:
    """`obj` with every tensor copied to host memory and every other leaf deep-copied: a snapshot
    that later optimiser steps cannot change (on CPU, `.cpu()` alone would alias the live tensor).
    With `pinned`, CUDA tensors go into its reused buffers, asynchronously: synchronise before reading."""
    if isinstance(obj, torch.Tensor):
        if pinned is not None and obj.is_cuda:
            return pinned.copy(_key, obj)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v, pinned, (*_key, k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(host_copy(v, pinned, (*_key, i)) for i, v in enumerate(obj))
    return copy.deepcopy(obj)


class StateWriter:
    """An engine's state at a step boundary, to be written by `finish()`: torch.save of host copies,
    or the completion of a write the engine's own asynchronous checkpointer has begun (DCP)."""

    def __init__(self, jobs: Sequence[Callable[[], Any]] = ()) -> None:
        self.jobs = list(jobs)

    @classmethod
    def files(cls, files: Sequence[tuple[str, Any]]) -> "StateWriter":
        return cls([functools.partial(torch.save, obj, path) for path, obj in files])

    def finish(self) -> None:
        for job in self.jobs:
            job()


def ensure_process_group(dist_info: DistInfo, backend: str = "auto") -> None:
    """Sharding engines need a process group even with one rank (e.g. resuming 2 ranks -> 1)."""
    if dist.is_initialized():
        return
    backend = process_group_backend(backend, dist_info.device.type == "cuda")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class Engine:
    """One process: model + optimiser + schedule, mixed precision, accumulation and clipping."""

    kind = "single"
    state_has_weights = False  # save_state holds no weights: resume also reads model.safetensors

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory, scheduler_factory: SchedulerFactory,
                 *, dist_info: DistInfo, precision: str = "fp32", grad_clip: float = 1.0, accum_steps: int = 1,
                 activation_checkpointing: bool = False, backend: str = "auto") -> None:
        self.dist = dist_info
        self.device = dist_info.device
        self.precision = precision
        self.grad_clip = grad_clip
        self.accum_steps = accum_steps
        self.backend = backend
        self.autocast_dtype = PRECISION_DTYPES[precision]
        if activation_checkpointing:
            model.set_grad_checkpointing(True)
        self._micro = 0
        self._pinned = PinnedBuffers()  # host buffers of asynchronous snapshots (allocated on first use, CUDA only)
        self._setup(model, optimizer_factory, scheduler_factory)

    # ---- construction (overridden by the sharding engines) ----------------------------------
    def _setup(self, model: nn.Module, optimizer_factory: OptimizerFactory,
               scheduler_factory: SchedulerFactory) -> None:
        self._module = model.to(self.device)
        self.model = self._wrap(self._module)
        self.optimizer = optimizer_factory(self._module)
        self.scheduler = scheduler_factory(self.optimizer)
        # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def _sync_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ---- the step ---------------------------------------------------------------------------
    # True where each rank holds only a shard of the weights (fsdp, ZeRO-3): evaluation then needs a replica.
    shards_weights = False
    # False: skip_step drops every gradient of the step (zero_grad(set_to_none)), so the loss guard
    # may judge all micro batches at once after their backwards. True where backward changes state
    # that a skip cannot undo (DeepSpeed): each micro batch is judged before its backward.
    judge_each_micro_batch = False

    # False after `step`/`skip_step` when the step did not count (ft.py: a replica group failed during it).
    committed = True

    def recover_live(self) -> int | None:
        """Before a resume reads a checkpoint (fault tolerance: this replica group's first quorum). The step
        this group recovered live from a peer at, when live peers are ahead of it: then no checkpoint is read."""
        return None

    def begin_step(self, step: int) -> int:
        """Before the step after `step` draws its data; returns the step the run is at (fault tolerance:
        a peer's, after this replica group recovered live from it)."""
        return step

    def close(self) -> None:
        """Release what the engine holds beyond the process group (ft.py: torchft's manager)."""

    @property
    def unwrapped(self) -> nn.Module:
        """The plain model, for evaluation (its weights may be sharded under fsdp / ZeRO-3)."""
        return self._module

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision_autocast(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        """One micro batch. The loss is divided by the accumulation count so that the summed
        gradient equals the gradient of the mean loss over the whole global batch."""
        self._micro += 1
        with self._sync_context(self._micro == self.accum_steps):
            self.scaler.scale(loss / self.accum_steps).backward()

    def _clip(self) -> torch.Tensor:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self._module.parameters(), max_norm, foreach=True)

    def step(self) -> torch.Tensor:
        """Clip, update, advance the schedule. Returns the pre-clip global grad norm as a tensor
        (no host sync here: the caller decides when to read it)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._end_step()
        return grad_norm.detach().float()

    def skip_step(self) -> None:
        """Drop this step's gradients without touching the weights; the schedule still advances
        so that lr stays a function of the step count (torch warns about exactly that order)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self._end_step()

    def _end_step(self) -> None:
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    # ---- checkpoint hooks -------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        return {"engine": self.kind, "world_size": self.dist.world_size}

    def resume_blocker(self, saved: dict[str, Any]) -> str | None:
        """Why this engine cannot load a state saved with `saved` layout (None: it can).
        single and ddp keep the full optimiser state on rank 0, so any world size works."""
        if saved.get("engine") not in ("single", "ddp"):
            return f"it was written by engine {saved.get('engine')!r}, this run uses {self.kind!r}"
        return None

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        # A snapshot (copy=True): on CPU in fp32, .float().cpu() would alias the live parameters; one copy on CUDA.
        return {k: v.detach().float().to("cpu", copy=True) for k, v in self._module.state_dict().items()}

    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._module.load_state_dict(state)

    def snapshot_state(self, directory: str, *, background: bool, group: Any = None) -> StateWriter:
        """The optimiser state (rank 0 holds all of it), as files under `directory`. `background`:
        copied to host memory now, so that `finish()` may run while training changes the live state.
        `group`: the process group for any collective that `finish()` needs."""
        if not self.dist.is_main:
            return StateWriter()
        state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        if background:
            state = host_copy(state, self._pinned)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the non-blocking copies have landed before anyone reads them
        return StateWriter.files([(os.path.join(directory, "engine.pt"), state)])

    def load_state(self, directory: str, saved_layout: dict[str, Any]) -> None:
        # weights_only: tensors, numbers, strings and containers only -- never pickled code.
        state = torch.load(os.path.join(directory, "engine.pt"), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def scheduler_state(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        """Call after load_state. The optimiser state carries the lr that the saving run's schedule
        set; it is recomputed from this run's schedule (train.steps may have changed since)."""
        self.scheduler.load_state_dict(state)
        groups, step = self.scheduler.optimizer.param_groups, self.scheduler.last_epoch
        for group, base_lr, fn in zip(groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base_lr * fn(step)
        self.scheduler._last_lr = [group["lr"] for group in groups]
