"""Fused-vs-eager parity measurements, shared by the CPU (Triton interpreter) and GPU tests.

``python -m tests.fused_parity`` (with TRITON_INTERPRET=1 on CPU) prints the measurements as JSON;
the tests assert on them. Errors are relative: max |fused - eager| / max |eager|.
"""

from __future__ import annotations

import copy
import functools
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import create_model
from pretrain.models import fused_layernorm, fused_mlp
from pretrain.models.fused_mlp import (FusedLayerNorm, FusedMixerBlock, FusedMlp, FusedTokenMixingMlp,
                                       use_fused_mlp)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _eager_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def function_errors(device: str, dtype: torch.dtype, batch: int, tokens: int, width: int,
                    d_s: int, d_c: int, seed: int = 0) -> dict[str, float]:
    """Each fused MLP function against the same math in torch, same dtype: output and 5 gradients."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    out: dict[str, float] = {}
    cases = {
        "channel": (fused_mlp.fused_channel_mlp, _eager_mlp, width, d_c),
        "token": (fused_mlp.fused_token_mlp,
                  lambda x, *w: _eager_mlp(x.transpose(1, 2), *w).transpose(1, 2), tokens, d_s),
    }
    for name, (fused, eager, n_in, hidden) in cases.items():
        x = rand(batch, tokens, width, scale=1.0)
        params = [rand(hidden, n_in, scale=n_in**-0.5), rand(hidden, scale=0.1),
                  rand(n_in, hidden, scale=hidden**-0.5), rand(n_in, scale=0.1)]
        grad = torch.randn(batch, tokens, width, generator=g).to(device, dtype)
        results = []
        for fn in (fused, eager):
            y = fn(x, *params)
            grads = torch.autograd.grad(y, [x, *params], grad)
            results.append((y, grads))
        (y_f, g_f), (y_e, g_e) = results
        out[f"{name}/out"] = _rel(y_f, y_e)
        for label, a, b in zip(("x", "w1", "b1", "w2", "b2"), g_f, g_e):
            out[f"{name}/grad_{label}"] = _rel(a, b)
    return out


def add_layernorm_errors(device: str, dtype: torch.dtype, batch: int, tokens: int, width: int,
                         seed: int = 0) -> dict[str, float]:
    """The fused residual add + LayerNorm against float64 torch on the same (rounded) inputs.

    ``block/*``: s and normed both used, as inside a block (normed in the input dtype).
    ``final/*``: only normed used, written in fp32, as the model's final norm under autocast.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device, dt)

    out: dict[str, float] = {}
    for case, out_dtype in (("block", dtype), ("final", torch.float32)):
        # A stream with an offset and a larger scale than the branch, like a residual stream.
        x, y = rand(batch, tokens, width, scale=3.0, shift=0.5), rand(batch, tokens, width)
        w, b = rand(width, scale=0.2, shift=1.0, dt=torch.float32), rand(width, scale=0.1, dt=torch.float32)
        grad_out = rand(batch, tokens, width, dt=out_dtype)
        grad_s = rand(batch, tokens, width) if case == "block" else None
        inputs = [t.clone().requires_grad_() for t in (x, y, w, b)]
        s, normed = fused_layernorm.fused_add_layernorm(*inputs, 1e-6, out_dtype)
        assert s.dtype == dtype and normed.dtype == out_dtype
        fused_grads = _grads(s, normed, grad_s, grad_out, inputs)
        ref_inputs = [t.double().requires_grad_() for t in (x, y, w, b)]
        s_ref = ref_inputs[0] + ref_inputs[1]
        normed_ref = F.layer_norm(s_ref, (width,), ref_inputs[2], ref_inputs[3], 1e-6)
        ref_grads = _grads(s_ref, normed_ref, grad_s, grad_out, ref_inputs)
        if case == "block":
            out[f"{case}/s"] = _rel(s, s_ref)
        out[f"{case}/normed"] = _rel(normed, normed_ref)
        for label, a, r in zip(("x", "y", "w", "b"), fused_grads, ref_grads):
            out[f"{case}/grad_{label}"] = _rel(a, r)
        # s = x + y: the kernel hands one tensor to both inputs, so these must agree exactly.
        out[f"{case}/grad_x_vs_grad_y"] = (fused_grads[0] - fused_grads[1]).abs().max().item()
    return out


def _grads(s, normed, grad_s, grad_out, inputs):
    outputs, grads = [normed], [grad_out.to(normed.dtype)]
    if grad_s is not None:
        outputs.append(s)
        grads.append(grad_s.to(s.dtype))
    return torch.autograd.grad(outputs, inputs, grads)


def model_errors(device: str, dtype: torch.dtype, name: str = "mixer_p4_32", batch: int = 3,
                 seed: int = 0, fuse_layernorm: bool = True, checkpointing: bool = False,
                 **overrides) -> dict[str, float]:
    """A whole Mixer under autocast: fused copy vs eager, logits and every parameter gradient.

    Models run in training mode, each after reseeding, so dropout and drop-path draw the same masks.
    """
    torch.manual_seed(seed)
    eager = create_model(name, **overrides).to(device)
    nn.init.normal_(eager.head.weight, std=0.05)  # a zero head would zero every body gradient
    fused, reference = copy.deepcopy(eager), copy.deepcopy(eager)
    assert use_fused_mlp(fused, fuse_layernorm=fuse_layernorm) == len(fused.blocks)
    assert all(isinstance(b.mlp_tokens, FusedTokenMixingMlp) and isinstance(b.mlp_channels, FusedMlp)
               for b in fused.blocks)
    assert all(isinstance(b, FusedMixerBlock) == fuse_layernorm for b in fused.blocks)
    assert isinstance(fused.norm, FusedLayerNorm) == fuse_layernorm
    fused.set_grad_checkpointing(checkpointing)
    h, w = eager.stem.img_size
    x = torch.randn(batch, 3, h, w, device=device)
    labels = torch.arange(batch, device=device) % eager.num_classes

    calls = {"fused_matmul": 0, "add_layernorm_fwd": 0, "add_layernorm_bwd": 0}
    counted = [(fused_mlp._kernels(), "fused_matmul"), (fused_layernorm._kernels(), "add_layernorm_fwd"),
               (fused_layernorm._kernels(), "add_layernorm_bwd")]
    for module, fn in counted:
        setattr(module, fn, _counting(getattr(module, fn), fn, calls))
    try:
        results = []
        for model, autocast in ((fused, True), (eager, True), (reference, False)):
            torch.manual_seed(seed + 1)
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                logits = model(x)
            F.cross_entropy(logits.float(), labels).backward()
            results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    finally:
        for module, fn in counted:
            setattr(module, fn, getattr(module, fn).__wrapped__)
    (l_f, g_f), (l_e, g_e), (l_r, g_r) = results
    errors = {"kernel_calls": float(calls["fused_matmul"]),
              "layernorm_kernel_calls": float(calls["add_layernorm_fwd"] + calls["add_layernorm_bwd"]),
              "logits": _rel(l_f, l_e),
              "fp32_ref/fused/logits": _rel(l_f, l_r), "fp32_ref/eager/logits": _rel(l_e, l_r)}
    # Some gradients are zero up to rounding noise: the token MLP's fc2 bias shifts a whole token
    # by a constant, which the next LayerNorm removes. Measure those against the model's overall
    # gradient scale (1 % of the largest), not against their own noise.
    floor = 0.01 * max(g.abs().max().item() for g in g_e.values())
    for n in g_e:
        scale = max(g_r[n].abs().max().item(), floor)
        errors[f"grad/{n}"] = ((g_f[n] - g_e[n]).abs().max() / scale).item()
        # Against fp32 math: the fused path should be about as accurate as eager autocast.
        errors[f"fp32_ref/fused/grad/{n}"] = ((g_f[n] - g_r[n]).abs().max() / scale).item()
        errors[f"fp32_ref/eager/grad/{n}"] = ((g_e[n] - g_r[n]).abs().max() / scale).item()
    return errors


def _counting(fn, name: str, calls: dict[str, int]):
    @functools.wraps(fn)
    def counting(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return counting


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    # Shapes that are not multiples of the tile sizes, so partial tiles and masks are exercised.
    small = dict(num_classes=10, img_size=16, num_blocks=2, embed_dim=32)
    report = {
        "function_bf16": function_errors(device, torch.bfloat16, batch=3, tokens=20, width=24, d_s=12, d_c=40),
        "function_fp16": function_errors(device, torch.float16, batch=2, tokens=20, width=24, d_s=12, d_c=40),
        "model_bf16": model_errors(device, torch.bfloat16, **small),
        "add_layernorm_bf16": add_layernorm_errors(device, torch.bfloat16, batch=3, tokens=7, width=24),
        "add_layernorm_fp16": add_layernorm_errors(device, torch.float16, batch=2, tokens=5, width=33),
        "model_bf16_noln": model_errors(device, torch.bfloat16, fuse_layernorm=False, **small),
        # Drop-path and MLP dropout while training (the MLPs fall back to eager; the norms stay
        # fused), and per-block checkpointing, which sees PendingResidual between blocks.
        "model_bf16_drop": model_errors(device, torch.bfloat16, drop_path_rate=0.5, proj_drop_rate=0.2, **small),
        "model_bf16_checkpointed": model_errors(device, torch.bfloat16, checkpointing=True, **small),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
