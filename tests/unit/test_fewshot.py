"""The few-shot solver against independent solutions, and its behaviour on easy and hopeless data."""
import numpy as np
import pytest

from pretrain.evaluation import fewshot_accuracy, ridge_solutions


@pytest.mark.parametrize("n,d", [(40, 8), (8, 40)])  # both the primal and the kernel form
def test_ridge_matches_lstsq_on_augmented_system(n, d):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    regs = [1e-3, 0.5, 10.0]
    for l2, w in zip(regs, ridge_solutions(x, y, regs)):
        # ||xW - y||^2 + l2||W||^2 == least squares on [x; sqrt(l2) I] W = [y; 0]
        xa = np.vstack([x, np.sqrt(l2) * np.eye(d)])
        ya = np.vstack([y, np.zeros((d, 3))])
        ref = np.linalg.lstsq(xa, ya, rcond=None)[0]
        np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-8)


def test_fewshot_separable_features_score_high_and_noise_scores_chance():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(5, 32)) * 3
    y_tr, y_te = rng.integers(0, 5, 400), rng.integers(0, 5, 500)
    x_tr = centers[y_tr] + rng.normal(size=(400, 32))
    x_te = centers[y_te] + rng.normal(size=(500, 32))
    good = fewshot_accuracy(x_tr, y_tr, x_te, y_te, shots=[1, 10], seeds=2, l2_regs=[0.1, 10, 1000])
    assert good[10] > 0.95 and good[1] > 0.6
    noise = fewshot_accuracy(rng.normal(size=(400, 32)), y_tr, rng.normal(size=(500, 32)), y_te,
                             shots=[10], seeds=3, l2_regs=[0.1, 10, 1000])
    assert 0.1 < noise[10] < 0.32  # chance is 0.2
