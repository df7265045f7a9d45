"""Frozen pre-logit features of a downstream split, computed data-parallel across ranks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..dist import DistInfo

if TYPE_CHECKING:
    from data_pipeline.stream.batch import Batch

    from .runner import Autocast, Batches, ToDevice


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[Batch], to_device: ToDevice,
                     autocast: Autocast) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit features (the pooled representation the head reads) of every sample, in key
    order so that the result does not depend on how many ranks shared the work. Collective when
    a process group exists: each rank passes the batches of its own share of the shards and
    every rank gets all features back."""
    feats, labels, keys = [], [], []
    for batch in batches:
        images, y = to_device(batch)
        with autocast():
            f = model.forward_head(model.forward_features(images), pre_logits=True)
        feats.append(f.float())
        labels.append(y)
        keys += list(batch.keys)
    device = next(model.parameters()).device
    x = torch.cat(feats) if feats else torch.zeros((0, model.num_features), device=device)
    y = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x, y = _all_gather_rows(x), _all_gather_rows(y)
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, keys)  # small strings between our own ranks
        keys = [k for part in gathered for k in part]
    order = np.argsort(np.asarray(keys), kind="stable")
    return x.cpu().numpy()[order], y.cpu().numpy()[order]


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (the counts may differ) in rank order."""
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class FeatureCache:
    """Features of the last model seen, per split, so that evaluators reading the same split (few-shot
    and linear probe on the same downstream set) share one forward pass. A model counts as the same
    while its parameters sum to the same values: every rank computes this alike, so all ranks hit or
    miss together and the collective inside `extract_features` stays in step."""

    def __init__(self) -> None:
        self._signature: tuple | None = None
        self._store: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, split: str, model: nn.Module, compute: Callable[[], tuple[np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            signature = (id(model), *(float(p.detach().double().sum()) for p in model.parameters()))
        if signature != self._signature:
            self._signature, self._store = signature, {}
        if split not in self._store:
            self._store[split] = compute()
        return self._store[split]


class FrozenFeatureEvaluator:
    """Base of the evaluators that fit on frozen features of a train and a test split. The features
    are computed data-parallel (each rank passes its share of the shards) and shared through the
    cache; rank 0 alone fits, in `fit`."""
    name = ""

    def __init__(self, train_batches: Batches, test_batches: Batches, to_device: ToDevice, autocast: Autocast,
                 dist_info: DistInfo, cache: FeatureCache | None = None,
                 keys: tuple[str, str] = ("train", "test")) -> None:
        self.train_batches, self.test_batches, self.dist = train_batches, test_batches, dist_info
        self.to_device, self.autocast = to_device, autocast
        # A cache shared with other evaluators is keyed by split: pass the shard specs as keys.
        self.cache, (self.train_key, self.test_key) = cache or FeatureCache(), keys

    def run(self, model: nn.Module) -> dict[str, float]:
        x_tr, y_tr = self.cache.get(self.train_key, model, lambda: extract_features(
            model, self.train_batches(), self.to_device, self.autocast))
        x_te, y_te = self.cache.get(self.test_key, model, lambda: extract_features(
            model, self.test_batches(), self.to_device, self.autocast))
        if not self.dist.is_main:
            return {}
        return self.fit(x_tr, y_tr, x_te, y_te)

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
            ) -> dict[str, float]:
        raise NotImplementedError
