"""The loss guard: decides, collectively and with one host read per optimiser step, whether a step's
losses are fit to update the weights (finite, no spike), and stops a run that keeps failing."""
from __future__ import annotations

import logging
import math

import torch

from .dist import all_reduce_mean

log = logging.getLogger("pretrain")


class TrainingDiverged(RuntimeError):
    """Too many bad steps in a row: the run stops rather than train on garbage."""


class LossGuard:
    """Judges the micro batches' losses of a step: non-finite, or above `spike_factor` x the running
    mean, is bad. Collective (each loss is averaged over ranks) so every rank decides alike.
    `judge` takes all the losses it is given in one all-reduce and one host read: the trainer calls
    it once per optimiser step, so the launch queue drains once per step, not once per micro batch."""

    def __init__(self, spike_factor: float, max_bad_steps: int) -> None:
        self.spike_factor, self.max_bad_steps = spike_factor, max_bad_steps
        self.mean: float | None = None  # exponential moving average of good losses
        self.streak = 0
        self.vetoed = False  # the last judge found a rank's veto: drop the step, do not count it as bad

    def judge(self, losses: list[torch.Tensor], veto: bool = False) -> str | None:
        """The first bad loss of `losses` (in order, as if each were checked alone), or None. `veto`: this
        rank's step was cut short (a preemption signal ended its wait for data); it rides in the same
        all-reduce, and if any rank vetoes, every rank is told so (`vetoed`) and drops the step."""
        flags = [x.detach().float().reshape(()) for x in losses]
        flags.append(torch.tensor(float(veto), device=flags[0].device))
        *values, vetoes = all_reduce_mean(torch.stack(flags)).tolist()  # the one sync
        self.vetoed = vetoes > 0
        if self.vetoed:
            return "step cut short by a preemption signal"
        for value in values:
            if not math.isfinite(value):
                return f"non-finite loss ({value})"
            if self.spike_factor and self.mean is not None and value > self.spike_factor * self.mean:
                return f"loss spike {value:.4f} > {self.spike_factor} x running mean {self.mean:.4f}"
            self.mean = value if self.mean is None else 0.9 * self.mean + 0.1 * value
        return None

    def check(self, loss: torch.Tensor) -> str | None:
        return self.judge([loss])

    def end_step(self, step: int, bad: str | None) -> None:
        if bad is None:
            self.streak = 0
            return
        self.streak += 1
        log.warning("step %d skipped: %s (%d in a row)", step, bad, self.streak)
        if self.streak >= self.max_bad_steps:
            raise TrainingDiverged(f"{self.streak} bad steps in a row up to step {step} (last: {bad}); stopping "
                                   "(lower optim.lr, check the data, or raise train.max_bad_steps)")
