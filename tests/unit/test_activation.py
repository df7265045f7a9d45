"""`model.act`: the config picks the MLP activation (gelu = exact erf, gelu_tanh = flax's nn.gelu), a bad
value is one line, ConvMixer keeps its own, and the fused Triton path (exact GELU only) says it falls back."""
from __future__ import annotations

import warnings

import pytest
import torch

from pretrain.build import build_model
from pretrain.config import ConfigError, load_config
from pretrain.models import activation_name, apply_mlp_impl, create_model
from tests.conftest import ROOT

DEMO = str(ROOT / "configs/demo.yaml")


def _built(*overrides: str) -> torch.nn.Module:
    cfg = load_config(DEMO, ["model.name=mixer_p4_32", "model.num_classes=64", *overrides])
    with torch.device("meta"):  # modules only, no weights to initialise
        return build_model(cfg)


def test_config_act_reaches_the_model():
    assert activation_name(_built()) == "gelu"  # null: the variant's own, exact GELU for every Mixer
    tanh = _built("model.act=gelu_tanh")
    assert activation_name(tanh) == "gelu_tanh"
    assert all(m.approximate == "tanh" for m in tanh.modules() if isinstance(m, torch.nn.GELU))
    with torch.device("meta"):  # a variant with an activation of its own keeps it when model.act is null
        relu = build_model(load_config(str(ROOT / "configs/s32.yaml"),
                                       ["model.name=convmixer_768_32", "model.num_classes=1000"]))
    assert activation_name(relu) == "relu"


def test_bad_act_is_one_line():
    with pytest.raises(ConfigError) as exc:
        _built("model.act=gelu_erf")
    msg = str(exc.value)
    assert "\n" not in msg and "act must be one of ['gelu', 'gelu_tanh']" in msg and "'gelu_erf'" in msg


def test_fused_path_says_it_runs_gelu_tanh_eager():
    model = create_model("mixer_p4_32", act="gelu_tanh")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_mlp_impl(model, "fused")
    assert [str(w.message) for w in caught] == [
        "mlp_impl 'fused' falls back to eager: the Triton MLP kernels compute exact gelu, the model uses gelu_tanh"]
    assert type(model.blocks[0].mlp_channels).__name__ == "Mlp"  # nothing swapped: eager tanh math throughout


def test_export_names_the_activation_of_what_it_exports():
    from pretrain.export import model_act
    assert [model_act("mixer_p4_32", None), model_act("mixer_p4_32", "gelu_tanh"), model_act("convmixer_768_32", None),
            model_act("not_a_model", None)] == ["gelu", "gelu_tanh", "relu", "?"]
