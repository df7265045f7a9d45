"""Fault handling in one room: each rank's stop flags, the one agreement at the step boundary, and what
each decision does -- its action and the exit code the process ends with.

A rank raises a flag where it notices a fault (a signal handler, a wait for data, the checkpoint thread,
the run dir's lease). Flags are never acted on where they are raised: at the step boundary every rank
calls ``Faults.at_boundary`` once, one SUM all-reduce tells every rank every flag (and the skipped-sample
counts), and every rank takes the same decision from the table ``FAULTS``. So no rank ever waits in a
collective that another rank has left. Adding a fault is one flag, one row and one line in docs/faults.md.

The actions:
- ``requeue``: checkpoint the last finished step and exit REQUEUE_EXIT_CODE (the scheduler requeues the job);
- ``stop``: every rank raises the same one-line error; nothing new is saved, the last checkpoint stays `latest`.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from data_pipeline.errors import DataSpecError, first_line
from data_pipeline.storage import RetryInterrupted, StorageError
from data_pipeline.stream.batch import Batch
from data_pipeline.stream.decode import SKIP_KINDS

from .checkpoint import CheckpointError
from .config import ConfigError
from .dist import DistInfo, broadcast_object
from .exit_codes import BAD_INPUT, CRASH, REQUEUE_EXIT_CODE
from .loss_guard import TrainingDiverged
from .preemption import PreemptionWatcher, WaitInterrupted

log = logging.getLogger("pretrain")

REQUEUE, STOP = "requeue", "stop"


@dataclass(frozen=True)
class Fault:
    flag: str  # the name of the per-rank flag (and of the decision)
    action: str  # REQUEUE or STOP
    cause: str  # what raises the flag (for docs and the log)


# In the order they are decided: the first raised flag wins. Bad data is not a flag but a fraction of
# the skip counts that ride in the same all-reduce; it is judged on log and save steps (`health_due`).
FAULTS = (
    Fault("save_failed", STOP, "the checkpoint thread's save ended in an error (disk full, storage)"),
    Fault("data_failed", STOP, "a rank's data storage failed for good (retries spent, or a permanent error)"),
    Fault("signal", REQUEUE, "SIGTERM / SIGUSR1 reached a rank (preemption, a time limit)"),
    Fault("lease_lost", STOP, "another run took the run dir's lease over (it thought this one dead)"),
    Fault("bad_data", STOP, "more than data.max_skip_fraction of the samples read were unusable"),
)
FLAGS = [f.flag for f in FAULTS if f.flag != "bad_data"]  # what each rank sends at the boundary


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is safely published."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"preempted ({reason}): checkpoint at step {step} saved; exit code "
                         f"{REQUEUE_EXIT_CODE} asks the scheduler to requeue")
        self.step = step


@dataclass(frozen=True)
class Stop:
    """The boundary's decision: ``fault`` (a FAULTS flag); for ``stop`` the error every rank raises, for
    ``requeue`` why the run is checkpointed and requeued."""
    fault: Fault
    error: BaseException | None = None
    reason: str = ""

    @property
    def requeue(self) -> bool:
        return self.fault.action == REQUEUE


_BY_FLAG = {f.flag: f for f in FAULTS}


class Faults:
    """Each rank's stop flags and the step boundary's one agreement on them. Construct on every rank."""

    def __init__(self, dist_info: DistInfo, loader, checkpointer, lease, total_steps: int,
                 max_skip_fraction: float, scalars: Callable[[int, dict], None]) -> None:
        self.dist, self.loader, self.checkpointer, self.lease = dist_info, loader, checkpointer, lease
        self.total_steps, self.max_skip_fraction, self.scalars = total_steps, max_skip_fraction, scalars
        self.preemption = PreemptionWatcher(dist_info)  # SIGTERM/SIGUSR1 -> checkpoint, exit 75
        self.data_error: str | None = None  # this rank's data storage failed for good (see next_batch)
        self.cut_short = False  # a signal ended this rank's wait for data: the step is dropped (a stalled step)
        self.last_batch: Batch | None = None
        # Agreement travels over gloo on CPU tensors: no device synchronisation every step on NCCL.
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    # ---- flags, raised where the fault is noticed
    def _flags(self) -> dict[str, bool]:
        return {"save_failed": self.checkpointer.failed(), "data_failed": self.data_error is not None,
                "signal": self.preemption.signal_name is not None,
                "lease_lost": self.lease is not None and self.lease.lost is not None}

    def next_batch(self, batches: Iterator[Batch], step: int) -> Batch:
        """The next micro batch. When this rank's storage failed for good (or a signal ended the wait), the
        last batch stands in until the step boundary, where every rank learns of it and all stop together:
        no rank waits in a collective."""
        if self.data_error is None and not self.cut_short:
            try:
                with self.preemption.interruptible():  # a preemption signal ends a wait on stalled storage
                    self.last_batch = next(batches)
                return self.last_batch
            except StorageError as e:
                self.data_error = str(e)
                log.error("data storage failed: %s; stopping at the end of this step without saving", e)
            except (WaitInterrupted, RetryInterrupted) as e:
                self.cut_short = True
                log.warning("%s; this step is dropped and step %d is saved", e, step)
        if self.last_batch is None:
            self.last_batch = self.loader.blank_batch()
        return self.last_batch

    # ---- the boundary
    def at_boundary(self, step: int, health_due: bool) -> Stop | None:
        """Collective, once per step on every rank: the decision every rank takes alike, or None.
        ``health_due``: also judge the skipped-sample fraction and log the data counts (log and save steps)."""
        self.preemption.count_boundary()
        flags = self._flags()
        skipped = self.loader.skipped
        values = torch.tensor([float(flags[f]) for f in FLAGS] + [skipped[k] for k in SKIP_KINDS]
                              + [self.loader.delivered], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, group=self._group)  # the one collective
        *raised, delivered = values.tolist()
        raised, counts = dict(zip(FLAGS, raised[:len(FLAGS)])), raised[len(FLAGS):]
        if raised["save_failed"]:
            try:
                self.checkpointer.wait()  # raises the failed save's one line, the same on every rank
            except Exception as e:  # noqa: BLE001 -- this is the error the run ends with
                return Stop(_BY_FLAG["save_failed"], error=e)
        if raised["data_failed"]:
            return Stop(_BY_FLAG["data_failed"], error=self._data_error(step))
        if raised["signal"] and (step < self.total_steps or self.cut_short):
            return Stop(_BY_FLAG["signal"], reason=self.preemption.reason())
        if not health_due:
            return None
        if raised["lease_lost"]:  # stop, writing nothing more
            return Stop(_BY_FLAG["lease_lost"],
                        error=ConfigError(str(broadcast_object(self.lease.lost if self.lease is not None else None))))
        return self._judge_data(step, counts, delivered)

    def _data_error(self, step: int) -> StorageError:
        """Collective: every rank gets the failing rank's line."""
        messages = [self.data_error]
        if dist.is_available() and dist.is_initialized():
            messages = [None] * dist.get_world_size()
            dist.all_gather_object(messages, self.data_error)
        return StorageError(next(m for m in messages if m) + f" (stopped at step {step}; the last checkpoint "
                            "is kept: resume from it once that is fixed)")

    def _judge_data(self, step: int, counts: list[float], delivered: float) -> Stop | None:
        """Report skipped samples; a bad fraction above data.max_skip_fraction stops the run, naming one
        skipped sample of the commonest kind and why (gathered from every rank: the counts are global)."""
        bad = sum(counts)
        if bad:
            self.scalars(step, {f"data/skipped_{k}": v for k, v in zip(SKIP_KINDS, counts)})
        self.scalars(step, self.loader.metrics())  # epochs, mixing shares, epoch-end drops
        fraction = bad / max(1.0, bad + delivered)
        if fraction <= self.max_skip_fraction:
            return None
        kind = max(zip(SKIP_KINDS, counts), key=lambda kv: kv[1])[0]
        causes = [self.loader.skip_causes]
        if dist.is_available() and dist.is_initialized():
            causes = [{}] * self.dist.world_size
            dist.all_gather_object(causes, self.loader.skip_causes)
        example = next((c[kind] for c in causes if kind in c), "see the warnings above")
        return Stop(_BY_FLAG["bad_data"], error=DataSpecError(
            f"{fraction:.1%} of the samples read so far were skipped as unusable "
            f"({', '.join(f'{k} {int(v)}' for k, v in zip(SKIP_KINDS, counts) if v)}), above "
            f"data.max_skip_fraction={self.max_skip_fraction}; {kind}: {example}"))


