"""The one owner of run metrics: console progress lines and TensorBoard scalars, rank 0 only.

Per-step values are accumulated as device tensors and read back (one host sync) only when a log
line is due, so logging never stalls the accelerator between steps.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Mapping

import torch

from .dist import DistInfo, all_reduce_mean

log = logging.getLogger("pretrain")


def itstime(step: int, every: int, total_steps: int) -> bool:
    """The one 'is it time?' rule for logging, checkpointing and evaluating: every `every` steps
    (counted 1-based) and always at the last step."""
    return step == total_steps or (every > 0 and step % every == 0)


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Monitor:
    def __init__(self, run_dir: str, dist_info: DistInfo, total_steps: int, log_every: int,
                 global_batch_size: int, flops_per_image: int | None = None) -> None:
        self.dist = dist_info
        self.total_steps = total_steps
        self.log_every = log_every
        self.global_batch_size = global_batch_size
        self.flops_per_image = flops_per_image
        self.writer = None
        if dist_info.is_main:
            from torch.utils.tensorboard import SummaryWriter  # imported late: slow, rank 0 only
            self.writer = SummaryWriter(log_dir=f"{run_dir}/tb")
        self._reset()

    def _reset(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._gnorm_sum: torch.Tensor | None = None
        self._steps = 0
        self._data_wait = 0.0
        self._t0 = time.perf_counter()

    def pause(self, seconds: float) -> None:
        """Exclude time spent checkpointing/evaluating from the throughput figure."""
        self._t0 += seconds

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
             data_wait_s: float) -> None:
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._gnorm_sum = grad_norm if self._gnorm_sum is None else self._gnorm_sum + grad_norm
        self._steps += 1
        self._data_wait += data_wait_s
        if not itstime(step, self.log_every, self.total_steps):
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        # The only host sync of the interval; the loss is averaged over ranks for an honest figure.
        means = all_reduce_mean(torch.stack([self._loss_sum, self._gnorm_sum]) / self._steps).tolist()
        imgs_per_s = self._steps * self.global_batch_size / elapsed
        scalars = {
            "train/loss": means[0],
            "train/grad_norm": means[1],
            "train/lr": lr,
            "perf/img_per_s": imgs_per_s,
            "perf/img_per_s_per_device": imgs_per_s / self.dist.world_size,
            "perf/data_wait_frac": min(1.0, self._data_wait / elapsed),
        }
        if self.flops_per_image:
            # Training FLOPs = 3x forward (backward costs two forwards).
            scalars["perf/tflops_per_device"] = 3 * self.flops_per_image * imgs_per_s / self.dist.world_size / 1e12
        if self.dist.device.type == "cuda":
            scalars["perf/max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        eta = (self.total_steps - step) * elapsed / self._steps
        if self.dist.is_main:
            log.info("step %d/%d  loss %.4f  lr %.2e  gnorm %.3f  %.0f img/s  data %.0f%%  eta %s",
                     step, self.total_steps, means[0], lr, means[1], imgs_per_s,
                     100 * scalars["perf/data_wait_frac"], _fmt_duration(eta))
            self.scalars(step, scalars)
        self._reset()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
