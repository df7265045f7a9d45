"""Linear probe: multinomial logistic regression on frozen pre-logit features of the full train split."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from omegaconf import DictConfig

from ..dist import DistInfo
from .features import FeatureCache, FrozenFeatureEvaluator
from .registry import EvalContext, register
from .runner import Autocast, Batches, ToDevice


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                 max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Weights (d, K) and bias (K,) minimising mean cross-entropy + l2/2 ||W||^2. Full batch with
    scipy's L-BFGS: the problem is convex and small (features, not images), and numpy on the host
    avoids the thread contention that makes tiny torch ops slow on busy CPUs."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    x = np.asarray(x, np.float64)
    n, d = x.shape
    onehot = np.eye(num_classes)[y]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
        logp = log_softmax(x @ w + b, axis=1)
        loss = -np.sum(onehot * logp) / n + 0.5 * l2 * np.sum(w * w)
        g = (np.exp(logp) - onehot) / n  # d loss / d logits
        return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(0)])

    res = minimize(objective, np.zeros(d * num_classes + num_classes), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": 1e-8, "ftol": 1e-12})
    return res.x[: d * num_classes].reshape(d, num_classes), res.x[d * num_classes:]


def _accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ w + b).argmax(1) == y))


def linear_probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                          l2_regs: Sequence[float], holdout_fraction: float = 0.2, seed: int = 0) -> dict[str, float]:
    """Test top-1 of a logistic regression on standardised features. The l2 strength is chosen on a
    held-out part of the train split, then the model is refit on all of it."""
    mean, std = x_train.mean(0, keepdims=True), x_train.std(0, keepdims=True) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classes, y_tr = np.unique(y_train, return_inverse=True)
    y_te = np.searchsorted(classes, y_test)
    y_te = np.where(classes[np.minimum(y_te, len(classes) - 1)] == y_test, y_te, -1)  # unseen class: never right
    order = np.random.default_rng(seed).permutation(len(y_tr))
    n_hold = int(len(order) * holdout_fraction)
    hold, fit = order[:n_hold], order[n_hold:]
    scores = {l2: _accuracy(*fit_logistic(x_train[fit], y_tr[fit], len(classes), l2), x_train[hold], y_tr[hold])
              for l2 in l2_regs} if n_hold and len(l2_regs) > 1 else {l2_regs[0]: 0.0}
    best = max(scores, key=scores.get)
    w, b = fit_logistic(x_train, y_tr, len(classes), best)
    return {"top1": _accuracy(w, b, x_test, y_te), "train_top1": _accuracy(w, b, x_train, y_tr), "l2": best}


class LinearProbeEvaluator(FrozenFeatureEvaluator):
    name = "linear_probe"

    def __init__(self, train_batches: Batches, test_batches: Batches, to_device: ToDevice, autocast: Autocast,
                 l2_regs: Sequence[float], dist_info: DistInfo, cache: FeatureCache | None = None,
                 keys: tuple[str, str] = ("train", "test")) -> None:
        super().__init__(train_batches, test_batches, to_device, autocast, dist_info, cache, keys)
        self.l2_regs = list(l2_regs)

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
            ) -> dict[str, float]:
        return linear_probe_accuracy(x_train, y_train, x_test, y_test, self.l2_regs)


@register("linear_probe")
def build_linear_probe(section: DictConfig, ctx: EvalContext) -> LinearProbeEvaluator:
    """Each rank extracts the features of its share of the shards (shared with few-shot on the same
    split through the context's cache); rank 0 fits."""
    return LinearProbeEvaluator(ctx.rank_share(section.train), ctx.rank_share(section.test), ctx.to_device,
                                ctx.autocast, l2_regs=section.l2_regs, dist_info=ctx.dist, cache=ctx.features,
                                keys=(section.train, section.test))
