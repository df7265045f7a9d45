"""ConvMixer family, higher-resolution fine-tuning of Mixer, and mlp_impl through the config."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.build import build_model
from pretrain.config import ConfigError, load_config
from pretrain.models import create_model, list_models
from pretrain.models.convmixer import ConvMixer
from pretrain.models.resolution import at_resolution, resize_token_mixing

CONVMIXER_PAPER = {  # name -> parameters in millions, "Patches Are All You Need?" Table 1
    "convmixer_1536_20": 51.6,
    "convmixer_768_32": 21.1,
    "convmixer_1024_20_ks9_p14": 24.4,
    "convmixer_1024_16": 19.4,
    "convmixer_512_16": 5.4,
}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------- ConvMixer
@pytest.mark.parametrize("name, millions", CONVMIXER_PAPER.items())
def test_convmixer_param_counts_match_paper(name, millions):
    with torch.device("meta"):
        model = create_model(name)
    assert isinstance(model, ConvMixer) and name in list_models()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_convmixer_keys_follow_timm_and_relu_variant():
    model = create_model("convmixer_t4_32", num_classes=10)
    keys = list(model.state_dict())
    assert keys[:2] == ["stem.0.weight", "stem.0.bias"] and "stem.2.running_mean" in keys
    assert {"blocks.3.0.fn.0.weight", "blocks.3.0.fn.2.weight", "blocks.3.1.weight", "blocks.3.3.bias",
            "head.weight", "head.bias"} <= set(keys)
    assert model.blocks[0][0].fn[0].groups == 128 and model.blocks[0][0].fn[0].kernel_size == (5, 5)
    with torch.device("meta"):
        relu = create_model("convmixer_768_32")
    assert isinstance(relu.blocks[0][2], nn.ReLU) and isinstance(model.blocks[0][2], nn.GELU)


def test_convmixer_trains_and_flops_match_counter():
    torch.manual_seed(0)
    model = create_model("convmixer_t4_32", num_classes=10, drop_path_rate=0.1)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    assert model.flops_per_image() * 4 == counter.get_total_flops()
    model.reset_classifier(3)
    assert model(x).shape == (4, 3) and torch.count_nonzero(model.head.weight) == 0


def test_convmixer_bad_sizes_are_one_line():
    with pytest.raises(ValueError) as exc:
        create_model("convmixer_t4_32", img_size=30)
    assert "img_size 30" in _one_line(exc)
    with pytest.raises(TypeError) as exc:
        create_model("convmixer_t4_32", embed_dim=64)  # a Mixer argument, not a ConvMixer one
    assert "'embed_dim'" in _one_line(exc)


# ------------------------------------------------------------------------- new resolution
def _perturbed_mixer() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("mixer_p4_32", num_classes=10).eval()
    for m in model.modules():  # non-zero head and biases, so every resized tensor matters
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.bias, std=0.1)
    nn.init.normal_(model.head.weight, std=0.1)
    return model


@pytest.mark.parametrize("size, tiles", [(64, (2, 2)), ((64, 96), (2, 3))])
def test_higher_resolution_treats_each_window_as_the_original_image(size, tiles):
    model = _perturbed_mixer()
    big = at_resolution(model, size).eval()
    rows, cols = tiles
    assert big.num_tokens == rows * cols * 64
    assert big.blocks[0].mlp_tokens.fc1.weight.shape == (rows * cols * 32, rows * cols * 64)
    pictures = torch.randn(rows * cols, 2, 3, 32, 32)
    image = torch.cat([torch.cat(list(pictures[r * cols:(r + 1) * cols]), dim=3) for r in range(rows)], dim=2)
    with torch.no_grad():
        expected = torch.stack([model(p) for p in pictures]).mean(0)
        torch.testing.assert_close(big(image), expected, rtol=1e-5, atol=1e-5)
    # Channel MLPs, norms, stem and head are carried over unchanged.
    torch.testing.assert_close(big.blocks[1].mlp_channels.fc1.weight, model.blocks[1].mlp_channels.fc1.weight)


def test_resized_model_fine_tunes():
    big = at_resolution(_perturbed_mixer(), 64).train()
    big(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean().backward()
    w = big.blocks[0].mlp_tokens.fc1.weight
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("size", [48, 16, 56])
def test_resolution_change_without_principled_resize_is_one_line(size):
    with pytest.raises(ValueError) as exc:
        at_resolution(_perturbed_mixer(), size)
    msg = _one_line(exc)
    assert "integer multiple" in msg or "divisible" in msg


def test_resize_state_dict_leaves_other_keys_alone():
    sd = _perturbed_mixer().state_dict()
    out = resize_token_mixing(sd, (8, 8), (16, 16))
    changed = {k for k in sd if not (out[k].shape == sd[k].shape and torch.equal(out[k], sd[k]))}
    assert changed == {k for k in sd if ".mlp_tokens." in k}


# ------------------------------------------------------------------------------- via config
def _cfg(*overrides: str):
    return load_config(None, ["train.steps=1", "data.train=unused", "data.image_size=32", "model.num_classes=1000",
                              *overrides])


def test_config_builds_convmixer_and_mlp_impl_choices():
    model = build_model(_cfg("model.name=convmixer_t4_32", "model.num_classes=10"))
    assert isinstance(model, ConvMixer)
    with pytest.raises(ConfigError) as exc:
        _cfg("model.name=mixer_p4_32", "model.mlp_impl=fast")
    assert "'model.mlp_impl'" in _one_line(exc) and "eager, compile, fused" in str(exc.value)


def test_config_fused_on_cpu_falls_back_with_one_warning(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so fused does not fall back here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(_cfg("model.name=mixer_p4_32", "model.mlp_impl=fused"))
    assert [str(w.message).split(":")[0] for w in caught] == ["mlp_impl 'fused' falls back to eager"]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
