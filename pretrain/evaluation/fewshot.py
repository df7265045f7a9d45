"""Few-shot linear evaluation, the paper's / big_vision's method: frozen pre-logit features,
closed-form regularised least squares onto +-1 one-hot targets, the regulariser chosen on
held-out training samples, k samples per class, averaged over several random draws."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from omegaconf import DictConfig

from ..dist import DistInfo
from .features import FeatureCache, FrozenFeatureEvaluator
from .registry import EvalContext, register
from .runner import Autocast, Batches, ToDevice

BIAS_FEATURE = 100.0  # a large constant feature acts as an (almost) unregularised bias


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


class FewShotEvaluator(FrozenFeatureEvaluator):
    name = "fewshot"

    def __init__(self, train_batches: Batches, test_batches: Batches, to_device: ToDevice, autocast: Autocast,
                 shots: Sequence[int], seeds: int, l2_regs: Sequence[float], dist_info: DistInfo,
                 cache: FeatureCache | None = None, keys: tuple[str, str] = ("train", "test")) -> None:
        super().__init__(train_batches, test_batches, to_device, autocast, dist_info, cache, keys)
        self.shots, self.seeds, self.l2_regs = list(shots), seeds, list(l2_regs)

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
            ) -> dict[str, float]:
        acc = fewshot_accuracy(x_train, y_train, x_test, y_test, self.shots, self.seeds, self.l2_regs)
        return {f"{k}shot": v for k, v in acc.items()}


@register("fewshot")
def build_fewshot(section: DictConfig, ctx: EvalContext) -> FewShotEvaluator:
    """Each rank extracts the features of its share of the shards; rank 0 fits."""
    return FewShotEvaluator(ctx.rank_share(section.train), ctx.rank_share(section.test), ctx.to_device, ctx.autocast,
                            shots=section.shots, seeds=section.seeds, l2_regs=section.l2_regs, dist_info=ctx.dist,
                            cache=ctx.features, keys=(section.train, section.test))
