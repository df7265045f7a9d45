"""The fused MLP path on CPU: Triton kernels through the interpreter, fallback, compile, swap."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pretrain.models import apply_mlp_impl, create_model
from pretrain.models.fused_mlp import (FusedLayerNorm, FusedMixerBlock, FusedMlp, FusedTokenMixingMlp,
                                       fused_unavailable_reason, use_fused_mlp)
from pretrain.models.mixer import MixerBlock

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton not installed (pip install -c constraints.txt triton; the CPU wheel "
                           "runs these kernels in its interpreter)")


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    # Triton decides at import whether kernels are interpreted, so run in a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "tests.fused_parity", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("dtype, tol", [("bf16", 2e-2), ("fp16", 3e-3)])
def test_interpreted_kernels_match_torch_forward_and_grads(interpreter_report, dtype, tol):
    errors = interpreter_report[f"function_{dtype}"]
    assert len(errors) == 12  # out + 5 grads, channel and token MLPs
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, bad


# bf16 / fp16 unit roundoff is 3.9e-3 / 4.9e-4: the outputs are rounded once to 16 bits, so a
# few ulps relative to the largest value, against float64 on the same rounded inputs.
@needs_triton
@pytest.mark.parametrize("dtype, tol", [("bf16", 1e-2), ("fp16", 1.5e-3)])
def test_interpreted_add_layernorm_matches_float64(interpreter_report, dtype, tol):
    errors = interpreter_report[f"add_layernorm_{dtype}"]
    rel = {k: v for k, v in errors.items() if not k.endswith("grad_x_vs_grad_y")}
    # s, normed and the gradients of x, y, w, b, inside a block; normed and the 4 gradients as
    # the final norm (fp32 output, no residual gradient).
    assert len(rel) == 6 + 5
    bad = {k: v for k, v in rel.items() if not v <= tol}
    assert not bad, bad
    # dL/dx and dL/dy are one tensor (s = x + y).
    assert errors["block/grad_x_vs_grad_y"] == 0 and errors["final/grad_x_vs_grad_y"] == 0


# (report key, fused_matmul calls, add_layernorm calls) for the 2-block model:
# MLPs: 2 blocks x 2 MLPs x (2 forward + 1 backward kernels); norms: 2 blocks x 2 fused norms (norm2,
# and the next norm1 or the final norm) x (forward + backward). Dropout while training sends the
# MLPs to eager but not the norms; checkpointing recomputes the blocks' forward kernels (8 + 3).
MODEL_CASES = [("model_bf16", 12, 8), ("model_bf16_noln", 12, 0), ("model_bf16_drop", 0, 8),
               ("model_bf16_checkpointed", 12 + 8, 8 + 3)]


@needs_triton
@pytest.mark.parametrize("case, mlp_calls, norm_calls", MODEL_CASES)
def test_interpreted_fused_mixer_matches_eager_autocast(interpreter_report, case, mlp_calls, norm_calls):
    r = interpreter_report[case]
    assert r["kernel_calls"] == mlp_calls
    assert r["layernorm_kernel_calls"] == norm_calls
    keys = ["logits"] + [k for k in r if k.startswith("grad/")]
    assert len(keys) == 1 + 30  # logits + every parameter of the 2-block model
    for k in keys:
        # Same numbers as eager within bf16 tolerance, and no less accurate against fp32 math
        # (not with dropout: fp32 masks need not be drawn like 16-bit ones).
        assert r[k] <= 5e-2, (k, r[k])
        if case != "model_bf16_drop":
            assert r[f"fp32_ref/fused/{k}"] <= 3 * r[f"fp32_ref/eager/{k}"] + 1e-2, (k, r)


@pytest.mark.parametrize("fuse_layernorm", [True, False])
def test_fused_swap_keeps_parameters_and_names(fuse_layernorm):
    model = create_model("mixer_p4_32", num_classes=10)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    assert use_fused_mlp(model, fuse_layernorm=fuse_layernorm) == 2
    assert all(isinstance(b.mlp_tokens, FusedTokenMixingMlp) and isinstance(b.mlp_channels, FusedMlp)
               for b in model.blocks)
    assert all(isinstance(b, FusedMixerBlock) == fuse_layernorm for b in model.blocks)
    assert isinstance(model.norm, FusedLayerNorm) == fuse_layernorm
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    blocks, norm = list(model.blocks), model.norm
    assert use_fused_mlp(model, fuse_layernorm=fuse_layernorm) == 2  # idempotent: no double wrapping
    assert list(model.blocks) == blocks and model.norm is norm
    assert list(model.state_dict()) == keys
    model.load_state_dict(create_model("mixer_p4_32", num_classes=10).state_dict())  # strict


def test_fused_layernorm_swap_only_inside_mlp_mixer():
    # A MixerBlock used on its own gets the fused MLPs but stays a MixerBlock returning a tensor:
    # only MlpMixer's final norm knows how to finish a PendingResidual.
    block = MixerBlock(16, 4)
    assert use_fused_mlp(block) == 1
    assert type(block) is MixerBlock and isinstance(block.mlp_channels, FusedMlp)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_modules_run_eager_math_where_fusing_does_not_apply(monkeypatch, autocast):
    # On CPU without the interpreter (fp32, or bf16 autocast), with drop-path and dropout
    # while training: the fused modules take the eager path, bit for bit, forward and backward.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    eager = create_model("mixer_p4_32", num_classes=10, drop_path_rate=0.5, proj_drop_rate=0.1)
    torch.nn.init.normal_(eager.head.weight, std=0.05)
    fused = create_model("mixer_p4_32", num_classes=10, drop_path_rate=0.5, proj_drop_rate=0.1)
    fused.load_state_dict(eager.state_dict())
    use_fused_mlp(fused)
    x = torch.randn(4, 3, 32, 32)
    logits = []
    for model in (fused, eager):
        torch.manual_seed(1)  # the same dropout and drop-path masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
        logits.append(out)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_fused_without_cuda_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so the fused path does not fall back here")
    reason = fused_unavailable_reason()
    assert reason is not None
    model = create_model("mixer_p4_32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_mlp_impl(model, "fused")
    assert len(caught) == 1 and "falls back to eager" in str(caught[0].message)
    assert reason in str(caught[0].message)
    assert not any(isinstance(m, (FusedMlp, FusedTokenMixingMlp)) for m in model.modules())


def test_unknown_mlp_impl_is_one_line():
    with pytest.raises(ValueError, match="mlp_impl must be one of eager, compile, fused, got 'fast'"):
        apply_mlp_impl(create_model("mixer_p4_32"), "fast")


def test_compile_is_regional_and_keeps_names():
    torch.manual_seed(0)
    model = create_model("mixer_p4_32", num_classes=10, num_blocks=2, embed_dim=32)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    reference = create_model("mixer_p4_32", num_classes=10, num_blocks=2, embed_dim=32)
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    # aot_eager traces with dynamo + AOT autograd like inductor does, without a minute of C++
    # compilation on CI's two cores; the inductor path is timed in bench/model_throughput.py.
    apply_mlp_impl(model, "compile", backend="aot_eager")
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model._compiled_call_impl is None  # only the blocks, not the whole model
    x = torch.randn(2, 3, 32, 32)
    for m in (model, reference):
        m(x).square().mean().backward()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
