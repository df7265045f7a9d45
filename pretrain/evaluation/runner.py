"""The evaluator interface, and the runner that evaluates one checkpoint and records the results."""
from __future__ import annotations

import logging
import time
import traceback
from contextlib import AbstractContextManager
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

from data_pipeline.storage import StorageError, one_budget_per_store
from data_pipeline.stream.batch import Batch

from ..dist import DistInfo
from .records import EvalRecords

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """`run(model)` returns `{metric: value}`; the caller adds the `eval/<name>/` prefix.
    A collective evaluator is called on every rank; only rank 0's result is recorded."""
    name: str

    def run(self, model: nn.Module) -> dict[str, float]: ...


# What every evaluator is given: a split's batches (a fresh pass per call), the host batch -> device
# inputs step (data_pipeline.image.device.BatchToDevice) and the autocast context of the forward passes.
Batches = Callable[[], Iterable[Batch]]
ToDevice = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]
Autocast = Callable[[], AbstractContextManager]


class EvalRunner:
    """Runs every evaluator on the model of a checkpoint; records results as TensorBoard scalars
    (x-axis: training step), one JSON file per checkpoint and a JSONL history. An evaluator that
    raises is logged and its error recorded; the others still run and training goes on. A store that
    does not answer costs one retry budget per checkpoint: once given up on, the evaluators after
    that read from it fail at once, and the error is recorded (and logged) once, by the first.

    ``before_record``: called (on every rank) before the record is written; the trainer waits there for
    the checkpoint being evaluated to be published, so that no record names an unpublished one."""

    def __init__(self, evaluators: Sequence[Evaluator], run_dir: str, dist_info: DistInfo,
                 scalars: Callable[[int, Mapping[str, float]], None],
                 on_record: Callable[[dict], None] | None = None) -> None:
        self.evaluators, self.dist, self.scalars, self.on_record = list(evaluators), dist_info, scalars, on_record
        self.records = EvalRecords(run_dir)

    def __call__(self, model: nn.Module, step: int, checkpoint: str,
                 before_record: Callable[[], None] | None = None) -> dict:
        was_training = model.training
        model.eval()
        record: dict = {"step": step, "checkpoint": checkpoint, "results": {}, "errors": {}, "seconds": {}}
        t0 = time.perf_counter()
        storage_failed = None  # the first evaluator that failed on storage (its error is the one recorded)
        try:
            with one_budget_per_store():
                for ev in self.evaluators:
                    t = time.perf_counter()
                    try:
                        record["results"][ev.name] = ev.run(model)
                    except StorageError as e:
                        if storage_failed is None:
                            log.error("evaluator %s failed at step %d: %s", ev.name, step, e)
                            storage_failed = ev.name
                            record["errors"][ev.name] = f"StorageError: {e}"
                        else:
                            record["errors"][ev.name] = f"StorageError: not run, see {storage_failed}"
                    except Exception as e:  # an evaluation must never take the training run down with it
                        log.error("evaluator %s failed at step %d: %s", ev.name, step, e)
                        record["errors"][ev.name] = "".join(traceback.format_exception_only(type(e), e)).strip()
                    record["seconds"][ev.name] = round(time.perf_counter() - t, 3)
        finally:
            model.train(was_training)
        record["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        if before_record is not None:
            before_record()
        if self.dist.is_main:
            flat = {f"eval/{name}/{k}": v for name, res in record["results"].items() for k, v in res.items()}
            self.scalars(step, flat)
            self.records.write(record)
            if self.on_record is not None:
                self.on_record(record)
            log.info("eval step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in flat.items()) or "no results")
        return record
