"""Upstream validation: loss, top-1, top-5 on held-out shards of the pre-training set."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..compat import hide_broken_torchvision
from .registry import EvalContext, register
from .runner import Autocast, Batches, ToDevice

hide_broken_torchvision()  # before torchmetrics, which imports torchvision whenever it is installed
from torchmetrics import MeanMetric  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402


class UpstreamEvaluator:
    """Collective: every rank evaluates its share of the held-out shards; torchmetrics reduces."""
    name = "upstream"

    def __init__(self, batches: Batches, num_classes: int, to_device: ToDevice, autocast: Autocast,
                 device: torch.device) -> None:
        self.batches, self.to_device, self.autocast = batches, to_device, autocast
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
            images, labels = self.to_device(batch)
            with self.autocast():
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


@register("upstream")
def build_upstream(section: DictConfig, ctx: EvalContext) -> UpstreamEvaluator | None:
    """The held-out shards of ``data.val``, each rank its share; none given: nothing to evaluate."""
    if not ctx.cfg.data.val:
        return None
    classes = ctx.cfg.model.num_classes
    return UpstreamEvaluator(ctx.rank_share(ctx.cfg.data.val, classes), classes, ctx.to_device,
                             ctx.autocast, ctx.dist.device)
