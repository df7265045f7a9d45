"""Upstream validation: loss, top-1, top-5 on held-out shards of the pre-training set."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .runner import Forward

if TYPE_CHECKING:
    from data_pipeline.stream import Batch


class UpstreamEvaluator:
    """Collective: every rank evaluates its share of the held-out shards; torchmetrics reduces."""
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
