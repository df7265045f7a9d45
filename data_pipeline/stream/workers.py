"""What the DataLoader workers of both streams share: the preemption-signal set-up, the no-op collate."""
from __future__ import annotations

import os
import signal
import threading
from typing import Any


def outlive_preemption_signals(_worker_id: int) -> None:
    """A scheduler's SIGTERM / SIGUSR1 reaches every process of the job. The rank checkpoints on it
    (pretrain/preemption.py) and then shuts its workers down; a worker that died of it first would
    fail the rank before the save. So a worker ignores SIGUSR1, and SIGTERM from anyone but its own
    rank; the rank's SIGTERM (DataLoader shutdown, interpreter exit) still ends it at once."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: keep PyTorch's default there
        return
    rank_pid = os.getppid()
    # Blocked here, in the worker's only thread so far, and so in every thread it starts later:
    # SIGTERM is then taken only by sigwaitinfo below, which tells who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_the_rank() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank_pid:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_the_rank, name="sigterm-from-rank", daemon=True).start()


def as_is(x: Any) -> Any:
    """The collate function of our loaders: the workers yield whole batches already."""
    return x
