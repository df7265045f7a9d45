"""Preemption: a signal asks the run to checkpoint at the next step boundary and exit for a requeue.

SLURM sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@120` in cluster/slurm) and
SIGTERM when it preempts or cancels a job; Kubernetes and most other schedulers send SIGTERM. The
handler only sets a flag (nothing else is safe inside a signal handler). The trainer asks
`requested()` once per step; the answer is agreed across ranks (a MAX all-reduce), so every rank
saves the same step even when the signal reaches them a moment apart, or reaches only one of them.
The process then exits with REQUEUE_EXIT_CODE, which cluster/slurm/pretrain.sbatch turns into
`scontrol requeue`; the requeued job resumes from that checkpoint (`checkpoint.resume: auto`).

A signal also bounds the waits for data (`interruptible`): a batch that has not come STALL_GRACE_S
after the signal means storage that does not answer (reads being retried, up to the retry budget);
the wait ends there, the trainer finishes the step on stand-in batches so that every collective still
meets, has every rank drop it (the loss guard's veto), and saves the step boundary before it --
weights, schedule, data position and RNG of the last finished step. A batch that comes in time is
used: without a stall, the step in progress is finished and saved, as before.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Iterator

import torch
import torch.distributed as dist

from .dist import DistInfo

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". Distinct from
# 0 (done), 1 (crash) and 2 (bad input) so that a script can requeue on exactly this code.
REQUEUE_EXIT_CODE = 75
# After a preemption signal, a wait for the next batch longer than this is a stall (storage not answering):
# far above a normal wait (milliseconds, with the workers reading ahead), far below a scheduler's grace period.
STALL_GRACE_S = 3.0
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is safely published."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"preempted ({reason}): checkpoint at step {step} saved; exit code "
                         f"{REQUEUE_EXIT_CODE} asks the scheduler to requeue")
        self.step = step


class WaitInterrupted(BaseException):
    """A wait for data ended by a preemption signal (raised inside `PreemptionWatcher.interruptible`).
    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


class PreemptionWatcher:
    """Catches the preemption signals in this process and answers, collectively, "stop now?".

    Construct it on every rank (it may create a process group). The data-loader workers ignore
    these signals (data_pipeline.stream.workers), so a scheduler that signals every process of the job does
    not take the workers down before the rank has saved.
    """

    def __init__(self, dist_info: DistInfo, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.dist = dist_info
        self.signal_name: str | None = None
        self.data_failed = False  # any rank's data storage failed for good (see requested)
        self.save_failed = False  # any rank's checkpoint thread failed (see requested)
        self._waiting = False  # inside `interruptible`: the handler ends the wait
        self._boundaries = 0  # calls of requested() so far = step boundaries seen
        self._signal_at = 0
        self._can_alarm = threading.current_thread() is threading.main_thread()  # signal.signal's own rule
        if self._can_alarm:
            for sig in signals:
                signal.signal(sig, self._handle)
            signal.signal(signal.SIGALRM, self._stalled)
        # Agreement travels over gloo on CPU tensors: no device synchronisation every step on NCCL.
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self._signal_at = self._boundaries
        if self._waiting:
            self._arm()

    def _arm(self) -> None:
        if self._can_alarm:
            signal.setitimer(signal.ITIMER_REAL, STALL_GRACE_S)

    def _stalled(self, signum: int, frame: FrameType | None) -> None:
        if self._waiting:  # the alarm of a wait that already ended is ignored
            self._waiting = False
            raise WaitInterrupted(f"{self.signal_name} received and no data for {STALL_GRACE_S:g}s (storage "
                                  "stalled?)")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait (for the next batch) that a preemption signal bounds: STALL_GRACE_S after the signal
        (or after entering, when the signal came earlier) it ends with WaitInterrupted."""
        self._waiting = True
        if self.signal_name is not None:
            self._arm()
        try:
            yield
        finally:
            self._waiting = False
            if self._can_alarm and self.signal_name is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def stop_reason(self) -> str | None:
        """Why this process should stop waiting (a signal arrived), or None; for the storage retry layer."""
        return f"{self.signal_name} received" if self.signal_name else None

    def requested(self, data_failed: bool = False, save_failed: bool = False) -> bool:
        """Collective (every rank calls it at every step boundary): did any rank get a signal?

        ``data_failed`` and ``save_failed`` ride along in the same all-reduce (no extra collective per
        step): afterwards ``self.data_failed`` / ``self.save_failed`` say whether any rank's data storage
        failed for good / any rank's checkpoint thread ended in an error."""
        self._boundaries += 1
        flag = torch.tensor([1 if self.signal_name else 0, int(data_failed), int(save_failed)], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.data_failed, self.save_failed = bool(flag[1].item()), bool(flag[2].item())
        return bool(flag[0].item())

    def reason(self) -> str:
        if self.signal_name is None:
            return "signal received by another rank"
        return f"{self.signal_name} received {self._boundaries - self._signal_at} step(s) ago"
