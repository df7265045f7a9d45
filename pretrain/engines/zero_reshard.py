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

Memory: every rank that calls this holds the full fp32 state (12 bytes per parameter for AdamW).
"""
from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass
class ZeroState:
    stage: int
    world_size: int
    tensors: dict[str, dict[str, torch.Tensor]]  # state key ("fp32", "exp_avg", ...) -> param name -> full
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


def _stage12(shapes: list[dict[str, Any]], paddings: list[list[int]] | None,
             partitions: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([rank_groups[g] for rank_groups in partitions])
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            out[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[g][i] if paddings else 0)
    return out


def _stage3(shapes: list[dict[str, Any]], partitions: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    world_size = len(partitions)
    flats = [torch.cat(rank_groups) for rank_groups in partitions]
    out, offset = {}, 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world_size)
            out[name] = torch.cat([f.narrow(0, offset, part) for f in flats])[:numel].view(shape).clone()
            offset += part
    return out


def read_zero_checkpoint(directory: str, load: Callable[..., Any]) -> ZeroState:
    """The full state of the DeepSpeed checkpoint in `directory` (one tag's folder). `load` reads one
    file (weights-only; see engines/deepspeed.py)."""
    model_file, optim_files = _files(directory)
    model_states = load(model_file, map_location="cpu")
    shapes = model_states["param_shapes"]
    ranks = [load(f, map_location="cpu")["optimizer_state_dict"] for f in optim_files]
    stage = int(ranks[0]["zero_stage"])
    if stage == 3:
        fp32_key, opt_key = "fp32_flat_groups", "optimizer_state_dict"
    else:
        fp32_key, opt_key = "single_partition_of_fp32_groups", "base_optimizer_state"
    group_states = [r[opt_key]["state"] for r in ranks]
    n_groups = len(ranks[0][fp32_key])
    keys = [k for k, v in group_states[0][0].items() if torch.is_tensor(v) and v.dim() == 1]

    def rebuild(per_rank: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        if stage == 3:
            return _stage3(shapes, per_rank)
        return _stage12(shapes, ranks[0].get("param_alignment_paddings"), per_rank)

    tensors = {"fp32": rebuild([r[fp32_key] for r in ranks])}
    for key in keys:
        tensors[key] = rebuild([[states[g][key] for g in range(n_groups)] for states in group_states])
    buffer_names = set(model_states.get("buffer_names") or ())
    return ZeroState(
        stage=stage, world_size=len(ranks), tensors=tensors,
        buffers={k: v for k, v in model_states["module"].items() if k in buffer_names},
        step=group_states[0][0].get("step"),
        optimizer_extras={k: ranks[0][k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in ranks[0]},
        global_steps=int(model_states.get("global_steps", 0)), skipped_steps=int(model_states.get("skipped_steps", 0)))
