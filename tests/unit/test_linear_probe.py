"""The linear probe's logistic regression against scikit-learn's, and its accuracy on easy and hopeless data."""
import numpy as np
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression

from pretrain.evaluation.linear_probe import fit_logistic, linear_probe_accuracy


def test_fit_matches_sklearn_multinomial_logistic_regression():
    rng = np.random.default_rng(0)
    n, d, k, l2 = 300, 6, 4, 0.05
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=(d, k)) + rng.normal(size=(n, k))).argmax(1)
    w, b = fit_logistic(x, y, k, l2)
    # sklearn minimises 0.5||W||^2 + C * sum(loss); ours mean(loss) + 0.5 l2 ||W||^2: C = 1 / (l2 n).
    ref = LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w.T, ref.coef_, atol=2e-4)
    # The softmax is blind to a shared shift of all intercepts: compare them centred.
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-4)
    probs = softmax(x @ w + b, axis=1)
    np.testing.assert_allclose(probs, ref.predict_proba(x), atol=1e-4)


def test_probe_separable_features_score_high_and_noise_scores_chance():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(5, 16)) * 2
    y_tr, y_te = rng.integers(0, 5, 500), rng.integers(0, 5, 500)
    good = linear_probe_accuracy(centers[y_tr] + rng.normal(size=(500, 16)), y_tr,
                                 centers[y_te] + rng.normal(size=(500, 16)), y_te, l2_regs=[1e-3, 1e-1])
    assert good["top1"] > 0.95 and good["l2"] in (1e-3, 1e-1)
    noise = linear_probe_accuracy(rng.normal(size=(500, 16)), y_tr, rng.normal(size=(500, 16)), y_te,
                                  l2_regs=[1e-3, 1e-1])
    assert 0.1 < noise["top1"] < 0.32  # chance is 0.2
    assert noise["train_top1"] > noise["top1"]  # it fits noise it cannot generalise from
