"""The fused Triton MLPs and residual add + LayerNorm on a GPU (skipped with the reason where CUDA
or Triton is missing)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from pretrain.models import apply_mlp_impl, create_model
from pretrain.models.fused_mlp import FusedLayerNorm, FusedMixerBlock, FusedMlp
from tests.fused_parity import add_layernorm_errors, function_errors, model_errors

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible here; these tests need one"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("shape", [
    dict(batch=4, tokens=196, width=768, d_s=384, d_c=3072),  # Mixer-B/16
    dict(batch=4, tokens=196, width=1024, d_s=512, d_c=4096),  # Mixer-L/16
    dict(batch=2, tokens=256, width=1280, d_s=640, d_c=5120),  # Mixer-H/14
    dict(batch=3, tokens=49, width=100, d_s=50, d_c=300),  # nothing a multiple of the tiles
])
def test_fused_functions_match_torch(dtype, tol, shape):
    errors = function_errors("cuda", dtype, **shape)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, bad


# Tolerances as in the interpreter test: a few 16-bit ulps relative to the largest value.
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1.5e-3)])
@pytest.mark.parametrize("shape", [
    dict(batch=4, tokens=196, width=768),  # Mixer-B/16
    dict(batch=4, tokens=196, width=1024),  # Mixer-L/16
    dict(batch=2, tokens=256, width=1280),  # Mixer-H/14's width: the widest tile
    dict(batch=3, tokens=49, width=100),  # nothing a power of two
])
def test_fused_add_layernorm_matches_float64(dtype, tol, shape):
    errors = add_layernorm_errors("cuda", dtype, **shape)
    assert errors.pop("block/grad_x_vs_grad_y") == 0 and errors.pop("final/grad_x_vs_grad_y") == 0
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, bad


@pytest.mark.parametrize("fuse_layernorm", [True, False])
def test_fused_mixer_matches_eager_autocast(fuse_layernorm):
    r = model_errors("cuda", torch.bfloat16, name="mixer_s16_224", batch=4, num_classes=100, num_blocks=2,
                     fuse_layernorm=fuse_layernorm)
    assert r["kernel_calls"] == 2 * 2 * 3
    assert r["layernorm_kernel_calls"] == (2 * 2 * 2 if fuse_layernorm else 0)
    keys = ["logits"] + [k for k in r if k.startswith("grad/")]
    for k in keys:
        assert r[k] <= 5e-2, (k, r[k])
        assert r[f"fp32_ref/fused/{k}"] <= 3 * r[f"fp32_ref/eager/{k}"] + 1e-2, (k, r)


def test_fused_applies_without_warning_on_cuda():
    model = create_model("mixer_p4_32").cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_mlp_impl(model, "fused")
    assert all(isinstance(b, FusedMixerBlock) and isinstance(b.mlp_channels, FusedMlp) for b in model.blocks)
    assert isinstance(model.norm, FusedLayerNorm)
