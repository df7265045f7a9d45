import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.loss import build_loss


def test_softmax_int_labels_and_one_hot_agree():
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = build_loss("softmax")
    assert loss(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), abs=1e-6)
    assert loss(logits, F.one_hot(labels, 5).float()) == pytest.approx(float(loss(logits, labels)), abs=1e-6)
    smoothed = build_loss("softmax", 0.1)
    assert smoothed(logits, labels) == pytest.approx(smoothed(logits, F.one_hot(labels, 5).float()).item(), abs=1e-6)


def test_sigmoid_is_summed_binary_ce():
    logits = torch.zeros(2, 4)
    # Every class at logit 0: -log(sigmoid(0)) = ln 2 per class, summed over 4 classes.
    assert build_loss("sigmoid")(logits, torch.tensor([1, 3])).item() == pytest.approx(4 * math.log(2))
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
    logits = torch.randn(2, 4)
    expected = F.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / 2
    assert build_loss("sigmoid")(logits, soft).item() == pytest.approx(expected.item(), abs=1e-6)


def test_bf16_logits_computed_in_fp32():
    logits = torch.randn(4, 3).bfloat16()
    assert build_loss("sigmoid")(logits, torch.tensor([0, 1, 2, 0])).dtype == torch.float32


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss("hinge")
