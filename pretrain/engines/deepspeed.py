"""DeepSpeed ZeRO-1/2/3 (optional optimiser offload to CPU), bf16/fp16 with dynamic loss scaling.

The DeepSpeed JSON is derived from our config here (`deepspeed_config`), never kept beside it.
Our own AdamW and LambdaLR are handed to DeepSpeed, which wraps the optimiser in its ZeRO
partitioning; the schedule is stepped by us so that lr is a function of our step count, also across
skipped steps. Accumulation is DeepSpeed's: `backward` + `step` per micro batch, the update happens
at the accumulation boundary.
"""
from __future__ import annotations

import enum
import os
import pickle
from typing import Any

import torch

from .base import Engine, ensure_process_group

STATE_TAG = "state"


def deepspeed_config(*, micro_batch_size: int, accum_steps: int, world_size: int, zero_stage: int,
                     precision: str, grad_clip: float, offload_optimizer: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": micro_batch_size * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 = dynamic: start at 2^16, halve on overflow (the step is skipped), grow back.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed supports it, just warns
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # our Monitor logs; DeepSpeed's own prints would duplicate it
        "wall_clock_breakdown": False,
    }


def _enum_member(cls: Any, name: str) -> Any:
    """Stands in for `getattr` while unpickling: Python 3.11.2+ pickles an Enum member as
    getattr(EnumClass, "name"); only that lookup is allowed, nothing else `getattr` could reach."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"refusing getattr({cls!r}, {name!r}) in a checkpoint file")


def _load_weights_only(path: str, map_location: Any = None) -> Any:
    """DeepSpeed's checkpoint reader, but with weights_only=True: its files may hold tensors,
    numbers, strings, containers and the few plain DeepSpeed data classes allowed here by name,
    never pickled code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address,
                                           (_enum_member, "builtins.getattr")]):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    state_has_weights = True

    def _setup(self, model, optimizer_factory, scheduler_factory) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        import deepspeed

        ensure_process_group(self.dist, self.backend)
        # DeepSpeed reads these even when the process group exists; plain `python` sets none of them.
        for name, value in (("LOCAL_RANK", self.dist.local_rank), ("RANK", self.dist.rank),
                            ("WORLD_SIZE", self.dist.world_size)):
            os.environ.setdefault(name, str(value))
        self.zero_stage = int(self.options["zero_stage"])
        self.ds_config = deepspeed_config(
            micro_batch_size=int(self.options["micro_batch_size"]), accum_steps=self.accum_steps,
            world_size=self.dist.world_size, zero_stage=self.zero_stage, precision=self.precision,
            grad_clip=self.grad_clip, offload_optimizer=bool(self.options.get("offload_optimizer", False)))
        self._module = model.to(self.device)
        optimizer = optimizer_factory(model)
        self.scheduler = scheduler_factory(optimizer)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.model = self.ds
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # DeepSpeed scales fp16 itself

    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        self.ds.backward(loss)  # divides by gradient_accumulation_steps itself
        self.ds.step()  # updates only at the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.ds.get_global_grad_norm()
        self.scheduler.step()
        self._micro = 0
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach()

    def skip_step(self) -> None:
        # The bad micro batch never reached backward; with accumulation, earlier micro batches of
        # this step did, and their gradients are dropped here.
        if self._micro:
            self.ds.zero_grad()
            self.ds.micro_steps += self.accum_steps - self._micro  # keep the boundary aligned
        self.scheduler.step()
        self._micro = 0

    @property
    def loss_scale(self) -> float:
        scale = getattr(self.ds.optimizer, "cur_scale", None) if self.precision == "fp16" else None
        return float(scale) if scale is not None else 1.0

    @property
    def shards_weights(self) -> bool:  # type: ignore[override]
        return self.zero_stage == 3

    # ---- checkpoint hooks -------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        return {"engine": self.kind, "world_size": self.dist.world_size, "zero_stage": self.zero_stage}

    def resume_blocker(self, saved: dict[str, Any]) -> str | None:
        if saved.get("engine") != "deepspeed":
            return f"it was written by engine {saved.get('engine')!r}, this run uses 'deepspeed'"
        if saved.get("world_size") != self.dist.world_size:
            return f"its ZeRO partitions are for {saved.get('world_size')} ranks, this run has {self.dist.world_size}"
        if saved.get("zero_stage") != self.zero_stage:
            return f"it was written with ZeRO stage {saved.get('zero_stage')}, this run uses {self.zero_stage}"
        return None

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (not the bf16/fp16 working copy), gathered from every partition."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self._module.named_parameters():
            full = safe_get_full_fp32_param(param)  # collective under ZeRO
            if self.dist.is_main:
                out[name] = full.detach().float().cpu().clone()
        if self.dist.is_main:
            out.update({k: v.detach().float().cpu() for k, v in self._module.named_buffers()})
        return out

    def load_consolidated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Weights into both DeepSpeed copies: the fp32 masters and the working parameters."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        params = dict(self._module.named_parameters())
        for name, param in params.items():
            safe_set_full_fp32_param(param, state[name].to(self.device))
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=self.zero_stage == 3), torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.device, param.dtype))

    def save_state(self, directory: str) -> None:
        self.ds.save_checkpoint(directory, tag=STATE_TAG, save_latest=False)

    def load_state(self, directory: str) -> None:
        self.ds.checkpoint_engine.load = _load_weights_only
        path, _ = self.ds.load_checkpoint(directory, tag=STATE_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{directory}: DeepSpeed found no checkpoint under tag {STATE_TAG!r}")
