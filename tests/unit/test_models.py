"""Unit tests for pretrain.models (MLP-Mixer). Fast: big variants are built on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models import DropPath, MixerBlock, Mlp, MlpMixer, create_model, list_models

PAPER_VARIANTS = {  # name -> parameters in millions, paper Table 1 (1000 classes)
    "mixer_s32_224": 19,
    "mixer_s16_224": 18,
    "mixer_b32_224": 60,
    "mixer_b16_224": 59,
    "mixer_l32_224": 206,
    "mixer_l16_224": 208,
    "mixer_h14_224": 431,
}
SMALL_VARIANTS = ["mixer_t4_32", "mixer_p4_32"]


def _meta_model(name: str, **kw) -> MlpMixer:
    with torch.device("meta"):
        return create_model(name, **kw)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _image(model: MlpMixer, batch: int = 2, device: str = "cpu") -> torch.Tensor:
    h, w = model.stem.img_size
    return torch.randn(batch, model.stem.proj.in_channels, h, w, device=device)


def test_registry_lists_every_variant():
    mixers = [name for name in list_models() if name.startswith("mixer_")]
    assert mixers == sorted([*PAPER_VARIANTS, *SMALL_VARIANTS])
    assert all(name.startswith(("mixer_", "convmixer_")) for name in list_models())  # ConvMixer: test_models_zoo


@pytest.mark.parametrize("name", [*PAPER_VARIANTS, *SMALL_VARIANTS])
def test_forward_shape_every_variant(name):
    model = _meta_model(name, num_classes=7)
    x = _image(model, device="meta")
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_tokens, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", SMALL_VARIANTS)
def test_forward_backward_small_variants_finite(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, drop_path_rate=0.1, proj_drop_rate=0.1, drop_rate=0.1)
    # The zero head would give zero gradients to every body weight; perturb it for this test.
    nn.init.normal_(model.head.weight, std=0.02)
    model.train()
    out = model(_image(model, batch=4))
    assert out.shape == (4, 10)
    out.logsumexp(-1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name, paper_millions", PAPER_VARIANTS.items())
def test_param_counts_match_paper_table1(name, paper_millions):
    n = _n_params(_meta_model(name))
    # Table 1 gives whole millions (apparently truncated, e.g. S/16 is 18.53M); allow 1M,
    # or 0.5% for H/14 whose printed 431M is 432.4M with a 1000-class head.
    assert abs(n - paper_millions * 1e6) < max(1e6, 0.005 * paper_millions * 1e6), n


@pytest.mark.parametrize(
    "name, depth, width, d_s, d_c, tokens",
    [
        ("mixer_s32_224", 8, 512, 256, 2048, 49),
        ("mixer_s16_224", 8, 512, 256, 2048, 196),
        ("mixer_b32_224", 12, 768, 384, 3072, 49),
        ("mixer_b16_224", 12, 768, 384, 3072, 196),
        ("mixer_l32_224", 24, 1024, 512, 4096, 49),
        ("mixer_l16_224", 24, 1024, 512, 4096, 196),
        ("mixer_h14_224", 32, 1280, 640, 5120, 256),
        ("mixer_t4_32", 4, 128, 64, 512, 64),
        ("mixer_p4_32", 2, 64, 32, 256, 64),
    ],
)
def test_variant_dimensions_match_table1(name, depth, width, d_s, d_c, tokens):
    model = _meta_model(name)
    assert len(model.blocks) == depth and model.num_features == width and model.num_tokens == tokens
    for block in model.blocks:
        assert block.mlp_tokens.fc1.weight.shape == (d_s, tokens)
        assert block.mlp_channels.fc1.weight.shape == (d_c, width)


def test_state_dict_keys_match_timm_exactly():
    model = create_model("mixer_p4_32", num_blocks=1, num_classes=10)
    c, n, d_s, d_c = 64, 64, 32, 256
    expected = {  # timm mlp_mixer keys, in timm's order
        "stem.proj.weight": (c, 3, 4, 4),
        "stem.proj.bias": (c,),
        "blocks.0.norm1.weight": (c,),
        "blocks.0.norm1.bias": (c,),
        "blocks.0.mlp_tokens.fc1.weight": (d_s, n),
        "blocks.0.mlp_tokens.fc1.bias": (d_s,),
        "blocks.0.mlp_tokens.fc2.weight": (n, d_s),
        "blocks.0.mlp_tokens.fc2.bias": (n,),
        "blocks.0.norm2.weight": (c,),
        "blocks.0.norm2.bias": (c,),
        "blocks.0.mlp_channels.fc1.weight": (d_c, c),
        "blocks.0.mlp_channels.fc1.bias": (d_c,),
        "blocks.0.mlp_channels.fc2.weight": (c, d_c),
        "blocks.0.mlp_channels.fc2.bias": (c,),
        "norm.weight": (c,),
        "norm.bias": (c,),
        "head.weight": (10, c),
        "head.bias": (10,),
    }
    sd = model.state_dict()
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_norm_eps_and_exact_gelu_by_default():
    model = create_model("mixer_p4_32")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * len(model.blocks) + 1
    assert all(m.eps == 1e-6 for m in norms)
    acts = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(acts) == 2 * len(model.blocks)
    assert all(a.approximate == "none" for a in acts)
    x = torch.linspace(-4, 4, 101)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(model.blocks[0].mlp_channels.act(x), exact)
    tanh_model = create_model("mixer_p4_32", act="gelu_tanh")
    assert all(m.approximate == "tanh" for m in tanh_model.modules() if isinstance(m, nn.GELU))


def test_init_follows_paper():
    torch.manual_seed(0)
    model = create_model("mixer_t4_32")
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    for block in model.blocks:
        for fc in (block.mlp_tokens.fc1, block.mlp_tokens.fc2, block.mlp_channels.fc1, block.mlp_channels.fc2):
            bound = math.sqrt(6.0 / (fc.in_features + fc.out_features))  # xavier uniform
            assert fc.weight.abs().max() <= bound
            assert fc.weight.abs().max() > 0.9 * bound
            assert 0 < fc.bias.std() < 1e-5
    conv = model.stem.proj
    fan_in = conv.weight[0].numel()
    # lecun normal: std sqrt(1/fan_in) after truncation at 2 pre-truncation std devs.
    assert abs(conv.weight.std().item() - math.sqrt(1 / fan_in)) < 0.1 * math.sqrt(1 / fan_in)
    assert conv.weight.abs().max() <= 2 * math.sqrt(1 / fan_in) / 0.87962566103423978 + 1e-6
    assert torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_classes=10),
        dict(num_classes=10, img_size=64, num_blocks=3, mlp_ratio=(1.0, 2.0)),
        dict(num_classes=5, global_pool=""),
        dict(num_classes=0),
    ],
)
def test_flops_per_image_matches_flop_counter(kw):
    model = create_model("mixer_p4_32", **kw).eval()
    batch = 3
    x = _image(model, batch=batch)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert model.flops_per_image() * batch == counter.get_total_flops()


def test_flops_per_image_b16_matches_published_macs():
    # timm's published figure for mixer_b16_224 is 12.61 GMACs, i.e. ~25.2 GFLOPs.
    assert abs(_meta_model("mixer_b16_224").flops_per_image() / 1e9 - 25.2) < 0.1


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_model_name_is_one_line_with_suggestion():
    with pytest.raises(ValueError) as exc:
        create_model("mixer_b16_244")
    msg = _one_line(exc)
    assert "'mixer_b16_244'" in msg and "did you mean 'mixer_b16_224'" in msg
    assert all(name in msg for name in list_models())


def test_unknown_override_is_named():
    with pytest.raises((TypeError, ValueError)) as exc:
        create_model("mixer_h14_224", embed_dimm=3)  # fails before allocating anything
    msg = _one_line(exc)
    assert "'embed_dimm'" in msg and "did you mean 'embed_dim'" in msg


def test_img_size_not_divisible_by_patch():
    with pytest.raises(ValueError) as exc:
        create_model("mixer_p4_32", img_size=30)
    msg = _one_line(exc)
    assert "30" in msg and "4" in msg and "img_size" in msg and "patch_size" in msg


@pytest.mark.parametrize(
    "kw, word",
    [(dict(act="relu"), "act"), (dict(global_pool="max"), "global_pool"), (dict(drop_path_rate=1.0), "drop_path")]
)
def test_bad_constructor_values_are_named(kw, word):
    with pytest.raises(ValueError) as exc:
        create_model("mixer_p4_32", **kw)
    assert word in _one_line(exc)


def test_wrong_input_size_is_a_clear_error():
    model = create_model("mixer_p4_32")
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 64, 64))


def test_overrides_apply():
    model = create_model("mixer_p4_32", num_classes=3, img_size=64, drop_path_rate=0.1, in_chans=1)
    assert model.num_tokens == 256 and model.head.out_features == 3 and model.stem.proj.in_channels == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_drop_path_rates_rise_linearly():
    model = create_model("mixer_t4_32", drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_reset_classifier():
    model = create_model("mixer_p4_32", num_classes=10)
    nn.init.normal_(model.head.weight)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model.head.out_features == 4
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    x = _image(model)
    assert model(x).shape == (2, 4)
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity)
    assert model(x).shape == (2, model.num_features)


def test_grad_checkpointing_gives_same_output_and_grads():
    torch.manual_seed(0)
    model = create_model("mixer_p4_32", num_classes=10, drop_path_rate=0.2, proj_drop_rate=0.1)
    nn.init.normal_(model.head.weight, std=0.02)
    model.train()
    x = _image(model, batch=4)

    def run(enable: bool):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # same dropout / drop-path draws in both runs
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_ref, grads_ref = run(False)
    out_ckpt, grads_ckpt = run(True)
    assert model.grad_checkpointing
    torch.testing.assert_close(out_ckpt, out_ref, rtol=0, atol=0)
    for g_ckpt, g_ref in zip(grads_ckpt, grads_ref):
        torch.testing.assert_close(g_ckpt, g_ref)


def test_grad_checkpointing_really_checkpoints(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    model = create_model("mixer_p4_32")
    model.set_grad_checkpointing()
    model(_image(model)).sum().backward()
    assert calls == [False] * len(model.blocks)


def test_drop_path_identity_in_eval_stochastic_in_train():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(256, 4, 8)
    dp.eval()
    assert dp(x) is x
    dp.train()
    y = dp(x)
    per_sample = y.flatten(1)
    # Each sample is kept whole (scaled by 1/keep) or dropped whole.
    assert torch.all(per_sample == per_sample[:, :1])
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}
    assert 0.3 < (per_sample[:, 0] == 0).float().mean() < 0.7
    assert not torch.equal(y, dp(x))  # a fresh draw each call
    assert DropPath(0.0).train()(x) is x


def test_model_with_drop_path_is_deterministic_in_eval():
    torch.manual_seed(0)
    model = create_model("mixer_p4_32", drop_path_rate=0.5, num_classes=10)
    nn.init.normal_(model.head.weight, std=0.02)
    x = _image(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        ref = model(x)
        model.train()
        assert not torch.allclose(model(x), ref)


def test_blocks_and_mlp_standalone():
    mlp = Mlp(8, 16, out_features=4)
    assert [n for n, _ in mlp.named_children()] == ["fc1", "act", "drop1", "fc2", "drop2"]
    assert mlp(torch.randn(2, 8)).shape == (2, 4)
    block = MixerBlock(dim=12, seq_len=5)
    assert block.mlp_tokens.fc1.out_features == 6 and block.mlp_channels.fc1.out_features == 48
    assert block.norm1.eps == 1e-6 and block.mlp_tokens.act.approximate == "none"
    assert block(torch.randn(3, 5, 12)).shape == (3, 5, 12)


def test_state_dict_round_trip_between_models():
    src = create_model("mixer_p4_32", num_classes=10)
    nn.init.normal_(src.head.weight)
    dst = create_model("mixer_p4_32", num_classes=10)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = _image(src)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_group_matcher_covers_all_parameters():
    import re

    model = create_model("mixer_p4_32")
    groups = model.group_matcher()
    patterns = [groups["stem"]] + [p for p, _ in groups["blocks"]]
    unmatched = [n for n, _ in model.named_parameters() if not any(re.match(p, n) for p in patterns)]
    assert unmatched == ["head.weight", "head.bias"]  # the head is grouped last by timm's helper


def test_forward_head_averages_tokens_then_applies_head():
    torch.manual_seed(0)
    model = create_model("mixer_p4_32", num_classes=10).eval()
    nn.init.normal_(model.head.weight, std=0.02)
    x = _image(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.mean(dim=1))
        torch.testing.assert_close(model(x), model.head(feats.mean(dim=1)))
        model.reset_classifier(10, global_pool="")
        assert model(x).shape == (2, model.num_tokens, 10)  # no pooling: per-token logits
