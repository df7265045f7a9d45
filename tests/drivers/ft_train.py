"""Test and bench driver run in place of pretrain/main.py under engine.fault_tolerance=torchft: the real
training CLI, plus a record of every step each replica group tried, for the data accounting of
tests/integration/test_fault_tolerance.py and bench/torchft_failover.py.

The test sets the pace of the steps (`step_sleep_s`). Each process appends to
``$FT_RECORD_DIR/group<G>.<pid>.jsonl``:
  {"draw": step, "quorum": Q, "slot": S, "rank": R, "n": N, "keys": [...], "t": time}   before the gradients leave
  {"done": step, "quorum": Q, "rank": R, "committed": bool, "t": time}   after the quorum's decision
  {"stepped": step, "rank": R, "t": time}   after each train_step (with or without torchft), before the pace
(R: the rank within its group.) A step's samples count as consumed when some group committed that
(step, quorum): then the draws of every slot's ranks in that quorum are in the averaged gradient. The
draw line is written before the cross-group all-reduce, so a group killed after contributing has still left its line.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import main as pretrain_main  # noqa: E402
from pretrain.engines.ft import FaultTolerance  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402


def _record(line: dict) -> None:
    record = Path(os.environ["FT_RECORD_DIR"]) / f"group{os.environ.get('REPLICA_GROUP_ID', '0')}.{os.getpid()}.jsonl"
    with record.open("a") as f:  # one write per line, closed at once: a SIGKILL loses nothing recorded
        f.write(json.dumps({**line, "t": time.time()}) + "\n")


_train_step = Trainer.train_step
_reduce = FaultTolerance._reduce_across_groups


class Drawn:
    """The trainer's batch iterator, noting the keys of every batch the step draws on the engine."""

    def __init__(self, batches, engine) -> None:
        self.batches, self.engine = batches, engine

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.engine.drawn_keys = [*getattr(self.engine, "drawn_keys", []), *batch.keys]
        return batch


def reduce(self: FaultTolerance, bad: bool) -> bool:
    m = self.manager
    step, quorum = m.current_step() + 1, m._quorum_id
    _record({"draw": step, "quorum": quorum, "slot": m.participating_rank(), "rank": self.dist.rank,
             "n": self.participants,
             "keys": list(getattr(self, "drawn_keys", []))})
    ok = _reduce(self, bad)
    _record({"done": step, "quorum": quorum, "rank": self.dist.rank, "committed": self.committed})
    return ok


def step_sleep_s() -> float:
    """Steps long enough for a test to kill a group between two of them, or to have a replacement join
    before the run ends: ``$FT_RECORD_DIR/step_sleep_s`` when the test has written it, else $FT_STEP_SLEEP_S."""
    pace = Path(os.environ["FT_RECORD_DIR"]) / "step_sleep_s"
    try:
        return float(pace.read_text())
    except (OSError, ValueError):
        return float(os.environ.get("FT_STEP_SLEEP_S", "0"))


def train_step(self: Trainer, batches) -> None:
    self.engine.drawn_keys = []
    _train_step(self, Drawn(batches, self.engine))
    _record({"stepped": self.step, "rank": self.dist.rank})  # every run, with or without torchft: step times
    time.sleep(step_sleep_s())


def account(record_dir: Path) -> dict:
    """What the committed steps consumed, from every group's record: per committed (step, quorum), the keys
    of every slot (each of its ranks) of that quorum. Returns the keys in step order, the committed steps,
    and the attempts that were not committed."""
    draws: dict[tuple[int, int], dict[tuple[int, int], list[str]]] = {}
    committed: dict[int, int] = {}  # step -> the quorum that committed it
    failed: set[tuple[int, int]] = set()
    for path in sorted(record_dir.glob("group*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "draw" in rec:
                draws.setdefault((rec["draw"], rec["quorum"]), {})[rec["slot"], rec.get("rank", 0)] = rec["keys"]
            elif "done" not in rec:
                continue
            elif rec["committed"]:
                if committed.setdefault(rec["done"], rec["quorum"]) != rec["quorum"]:
                    raise AssertionError(f"step {rec['done']} committed by two quorums")
            else:
                failed.add((rec["done"], rec["quorum"]))
    keys: list[str] = []
    for step in sorted(committed):
        slots = draws[(step, committed[step])]
        keys += [k for slot in sorted(slots) for k in slots[slot]]
    return {"keys": keys, "steps": sorted(committed), "not_committed": sorted(failed - set(committed.items()))}


if __name__ == "__main__":
    Trainer.train_step = train_step
    FaultTolerance._reduce_across_groups = reduce
    sys.exit(pretrain_main.main())
