"""Preemption: a signal asks the run to checkpoint at the next step boundary and exit for a requeue.

SLURM sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@120` in cluster/slurm) and
SIGTERM when it preempts or cancels a job; Kubernetes and most other schedulers send SIGTERM. The
handler only sets a flag (nothing else is safe inside a signal handler). The flag is agreed across
ranks at the step boundary (pretrain/faults.py, in its one all-reduce), so every rank saves the same
step even when the signal reaches them a moment apart, or reaches only one of them. The process then
exits with REQUEUE_EXIT_CODE (pretrain/exit_codes.py), which cluster/slurm/pretrain.sbatch turns into
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

from .dist import DistInfo

log = logging.getLogger(__name__)

# After a preemption signal, a wait for the next batch longer than this is a stall (storage not answering):
# far above a normal wait (milliseconds, with the workers reading ahead), far below a scheduler's grace period.
STALL_GRACE_S = 3.0
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class WaitInterrupted(BaseException):
    """A wait for data ended by a preemption signal (raised inside `PreemptionWatcher.interruptible`).
    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


class PreemptionWatcher:
    """Catches the preemption signals in this process; pretrain/faults.py agrees on them across ranks.

    The data-loader workers ignore these signals (data_pipeline.stream.workers), so a scheduler that
    signals every process of the job does not take the workers down before the rank has saved.
    """

    def __init__(self, dist_info: DistInfo, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.dist = dist_info
        self.signal_name: str | None = None
        self._waiting = False  # inside `interruptible`: the handler ends the wait
        self._boundaries = 0  # step boundaries seen (count_boundary)
        self._signal_at = 0
        self._can_alarm = threading.current_thread() is threading.main_thread()  # signal.signal's own rule
        if self._can_alarm:
            for sig in signals:
                signal.signal(sig, self._handle)
            signal.signal(signal.SIGALRM, self._stalled)

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

    def count_boundary(self) -> None:
        """A step boundary passed (for `reason`: how many steps ago the signal came)."""
        self._boundaries += 1

    def reason(self) -> str:
        if self.signal_name is None:
            return "signal received by another rank"
        return f"{self.signal_name} received {self._boundaries - self._signal_at} step(s) ago"
