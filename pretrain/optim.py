"""Optimiser and learning-rate schedule: the paper's recipe (Adam with decoupled weight decay,
linear warm-up, then linear or cosine decay)."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only: decaying LayerNorm gains and biases only
    pulls them towards zero without regularising anything useful."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    # foreach is the fast path on both CPU and CUDA; fused would be CUDA-only.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             foreach=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "linear",
              end_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at `step` (0-based: the lr used for the update of step `step`)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return end_ratio + (1.0 - end_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    schedule: str, end_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    def fn(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, schedule, end_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
