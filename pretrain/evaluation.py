"""Evaluations that run after each checkpoint: how good is the representation now?

Each evaluator has a `name` and `run(model) -> {metric: value}`; the caller adds the
`eval/<name>/` prefix, writes TensorBoard and the JSON records, and survives an evaluator that
raises. `upstream` is collective (every rank evaluates its share of the held-out shards, the
metrics are reduced by torchmetrics); `fewshot` runs on rank 0 (downstream sets here are small).
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .dist import DistInfo

if TYPE_CHECKING:
    from data_pipeline.stream import Batch

log = logging.getLogger(__name__)

BIAS_FEATURE = 100.0  # a large constant feature acts as an (almost) unregularised bias


class Evaluator(Protocol):
    name: str

    def run(self, model: nn.Module) -> dict[str, float]: ...


@dataclass
class Forward:
    """How to feed a uint8 batch to the model: device copy, normalisation, autocast."""
    prepare: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]
    autocast: Callable[[], object]


class UpstreamEvaluator:
    name = "upstream"

    def __init__(self, batches: Callable[[], Iterable[Batch]], num_classes: int, forward: Forward,
                 device: torch.device) -> None:
        self.batches, self.forward = batches, forward
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
        self.top5 = (MulticlassAccuracy(num_classes, top_k=5, average="micro").to(device)
                     if num_classes >= 5 else None)
        self.loss = MeanMetric().to(device)

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, float]:
        metrics = [m for m in (self.top1, self.top5, self.loss) if m is not None]
        for m in metrics:
            m.reset()
        for batch in self.batches():
            images, labels = self.forward.prepare(batch)
            with self.forward.autocast():
                logits = model(images).float()
            self.top1.update(logits, labels)
            if self.top5 is not None:
                self.top5.update(logits, labels)
            self.loss.update(F.cross_entropy(logits, labels, reduction="none"))
        # compute() syncs the states across ranks, so every rank must get here (it does: run is collective).
        out = {"top1": self.top1.compute().item(), "loss": self.loss.compute().item()}
        if self.top5 is not None:
            out["top5"] = self.top5.compute().item()
        return out


# ---------------------------------------------------------------------------------------------
# Few-shot linear evaluation (the paper's / big_vision's method): frozen pre-logit features,
# closed-form regularised least squares onto +-1 one-hot targets.

def ridge_solutions(x: np.ndarray, y: np.ndarray, l2_regs: Sequence[float]) -> list[np.ndarray]:
    """W minimising ||xW - y||^2 + l2 ||W||^2 for every l2, sharing one eigendecomposition.
    Uses the N x N kernel form when there are fewer samples than features (few-shot's usual case)."""
    n, d = x.shape
    if n >= d:
        eigs, q = np.linalg.eigh(x.T @ x)
        qt_xty = q.T @ (x.T @ y)
        return [q @ (qt_xty / (eigs + l2)[:, None]) for l2 in l2_regs]
    eigs, q = np.linalg.eigh(x @ x.T)
    qty = q.T @ y
    return [x.T @ (q @ (qty / (eigs + l2)[:, None])) for l2 in l2_regs]


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0, keepdims=True), train.std(0, keepdims=True) + 1e-5
    out = []
    for a in (train, *others):
        a = (a - mean) / std
        out.append(np.concatenate([a, np.full((len(a), 1), BIAS_FEATURE)], axis=1))
    return out


def fewshot_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     shots: Sequence[int], seeds: int, l2_regs: Sequence[float],
                     holdout_per_class: int = 10) -> dict[int, float]:
    """Mean test accuracy over `seeds` draws of k training samples per class, for each k in shots.
    The ridge strength is chosen per draw on held-out training samples not in the draw."""
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    classes = np.unique(y_train)
    by_class = {c: np.flatnonzero(y_train == c) for c in classes}
    results = {}
    for k in shots:
        accs = []
        for seed in range(seeds):
            rng = np.random.default_rng([seed, k])
            pick, hold = [], []
            for c in classes:
                idx = rng.permutation(by_class[c])
                pick.append(idx[:k])
                hold.append(idx[k:k + holdout_per_class])
            pick, hold = np.concatenate(pick), np.concatenate(hold)
            xs, xh, xt = _standardise(x_train[pick], x_train[hold], x_test)
            y = 2.0 * (y_train[pick][:, None] == classes[None, :]) - 1.0
            ws = ridge_solutions(xs, y, l2_regs)
            best = max(ws, key=lambda w: np.mean(classes[(xh @ w).argmax(1)] == y_train[hold])) if len(hold) else ws[0]
            accs.append(float(np.mean(classes[(xt @ best).argmax(1)] == y_test)))
        results[k] = float(np.mean(accs))
    return results


class FewShotEvaluator:
    name = "fewshot"

    def __init__(self, train_batches: Callable[[], Iterable[Batch]], test_batches: Callable[[], Iterable[Batch]],
                 forward: Forward, shots: Sequence[int], seeds: int, l2_regs: Sequence[float],
                 dist_info: DistInfo) -> None:
        self.train_batches, self.test_batches = train_batches, test_batches
        self.forward, self.shots, self.seeds, self.l2_regs = forward, list(shots), seeds, list(l2_regs)
        self.dist = dist_info

    @torch.no_grad()
    def features(self, model: nn.Module, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = [], []
        for batch in batches:
            images, y = self.forward.prepare(batch)
            with self.forward.autocast():
                f = model.forward_head(model.forward_features(images), pre_logits=True)
            feats.append(f.float().cpu().numpy())
            labels.append(y.cpu().numpy())
        return np.concatenate(feats), np.concatenate(labels)

    def run(self, model: nn.Module) -> dict[str, float]:
        if not self.dist.is_main:
            return {}
        x_tr, y_tr = self.features(model, self.train_batches())
        x_te, y_te = self.features(model, self.test_batches())
        acc = fewshot_accuracy(x_tr, y_tr, x_te, y_te, self.shots, self.seeds, self.l2_regs)
        return {f"{k}shot": v for k, v in acc.items()}


class EvalRunner:
    """Runs every evaluator on the model of a checkpoint; records results as TensorBoard scalars
    (x-axis: training step), one JSON file per checkpoint and a JSONL history."""

    def __init__(self, evaluators: Sequence[Evaluator], run_dir: str, dist_info: DistInfo,
                 scalars: Callable[[int, Mapping[str, float]], None]) -> None:
        self.evaluators, self.dist, self.scalars = list(evaluators), dist_info, scalars
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = root.rstrip("/") + "/eval"

    def __call__(self, model: nn.Module, step: int, checkpoint: str) -> dict:
        was_training = model.training
        model.eval()
        record: dict = {"step": step, "checkpoint": checkpoint, "results": {}, "errors": {}}
        t0 = time.perf_counter()
        for ev in self.evaluators:
            try:
                record["results"][ev.name] = ev.run(model)
            except Exception as e:  # an evaluation must never take the training run down with it
                log.error("evaluator %s failed at step %d: %s", ev.name, step, e)
                record["errors"][ev.name] = "".join(traceback.format_exception_only(type(e), e)).strip()
        model.train(was_training)
        record["seconds"] = time.perf_counter() - t0
        if self.dist.is_main:
            flat = {f"eval/{name}/{k}": v for name, res in record["results"].items() for k, v in res.items()}
            self.scalars(step, flat)
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(f"{self.root}/step_{step:07d}.json", "w") as f:
                json.dump(record, f, indent=1)
            with self.fs.open(f"{self.root}/results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("eval step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in flat.items()) or "no results")
        return record
