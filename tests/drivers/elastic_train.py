"""Test driver run by torchrun in place of pretrain/main.py: the real training CLI, plus a record of what
the data loader delivered, for the elastic node-loss test (tests/integration/test_elastic_node_loss.py).

Every worker process (a new one after each elastic restart) appends to
``$ELASTIC_RECORD_DIR/keys.<pid>.jsonl``: a first line {"rank", "world", "start_step"} once the run has
resumed (or not), then one line per batch taken, the keys of its samples. With one micro batch per
optimiser step, batch i of the file belongs to step start_step + 1 + i.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_pipeline.stream.train_loader import TrainLoader  # noqa: E402
from pretrain import main as pretrain_main  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402

RECORD = Path(os.environ["ELASTIC_RECORD_DIR"]) / f"keys.{os.getpid()}.jsonl"
STEP_SLEEP_S = float(os.environ.get("ELASTIC_STEP_SLEEP_S", "0"))


def _record(line: object) -> None:
    with RECORD.open("a") as f:  # one write per line, closed at once: a SIGKILL loses nothing recorded
        f.write(json.dumps(line) + "\n")


_iter, _resume = TrainLoader.__iter__, Trainer.resume


def recording_iter(self: TrainLoader):
    for batch in _iter(self):
        _record(batch.keys)
        time.sleep(STEP_SLEEP_S)  # a step long enough for the test to kill a node between two of them
        yield batch


def recording_resume(self: Trainer) -> None:
    _resume(self)
    _record({"rank": self.dist.rank, "world": self.dist.world_size, "start_step": self.step})


TrainLoader.__iter__ = recording_iter
Trainer.resume = recording_resume

if __name__ == "__main__":
    sys.exit(pretrain_main.main())
