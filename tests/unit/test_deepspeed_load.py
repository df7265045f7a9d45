"""DeepSpeed's checkpoint files are read with weights_only=True and a short allow-list. Python 3.11.2+
pickles Enum members as getattr(EnumClass, "name"): that lookup, and only that, is let through."""
import pickle

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed")
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402

from pretrain.engines.deepspeed import _load_weights_only  # noqa: E402


class _EnumByName:
    def __reduce__(self):
        return (getattr, (ZeroStageEnum, "gradients"))


class _GetattrOnAClass:
    def __reduce__(self):
        return (getattr, (LossScaler, "__init__"))


def test_enum_member_by_getattr_loads(tmp_path):
    torch.save({"zero_stage": _EnumByName(), "w": torch.ones(2)}, tmp_path / "ok.pt")
    state = _load_weights_only(str(tmp_path / "ok.pt"))
    assert state["zero_stage"] is ZeroStageEnum.gradients and torch.equal(state["w"], torch.ones(2))


def test_other_getattr_is_refused(tmp_path):
    torch.save({"x": _GetattrOnAClass()}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
        _load_weights_only(str(tmp_path / "bad.pt"))
