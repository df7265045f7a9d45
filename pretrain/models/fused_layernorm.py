"""Residual add fused into the LayerNorm that reads it: ``s = x + y; normed = LN(s) * w + b``.

The autograd wrapper of ``triton_layernorm``'s kernels, over the last axis of ``[..., C]``
tensors. ``fused_mlp`` decides when to use it; nothing here checks devices or dtypes.
"""

from __future__ import annotations

import torch

__all__ = ["fused_add_layernorm"]


def _kernels():
    from . import triton_layernorm

    return triton_layernorm


class _AddLayerNormFn(torch.autograd.Function):
    """``(s, normed) = (x + y, LN(x + y) * w + b)`` over the last axis of contiguous [..., C]."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, eps, out_dtype):
        s, out, mean, rstd = _kernels().add_layernorm_fwd(x, y, weight, bias, eps, out_dtype)
        # s is saved instead of x and y: x_hat is recomputed from it, as eager LayerNorm's backward does.
        ctx.save_for_backward(s, weight, mean, rstd)
        # Unused outputs get None, not a zero tensor: the last block's s feeds only the final norm,
        # and the kernel then skips reading a residual gradient.
        ctx.set_materialize_grads(False)
        return s, out

    @staticmethod
    def backward(ctx, grad_s, grad_out):
        if grad_out is None:  # normed unused: s = x + y passes grad_s through to both inputs
            return grad_s, grad_s, None, None, None, None
        s, weight, mean, rstd = ctx.saved_tensors
        ds, dw, db = _kernels().add_layernorm_bwd(
            s, grad_out.contiguous(), grad_s.contiguous() if grad_s is not None else None, weight, mean, rstd)
        # d(x + y)/dx = d(x + y)/dy = 1: one tensor is the gradient of both.
        return ds, ds, dw, db, None, None


def fused_add_layernorm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + y, layer_norm(x + y, weight, bias, eps))`` over the last axis, in one kernel each way.

    x and y share one 16-bit dtype, which ``s`` keeps; statistics are fp32; ``normed`` is in
    ``out_dtype`` (default x's). weight and bias may be any float dtype (fp32 master weights under
    autocast) and get gradients in their own dtype.
    """
    # Outputs come back in x's shape, allocated so (not views): FSDP2 warns about views it hooks.
    return _AddLayerNormFn.apply(x.contiguous(), y.contiguous(), weight, bias, eps, out_dtype or x.dtype)
