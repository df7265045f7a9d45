"""Classification losses: softmax cross-entropy and the paper's sigmoid cross-entropy upstream option.

Both take logits [B, C] and targets as int labels [B] or float soft targets [B, C] (mixup/cutmix
and label smoothing produce the latter), and compute in fp32 whatever precision the logits have.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _dense_targets(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        targets = F.one_hot(targets.long(), num_classes).float()
    targets = targets.float()
    if smoothing > 0:
        targets = targets * (1.0 - smoothing) + smoothing / num_classes
    return targets


class SoftmaxCrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if targets.ndim == 1:  # int labels: the fused kernel, no one-hot materialised
            return F.cross_entropy(logits, targets.long(), label_smoothing=self.label_smoothing)
        targets = _dense_targets(targets, logits.shape[-1], self.label_smoothing)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class SigmoidCrossEntropy(nn.Module):
    """Per-class binary cross-entropy, summed over classes and averaged over the batch
    (big_vision's `sigmoid_xent`): classes do not compete, which suits multi-label upstream data."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        targets = _dense_targets(targets, logits.shape[-1], self.label_smoothing)
        per_class = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return per_class.sum(dim=-1).mean()


def build_loss(kind: str, label_smoothing: float = 0.0) -> nn.Module:
    losses = {"softmax": SoftmaxCrossEntropy, "sigmoid": SigmoidCrossEntropy}
    if kind not in losses:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(losses)}")
    return losses[kind](label_smoothing)
