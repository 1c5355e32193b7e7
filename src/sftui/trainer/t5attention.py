"""T5-style attention in Triton: forward + backward, FlashAttention-2 style, and the attention
implementation (``NAME``) that a T5's packed rows take on a GPU (``packed_attention``).

Why a kernel of our own: a T5 self-attention adds a trained position bias (a cross-attention a
bias of zeros), masks (padding, causality, a packed row's documents) and drops out attention
probabilities. No kernel torch ships
does all of that with the bias's gradient: sdpa's memory-efficient kernel does, slowly, on a
(batch, heads, L, L) bias that transformers materialises per layer; cuDNN's backward returns no
bias gradient; flex attention has no dropout. On an H200 (2026-12-02, batch 256, 12 heads, L 256,
bf16, dropout 0.1, docs/BENCHMARKS.md) the kernels below took 3.15 ms forward and backward over
packed documents against sdpa's 4.68 (1.48x), 2.76 against 4.67 over padded rows; at batch 16
they are 3x slower than sdpa, so only packed rows take them, and only in runs whose micro-batches
hold at least ``MIN_SAMPLES_X_HEADS`` samples × heads.


    out = dropout(softmax(where(mask, scale * q @ k^T + bias, -inf))) @ v

* q: (B, H, Lq, D), k/v: (B, H, Lk, D); fp16/bf16 (fp32 allowed, e.g. for the
  CPU interpreter).  Arbitrary strides (views from ``.view().transpose(1, 2)``
  are used as they are, never copied).
* bias: None, (1, H, Lq, Lk) (T5 relative position bias shared by the batch;
  its gradient is summed over the batch) or (B, H, Lq, Lk) (per-batch grad).
* mask: None or bool, broadcastable as (B, 1, Lq, Lk); True = may attend.
  Tiles without a single True entry are skipped (no loads of K/V, no matmuls,
  no RNG) in all three kernels.  A query row without any allowed key gives
  out = 0 and zero gradients.
* dropout: applied to the normalised probabilities, kept values scaled by
  1 / (1 - p).  Counter-based Philox, keyed by ``seed`` and the element's
  position (b*H + h, i, j) -- see ``_keep_tile``.

Public API: ``attention``, ``dropout_keep_mask``.  The kernels are exposed as
the custom ops ``torch.ops.sftui_t5attn.fwd`` / ``torch.ops.sftui_t5attn.bwd`` with fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces
through ``attention`` without graph breaks.

Environment knobs (read at import):
  T5ATTN_DBIAS_STRATEGY  default dBias strategy: "atomic" (default), "store"
                         (fp32 dS buffer), "store_bf16" (bf16 dS buffer).
  T5ATTN_PHILOX_ROUNDS   Philox rounds (default 10, as torch / triton).
  T5ATTN_INTERP_BLOCK    block size used under TRITON_INTERPRET=1 (default 16).
  T5ATTN_SKIP_TILES      1 (default): skip tiles with no allowed entry; 0: only
                         mask them (the tile test makes K/V loads conditional,
                         which can keep Triton from pipelining them: benchmark).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["attention", "dropout_keep_mask", "DBIAS_STRATEGIES"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DBIAS_STRATEGIES = ("atomic", "store", "store_bf16")
_DEFAULT_DBIAS = os.environ.get("T5ATTN_DBIAS_STRATEGY", "atomic")
PHILOX_ROUNDS = int(os.environ.get("T5ATTN_PHILOX_ROUNDS", "10"))
_INTERP_BLOCK = int(os.environ.get("T5ATTN_INTERP_BLOCK", "16"))
SKIP_TILES = os.environ.get("T5ATTN_SKIP_TILES", "1") != "0"

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# dropout decisions use 16 random bits each: keep <=> r16 >= round(p * 2**16)
_RNG_BITS = 16


def _dropout_threshold(p: float) -> int:
    """Integer threshold on 16-bit uniforms; p is thereby rounded to a multiple of
    2**-16 (|error| <= 7.6e-6; FlashAttention-2's CUDA kernels round to 2**-8)."""
    return min(int(round(p * (1 << _RNG_BITS))), 1 << _RNG_BITS)


# ----------------------------------------------------------------------------
# autotune configurations
# ----------------------------------------------------------------------------
def _configs(entries):
    if _INTERPRET:  # the interpreter is slow and does not benchmark: one small config
        return [triton.Config({"BLOCK_M": _INTERP_BLOCK, "BLOCK_N": _INTERP_BLOCK}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in entries]


# (BLOCK_M, BLOCK_N, num_warps, num_stages).  Chosen from `compile_check.py`
# (ptxas -v for sm_90, bf16, D=64): configs that spill badly with bias + mask +
# dropout were left out; the autotuner picks among the rest on the GPU.
_FWD_CONFIGS = _configs([
    (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2),
])
# dK/dV: a program owns BLOCK_N keys and iterates over query blocks of BLOCK_M
_DKDV_CONFIGS = _configs([
    (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2),
])
# dQ: a program owns BLOCK_M queries and iterates over key blocks of BLOCK_N
_DQ_CONFIGS = _configs([
    (128, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3),
])
# Autotune key: power-of-two buckets of the lengths (LQ_KEY/LK_KEY, unused in the
# kernels) and the compile-time variant -- never the batch size, and not every
# new padded length either. The timings are kept on disk (cache_results, in
# triton's cache directory), so that a new process -- an OOM restart's rank --
# does not time every configuration again.
_TUNE_KEY = ["LQ_KEY", "LK_KEY", "HEAD_DIM", "HAS_BIAS", "HAS_MASK", "HAS_DROPOUT"]


def _prune(configs, named_args, **kwargs):
    """Drop configs whose blocks are much larger than the sequence (short rows)."""
    lq = max(16, triton.next_power_of_2(int(named_args["Lq"])))
    lk = max(16, triton.next_power_of_2(int(named_args["Lk"])))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= lq and c.kwargs["BLOCK_N"] <= lk]
    return kept or configs[:1]


# ----------------------------------------------------------------------------
# shared @triton.jit helpers
# ----------------------------------------------------------------------------
@triton.jit
def _split16(r):
    """uint32 -> (..., 2) int32 tensor with the low and high 16-bit halves."""
    lo = (r & 0xFFFF).to(tl.int32)
    hi = (r >> 16).to(tl.int32)
    return tl.join(lo, hi)


@triton.jit
def _keep_tile(seed, bh, offs_m, start_n, p_thresh,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Dropout keep-mask (BLOCK_M, BLOCK_N) for rows ``offs_m`` and columns
    ``start_n + arange(BLOCK_N)`` of head ``bh = b*H + h``.

    One Philox4x32 call per 8 elements: counter (c0, c1, c2, c3) =
    (j // 8, i, b*H + h, 0), key = seed; each of the 4 outputs gives two 16-bit
    uniforms, element j uses half (j % 2) of output ((j % 8) // 2).  The value
    only depends on (seed, b, h, i, j) -- not on block sizes -- and every
    coordinate has its own 32-bit counter word, so nothing overflows or repeats
    for any B*H*Lq*Lk.  ``start_n`` must be a multiple of 8.
    """
    G: tl.constexpr = BLOCK_N // 8
    zero = tl.zeros((BLOCK_M, G), dtype=tl.uint32)
    c0 = zero + (start_n // 8 + tl.arange(0, G)).to(tl.uint32)[None, :]
    c1 = zero + offs_m.to(tl.uint32)[:, None]
    c2 = zero + bh.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero, N_ROUNDS)
    r = tl.join(tl.join(_split16(r0), _split16(r1)), tl.join(_split16(r2), _split16(r3)))
    r = tl.reshape(r, (BLOCK_M, BLOCK_N))  # (BM, G, 2, 2, 2) row-major -> column 8*g + 4x + 2y + z
    return r >= p_thresh


@triton.jit
def _valid_tile(Mask, mask_base, offs_m, offs_n, row_ok, col_ok, stride_mm, stride_mn,
                HAS_MASK: tl.constexpr, MASK_ROW_BCAST: tl.constexpr):
    """In-bounds & user mask for a (BLOCK_M, BLOCK_N) tile of scores, and whether
    the tile has any allowed entry (scalar; only meaningful when HAS_MASK)."""
    valid = row_ok[:, None] & col_ok[None, :]
    any_ok = True
    if HAS_MASK:
        if MASK_ROW_BCAST:  # key-padding mask (B, 1, 1, Lk): one row for all queries
            mv = tl.load(Mask + mask_base + offs_n * stride_mn, mask=col_ok, other=0)
            key_ok = col_ok & (mv != 0)
            valid = row_ok[:, None] & key_ok[None, :]
            any_ok = tl.max(key_ok.to(tl.int32), 0) > 0  # row_ok has a True in every program
        else:
            mv = tl.load(Mask + mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                         mask=valid, other=0)
            valid = valid & (mv != 0)
            any_ok = tl.max(tl.max(valid.to(tl.int32), 1), 0) > 0
    return valid, any_ok


@triton.jit
def _scores_log2(q, k, Bias, bias_base, offs_m, offs_n, row_ok, col_ok, stride_bm, stride_bn, qk_scale,
                 HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """(scale * q @ k^T + bias) * log2(e) in fp32 (the log2 domain lets us use exp2)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:
        bias = tl.load(Bias + bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s += bias.to(tl.float32) * _LOG2E
    return s


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(
    Q, K, V, Bias, Mask, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, LQ_KEY, LK_KEY, qk_scale, seed, p_thresh, inv_keep,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, SKIP_TILES: tl.constexpr,
    N_ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, b*H + h): online softmax over key blocks.
    Writes out (scaled by 1/(1-p)) and the natural-log logsumexp (+inf for rows
    without any allowed key, so the backward's exp(s - lse) is 0 there)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    bias_base = b * stride_bb + h * stride_bh
    mask_base = b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        valid, any_ok = _valid_tile(Mask, mask_base, offs_m, offs_n, row_ok, col_ok, stride_mm, stride_mn,
                                    HAS_MASK, MASK_ROW_BCAST)
        run = True
        if HAS_MASK and SKIP_TILES:
            run = any_ok
        if run:
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=col_ok[:, None], other=0.0)
            s = _scores_log2(q, k, Bias, bias_base, offs_m, offs_n, row_ok, col_ok, stride_bm, stride_bn,
                             qk_scale, HAS_BIAS, DOT_PREC)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing allowed so far keep m = -inf; use 0 to avoid inf - inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _keep_tile(seed, bh, offs_m, start_n, p_thresh, BLOCK_M, BLOCK_N, N_ROUNDS)
                p = tl.where(keep, p, 0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new

    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    acc = acc * (inv_keep / l_safe)[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * _LN2, float("inf"))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(Out, DO, Delta,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_dob, stride_doh, stride_dom, stride_dod,
                    H, Lq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) (fp32).  Equals rowsum(dP * P) even with dropout."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_tile(q, k, v, do, lse2, delta, Bias, bias_base, offs_m, offs_n, row_ok, col_ok, valid,
              stride_bm, stride_bn, qk_scale, seed, bh, start_n, p_thresh, inv_keep,
              HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
              N_ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Recompute P from the logsumexp and return (P * Z, dS) for one tile, where Z
    is the dropout multiplier (keep / (1 - p)) and dS = dL/d(scores)."""
    s = _scores_log2(q, k, Bias, bias_base, offs_m, offs_n, row_ok, col_ok, stride_bm, stride_bn,
                     qk_scale, HAS_BIAS, DOT_PREC)
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _keep_tile(seed, bh, offs_m, start_n, p_thresh, BLOCK_M, BLOCK_N, N_ROUNDS)
        pz = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        pz = p
    ds = p * (dp - delta[:, None])
    return pz, ds


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY + ["DBIAS_MODE"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DB"], cache_results=True)
@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(
    Q, K, V, Bias, Mask, DO, LSE, Delta, DK, DV, DB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    H, Lq, Lk, LQ_KEY, LK_KEY, qk_scale, scale, seed, p_thresh, inv_keep,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, SKIP_TILES: tl.constexpr,
    DBIAS_MODE: tl.constexpr, N_ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, b*H + h), looping over query blocks:
    dV = sum (P*Z)^T dO,  dK = scale * sum dS^T Q, and dBias from dS:
    DBIAS_MODE 0: none, 1: fp32 atomic add into DB[h, i, j] (sum over batch),
    2: plain store into DB[b, h, i, j] (zeros for skipped tiles).

    Tiles are computed transposed, (BLOCK_N keys) x (BLOCK_M queries), as in
    the Triton fused-attention tutorial: every dot then has M = BLOCK_N (a
    wgmma-friendly 64/128) and P^T, dS^T feed dV/dK directly from registers.
    The query-block loop starts at block (b mod n) so that the B programs that
    add into the same dBias tile do not all hit it at the same moment."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Lk

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    q_ptr = Q + b * stride_qb + h * stride_qh
    do_ptr = DO + b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * Lq
    bias_ptr = Bias + b * stride_bb + h * stride_bh
    mask_ptr = Mask + b * stride_mb
    db_ptr = DB + b * stride_dbb + h * stride_dbh

    key_ok = col_ok
    any_key = True
    if HAS_MASK and MASK_ROW_BCAST:  # key-padding mask: the same for every query block
        mv = tl.load(mask_ptr + offs_n * stride_mn, mask=col_ok, other=0)
        key_ok = col_ok & (mv != 0)
        any_key = tl.max(key_ok.to(tl.int32), 0) > 0

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    first = (bh // H) % n_mblocks
    for it in range(0, n_mblocks):
        mb = it + first
        mb = tl.where(mb >= n_mblocks, mb - n_mblocks, mb)
        start_m = mb * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        inb_t = col_ok[:, None] & row_ok[None, :]  # (BLOCK_N, BLOCK_M)
        valid_t = key_ok[:, None] & row_ok[None, :]
        run = True
        if HAS_MASK and SKIP_TILES:
            run = any_key
        if HAS_MASK and not MASK_ROW_BCAST:
            mv = tl.load(mask_ptr + offs_m[None, :] * stride_mm + offs_n[:, None] * stride_mn,
                         mask=inb_t, other=0)
            valid_t = valid_t & (mv != 0)
            if SKIP_TILES:
                run = tl.max(tl.max(valid_t.to(tl.int32), 1), 0) > 0
        db_ptrs = db_ptr + offs_m[None, :] * stride_dbm + offs_n[:, None] * stride_dbn
        if run:
            q_t = tl.load(q_ptr + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                          mask=row_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_M)
            do = tl.load(do_ptr + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                         mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * _LOG2E
            delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, q_t, input_precision=DOT_PREC) * qk_scale
            if HAS_BIAS:
                bias_t = tl.load(bias_ptr + offs_m[None, :] * stride_bm + offs_n[:, None] * stride_bn,
                                 mask=inb_t, other=0.0)
                s_t += bias_t.to(tl.float32) * _LOG2E
            p_t = tl.where(valid_t, tl.exp2(s_t - lse2[None, :]), 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            if HAS_DROPOUT:
                keep_t = tl.trans(_keep_tile(seed, bh, offs_m, start_n, p_thresh, BLOCK_M, BLOCK_N, N_ROUNDS))
                pz_t = tl.where(keep_t, p_t * inv_keep, 0.0)
                dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
            else:
                pz_t = p_t
            dv = tl.dot(pz_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PREC)
            if DBIAS_MODE == 1:
                tl.atomic_add(db_ptrs, ds_t, mask=inb_t, sem="relaxed")
            elif DBIAS_MODE == 2:
                tl.store(db_ptrs, ds_t.to(DB.dtype.element_ty), mask=inb_t)
        else:
            if DBIAS_MODE == 2:
                tl.store(db_ptrs, tl.zeros([BLOCK_N, BLOCK_M], dtype=DB.dtype.element_ty), mask=inb_t)

    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(
    Q, K, V, Bias, Mask, DO, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Lq, Lk, LQ_KEY, LK_KEY, qk_scale, scale, seed, p_thresh, inv_keep,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, SKIP_TILES: tl.constexpr,
    N_ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, b*H + h), looping over key blocks:
    dQ = scale * sum dS K.  Separate from the dK/dV kernel so dQ needs no
    atomics and is deterministic (costs one more recomputation of S and P)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    row_base = bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    bias_base = b * stride_bb + h * stride_bh
    mask_base = b * stride_mb

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        valid, any_ok = _valid_tile(Mask, mask_base, offs_m, offs_n, row_ok, col_ok, stride_mm, stride_mn,
                                    HAS_MASK, MASK_ROW_BCAST)
        run = True
        if HAS_MASK and SKIP_TILES:
            run = any_ok
        if run:
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=col_ok[:, None], other=0.0)
            pz, ds = _bwd_tile(q, k, v, do, lse2, delta, Bias, bias_base, offs_m, offs_n, row_ok, col_ok,
                               valid, stride_bm, stride_bn, qk_scale, seed, bh, start_n, p_thresh, inv_keep,
                               HAS_BIAS, HAS_DROPOUT, DOT_PREC, N_ROUNDS, BLOCK_M, BLOCK_N)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(Out, Lq, Lk, seed, p_thresh, N_ROUNDS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialise the dropout keep-mask (uint8, (B*H, Lq, Lk)) with the same RNG
    helper as the attention kernels (for tests / eager references)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = _keep_tile(seed, bh, offs_m, start_n, p_thresh, BLOCK_M, BLOCK_N, N_ROUNDS)
    ptrs = Out + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


# ----------------------------------------------------------------------------
# host-side helpers
# ----------------------------------------------------------------------------
def _check_inputs(q, k, v, bias, mask):
    """Validate shapes; returns (B, H, Lq, Lk, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (B, H, L, D)")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if tuple(k.shape) != (B, H, Lk, D) or tuple(v.shape) != (B, H, Lk, D):
        raise ValueError(f"k/v shapes {tuple(k.shape)}/{tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError("q, k, v must have the same dtype")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if D < 16 or D > 128 or (D & (D - 1)) != 0:
        raise ValueError(f"head dim must be a power of two in [16, 128], got {D}")
    if bias is not None:
        if bias.dim() != 4 or bias.shape[0] not in (1, B) or tuple(bias.shape[1:]) != (H, Lq, Lk):
            raise ValueError(f"bias must have shape (1, H, Lq, Lk) or (B, H, Lq, Lk) = "
                             f"({B}, {H}, {Lq}, {Lk}); got {tuple(bias.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = attend), got {mask.dtype}")
        if (mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1
                or mask.shape[2] not in (1, Lq) or mask.shape[3] != Lk):
            raise ValueError(f"mask must be broadcastable as (B, 1, Lq, Lk) = ({B}, 1, {Lq}, {Lk}) with "
                             f"shape (B|1, 1, Lq|1, Lk); got {tuple(mask.shape)}")
    return B, H, Lq, Lk, D


def _bias_args(bias, dummy):
    if bias is None:
        return dummy, (0, 0, 0, 0)
    sb = bias.stride()
    return bias, (0 if bias.shape[0] == 1 else sb[0], sb[1], sb[2], sb[3])


def _mask_args(mask, dummy):
    """bool mask -> (uint8 view, strides (b, m, n), row-broadcast flag). No copy."""
    if mask is None:
        return dummy, (0, 0, 0), False
    m8 = mask.view(torch.uint8)
    sm = m8.stride()
    row_bcast = mask.shape[2] == 1
    return m8, (0 if mask.shape[0] == 1 else sm[0], 0 if row_bcast else sm[2], sm[3]), row_bcast


def _len_key(n):
    return max(16, triton.next_power_of_2(int(n)))


def _dot_prec(dtype):
    # fp32 inputs: exact fp32 products (no TF32) so fp32 results are true fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dropout_consts(dropout_p, seed):
    if dropout_p <= 0.0:
        return False, 0, 0, 1.0
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    s = int(seed.reshape(-1)[0].item())  # a CPU tensor: no device sync
    inv_keep = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return True, s, _dropout_threshold(dropout_p), inv_keep


def _out_like(q):
    """Output laid out as (B, Lq, H, D) in memory, returned as the (B, H, Lq, D)
    view: T5's following ``.transpose(1, 2).reshape(B, L, H*D)`` is then free."""
    B, H, Lq, D = q.shape
    return torch.empty_strided((B, H, Lq, D), (Lq * H * D, D, H * D, 1), dtype=q.dtype, device=q.device)


# ----------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------
@torch.library.custom_op("sftui_t5attn::seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _seed_op(on: torch.Tensor) -> torch.Tensor:
    """A dropout seed from the generator of ``on``'s device (``_ON_THE_CPU``: torch's CPU
    generator), as a 1-element int64 tensor there.

    An op of its own, opaque to inductor: a ``torch.randint`` on the CPU inside a compiled CUDA
    graph became a C++ kernel, and loading it, even from the compile cache, made inductor probe
    the C++ compiler's vector extensions in every new process (44 s of a rank's first step on an
    H200 machine). The tag keeps the compiler from merging two draws or redrawing one for the
    backward; ``on`` tells a compiled activation checkpoint which generator's state to keep for
    its recompute (with no tensor argument it fails: "Backend not supported for None")."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=on.device)


@_seed_op.register_fake
def _seed_fake(on: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, dtype=torch.int64, device=on.device)


_ON_THE_CPU = torch.empty(0)  # the seed op's device: the CPU, so that no device sync reads the seed


@torch.library.custom_op("sftui_t5attn::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
            mask: Optional[torch.Tensor], dropout_p: float, scale: float, seed: Optional[torch.Tensor],
            dbias_strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse).  ``dbias_strategy`` is only used by the backward."""
    B, H, Lq, Lk, D = _check_inputs(q, k, v, bias, mask)
    out = _out_like(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    bias_t, sb = _bias_args(bias, q)
    mask_t, sm, row_bcast = _mask_args(mask, q)
    has_drop, seed_i, thresh, inv_keep = _dropout_consts(dropout_p, seed)

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    _fwd_kernel[grid](
        q, k, v, bias_t, mask_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *sb, *sm, *out.stride(),
        H, Lq, Lk, _len_key(Lq), _len_key(Lk), float(scale) * 1.4426950408889634, seed_i, thresh, inv_keep,
        HEAD_DIM=D, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, MASK_ROW_BCAST=row_bcast,
        HAS_DROPOUT=has_drop, DOT_PREC=_dot_prec(q.dtype), SKIP_TILES=SKIP_TILES, N_ROUNDS=PHILOX_ROUNDS,
    )
    return out, lse


@_fwd_op.register_fake
def _fwd_fake(q, k, v, bias, mask, dropout_p, scale, seed, dbias_strategy):
    B, H, Lq, Lk, D = _check_inputs(q, k, v, bias, mask)
    return _out_like(q), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("sftui_t5attn::bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
            mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, dropout_p: float, scale: float,
            seed: Optional[torch.Tensor], need_dbias: bool, dbias_strategy: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is an empty tensor unless need_dbias."""
    B, H, Lq, Lk, D = _check_inputs(q, k, v, bias, mask)
    if dbias_strategy not in DBIAS_STRATEGIES:
        raise ValueError(f"dbias_strategy must be one of {DBIAS_STRATEGIES}, got {dbias_strategy!r}")
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    bias_t, sb = _bias_args(bias, q)
    mask_t, sm, row_bcast = _mask_args(mask, q)
    has_drop, seed_i, thresh, inv_keep = _dropout_consts(dropout_p, seed)
    prec = _dot_prec(q.dtype)
    common = dict(HEAD_DIM=D, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, MASK_ROW_BCAST=row_bcast,
                  HAS_DROPOUT=has_drop, DOT_PREC=prec, SKIP_TILES=SKIP_TILES, N_ROUNDS=PHILOX_ROUNDS)

    pre_block = _INTERP_BLOCK if _INTERPRET else 64
    _bwd_preprocess[(triton.cdiv(Lq, pre_block), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, Lq, HEAD_DIM=D, BLOCK_M=pre_block)

    # dBias buffer: mode 1 = fp32 (H, Lq, Lk) atomics; mode 2 = (B, H, Lq, Lk) stores
    need_dbias = need_dbias and bias is not None
    per_batch_bias = need_dbias and bias.shape[0] == B and B > 1
    if not need_dbias:
        mode, db = 0, torch.empty(0, dtype=torch.float32, device=q.device)
        sdb = (0, 0, 0, 0)
    elif dbias_strategy == "atomic" and not per_batch_bias:
        mode, db = 1, torch.zeros((H, Lq, Lk), dtype=torch.float32, device=q.device)
        sdb = (0, *db.stride())
    else:
        buf_dtype = torch.bfloat16 if dbias_strategy == "store_bf16" else torch.float32
        mode, db = 2, torch.empty((B, H, Lq, Lk), dtype=buf_dtype, device=q.device)
        sdb = db.stride()

    qk_scale = float(scale) * 1.4426950408889634
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)](
        q, k, v, bias_t, mask_t, do, lse, delta, dk, dv, db,
        *q.stride(), *k.stride(), *v.stride(), *sb, *sm, *do.stride(), *dk.stride(), *dv.stride(), *sdb,
        H, Lq, Lk, _len_key(Lq), _len_key(Lk), qk_scale, float(scale), seed_i, thresh, inv_keep, DBIAS_MODE=mode, **common)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)](
        q, k, v, bias_t, mask_t, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *sb, *sm, *do.stride(), *dq.stride(),
        H, Lq, Lk, _len_key(Lq), _len_key(Lk), qk_scale, float(scale), seed_i, thresh, inv_keep, **common)

    if mode == 0:
        dbias = torch.empty(0, dtype=q.dtype, device=q.device)
    elif mode == 1:
        dbias = db.unsqueeze(0).to(bias.dtype)
    elif per_batch_bias:
        dbias = db.to(bias.dtype)
    else:
        dbias = db.sum(0, keepdim=True, dtype=torch.float32).to(bias.dtype)
    return dq, dk, dv, dbias


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, bias, mask, out, lse, dropout_p, scale, seed, need_dbias, dbias_strategy):
    if need_dbias and bias is not None:
        dbias = bias.new_empty(bias.shape)
    else:
        dbias = q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, dropout_p, scale, seed, dbias_strategy = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, mask, out, lse, seed)
    ctx.dropout_p = dropout_p
    ctx.scale = scale
    ctx.dbias_strategy = dbias_strategy
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, bias, mask, out, lse, seed = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.sftui_t5attn.bwd(dout, q, k, v, bias, mask, out, lse, ctx.dropout_p, ctx.scale,
                                             seed, need_dbias, ctx.dbias_strategy)
    return dq, dk, dv, (dbias if need_dbias else None), None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, scale: float = 1.0, *,
              seed=None, dbias_strategy: Optional[str] = None) -> torch.Tensor:
    """softmax(where(mask, scale * q @ k^T + bias, -inf)) with dropout, @ v.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); bias: None, (1, H, Lq, Lk) or
    (B, H, Lq, Lk); mask: None or bool broadcastable as (B, 1, Lq, Lk) with
    shape (B|1, 1, Lq|1, Lk), True = attend.  Returns (B, H, Lq, D) (memory
    layout (B, Lq, H, D)).

    seed: None (dropout > 0: drawn from torch's *CPU* default generator, so it
    follows ``torch.manual_seed``, needs no device sync and is restored by
    ``torch.utils.checkpoint``), an int, or a 1-element int64 CPU tensor.
    dbias_strategy: "atomic" | "store" | "store_bf16" (default from
    T5ATTN_DBIAS_STRATEGY, else "atomic").
    """
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0:
        if seed is None:
            seed_t = torch.ops.sftui_t5attn.seed(_ON_THE_CPU)
        elif isinstance(seed, torch.Tensor):
            seed_t = seed.reshape(1).to(torch.int64)
        else:
            seed_t = torch.tensor([int(seed)], dtype=torch.int64)
    else:
        seed_t = None
    strategy = dbias_strategy or _DEFAULT_DBIAS
    if strategy not in DBIAS_STRATEGIES:
        raise ValueError(f"dbias_strategy must be one of {DBIAS_STRATEGIES}, got {strategy!r}")
    out, _ = torch.ops.sftui_t5attn.fwd(q, k, v, bias, mask, dropout_p, float(scale), seed_t, strategy)
    return out


def dropout_keep_mask(seed, B: int, H: int, Lq: int, Lk: int, p: float, device=None) -> torch.Tensor:
    """The exact boolean keep-mask (B, H, Lq, Lk) that the kernels use for this
    seed and p (True = kept; kept probabilities are scaled by 1 / (1 - p))."""
    s = int(seed.reshape(-1)[0].item()) if isinstance(seed, torch.Tensor) else int(seed)
    out = torch.empty((B, H, Lq, Lk), dtype=torch.uint8, device=device)
    bm, bn = (16, 32) if _INTERPRET else (64, 128)  # any multiple of 8 gives the same mask
    grid = (triton.cdiv(Lq, bm), triton.cdiv(Lk, bn), B * H)
    _keep_mask_kernel[grid](out, Lq, Lk, s, _dropout_threshold(p), N_ROUNDS=PHILOX_ROUNDS, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


# ----------------------------------------------------------------------------
# transformers: the attention a T5's packed rows take
# ----------------------------------------------------------------------------
NAME = "sftui_t5"  # the attn_implementation name it is registered under
# A run whose micro-batches hold fewer samples × heads stays on sdpa: 16 rows of 12 heads ran 0.30x of
# sdpa (H200, 2026-12-02); chatlm-mini's packed batch of 256 samples (about 160 rows) of 12 heads ran
# faster with the kernels. Between the two nothing was measured; this is a guess inside that gap. It is
# decided once per rank from the attempt's batch, not per micro-batch: under --compile a size test is a
# guard, and a short last step under it compiled a second graph (over a minute, H200, 2026-12-02).
MIN_SAMPLES_X_HEADS = 1536


def t5_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                 position_bias: Optional[torch.Tensor] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface (T5Attention's call): an attention with a position bias
    (a self-attention's relative bias, trained or frozen; a cross-attention's zeros) and a boolean
    mask, with a head size the kernels take, runs ``attention``, which skips the tiles a packed
    row's mask empties; everything else (a decoder left to sdpa's ``is_causal`` without a mask)
    transformers' sdpa. Evaluation's batches take it too, without dropout. Nothing here depends on
    the micro-batch's size (``packed_attention``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    size = query.shape[-1]
    if (position_bias is None or attention_mask is None
            or attention_mask.dtype != torch.bool or position_bias.shape[0] != 1
            or not 16 <= size <= 128 or size & (size - 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      position_bias=position_bias, **kwargs)
    out = attention(query, key, value, position_bias, attention_mask, dropout if module.training else 0.0,
                    size ** -0.5 if scaling is None else scaling)
    return out.transpose(1, 2), None


def packed_attention(device: torch.device, batch: int, heads: int) -> Optional[str]:
    """``NAME`` on a GPU for micro-batches of ``batch`` samples of a model of ``heads`` heads, at
    least ``MIN_SAMPLES_X_HEADS`` of them, registered with transformers (sdpa's mask builder: the
    same boolean masks), for a T5's packed rows; None elsewhere (the model keeps sdpa)."""
    if device.type != "cuda" or batch * heads < MIN_SAMPLES_X_HEADS:
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, t5_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
