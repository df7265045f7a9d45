"""Full, world-size independent optimiser state rebuilt from a DeepSpeed ZeRO checkpoint.

DeepSpeed's own files hold each rank's flat partition of the fp32 master weights and of every Adam
moment, and DeepSpeed loads them only onto the same number of ranks and the same ZeRO stage. This
module rebuilds every parameter's full tensors from them -- the layout DeepSpeed's `zero_to_fp32.py`
walks for the weights, applied to the moments as well -- reading the files weights-only, so that a run
can take its whole optimiser state to another world size or ZeRO stage (DeepSpeedEngine.load_state).
DeepSpeed's `ds_to_universal` does the same offline, but unpickles with weights_only=False.

  ZeRO-1/2  per flat group: the group's parameters flattened one after another (each followed by its
            alignment padding) and cut into world_size equal contiguous partitions, rank r holding
            the r-th.
  ZeRO-3    every parameter cut into world_size equal partitions, the last one padded; rank r's flat
            groups, concatenated, hold its partition of each parameter in `param_shapes` order.

Memory: the files are memory-mapped (page cache, shared by the ranks of a node) and each parameter's
full tensor is assembled only when asked for, so a rank holds one parameter's full state at a time.
"""
from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass
class ZeroState:
    stage: int
    world_size: int
    tensors: dict[str, Mapping[str, torch.Tensor]]  # state key ("fp32", "exp_avg", ...) -> param name -> full
    buffers: dict[str, torch.Tensor]
    step: torch.Tensor | None  # the optimiser's step count (the same in every group)
    optimizer_extras: dict[str, Any]  # loss scaler and overflow flags, world-size independent
    global_steps: int
    skipped_steps: int


def _files(directory: str) -> tuple[str, list[str]]:
    optim = {int(m.group(1)): p for p in glob.glob(os.path.join(directory, "*optim_states.pt"))
             if (m := OPTIM_FILE.search(p))}
    if not optim or sorted(optim) != list(range(len(optim))):
        raise FileNotFoundError(f"{directory}: no complete set of DeepSpeed *_optim_states.pt files")
    model = sorted(glob.glob(os.path.join(directory, "*model_states.pt")))
    if not model:
        raise FileNotFoundError(f"{directory}: no DeepSpeed *model_states.pt file")
    return model[0], [optim[r] for r in range(len(optim))]


def _cut(flats: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Pieces of the virtual concatenation of `flats` covering [start, start + length)."""
    pieces, offset = [], 0
    for flat in flats:
        lo, hi = max(start, offset), min(start + length, offset + flat.numel())
        if lo < hi:
            pieces.append(flat[lo - offset:hi - offset])
        offset += flat.numel()
    return pieces


class _FullParams(Mapping):
    """name -> full tensor of one state key, assembled on access from the ranks' flat partitions.

    `where[name] = (group, offset, numel, shape)`. ZeRO-1/2: `offset` into the concatenation of
    group `group`'s rank partitions. ZeRO-3 (`group` None): `offset` of the parameter's partition
    in each rank's concatenated flat groups, whose size is ceil(numel / world_size)."""

    def __init__(self, partitions: list[list[torch.Tensor]], where: dict[str, tuple[Any, int, int, Any]]) -> None:
        self.partitions, self.where = partitions, where

    def __getitem__(self, name: str) -> torch.Tensor:
        group, offset, numel, shape = self.where[name]
        if group is None:
            part = math.ceil(numel / len(self.partitions))
            pieces = [p for rank in self.partitions for p in _cut(rank, offset, part)]
            return torch.cat(pieces)[:numel].view(shape)
        return torch.cat(_cut([rank[group] for rank in self.partitions], offset, numel)).view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _layout(stage: int, world_size: int, shapes: list[dict[str, Any]],
            paddings: list[list[int]] | None) -> dict[str, tuple[Any, int, int, Any]]:
    where, offset3 = {}, 0
    for g, group_shapes in enumerate(shapes):
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            if stage == 3:
                where[name] = (None, offset3, numel, tuple(shape))
                offset3 += math.ceil(numel / world_size)
            else:
                where[name] = (g, offset, numel, tuple(shape))
                offset += numel + (paddings[g][i] if paddings else 0)
    return where


def read_zero_checkpoint(directory: str, load: Callable[..., Any]) -> ZeroState:
    """The full state of the DeepSpeed checkpoint in `directory` (one tag's folder). `load` reads one
    file (weights-only; see engines/deepspeed.py)."""
    model_file, optim_files = _files(directory)
    model_states = load(model_file, map_location="cpu", mmap=True)
    ranks = [load(f, map_location="cpu", mmap=True)["optimizer_state_dict"] for f in optim_files]
    stage = int(ranks[0]["zero_stage"])
    if stage == 3:
        fp32_key, opt_key = "fp32_flat_groups", "optimizer_state_dict"
    else:
        fp32_key, opt_key = "single_partition_of_fp32_groups", "base_optimizer_state"
    group_states = [r[opt_key]["state"] for r in ranks]
    n_groups = len(ranks[0][fp32_key])
    keys = [k for k, v in group_states[0][0].items() if torch.is_tensor(v) and v.dim() == 1]
    where = _layout(stage, len(ranks), model_states["param_shapes"], ranks[0].get("param_alignment_paddings"))
    tensors: dict[str, Mapping[str, torch.Tensor]] = {"fp32": _FullParams([r[fp32_key] for r in ranks], where)}
    for key in keys:
        tensors[key] = _FullParams([[states[g][key] for g in range(n_groups)] for states in group_states], where)
    buffer_names = set(model_states.get("buffer_names") or ())
    return ZeroState(
        stage=stage, world_size=len(ranks), tensors=tensors,
        buffers={k: v.clone() for k, v in model_states["module"].items() if k in buffer_names},
        step=group_states[0][0].get("step"),
        optimizer_extras={k: ranks[0][k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in ranks[0]},
        global_steps=int(model_states.get("global_steps", 0)), skipped_steps=int(model_states.get("skipped_steps", 0)))