# What gloo (and the TCP store) say when the rank at the other end of a connection is gone.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def lost_peer(exn: BaseException) -> str | None:
    """The words of a collective that failed because another rank died, or None for any other error."""
    text = str(exn)
    return next((marker for marker in _PEER_GONE if marker in text), None) if isinstance(exn, RuntimeError) else None


@dataclass(frozen=True)
class Ending:
    """How a process that stopped on ``error`` ends: its exit code, the one line it says, and whether it
    only lost a peer (the launcher then names the rank that died instead)."""
    code: int
    line: str
    lost_peer: bool = False
    plain: bool = False  # said as it is (not as "error: ..."): a requeue is not an error


def ending(error: BaseException) -> Ending | None:
    """The exit code and line for an error that ended training, or None for one with no known cause
    (its traceback is the report)."""
    if isinstance(error, (ConfigError, DataSpecError, CheckpointError, TrainingDiverged)):
        return Ending(BAD_INPUT, first_line(error))
    if isinstance(error, Preempted):
        return Ending(REQUEUE_EXIT_CODE, str(error), plain=True)
    why = lost_peer(error)
    if why is not None:
        # A survivor's 24-line gloo traceback says nothing about the rank that died; the launcher names it.
        return Ending(CRASH, f"rank {os.environ.get('RANK', '?')}: another rank of this run is gone ({why} in a "
                      "collective); see the line about that rank", lost_peer=True)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        # A full disk outside the checkpoint writer (which says more: see checkpoint.py): eval records, config.
        return Ending(BAD_INPUT, f"{error.filename or 'the run dir'}: no space left on the device ({error.strerror}); "
                      "free space or move run.dir")
    return None
