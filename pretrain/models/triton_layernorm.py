"""Triton residual add + LayerNorm, forward and backward. Imported only where Triton exists.

In a pre-norm residual network every LayerNorm but the first reads ``s = x + y`` (residual stream
plus branch output) right after it is written. Forward does both in one pass over rows of C
channels: it reads x and y once, writes ``s`` (the new residual stream, in the inputs' dtype) and
``LN(s) * w + b``, and saves the per-row mean and rstd (fp32) for backward.

Backward gets ``dL/dnormed`` and, from the residual path, ``dL/ds``; since ``s = x + y`` their sum
through the LayerNorm is both ``dL/dx`` and ``dL/dy``, so one tensor is written. The weight and
bias gradients follow the Triton layer-norm tutorial: each program accumulates fp32 partial sums
over its rows, and the caller sums the few partial rows afterwards.

Statistics are in fp32 on the *rounded* ``s``: what eager computes from the stored residual stream,
and what backward recomputes ``x_hat`` from.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .triton_kernels import AUTOTUNED, autotune_bench, interpreting


@triton.jit
def _add_ln_fwd_kernel(
    x_ptr, y_ptr, s_ptr, out_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    M, C, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows[:, None] < M) & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + y).to(s_ptr.dtype.element_ty)  # one rounding, like eager's 16-bit add
    tl.store(s_ptr + offs, s, mask=mask)

    s = s.to(tl.float32)
    mean = tl.sum(s, axis=1) / C
    diff = tl.where(mask, s - mean[:, None], 0.0)  # padding columns must not count in the variance
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    row_ok = rows < M
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_ln_bwd_kernel(
    s_ptr, g_ptr, gs_ptr, ds_ptr, w_ptr, mean_ptr, rstd_ptr, dw_part_ptr, db_part_ptr,
    M, C,
    HAS_GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # Row tiles pid, pid + programs, ...: a fixed number of programs (so of partial-sum rows)
    # whatever M is.
    for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(x_hat * wg, axis=1) / C
        c2 = tl.sum(wg, axis=1) / C
        ds = (wg - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_GS:
            ds += tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        dw_acc += g * x_hat
        db_acc += g
    tl.store(dw_part_ptr + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(db_part_ptr + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _tiles(c: int) -> tuple[int, int, int]:
    """Interpreter tiles (BLOCK_M, BLOCK_C, num_warps): a whole row per tile, a few rows per program."""
    return 4, triton.next_power_of_2(c), 1  # small tiles keep the numpy interpreter quick and still span several


def _gpu_configs(block_c: int) -> list[triton.Config]:
    """Candidate (rows per program, warps) for rows of `block_c`: tiles of 2K-8K elements, 16 or fewer
    rows, 4 or 8 warps. The autotuner times them once per (M, C) on the GPU and keeps the fastest."""
    rows = sorted({max(1, min(16, elements // block_c)) for elements in (2048, 4096, 8192)})
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m in rows for w in (4, 8)]


def _tuned(kernel: Any, block_c: int, key: tuple[str, ...]) -> Any:
    """`kernel` autotuned over `_gpu_configs(block_c)` (BLOCK_C is fixed by the row width), made once."""
    name = f"{kernel.__name__.strip('_')}/block_c={block_c}"
    if name not in AUTOTUNED:
        AUTOTUNED[name] = triton.autotune(configs=_gpu_configs(block_c), key=list(key), do_bench=autotune_bench)(kernel)
    return AUTOTUNED[name]


def add_layernorm_fwd(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous x, y [..., C] (M rows of C) -> ``(s, normed, mean, rstd)``: s = x + y,
    normed = LN(s) * w + b, both in x's shape."""
    c = x.shape[-1]
    m = x.numel() // c
    s = torch.empty_like(x)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    args = (x, y, s, out, weight, bias, mean, rstd, m, c, eps)
    if interpreting():
        block_m, block_c, warps = _tiles(c)
        _add_ln_fwd_kernel[(triton.cdiv(m, block_m),)](*args, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    else:
        block_c = triton.next_power_of_2(c)
        _tuned(_add_ln_fwd_kernel, block_c, ("M", "C"))[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            *args, BLOCK_C=block_c)
    return s, out, mean, rstd


def _programs(rows: int, device: torch.device) -> int:
    """Programs of the backward kernel; each sums its rows' dw/db into one partial row. Independent of
    the (autotuned) rows per tile, so the partial buffer is sized before the tile is chosen."""
    if interpreting():
        return min(triton.cdiv(rows, _tiles(1)[0]), 3)  # several programs: the partial sums are exercised
    # A few waves of programs: enough to fill the GPU, few enough that the partial rows are cheap to sum.
    return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def add_layernorm_bwd(
    s: torch.Tensor, grad_out: torch.Tensor, grad_s: torch.Tensor | None, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``add_layernorm_fwd`` on contiguous rows: ``(ds_total, dw, db)``.

    ``grad_s`` is dL/ds from the residual path (None if s fed nothing else); ``ds_total`` is
    dL/dx = dL/dy. ``dw``/``db`` come back in ``weight``'s dtype, summed in fp32.
    """
    c = s.shape[-1]
    m = s.numel() // c
    programs = _programs(m, s.device)
    ds = torch.empty_like(s)
    dw_part = torch.empty((programs, c), device=s.device, dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    # A program left without a row tile writes zero partial rows: every row of dw_part is written.
    args = (s, grad_out, grad_s if grad_s is not None else s, ds, weight, mean, rstd, dw_part, db_part, m, c)
    if interpreting():
        block_m, block_c, warps = _tiles(c)
        _add_ln_bwd_kernel[(programs,)](*args, HAS_GS=grad_s is not None, BLOCK_M=block_m, BLOCK_C=block_c,
                                        num_warps=warps)
    else:
        block_c = triton.next_power_of_2(c)
        _tuned(_add_ln_bwd_kernel, block_c, ("M", "C", "HAS_GS"))[(programs,)](
            *args, HAS_GS=grad_s is not None, BLOCK_C=block_c)
    return ds, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)
