"""DeepSpeed ZeRO-1/2/3 (optional optimiser offload to CPU), bf16/fp16 with dynamic loss scaling.

The DeepSpeed JSON is derived from our config here (`deepspeed_config`), never kept beside it.
Our own AdamW and LambdaLR are handed to DeepSpeed, which wraps the optimiser in its ZeRO
partitioning; the schedule is stepped by us so that lr is a function of our step count, also across
skipped steps. Accumulation is DeepSpeed's: `backward` + `step` per micro batch, the update happens
at the accumulation boundary.

Checkpoints are DeepSpeed's own files (each rank its partition). Onto the same world size and stage
DeepSpeed loads them; onto another, zero_reshard.py rebuilds the full state and each rank takes its
new partition of the masters and the moments.
"""
from __future__ import annotations

import logging
import os
from collections import ChainMap
from typing import Any, Mapping

import torch
from torch import nn

from ..config import DeepSpeedOptions
from .base import Engine, OptimizerFactory, SchedulerFactory, StateWriter, ensure_process_group, host_copy
from .safe_load import enum_member, forced_weights_only
from .zero_reshard import read_zero_checkpoint

log = logging.getLogger("pretrain")
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


def _deepspeed_safe_globals() -> list[Any]:
    """The plain DeepSpeed data classes its checkpoint files hold, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, (enum_member, "builtins.getattr")]


def _load_weights_only(path: str, map_location: Any = None, mmap: bool = False) -> Any:
    """DeepSpeed's checkpoint reader, but with weights_only=True: its files may hold tensors,
    numbers, strings, containers and the few plain DeepSpeed data classes allowed here by name,
    never pickled code."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    state_has_weights = True

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory, scheduler_factory: SchedulerFactory,
                 *, options: DeepSpeedOptions, micro_batch_size: int, **common: Any) -> None:
        self.zero_stage, self.offload_optimizer = options.zero_stage, options.offload_optimizer
        self.micro_batch_size = micro_batch_size  # DeepSpeed's JSON names the micro batch; other engines never need it
        super().__init__(model, optimizer_factory, scheduler_factory, **common)

    def _setup(self, model, optimizer_factory, scheduler_factory) -> None:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        import deepspeed

        ensure_process_group(self.dist, self.backend)
        # DeepSpeed reads these even when the process group exists; plain `python` sets none of them.
        for name, value in (("LOCAL_RANK", self.dist.local_rank), ("RANK", self.dist.rank),
                            ("WORLD_SIZE", self.dist.world_size)):
            os.environ.setdefault(name, str(value))
        self.ds_config = deepspeed_config(
            micro_batch_size=self.micro_batch_size, accum_steps=self.accum_steps,
            world_size=self.dist.world_size, zero_stage=self.zero_stage, precision=self.precision,
            grad_clip=self.grad_clip, offload_optimizer=self.offload_optimizer)
        self._module = model.to(self.device)
        optimizer = optimizer_factory(model)
        self.scheduler = scheduler_factory(optimizer)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.model = self.ds
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # DeepSpeed scales fp16 itself

    # ZeRO-2 reduces each micro batch's gradients into its partition buffers, which zero_grad does not
    # clear, and the last backward's ds.step() updates: a bad loss must never reach backward here.
    judge_each_micro_batch = True

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
        return None  # any world size and ZeRO stage: see load_state

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights (not the bf16/fp16 working copy), gathered from every partition."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self._module.named_parameters():
            full = safe_get_full_fp32_param(param)  # collective under ZeRO
            if self.dist.is_main:
                out[name] = full.detach().float().cpu().clone()
        if self.dist.is_main:
            out.update({k: v.detach().float().cpu().clone() for k, v in self._module.named_buffers()})
        return out

    def load_consolidated_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Weights into both DeepSpeed copies: the fp32 masters and the working parameters. One
        parameter at a time: `state` may assemble each tensor on access (see _load_resharded)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in self._module.named_parameters():
            value = state[name].to(self.device)
            if hasattr(param, "ds_id"):
                _set_zero3_partition(param, value, None)
            else:
                safe_set_full_fp32_param(param, value)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=self.zero_stage == 3), \
                    torch.no_grad():
                param.copy_(value.to(param.dtype))
        with torch.no_grad():
            for name, buf in self._module.named_buffers():  # never partitioned
                buf.copy_(state[name].to(buf.device, buf.dtype))

    def snapshot_state(self, directory: str, *, background: bool, group: Any = None) -> StateWriter:
        """DeepSpeed's own checkpoint (each rank its partition). In the background its checkpoint
        engine's `save` is intercepted to take host copies, written later by `finish()`.

        DeepSpeed's `latest` file is written (it names the tag), so its own tools read `engine/` without
        `--tag`; its copies of `zero_to_fp32.py` are not: their CLI needs huggingface_hub, and
        `python -m deepspeed.utils.zero_to_fp32` is the same script (docs/checkpoints.md)."""
        self.ds._copy_recovery_script = lambda save_path: None  # instance attribute: shadows the method
        if not background:
            self.ds.save_checkpoint(directory, tag=STATE_TAG, save_latest=True)
            return StateWriter()
        captured: list[tuple[str, Any]] = []
        engine = self.ds.checkpoint_engine
        engine.save = lambda state_dict, path: captured.append((path, host_copy(state_dict)))
        try:
            self.ds.save_checkpoint(directory, tag=STATE_TAG, save_latest=True)
        finally:
            del engine.save  # the instance attribute shadowed the class method
        return StateWriter.files(captured)

    def load_state(self, directory: str, saved_layout: dict[str, Any]) -> None:
        same = (saved_layout.get("world_size"), saved_layout.get("zero_stage")) == (self.dist.world_size,
                                                                                    self.zero_stage)
        if same:
            # Every file DeepSpeed reads goes through its checkpoint engine's `load`, replaced here; the
            # universal-checkpoint paths call torch.load(weights_only=False) directly, and the forced
            # weights-only mode makes those (and any other) safe too.
            self.ds.checkpoint_engine.load = _load_weights_only
            with forced_weights_only(), torch.serialization.safe_globals(_deepspeed_safe_globals()):
                path, _ = self.ds.load_checkpoint(directory, tag=STATE_TAG, load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"{directory}: DeepSpeed found no checkpoint under tag {STATE_TAG!r}")
        else:
            self._load_resharded(os.path.join(directory, STATE_TAG))

    def _load_resharded(self, directory: str) -> None:
        """Another world size or ZeRO stage: the full state rebuilt from the saved partitions, then
        each rank takes its own partition of the masters, of every moment and the step count."""
        saved = read_zero_checkpoint(directory, _load_weights_only)
        # A ChainMap, not a merged dict: each parameter's full tensor is assembled only when loaded.
        self.load_consolidated_state_dict(ChainMap(saved.tensors["fp32"], saved.buffers))
        moments = [k for k in saved.tensors if k != "fp32"]
        base = self.ds.optimizer.optimizer  # the torch AdamW under DeepSpeed's partitioning wrapper
        step = saved.step if saved.step is not None else torch.tensor(0.0)
        flats = (self.ds.optimizer.fp32_partitioned_groups_flat if self.zero_stage == 3
                 else self.ds.optimizer.single_partition_of_fp32_groups)
        for flat in flats:  # this rank's fp32 partitions: AdamW would create their state lazily
            base.state[flat] = {"step": step.clone(), **{key: torch.zeros_like(flat) for key in moments}}
        for name, param in self._module.named_parameters():
            for key in moments:
                self._set_moment_partition(param, saved.tensors[key][name].to(self.device), key)
        for key, value in saved.optimizer_extras.items():  # loss scaler and overflow flags
            if hasattr(self.ds.optimizer, key):
                setattr(self.ds.optimizer, key, value)
        self.ds.global_steps, self.ds.skipped_steps = saved.global_steps, saved.skipped_steps
        self.ds.global_samples = saved.global_steps * self.ds.train_batch_size()
        log.info("DeepSpeed optimizer state resharded: ZeRO-%d on %d ranks -> ZeRO-%d on %d ranks (fp32 masters, "
                 "%s and step %d restored)", saved.stage, saved.world_size, self.zero_stage, self.dist.world_size,
                 ", ".join(moments), int(step))

    def _set_moment_partition(self, param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
        """This rank's part of the full optimiser state `value` of `param`, into the flat state."""
        if hasattr(param, "ds_id"):  # ZeRO-3
            _set_zero3_partition(param, value, key)
            return
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # ZeRO-1/2: no part of this parameter lives on this rank
            return
        flat = self.ds.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        target = self.ds.optimizer.optimizer.state[flat][key]
        target.narrow(0, hp.start, hp.numel).copy_(value.flatten().narrow(0, lp.start, lp.numel))


def _set_zero3_partition(param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's ZeRO-3 partition of `value` into the fp32 master (key None) or optimiser state
    `key`. DeepSpeed's own setter cannot fill a padded last partition (it narrows past the end of
    the unpadded value), so the partition is cut here."""
    opt = param._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * opt._get_param_partition_rank(param)
    chunk = value.flatten()[start:start + part.numel()]
    part.data[:chunk.numel()].copy_(chunk)
