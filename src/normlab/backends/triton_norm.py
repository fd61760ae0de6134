"""The Triton backend: one set of fused kernels for BN, LN, IN, GN and batch-group norm.

Wu & He, "Group Normalization" (ECCV 2018), section 3.1: every normalization is the same operator
with a different statistics set. For ``x`` of shape ``(N, C, *spatial)`` (S = prod(spatial)) split
into ``G`` groups of ``Cg = C/G`` channels, a *statistic* ``k`` covers

* ``over_batch=False`` (LN, IN, GN): ``k = n*G + g``, the elements ``x[n, g*Cg:(g+1)*Cg, :]``;
* ``over_batch=True``  (BN, batch-group norm): ``k = g``, the elements ``x[:, g*Cg:(g+1)*Cg, :]``.

Each statistic is a 2-D tile space: *rows* are spatial positions (times samples when over the
batch), *columns* are the ``Cg`` channels of the group. One address formula serves both layouts::

    addr(n, c, s) = n*sn + c*sc + s*ss      NCHW: (C*S, S, 1)     channels_last: (S*C, 1, C)

so channels_last input is read in place (no layout conversion). Tiles never cross a sample, so
the row -> (n, s) split is one scalar division per tile, not per element.

Blocks of groups: when the channels are the contiguous axis (channels_last, or a 2-D (N, C)
input) a group's row is only Cg elements (1 for BN and IN: 2 bytes in bf16, a sixteenth of a
32-byte sector). One program then covers GB consecutive groups, so a tile row is GB*Cg
contiguous channels; it keeps per-column (count, mean, M2) and folds the columns of each group
together once per column tile (a [BLOCK_C, GB] one-hot contraction; skipped when a column is a
group). In NCHW, and for groups as wide as a tile, GB = 1 and the vectors have one entry.

Forward (per statistic)::

    shift      the statistic's first element; all sums run over x - shift (shifted data)
    mean, M2   per tile by two passes over the tile in registers, merged tile by tile with
               Chan et al.'s pairwise update (never E[x^2] - E[x]^2):
               n = na + nb, d = mb - ma, mean = ma + d*nb/n, M2 = M2a + M2b + d^2*na*nb/n
    rstd       = 1 / sqrt(M2/m + eps)
    y          = act(((x - shift) - mean') * rstd * w_c + b_c)      mean' = mean - shift

Backward, with z = xhat*w + b and dz = dy * act'(z)::

    xhat = ((x - shift) - mean') * rstd  the forward's shifted mean (SMEAN) and the same shift,
                                         reloaded from x: (x - mean) * rstd with the rounded
                                         mean = mean' + shift would lose |mean|/std digits

    db_c = sum dz          dw_c = sum dz * xhat        (over the rows; per-program partials,
                                                        reduced in a fixed order: deterministic)
    A = sum_c w_c db_c     B = sum_c w_c dw_c           (over the statistic's elements)
    dx = rstd * (dz*w - (A + xhat*B) / m)

Parallelism: when there are fewer blocks than ~4 programs per SM (small N*G), a block's
rows are split over ``SPLIT`` programs; partial (count, mean, M2) and partial (A, B) are written
to scratch and combined with Chan's formula by the next kernel (fixed order, no atomics). With
enough statistics (``SPLIT == 1``) each program does both passes itself (the second read of its
slice mostly hits L2): forward one launch; backward one where each block of groups has one
dw/db row (BN on the fused path, batch 1), else two (dx, then the dw/db row reduction), or one
with ``$NORMLAB_TRITON_FOLD=1``: the last program of a block to arrive at its counter (row 4
of the forward's statistics, zeroed by the forward) sums the block's rows, in row order.

Eval with given per-channel statistics (``normalize_fixed``, BatchNorm in eval) reuses the same
kernels with G = 1 over the batch and per-channel mean/rstd loaded per column tile.

Launchers are wrapped as ``torch.library`` custom ops (``normlab::triton_norm_fwd`` etc.) with
fake implementations and registered autograd, so the backend works under
``torch.compile(fullgraph=True)`` and in CUDA graphs (no host synchronisation, no allocation that
depends on data). With ``$NORMLAB_TRITON_OP=1`` they are ``torch.library.triton_op`` ops
instead, whose traced graph holds the kernel launches themselves (``_use_triton_op``). On CPU
tensors the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` (tests only: slow).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import typing
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab.backends import triton_interpreting
from normlab.backends.reference import BACKEND as _REFERENCE, update_running_stats

__all__ = ["TritonBackend", "BACKEND", "TUNING", "plan_launch", "LaunchPlan"]

# activation name -> constexpr code used by the kernels
ACT_CODES = {"none": 0, "relu": 1, "silu": 2, "gelu": 3}
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tuning knobs read at launch time. ``None`` means the device default. Tests shrink them to force
# split reductions and multi-tile groups on tiny shapes.
TUNING: dict = {
    "target_programs": None,  # programs to aim for; fewer statistics than this -> split rows
    "block_elems": None,  # elements per tile (power of two)
    "max_block_c": None,  # cap on the channel extent of a tile
    "group_blocks": True,  # False: one group per program in every layout (v1; benchmarks A/B)
    "num_stages": None,  # pipelining depth of the row-tile loops (None: 3 on a GPU, 1 otherwise)
    "fold_rows": None,  # the fused backward sums its dw/db rows itself (None: $NORMLAB_TRITON_FOLD)
    "rows_max_c": None,  # widest (rows, C) row for the rows backward (None: ROWS_MAX_C; 0: never)
    "poison": None,  # tests: fill every output and scratch buffer with this before launching
}


# elements per tile on a GPU: 8 per thread of 8 warps. Each lane keeps two float32
# accumulators per element across the row tiles (forward: mean, M2; backward: dbias, dweight
# sums) and double-buffers its loads; at 4096 elements the backward plans needed up to 154
# registers (1 program per SM, scripts/triton_aot_check.py)
GPU_BLOCK_ELEMS = 2048
# software-pipelining depth of the row-tile loops on a GPU (cp.async into shared memory)
GPU_NUM_STAGES = 3


def _env_flag(name: str) -> bool:
    """A 0/1 switch from the environment (default 0)."""
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise ValueError(f"${name} must be 0 or 1, got {value!r}")
    return value == "1"


def _use_triton_op() -> bool:
    """``$NORMLAB_TRITON_OP=1``: register the ops through ``torch.library.triton_op`` (read at
    import). Their bodies then launch through ``torch.library.wrap_triton``, so a torch.compile
    trace records the kernel launches themselves (Inductor schedules them, CUDA graphs capture
    them) instead of one opaque custom op. Off by default until a GPU run has checked it
    (benchmarks/NOTES.md). Under the interpreter it has no effect: ``wrap_triton`` hands an
    interpreted kernel back unwrapped, and a trace would run it on fake tensors."""
    if not _env_flag("NORMLAB_TRITON_OP") or triton_interpreting():
        return False
    if not hasattr(torch.library, "triton_op"):
        raise RuntimeError(f"$NORMLAB_TRITON_OP=1 needs torch.library.triton_op (torch >= 2.6); "
                           f"this is torch {torch.__version__}")
    return True


TRITON_OP = _use_triton_op()
# ``$NORMLAB_TRITON_FOLD=1`` (read at import; ``TUNING["fold_rows"]`` overrides it): the fused
# per-sample backward sums its dw/db rows itself, the last program of each block to arrive
# (``_fold_rows``), instead of in a second launch. Off by default until a GPU run has checked
# the cross-program ordering, which the interpreter (programs one after another) cannot
# exercise (benchmarks/NOTES.md)
FOLD_ROWS = _env_flag("NORMLAB_TRITON_FOLD")
# whether the kernels below are interpreted: Triton decides when it decorates them (this
# module's import), so TRITON_INTERPRET=1 set later does not make them run CPU tensors
KERNELS_INTERPRETED = triton_interpreting()


def _unwrapped(kernel):
    return kernel


# how the launchers call a kernel: ``wrap_triton(kernel)[grid](...)``. With TRITON_OP it is
# torch.library.wrap_triton (inside a trace the launch becomes a graph node; inside
# ``_direct_launches`` and the triton_op's own eager kernel it is the kernel itself); under the
# same name, torch.library's source analysis finds which kernels an op launches
wrap_triton = torch.library.wrap_triton if TRITON_OP else _unwrapped


def _direct_launches():
    """Eager launches that skip wrap_triton's tracing dispatch (about a millisecond of CPU per
    launch), as triton_op's own eager kernel does. A lazy attribute: torch._library.triton is
    private and only needed when TRITON_OP."""
    if TRITON_OP:
        return torch._library.triton.set_wrap_triton_enabled(False)
    return contextlib.nullcontext()


# ============================================================================================
# kernels
# ============================================================================================


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """Fused activation on the float32 pre-activation z (gelu is the exact erf form).
    relu is a select, not tl.maximum: that is fmax, which maps NaN to 0 (torch.relu keeps it)."""
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _act_bwd(z, dy, ACT: tl.constexpr):
    """dy * act'(z): relu' = [z > 0], silu' = s(1 + z(1 - s)), gelu' = Phi(z) + z*phi(z)."""
    if ACT == 1:
        dz = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(z)
        dz = dy * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = dy * (cdf + z * pdf)
    else:
        dz = dy
    return dz


@triton.jit
def _block_base(k, NGB, GB: tl.constexpr, Cg: tl.constexpr, sn, sc, OVER_BATCH: tl.constexpr):
    """Program k -> (its sample, or 0 over the batch; the first group g0 of its block of GB
    groups; int64 element offset of the block's first element)."""
    if OVER_BATCH:
        n0 = k * 0
        blk = k
    else:
        n0 = k // NGB
        blk = k % NGB
    g0 = blk * GB
    base = n0.to(tl.int64) * sn + (g0 * Cg).to(tl.int64) * sc
    return n0, g0, base


@triton.jit
def _prologue(k, j, G, NGB, TPP, RT, sn, sc, Cg: tl.constexpr, OVER_BATCH: tl.constexpr,
              GB: tl.constexpr, GBP: tl.constexpr, EVEN: tl.constexpr):
    """What a forward or backward program (k, j) works on: (g0, int64 base offset of its block,
    group validity [GBP], valid columns, statistic index [GBP], its row tiles [rt_lo, rt_hi)).
    No pointer argument: torch.library's analysis of which tensors a kernel writes (triton_op
    registration) counts every pointer passed to a helper whose result feeds a store address
    as written, and a written input is copied before each launch."""
    n0, g0, base = _block_base(k, NGB, GB, Cg, sn, sc, OVER_BATCH)
    gidx = tl.arange(0, GBP)
    gvalid = (gidx < GB) & (g0 + gidx < G)
    if EVEN:  # G % GB == 0: every block is full, the column count is a compile-time constant
        ncols = GB * Cg
    else:
        ncols = tl.minimum(G - g0, GB) * Cg  # valid columns of this block
    if OVER_BATCH:
        stat = g0 + gidx
    else:
        stat = n0 * G + g0 + gidx
    rt_lo = j * TPP
    rt_hi = tl.minimum(rt_lo + TPP, RT)
    return g0, base, gvalid, ncols, stat, rt_lo, rt_hi


@triton.jit
def _load_shift(X, base, gvalid, sc, Cg: tl.constexpr, GBP: tl.constexpr, SHIFT: tl.constexpr):
    """The shift [GBP]: each group's first element when SHIFT (centred statistics), else 0.
    X: (N, C, *spatial) input, element strides (sn, sc, ss); ``base`` the block's first element.

    Shifted data: every program of a statistic subtracts the same shift, so the sums run over
    values of the spread's magnitude, not the offset's (1e4 + 0.1*randn keeps full float32
    accuracy); the forward stores the mean of the shifted data (SMEAN) for the backward."""
    shift_g = tl.zeros([GBP], dtype=tl.float32)
    if SHIFT:
        first = tl.arange(0, GBP) * Cg
        shift_g = tl.load(X + base + first.to(tl.int64) * sc, mask=gvalid,
                          other=0.0).to(tl.float32)
    return shift_g


@triton.jit
def _tile(rt, ct, TPS, S, ncols, sn, sc, ss, OVER_BATCH: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """Row tile rt, column tile ct of a block -> (int64 offset of the tile's sample, int32
    in-sample offsets [BLOCK_R, BLOCK_C], mask, row mask [BLOCK_R])."""
    if OVER_BATCH:
        nn = rt // TPS
        s0 = (rt - nn * TPS) * BLOCK_R
        sample = nn.to(tl.int64) * sn
    else:
        s0 = rt * BLOCK_R
        sample = s0.to(tl.int64) * 0
    c0 = ct * BLOCK_C
    rows = s0 + tl.arange(0, BLOCK_R)
    cols = c0 + tl.arange(0, BLOCK_C)
    offs = rows[:, None] * ss + cols[None, :] * sc
    rmask = rows < S
    mask = rmask[:, None] & (cols[None, :] < ncols)
    return sample, offs, mask, rmask


@triton.jit
def _onehot(ct, ncols, Cg: tl.constexpr, GBP: tl.constexpr, BLOCK_C: tl.constexpr,
            IDENT: tl.constexpr):
    """[BLOCK_C, GBP] float 0/1: column c of tile ct belongs to group (c // Cg) of the block.
    With IDENT (Cg == 1 and GBP == BLOCK_C: a column is a group) it is never built."""
    if IDENT:
        m = tl.zeros([1, 1], dtype=tl.float32)
    else:
        cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        gid = cols // Cg
        m = ((gid[:, None] == tl.arange(0, GBP)[None, :]) & (cols < ncols)[:, None]).to(tl.float32)
    return m


@triton.jit
def _to_groups(v, m, IDENT: tl.constexpr):
    """Per-column [BLOCK_C] -> per-group [GBP] sums (one small contraction per program).
    A select, not a product with the 0/1 matrix: NaN * 0 is NaN, and a NaN or inf in one group
    must not reach the other groups of the block."""
    if IDENT:
        r = v
    else:
        r = tl.sum(tl.where(m > 0.0, v[:, None], 0.0), axis=0)
    return r


@triton.jit
def _to_cols(gv, m, IDENT: tl.constexpr):
    """Per-group [GBP] -> per-column [BLOCK_C] (each column takes its group's value)."""
    if IDENT:
        r = gv
    else:
        r = tl.sum(tl.where(m > 0.0, gv[None, :], 0.0), axis=1)
    return r


@triton.jit
def _columns(ch0, ct, ncols, BLOCK_C: tl.constexpr):
    """Column tile ct of a block whose first channel is ch0: (columns, their mask, channels)."""
    cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < ncols, ch0 + cols


@triton.jit
def _channel_vectors(W, B, MEAN, VAR, ch, cm, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-column weight, bias (and, for given per-channel statistics, mean and rstd) of the
    channels ch (a separate helper from ``_columns``: see ``_prologue`` on pointers).
    W, B: (C,) weight and bias, or dummies when not HAS_W / HAS_B; MEAN, VAR: (C,) the given
    statistics when PER_CHANNEL, else dummies."""
    if HAS_W:
        w = tl.load(W + ch, mask=cm, other=0.0).to(tl.float32)
    else:
        w = tl.where(cm, 1.0, 0.0)
    if HAS_B:
        b = tl.load(B + ch, mask=cm, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    if PER_CHANNEL:
        mu = tl.load(MEAN + ch, mask=cm, other=0.0).to(tl.float32)
        var = tl.load(VAR + ch, mask=cm, other=1.0).to(tl.float32)
        rs = 1.0 / tl.sqrt(var + eps)
    else:
        mu = tl.zeros([BLOCK_C], dtype=tl.float32)
        rs = tl.zeros([BLOCK_C], dtype=tl.float32)
    return w, b, mu, rs


@triton.jit
def _column_moments(X, base, shift_c, rt_lo, rt_hi, ct, TPS, S, ncols, sn, sc, ss,
                    OVER_BATCH: tl.constexpr, CENTER: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Per-column (count, mean, M2) of x - shift over row tiles [rt_lo, rt_hi) of column tile ct.
    X: (N, C, *spatial) input, element strides (sn, sc, ss); ``base`` the block's first element.

    Each lane keeps its own running (mean, M2) across the tiles (Welford: one update per
    element, no reduction inside the loop, so the loads of the next tiles can be in flight);
    the lanes of a column are combined once at the end with Chan et al.'s formula. Rows that a
    tile masks (the last tile of a sample) keep their lane's values: the count is per row.
    Without CENTER the moments are about 0: mean 0, M2 = sum of x^2 (RMS statistics)."""
    l_cnt = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_mean = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    l_m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for rt in tl.range(rt_lo, rt_hi, num_stages=NUM_STAGES):
        sample, offs, mask, rmask = _tile(rt, ct, TPS, S, ncols, sn, sc, ss, OVER_BATCH,
                                          BLOCK_R, BLOCK_C)
        x = tl.load(X + base + sample + offs, mask=mask, other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
        l_cnt += rmask.to(tl.float32)
        if CENTER:
            # a masked lane sees its own mean: d = 0 leaves it as it is
            x = tl.where(mask, x - shift_c[None, :], l_mean)
            inv = tl.where(rmask, 1.0 / tl.maximum(l_cnt, 1.0), 0.0)
            d = x - l_mean
            l_mean += d * inv[:, None]
            l_m2 += d * (x - l_mean)
        else:
            l_m2 += tl.where(mask, x * x, 0.0)
    c_cnt = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.sum(l_cnt, axis=0)
    c_m2 = tl.sum(l_m2, axis=0)
    if CENTER:
        c_mean = tl.sum(l_cnt[:, None] * l_mean, axis=0) / tl.where(c_cnt > 0.0, c_cnt, 1.0)
        dm = tl.where(l_cnt[:, None] > 0.0, l_mean - c_mean[None, :], 0.0)
        c_m2 += tl.sum(l_cnt[:, None] * dm * dm, axis=0)
    else:
        c_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    return c_cnt, c_mean, c_m2


@triton.jit
def _store_stats(STATS, K, stat, gvalid, smean_g, shift_g, rstd_g, var_g):
    """Rows of the (5, K) float32 statistics buffer STATS (K statistics: N*G, or G over the
    batch): mean, rstd, biased var, shifted mean, and zeros:
    row 4 holds the backward's int32 arrival counters (``_fold_rows``), zero after every
    forward and after every backward that used them."""
    tl.store(STATS + stat, smean_g + shift_g, mask=gvalid)
    tl.store(STATS + K + stat, rstd_g, mask=gvalid)
    tl.store(STATS + 2 * K + stat, var_g, mask=gvalid)
    tl.store(STATS + 3 * K + stat, smean_g, mask=gvalid)
    tl.store(STATS + 4 * K + stat, tl.zeros_like(rstd_g), mask=gvalid)


@triton.jit
def _fwd_kernel(
    X,  # (N, C, *spatial) input, element strides (sn, sc, ss)
    Y,  # like X (same strides)
    W,  # (C,) weight, or a dummy when not HAS_W
    B,  # (C,) bias, or a dummy when not HAS_B
    STATS,  # (5, K) float32 rows: mean, rstd, biased var, mean of x - shift, 0; STAGE 3: unused
    MEAN,  # STAGE 3: (C,) given per-channel mean; else unused
    VAR,  # STAGE 3: (C,) given per-channel variance; else unused
    PART,  # (K * SPLIT * 3,) float32 partial (count, mean, M2) for STAGE 1/2, else a dummy
    S, Cg: tl.constexpr, G, NGB, K, CT, TPS, RT, TPP, sn, sc, ss, eps,
    OVER_BATCH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    STAGE: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    GB: tl.constexpr, GBP: tl.constexpr, IDENT: tl.constexpr, EVEN: tl.constexpr,
    CENTER: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Forward. grid = (blocks of GB groups, SPLIT). Cg is a compile-time constant so that the
    compiler knows the alignment of a group's first channel (one kernel per distinct Cg).
    STAGE 0: statistics then normalize (SPLIT == 1); 1: partial (count, mean, M2) only;
    2: combine partials then normalize; 3: normalize with the given per-channel MEAN/VAR (eval).
    CENTER False: statistics about 0 (RMS: mean 0, var = mean of x^2).

    Every vector of statistics has one entry per group of the block ([GBP], padded to a power
    of two); per-column moments are folded into groups once per column tile (``_to_groups``).
    Reference twin: ``reference.BACKEND.normalize`` (STAGE 3: ``normalize_fixed``)."""
    k = tl.program_id(0)
    j = tl.program_id(1)
    nsplit = tl.num_programs(1)
    g0, base, gvalid, ncols, stat, rt_lo, rt_hi = _prologue(
        k, j, G, NGB, TPP, RT, sn, sc, Cg, OVER_BATCH, GB, GBP, EVEN)
    shift_g = _load_shift(X, base, gvalid, sc, Cg, GBP, STAGE != 3 and CENTER)
    mean_g = tl.zeros([GBP], dtype=tl.float32)
    rstd_g = tl.zeros([GBP], dtype=tl.float32)
    if STAGE == 0 or STAGE == 1:
        cnt_g = tl.zeros([GBP], dtype=tl.float32)
        m2_g = tl.zeros([GBP], dtype=tl.float32)
        for ct in range(0, CT):
            m = _onehot(ct, ncols, Cg, GBP, BLOCK_C, IDENT)
            c_cnt, c_mean, c_m2 = _column_moments(
                X, base, _to_cols(shift_g, m, IDENT), rt_lo, rt_hi, ct, TPS, S, ncols, sn, sc,
                ss, OVER_BATCH, CENTER, BLOCK_R, BLOCK_C, NUM_STAGES)
            # columns -> groups (Chan over the columns of a group), then into the running total
            t_cnt = _to_groups(c_cnt, m, IDENT)
            t_safe = tl.where(t_cnt > 0.0, t_cnt, 1.0)
            t_mean = _to_groups(c_cnt * c_mean, m, IDENT) / t_safe
            dm = c_mean - _to_cols(t_mean, m, IDENT)
            t_m2 = _to_groups(c_m2 + c_cnt * dm * dm, m, IDENT)
            tot = cnt_g + t_cnt
            delta = t_mean - mean_g
            frac = t_cnt / tl.where(tot > 0.0, tot, 1.0)
            mean_g = mean_g + delta * frac
            m2_g = m2_g + t_m2 + delta * delta * cnt_g * frac
            cnt_g = tot
        if STAGE == 1:
            p = PART + (stat * nsplit + j) * 3
            tl.store(p, cnt_g, mask=gvalid)
            tl.store(p + 1, mean_g, mask=gvalid)
            tl.store(p + 2, m2_g, mask=gvalid)
            return
        var_g = m2_g / tl.where(cnt_g > 0.0, cnt_g, 1.0)
        rstd_g = 1.0 / tl.sqrt(var_g + eps)
        _store_stats(STATS, K, stat, gvalid, mean_g, shift_g, rstd_g, var_g)
    if STAGE == 2:
        idx = tl.arange(0, SPLIT_BLOCK)
        pm = gvalid[:, None] & (idx < nsplit)[None, :]
        p = PART + (stat[:, None] * nsplit + idx[None, :]) * 3
        pc = tl.load(p, mask=pm, other=0.0)
        pmean = tl.load(p + 1, mask=pm, other=0.0)
        pm2 = tl.load(p + 2, mask=pm, other=0.0)
        cnt_g = tl.sum(pc, axis=1)
        cnt_safe = tl.where(cnt_g > 0.0, cnt_g, 1.0)
        mean_g = tl.sum(pc * pmean, axis=1) / cnt_safe
        dm = pmean - mean_g[:, None]
        var_g = (tl.sum(pm2, axis=1) + tl.sum(pc * dm * dm, axis=1)) / cnt_safe
        rstd_g = 1.0 / tl.sqrt(var_g + eps)
        if j == 0:
            _store_stats(STATS, K, stat, gvalid, mean_g, shift_g, rstd_g, var_g)

    for ct in range(0, CT):
        cols, cm, ch = _columns(g0 * Cg, ct, ncols, BLOCK_C)
        w, b, mu, rs = _channel_vectors(W, B, MEAN, VAR, ch, cm, eps, HAS_W, HAS_B, STAGE == 3,
                                        BLOCK_C)
        shift_c = tl.zeros([BLOCK_C], dtype=tl.float32)
        if STAGE != 3:
            m = _onehot(ct, ncols, Cg, GBP, BLOCK_C, IDENT)
            shift_c = _to_cols(shift_g, m, IDENT)
            mu = mu + _to_cols(mean_g, m, IDENT)
            rs = rs + _to_cols(rstd_g, m, IDENT)
        scale = (rs * w)[None, :]
        for rt in tl.range(rt_lo, rt_hi, num_stages=NUM_STAGES):
            sample, offs, mask, rmask = _tile(rt, ct, TPS, S, ncols, sn, sc, ss, OVER_BATCH,
                                              BLOCK_R, BLOCK_C)
            x = tl.load(X + base + sample + offs, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            z = ((x - shift_c[None, :]) - mu[None, :]) * scale + b[None, :]
            y = _act_fwd(z, ACT)
            tl.store(Y + base + sample + offs, y.to(Y.dtype.element_ty), mask=mask)


# rows of dw/db partials whose loads ``_reduce_rows`` issues together
ROW_UNROLL = tl.constexpr(8)


@triton.jit
def _reduce_rows(PDW, PDB, DW, DB, ROWS, C, ch0, ncols, CT, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """DW[c] = sum_r PDW[r, c] (and DB likewise) for the ncols channels from ch0, rows added in
    order 0..ROWS-1: deterministic, and the same sums wherever it runs. PDW, PDB: (ROWS, C)
    float32 partials; DW, DB: (C,) in the weight's dtype (dummies when not HAS_W / HAS_B). The
    rows are read from L2 (``.cg``): other programs of the same launch may have written them
    (``_fold_rows``). ROW_UNROLL (8) rows per iteration, added one after another (the same order
    and bits as one row per iteration; a row past ROWS adds an exact 0): their loads do not wait
    for each other, so 132 rows (BatchNorm in channels_last split over a 132-SM GPU) cost 17 L2
    round trips in sequence instead of 132."""
    for ct in range(0, CT):
        cols = ch0 + ct * BLOCK + tl.arange(0, BLOCK)
        cm = ct * BLOCK + tl.arange(0, BLOCK) < ncols
        acc_w = tl.zeros([BLOCK], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK], dtype=tl.float32)
        row = (ch0 * 0).to(tl.int64)  # int64 row offset: ROWS * C can pass 2**31
        for r in range(0, ROWS, ROW_UNROLL):
            for u in tl.static_range(ROW_UNROLL):
                rm = cm & (tl.full([BLOCK], r + u, tl.int32) < ROWS)  # a vector: the
                # interpreter rejects a vector & scalar-bool mask
                if HAS_W:
                    acc_w += tl.load(PDW + row + cols, mask=rm, other=0.0, cache_modifier=".cg")
                if HAS_B:
                    acc_b += tl.load(PDB + row + cols, mask=rm, other=0.0, cache_modifier=".cg")
                row += C
        if HAS_W:
            tl.store(DW + cols, acc_w.to(DW.dtype.element_ty), mask=cm)
        if HAS_B:
            tl.store(DB + cols, acc_b.to(DB.dtype.element_ty), mask=cm)


@triton.jit
def _fold_rows(CNT, blk, PDW, PDB, DW, DB, ROWS, C, ch0, ncols, CT, HAS_W: tl.constexpr,
               HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """The last of a block's ROWS programs to arrive sums the block's dw/db rows (FOLD 2).
    CNT: (K,) the forward's STATS[4], int32 arrival counters (``blk`` indexes them);
    PDW, PDB, DW, DB as in ``_reduce_rows``.

    Each program has stored its rows of PDW/PDB. The barrier orders every thread's stores
    before the arrival; the arrival is one acq_rel atomic at GPU scope (Triton issues a scalar
    atomic from one thread and hands its result to all), so the program that counts ROWS - 1
    sees every other program's rows. It sums them in row order (``_reduce_rows``: the same
    sums as the separate kernel, whoever arrives last) and puts the counter back to 0 for the
    next backward over the same statistics (a retained graph)."""
    tl.debug_barrier()
    cnt = CNT.to(tl.pointer_type(tl.int32), bitcast=True) + blk
    arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
    if arrived == ROWS - 1:
        _reduce_rows(PDW, PDB, DW, DB, ROWS, C, ch0, ncols, CT, HAS_W, HAS_B, BLOCK)
        tl.store(cnt, 0)


@triton.jit
def _bwd_kernel(
    X,  # (N, C, *spatial) the forward's input, element strides (sn, sc, ss)
    DY,  # like X (same strides)
    DX,  # like X (same strides)
    W,  # (C,) weight, or a dummy when not HAS_W
    B,  # (C,) bias, or a dummy when not HAS_B
    MEAN,  # (K,) float32 shifted mean (the forward's STATS[3]); STAGE 3: (C,) given mean
    RSTD,  # (K,) float32 1/sqrt(var + eps); unused in STAGE 3
    VAR,  # (C,) float32 given per-channel variance in STAGE 3; unused otherwise
    AB,  # (K * SPLIT * 2,) float32 partial (A, B) for STAGE 1/2, else a dummy
    PDW,  # (partial rows, C) float32 per-program dweight partials, or a dummy when not HAS_W
    PDB,  # (partial rows, C) float32 per-program dbias partials, or a dummy when not HAS_B
    DW,  # (C,) dweight (STAGE 2 writes it), or a dummy
    DB,  # (C,) dbias (STAGE 2 writes it), or a dummy
    CNT,  # (K,) the forward's STATS[4], int32 arrival counters (zero) when FOLD == 2, else a dummy
    S, Cg: tl.constexpr, G, NGB, C, CT, TPS, RT, TPP, sn, sc, ss, eps, inv_m, ROWS,
    OVER_BATCH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    STAGE: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    GB: tl.constexpr, GBP: tl.constexpr, IDENT: tl.constexpr, EVEN: tl.constexpr,
    CENTER: tl.constexpr, NUM_STAGES: tl.constexpr, FOLD: tl.constexpr,
):
    """Backward. grid = (blocks of GB groups, SPLIT). STAGE 0: reduce then dx (SPLIT == 1);
    1: reduce only (per-channel partials + partial A, B per group); 2: combine A, B then dx;
    3: given per-channel statistics (eval): dx and per-channel partials in one pass.
    CENTER False (RMS statistics): the mean is 0 and dx has no A term.

    The per-channel sums are per-lane accumulators across the row tiles, reduced once per
    column tile; they go to row ``n*SPLIT + j`` (or ``j`` over the batch) of PDW/PDB
    (ROWS x C, float32). In STAGE 2 (the first kernel has finished: every row is written) the
    first program of each block of groups sums its channels' rows in order into DW/DB. After
    STAGE 0 and 3 (the rows come from programs of one launch), by FOLD: 0, the separate
    ``_reduce_rows_kernel``; 1 (ROWS == 1: the program's own sums are the whole), DW/DB stored
    directly; 2 (STAGE 0 per sample), the last program of each block to arrive
    (``_fold_rows``). Reference twin: autograd through ``reference.BACKEND.normalize`` (STAGE
    3: ``normalize_fixed``)."""
    k = tl.program_id(0)
    j = tl.program_id(1)
    nsplit = tl.num_programs(1)
    g0, base, gvalid, ncols, stat, rt_lo, rt_hi = _prologue(
        k, j, G, NGB, TPP, RT, sn, sc, Cg, OVER_BATCH, GB, GBP, EVEN)
    shift_g = _load_shift(X, base, gvalid, sc, Cg, GBP, STAGE != 3 and CENTER)
    if OVER_BATCH:
        prow = j
    else:
        prow = (k // NGB) * nsplit + j
    # the forward's shift and shifted mean: xhat is ((x - shift) - mean') * rstd exactly as in
    # the forward
    mean_g = tl.zeros([GBP], dtype=tl.float32)
    rstd_g = tl.zeros([GBP], dtype=tl.float32)
    if STAGE != 3:
        if CENTER:
            mean_g = tl.load(MEAN + stat, mask=gvalid, other=0.0)
        rstd_g = tl.load(RSTD + stat, mask=gvalid, other=0.0)

    a_g = tl.zeros([GBP], dtype=tl.float32)
    b_g = tl.zeros([GBP], dtype=tl.float32)
    if STAGE != 2:
        for ct in range(0, CT):
            cols, cm, ch = _columns(g0 * Cg, ct, ncols, BLOCK_C)
            w, b, mu, rs = _channel_vectors(W, B, MEAN, VAR, ch, cm, eps, HAS_W, HAS_B,
                                            STAGE == 3, BLOCK_C)
            m = _onehot(ct, ncols, Cg, GBP, BLOCK_C, IDENT)
            shift_c = tl.zeros([BLOCK_C], dtype=tl.float32)
            if STAGE != 3:
                shift_c = _to_cols(shift_g, m, IDENT)
                mu = mu + _to_cols(mean_g, m, IDENT)
                rs = rs + _to_cols(rstd_g, m, IDENT)
            l_db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            l_dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            for rt in tl.range(rt_lo, rt_hi, num_stages=NUM_STAGES):
                sample, offs, mask, rmask = _tile(rt, ct, TPS, S, ncols, sn, sc, ss, OVER_BATCH,
                                                  BLOCK_R, BLOCK_C)
                x = tl.load(X + base + sample + offs, mask=mask, other=0.0,
                            eviction_policy="evict_last").to(tl.float32)
                dy = tl.load(DY + base + sample + offs, mask=mask, other=0.0,
                             eviction_policy="evict_last").to(tl.float32)
                xhat = ((x - shift_c[None, :]) - mu[None, :]) * rs[None, :]
                dz = _act_bwd(xhat * w[None, :] + b[None, :], dy, ACT)
                dz = tl.where(mask, dz, 0.0)
                l_db += dz
                l_dw += dz * xhat
                if STAGE == 3:
                    dx = dz * (w * rs)[None, :]
                    tl.store(DX + base + sample + offs, dx.to(DX.dtype.element_ty), mask=mask)
            db_acc = tl.sum(l_db, axis=0)
            dw_acc = tl.sum(l_dw, axis=0)
            if FOLD == 1:  # the only row: it is the sum
                if HAS_W:
                    tl.store(DW + ch, dw_acc.to(DW.dtype.element_ty), mask=cm)
                if HAS_B:
                    tl.store(DB + ch, db_acc.to(DB.dtype.element_ty), mask=cm)
            else:
                # int64 row offset: N * SPLIT * C can pass 2**31 (a 2-D LN over 2**21 rows of
                # 1024)
                if HAS_W:
                    tl.store(PDW + prow.to(tl.int64) * C + ch, dw_acc, mask=cm)
                if HAS_B:
                    tl.store(PDB + prow.to(tl.int64) * C + ch, db_acc, mask=cm)
            a_g += _to_groups(db_acc * w, m, IDENT)
            b_g += _to_groups(dw_acc * w, m, IDENT)
        if STAGE == 1:
            tl.store(AB + (stat * nsplit + j) * 2, a_g, mask=gvalid)
            tl.store(AB + (stat * nsplit + j) * 2 + 1, b_g, mask=gvalid)
        if STAGE == 1 or STAGE == 3:
            return
    if STAGE == 2:
        idx = tl.arange(0, SPLIT_BLOCK)
        pm = gvalid[:, None] & (idx < nsplit)[None, :]
        p = AB + (stat[:, None] * nsplit + idx[None, :]) * 2
        a_g = tl.sum(tl.load(p, mask=pm, other=0.0), axis=1)
        b_g = tl.sum(tl.load(p + 1, mask=pm, other=0.0), axis=1)
        if HAS_W or HAS_B:  # (two ifs: triton 3.0 refuses a chain of three and/or operands)
            if j == 0 and k < NGB:  # sample 0's programs (or all, over the batch)
                _reduce_rows(PDW, PDB, DW, DB, ROWS, C, g0 * Cg, ncols, CT, HAS_W, HAS_B,
                             BLOCK_C)
    if not CENTER:
        a_g = tl.zeros([GBP], dtype=tl.float32)  # d(mean)/dx = 0: no A term

    for ct in range(0, CT):
        cols, cm, ch = _columns(g0 * Cg, ct, ncols, BLOCK_C)
        w, b, mu, rs = _channel_vectors(W, B, MEAN, VAR, ch, cm, eps, HAS_W, HAS_B, False,
                                        BLOCK_C)
        m = _onehot(ct, ncols, Cg, GBP, BLOCK_C, IDENT)
        shift_c = _to_cols(shift_g, m, IDENT)
        mu = _to_cols(mean_g, m, IDENT)
        rs = _to_cols(rstd_g, m, IDENT)
        a_m = _to_cols(a_g, m, IDENT) * inv_m
        b_m = _to_cols(b_g, m, IDENT) * inv_m
        for rt in tl.range(rt_lo, rt_hi, num_stages=NUM_STAGES):
            sample, offs, mask, rmask = _tile(rt, ct, TPS, S, ncols, sn, sc, ss, OVER_BATCH,
                                              BLOCK_R, BLOCK_C)
            x = tl.load(X + base + sample + offs, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            dy = tl.load(DY + base + sample + offs, mask=mask, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            xhat = ((x - shift_c[None, :]) - mu[None, :]) * rs[None, :]
            dz = _act_bwd(xhat * w[None, :] + b[None, :], dy, ACT)
            dx = rs[None, :] * (dz * w[None, :] - (a_m[None, :] + xhat * b_m[None, :]))
            tl.store(DX + base + sample + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if FOLD == 2:  # after the dx pass: the rows were stored long before the arrival
        _fold_rows(CNT, k % NGB, PDW, PDB, DW, DB, ROWS, C, g0 * Cg, ncols, CT, HAS_W, HAS_B,
                   BLOCK_C)


@triton.jit
def _reduce_rows_kernel(
    PDW,  # (ROWS, C) float32 per-program dweight partials, or a dummy when not HAS_W
    PDB,  # (ROWS, C) float32 per-program dbias partials, or a dummy when not HAS_B
    DW,  # (C,) dweight in the weight's dtype, or a dummy when not HAS_W
    DB,  # (C,) dbias in the bias's dtype, or a dummy when not HAS_B
    ROWS, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):
    """The row reduction of PDW/PDB after a backward whose programs all wrote rows (one
    program per BLOCK channels)."""
    ch0 = tl.program_id(0) * BLOCK
    _reduce_rows(PDW, PDB, DW, DB, ROWS, C, ch0, C - ch0, 1, HAS_W, HAS_B, BLOCK)


@triton.jit
def _rows_range(pid, RPP, R, sn):
    """Program pid's rows [r_lo, r_hi) of the rows kernels and the int64 offset of its first
    (R * C can pass 2**31)."""
    r_lo = pid * RPP
    return r_lo, tl.minimum(r_lo + RPP, R), r_lo.to(tl.int64) * sn


@triton.jit
def _rows_fwd_kernel(
    X,  # (R, C) input, row stride sn, contiguous rows
    Y,  # (R, C) like X
    W,  # (C,) weight, or a dummy when not HAS_W
    B,  # (C,) bias, or a dummy when not HAS_B
    STATS,  # (5, R) float32 rows: mean, rstd, biased var, mean of x - shift, 0
    R, C, RPP, sn, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Forward of LayerNorm / RMSNorm over the features of (rows, C), a whole row in one tile:
    program p normalizes rows [p*RPP, (p+1)*RPP), loads pipelined. A row's statistics are two
    passes over it in registers (shift by its first element, mean, then the sum of squared
    deviations: never E[x^2] - E[x]^2); the same five statistics rows as ``_fwd_kernel``.
    Reference twin: ``reference.BACKEND.normalize`` on the (rows, C) view with G = 1."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    w, b, _, _ = _channel_vectors(W, B, W, W, cols, cm, 0.0, HAS_W, HAS_B, False, BLOCK_C)
    r_lo, r_hi, base = _rows_range(pid, RPP, R, sn)
    for r in tl.range(r_lo, r_hi, num_stages=NUM_STAGES):
        x = tl.load(X + base + cols, mask=cm, other=0.0).to(tl.float32)
        if CENTER:  # shifted data (the row's first element), as the general kernels
            shift = tl.load(X + base).to(tl.float32)
            xs = tl.where(cm, x - shift, 0.0)
            smean = tl.sum(xs, axis=0) / C
            d = tl.where(cm, xs - smean, 0.0)
        else:
            shift = 0.0
            smean = 0.0
            d = x
        var = tl.sum(d * d, axis=0) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        y = _act_fwd(d * rstd * w + b, ACT)
        tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=cm)
        tl.store(STATS + r, smean + shift)
        tl.store(STATS + R + r, rstd)
        tl.store(STATS + 2 * R + r, var)
        tl.store(STATS + 3 * R + r, smean)
        tl.store(STATS + 4 * R + r, 0.0)
        base += sn


@triton.jit
def _rows_bwd_kernel(
    X,  # (R, C) the forward's input, row stride sn, contiguous rows
    DY,  # (R, C) like X
    DX,  # (R, C) like X
    W,  # (C,) weight, or a dummy when not HAS_W
    B,  # (C,) bias, or a dummy when not HAS_B
    MEAN,  # (R,) float32 shifted mean (the forward's STATS[3])
    RSTD,  # (R,) float32 1/sqrt(var + eps)
    PDW,  # (programs, C) float32 dweight partial of each program's rows, or a dummy
    PDB,  # (programs, C) float32 dbias partial of each program's rows, or a dummy
    R, C, RPP, sn, inv_m,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, CENTER: tl.constexpr,
    BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Backward of LayerNorm / RMSNorm over the features of a 2-D (rows, C) input, the
    transformer case: one statistic per row, a whole row in one tile (C <= BLOCK_C). grid =
    (programs,): program p takes rows [p*RPP, (p+1)*RPP), one after another (loads pipelined),
    and keeps dbias/dweight in per-lane registers across its rows; it writes one partial row.
    So the partials are (programs, C) floats, not (R, C) (as large as the activation, in
    float32), and ``_sum_rows_kernel`` sums a few hundred rows instead of R. Reference twin:
    autograd through ``reference.BACKEND.normalize`` on the (rows, C) view with G = 1."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    w, b, _, _ = _channel_vectors(W, B, W, W, cols, cm, 0.0, HAS_W, HAS_B, False, BLOCK_C)
    acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    r_lo, r_hi, base = _rows_range(pid, RPP, R, sn)
    for r in tl.range(r_lo, r_hi, num_stages=NUM_STAGES):
        x = tl.load(X + base + cols, mask=cm, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=cm, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        if CENTER:  # the forward's shift (the row's first element) and shifted mean
            xhat = ((x - tl.load(X + base).to(tl.float32)) - tl.load(MEAN + r)) * rstd
        else:
            xhat = x * rstd
        dz = tl.where(cm, _act_bwd(xhat * w + b, dy, ACT), 0.0)
        acc_db += dz
        acc_dw += dz * xhat
        dzw = dz * w
        b_sum = tl.sum(dzw * xhat, axis=0)
        if CENTER:
            a_sum = tl.sum(dzw, axis=0)
        else:
            a_sum = 0.0  # d(mean)/dx = 0: no A term
        dx = rstd * (dzw - (a_sum + xhat * b_sum) * inv_m)
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=cm)
        base += sn
    if HAS_W:
        tl.store(PDW + pid.to(tl.int64) * C + cols, acc_dw, mask=cm)
    if HAS_B:
        tl.store(PDB + pid.to(tl.int64) * C + cols, acc_db, mask=cm)


@triton.jit
def _sum_rows_kernel(
    PDW,  # (ROWS, C) float32 partial rows, or a dummy when not HAS_W
    PDB,  # (ROWS, C) float32 partial rows, or a dummy when not HAS_B
    DW,  # (C,) dweight in the weight's dtype, or a dummy when not HAS_W
    DB,  # (C,) dbias in the bias's dtype, or a dummy when not HAS_B
    ROWS, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """DW[c] = sum_r PDW[r, c] (DB likewise) for BLOCK channels per program: [BLOCK_R, BLOCK]
    tiles added lane by lane, then one reduction over the tile's rows: few round trips for a
    few hundred rows, and a fixed order (deterministic)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < C
    acc_w = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < ROWS)[:, None] & cm[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        if HAS_W:
            acc_w += tl.load(PDW + offs, mask=m, other=0.0)
        if HAS_B:
            acc_b += tl.load(PDB + offs, mask=m, other=0.0)
    if HAS_W:
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=cm)
    if HAS_B:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=cm)


# ============================================================================================
# launch planning (pure Python: shapes, strides, block sizes, split factor)
# ============================================================================================


@dataclass(frozen=True)
class LaunchPlan:
    """How one call maps onto the kernels (all derived from shapes and strides only)."""

    n: int
    c: int
    s: int  # prod(spatial)
    g: int  # groups (1 for per-channel given statistics)
    cg: int  # channels per group
    over_batch: bool
    strides: Tuple[int, int, int]  # (sn, sc, ss) in elements
    num_stats: int  # K: G if over_batch else N*G
    count: int  # m: elements behind each statistic
    block_r: int
    block_c: int
    col_tiles: int  # CT: column tiles of one block of groups
    tiles_per_sample: int  # TPS
    row_tiles: int  # RT: row tiles of one statistic
    tiles_per_program: int  # TPP
    split: int  # programs per block of groups
    num_warps: int
    groups_per_block: int = 1  # GB: groups one program covers (> 1 only when channels are contiguous)
    num_blocks: int = 0  # programs along grid axis 0: blocks of GB groups (times N if not over the batch)
    num_stages: int = 1  # software-pipelining depth of the row-tile loops (tl.range)

    @property
    def gbp(self) -> int:
        """GB padded to a power of two (the length of the per-group vectors in the kernels)."""
        return _next_pow2(self.groups_per_block)

    @property
    def ident(self) -> bool:
        """A column is a group (Cg == 1, one tile of GB columns): no column -> group folding."""
        return self.cg == 1 and self.block_c == self.gbp and self.col_tiles == 1

    @property
    def groups_blocks(self) -> int:
        """NGB: blocks of GB groups per sample (or over the batch)."""
        return triton.cdiv(self.g, self.groups_per_block)

    @property
    def partial_rows(self) -> int:
        """Rows of the per-channel dw/db partial buffers."""
        return self.split if self.over_batch else self.n * self.split


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _prev_pow2(v: int) -> int:
    return 1 << max(0, int(v).bit_length() - 1)


_SM_COUNT: dict = {}


def _default_target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: programs run one after another, keep them few
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    # 4 programs of 8 warps per SM keep enough loads in flight for a streaming kernel (a guess
    # to be tuned on the GPU: benchmarks/NOTES.md)
    return 4 * _SM_COUNT[idx]


def kernel_strides(x: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
    """x in a layout the kernels read in place, and its (sn, sc, ss) element strides.

    NCHW-contiguous and channels_last(_3d) are used as they are. Any other strides (a slice, a
    permutation) are first made contiguous: one copy, documented here rather than a silent
    slow path in the kernels.
    """
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if x.is_contiguous():
        return x, (c * s, s, 1)
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return x, (s * c, 1, c)
    x = x.contiguous()
    return x, (c * s, s, 1)


def plan_launch(
    shape: Tuple[int, ...],
    strides: Tuple[int, int, int],
    num_groups: int,
    over_batch: bool,
    device: torch.device = torch.device("cpu"),
    elem_bytes: int = 4,
) -> LaunchPlan:
    """Block sizes and split factor for x of ``shape`` with kernel strides ``strides`` and
    ``elem_bytes`` bytes per element.

    Tiles are [BLOCK_R rows, BLOCK_C channels] of about ``block_elems`` elements; the channel
    extent is capped (64 when rows are contiguous, NCHW; 256 for channels_last; 1024 when there
    are no spatial positions) so that the contiguous axis gets the larger share.

    When the channels are the contiguous axis (channels_last, or a 2-D (N, C) input) and a
    group's row is narrower than a 128-byte line, one program covers a block of GB consecutive
    groups so that a tile row is GB*Cg contiguous channels instead of Cg (BN and IN: one element,
    a sixteenth of a 32-byte sector in bf16). Over the batch (BN) the block fills a line; per
    sample (GN, IN) it is narrowed, down to one sector, while there are too few blocks for the
    fused path, so that a larger block does not cost a split (an extra launch and read).

    The row tiles are split over ``split`` programs when there are fewer blocks than half the
    target (below that the GPU is not filled; above it a split costs more than it gains).
    """
    target = TUNING["target_programs"] or _default_target_programs(device)
    return _plan_cached(tuple(int(d) for d in shape), tuple(strides), num_groups, over_batch,
                        device.type == "cuda", target, TUNING["block_elems"],
                        TUNING["max_block_c"], int(elem_bytes),
                        bool(TUNING.get("group_blocks", True)), TUNING.get("num_stages"))


def _groups_per_block(g: int, cg: int, max_cols: int) -> int:
    """GB for the blocked path: as many groups as fit in ``max_cols`` channels, preferring a
    count that divides G (full blocks: the column count is a constant, no column masks)."""
    if cg == 1:  # GB is the tile width: a power of two
        cap = _prev_pow2(max_cols)
        if _next_pow2(g) <= cap:
            return _next_pow2(g)
        d = cap
        while d >= 8 and g % d:
            d //= 2
        return d if d >= 8 else cap
    most = max(1, min(g, max_cols // cg))
    best = max(d for d in range(1, most + 1) if g % d == 0)
    return best if 2 * best > most else most


@functools.lru_cache(maxsize=4096)
def _plan_cached(shape: Tuple[int, ...], strides: Tuple[int, int, int], num_groups: int,
                 over_batch: bool, on_gpu: bool, target: int, block_elems: Optional[int],
                 max_block_c: Optional[int], elem_bytes: int = 4,
                 group_blocks: bool = True, num_stages: Optional[int] = None) -> LaunchPlan:
    """plan_launch's arithmetic, memoised: eager calls repeat the same few shapes."""
    n, c = int(shape[0]), int(shape[1])
    s = math.prod(int(d) for d in shape[2:])
    g = num_groups
    cg = c // g
    k = g if over_batch else n * g
    count = cg * s * (n if over_batch else 1)
    elems = block_elems or (GPU_BLOCK_ELEMS if on_gpu else 1024)
    if max_block_c:
        cap_c = max_block_c
    elif s == 1:
        cap_c = 1024
    elif strides[2] == 1:
        cap_c = 64
    else:
        cap_c = 256
    gb = 1
    max_cols = min(cap_c, elems)
    # blocks from which one program per block keeps the GPU busy: 3/4 of the SMs (target is 4
    # programs per SM). N*G = 256 (GroupNorm(32) at batch 8; 128 blocks of 2 groups in
    # channels_last at Cg = 20) is above it on a 132-SM GPU: one launch per direction instead
    # of two, and no second read of x. With few programs per SM the loads in flight come from
    # the pipelining depth (3 stages), not from more programs
    fused_min = max(1, 3 * target // 16)
    if group_blocks and strides[1] == 1 and g > 1 and cg < max_cols and cg * elem_bytes < 128:
        # channels contiguous and a group narrower than a line: a block of groups per program
        want = max(1, min(max_cols, 128 // elem_bytes) // cg)  # groups in a 128-byte row
        if not over_batch:
            least = max(1, min(want, -(-64 // (cg * elem_bytes))))  # rows of >= 64 bytes
            while want > least and n * triton.cdiv(g, want) < fused_min:
                want = max(least, want // 2)
        if want > 1:
            gb = _groups_per_block(g, cg, want * cg)
    if gb > 1:
        block_c = _next_pow2(gb * cg)
        block_r = max(1, min(_next_pow2(s), elems // block_c))
    else:
        block_r = max(1, min(_next_pow2(s), elems // min(_next_pow2(cg), cap_c)))
        block_c = max(1, min(_next_pow2(cg), cap_c, max(1, elems // block_r)))
    col_tiles = triton.cdiv(gb * cg, block_c)
    tps = triton.cdiv(s, block_r)
    row_tiles = tps * (n if over_batch else 1)
    blocks = triton.cdiv(g, gb) * (1 if over_batch else n)
    split = 1 if blocks >= fused_min else min(row_tiles, triton.cdiv(target, blocks))
    tpp = triton.cdiv(row_tiles, split)
    split = triton.cdiv(row_tiles, tpp)  # no empty programs
    tile = block_r * block_c
    num_warps = max(1, min(8, tile // 256))
    # loads pipelined 3 deep (cp.async into shared memory: 3 tiles of one operand in flight per
    # program, ~24 KB per SM at 2 programs of bf16, what a DRAM latency at full bandwidth
    # needs) where a program has several row tiles; the interpreter ignores the depth
    stages = (num_stages or (GPU_NUM_STAGES if on_gpu else 1)) if tpp > 1 else 1
    return LaunchPlan(n, c, s, g, cg, over_batch, strides, k, count, block_r, block_c,
                      col_tiles, tps, row_tiles, tpp, split, num_warps, gb, blocks, stages)


def _poison(*tensors: Tensor) -> None:
    """Test hook: pre-fill buffers so that elements a kernel fails to write are caught."""
    value = TUNING["poison"]
    if value is not None:
        for t in tensors:
            t.fill_(value)


def _param(p: Optional[Tensor], like: Tensor) -> Tensor:
    """A contiguous parameter, or a 1-element dummy pointer when absent (never read)."""
    return like if p is None else p.contiguous()


# ============================================================================================
# launchers
# ============================================================================================


def _elementwise_split(p: LaunchPlan, device: torch.device) -> LaunchPlan:
    """For given statistics every tile is independent: one program per few row tiles."""
    return _elementwise_cached(p, 4 * (TUNING["target_programs"]
                                       or _default_target_programs(device)))


@functools.lru_cache(maxsize=1024)
def _elementwise_cached(p: LaunchPlan, target: int) -> LaunchPlan:
    tpp = triton.cdiv(p.row_tiles, min(p.row_tiles, target))
    split = triton.cdiv(p.row_tiles, tpp)
    return LaunchPlan(**{**p.__dict__, "tiles_per_program": tpp, "split": split})


@functools.lru_cache(maxsize=4096)
def _constexprs(p: LaunchPlan, has_w: bool, has_b: bool, activation: str, center: bool) -> dict:
    """The compile-time arguments and launch options of the kernels for one plan and flags,
    built once (eager calls repeat the same few shapes). Callers must not modify the dict."""
    return dict(
        OVER_BATCH=p.over_batch, HAS_W=has_w, HAS_B=has_b, ACT=ACT_CODES[activation],
        SPLIT_BLOCK=_next_pow2(p.split), BLOCK_R=p.block_r, BLOCK_C=p.block_c,
        GB=p.groups_per_block, GBP=p.gbp, IDENT=p.ident, EVEN=p.g % p.groups_per_block == 0,
        CENTER=center, NUM_STAGES=p.num_stages, num_warps=p.num_warps,
    )


def _on_device(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device): a guard only when they
    differ, since entering one costs a few microseconds."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _launch_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
    over_batch: bool, eps: float, activation: str, center: bool = True,
) -> Tuple[Tensor, Tensor]:
    """y and the float32 statistics ``(5, *stat shape)``: mean, rstd, biased var, the
    shifted mean (mean of x minus the statistic's first element) that the backward takes in
    place of the mean, and zeros (the backward's arrival counters). Without ``center`` the
    mean rows are 0 and var is the mean of x^2."""
    x, strides = kernel_strides(x)
    p = plan_launch(tuple(x.shape), strides, num_groups, over_batch, x.device, x.element_size())
    y = torch.empty_like(x)
    stats = torch.empty((5,) + _stat_shape(x, num_groups, over_batch), device=x.device,
                        dtype=torch.float32)
    if _rows_path(p):  # LayerNorm / RMSNorm over (rows, C): several rows per program
        _poison(y, stats)
        rpp, programs, block_c, stages, warps = _rows_plan(p, x.device)
        with _on_device(x):
            wrap_triton(_rows_fwd_kernel)[(programs,)](
                x, y, _param(weight, stats), _param(bias, stats), stats, p.n, p.c, rpp,
                p.strides[0], eps, HAS_W=weight is not None, HAS_B=bias is not None,
                ACT=ACT_CODES[activation], CENTER=center, BLOCK_C=block_c, NUM_STAGES=stages,
                num_warps=warps,
            )
        return y, stats
    part = (torch.empty((p.num_stats * p.split * 3,), device=x.device, dtype=torch.float32)
            if p.split > 1 else stats)
    _poison(y, stats, part)
    meta = _constexprs(p, weight is not None, bias is not None, activation, center)
    args = (x, y, _param(weight, stats), _param(bias, stats), stats, stats, stats, part, p.s,
            p.cg, p.g, p.groups_blocks, p.num_stats, p.col_tiles, p.tiles_per_sample,
            p.row_tiles, p.tiles_per_program, *p.strides, eps)
    grid = (p.num_blocks, p.split)
    with _on_device(x):
        if p.split == 1:
            wrap_triton(_fwd_kernel)[grid](*args, STAGE=0, **meta)
        else:
            wrap_triton(_fwd_kernel)[grid](*args, STAGE=1, **meta)
            wrap_triton(_fwd_kernel)[grid](*args, STAGE=2, **meta)
    return y, stats


def _launch_fixed(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, activation: str,
) -> Tensor:
    x, strides = kernel_strides(x)
    # all channels form one "group" over the batch; statistics are per channel (PER_CHANNEL)
    p = _elementwise_split(plan_launch(tuple(x.shape), strides, 1, True, x.device,
                                       x.element_size()), x.device)
    y = torch.empty_like(x)
    _poison(y)
    mean, var = mean.contiguous(), var.contiguous()
    meta = _constexprs(p, weight is not None, bias is not None, activation, True)
    with _on_device(x):
        wrap_triton(_fwd_kernel)[(1, p.split)](
            x, y, _param(weight, mean), _param(bias, mean), mean, mean, var, mean, p.s, p.cg,
            p.g, 1, p.num_stats, p.col_tiles, p.tiles_per_sample, p.row_tiles,
            p.tiles_per_program, *p.strides, eps, STAGE=3, **meta)
    return y


def _scratch(sizes: Tuple[int, ...], device: torch.device) -> Tuple[Tensor, ...]:
    """One float32 allocation cut into buffers of ``sizes`` elements, each starting on a
    16-byte boundary (the kernels' pointers stay 16-byte aligned: vector stores)."""
    padded = [-(-n // 4) * 4 for n in sizes]
    flat = torch.empty((sum(padded),), device=device, dtype=torch.float32)
    out, at = [], 0
    for n, size in zip(sizes, padded):
        out.append(flat[at:at + n])
        at += size
    return tuple(out)


def _fold_mode(p: LaunchPlan, stage: int, has_w: bool, has_b: bool, counters: bool) -> int:
    """How a one-kernel backward (STAGE 0 or 3) turns its dw/db rows into dw/db: 1 when there
    is one row (the program's own sums are the whole: stored directly), 2 when the last program
    of each block sums the rows (``_fold_rows``; STAGE 0 with the forward's zeroed counters, and
    only when switched on), else 0 (a second launch, ``_reduce_rows_kernel``)."""
    if not (has_w or has_b):
        return 0
    if p.partial_rows == 1:
        return 1
    on = TUNING["fold_rows"] if TUNING["fold_rows"] is not None else FOLD_ROWS
    return 2 if on and stage == 0 and counters else 0


# the widest row the rows backward takes in one tile (elements): wider rows keep the general
# path (scripts/triton_aot_check.py: no spills up to here at 8 warps)
ROWS_MAX_C = 4096


def _rows_path(p: LaunchPlan) -> bool:
    """LayerNorm / RMSNorm over the features of (rows, C) (one statistic per row, no spatial
    positions) with the row in one tile: the rows backward (``_rows_bwd_kernel``)."""
    widest = TUNING["rows_max_c"] if TUNING["rows_max_c"] is not None else ROWS_MAX_C
    return p.s == 1 and p.g == 1 and not p.over_batch and p.n > 1 and p.c <= widest


def _rows_plan(p: LaunchPlan, device: torch.device) -> Tuple[int, int, int, int, int]:
    """(rows per program, programs, BLOCK_C, pipelining stages, warps) of the rows kernels:
    about 2 programs per SM (a few hundred on a GPU), each taking a contiguous range of rows."""
    target = TUNING["target_programs"] or _default_target_programs(device)
    rpp = triton.cdiv(p.n, min(p.n, max(1, target // 2)))
    block_c = _next_pow2(p.c)
    stages = (TUNING["num_stages"] or (GPU_NUM_STAGES if device.type == "cuda" else 1)
              if rpp > 1 else 1)
    return rpp, triton.cdiv(p.n, rpp), block_c, stages, max(1, min(8, block_c // 256))


def _launch_rows_bwd(
    p: LaunchPlan, dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    mean: Tensor, rstd: Tensor, activation: str, center: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias of ``_rows_path`` calls: a few rows per program (dbias/dweight kept
    per program, not per row), then the partial rows summed by ``_sum_rows_kernel``."""
    dev = x.device
    has_w, has_b = weight is not None, bias is not None
    rpp, programs, block_c, stages, warps = _rows_plan(p, dev)
    dx = torch.empty_like(x)
    pdw, pdb = _scratch((programs * p.c if has_w else 1, programs * p.c if has_b else 1), dev)
    dw = torch.empty((p.c,) if has_w else (0,), device=dev,
                     dtype=weight.dtype if has_w else x.dtype)
    db = torch.empty((p.c,) if has_b else (0,), device=dev,
                     dtype=bias.dtype if has_b else x.dtype)
    _poison(dx, pdw, pdb, dw, db)
    with _on_device(x):
        wrap_triton(_rows_bwd_kernel)[(programs,)](
            x, dy, dx, _param(weight, rstd), _param(bias, rstd), mean.contiguous(),
            rstd.contiguous(), pdw, pdb, p.n, p.c, rpp, p.strides[0], 1.0 / p.c,
            HAS_W=has_w, HAS_B=has_b, ACT=ACT_CODES[activation], CENTER=center,
            BLOCK_C=block_c, NUM_STAGES=stages, num_warps=warps,
        )
        if has_w or has_b:
            block = min(64, block_c)
            wrap_triton(_sum_rows_kernel)[(triton.cdiv(p.c, block),)](
                pdw, pdb, dw if has_w else pdw, db if has_b else pdb, programs, p.c,
                HAS_W=has_w, HAS_B=has_b, BLOCK_R=32, BLOCK=block,
            )
    return dx, dw, db


def _launch_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
    rstd: Tensor, var: Optional[Tensor], num_groups: int, over_batch: bool, eps: float,
    activation: str, center: bool = True, counters: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias. ``mean`` is the forward's shifted mean (row 3 of ``_launch_fwd``'s
    statistics); ``var`` given (and ``mean`` per channel, not shifted) means fixed statistics.
    ``counters`` is the forward's zeroed row 4 (the arrival counters of ``_fold_rows``)."""
    fixed = var is not None
    x, strides = kernel_strides(x)
    fmt = torch.contiguous_format if strides[2] == 1 or x.dim() < 4 else (
        torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    dy = dy.contiguous(memory_format=fmt)  # no-op when autograd hands dy in x's layout
    p = plan_launch(tuple(x.shape), strides, 1 if fixed else num_groups, fixed or over_batch,
                    x.device, x.element_size())
    if fixed:
        p = _elementwise_split(p, x.device)
    elif _rows_path(p):
        return _launch_rows_bwd(p, dy, x, weight, bias, mean, rstd, activation, center)
    dx = torch.empty_like(x)
    dev = x.device
    has_w, has_b = weight is not None, bias is not None
    split = p.split > 1 and not fixed  # its second kernel sums the dw/db rows itself
    fold = 0 if split else _fold_mode(p, 3 if fixed else 0, has_w, has_b, counters is not None)
    rows = p.partial_rows
    part = rows * p.c if fold != 1 else 1  # fold 1: no rows, the program stores dw/db itself
    pdw, pdb, ab = _scratch((part if has_w else 1, part if has_b else 1,
                             p.num_stats * p.split * 2 if split else 1), dev)
    _poison(dx, pdw, pdb, ab)
    mean = mean.contiguous()
    rstd = rstd.contiguous()
    var_t = var.contiguous() if fixed else rstd
    meta = _constexprs(p, has_w, has_b, activation, center)
    dw = torch.empty((p.c,) if has_w else (0,), device=dev,
                     dtype=weight.dtype if has_w else x.dtype)
    db = torch.empty((p.c,) if has_b else (0,), device=dev,
                     dtype=bias.dtype if has_b else x.dtype)
    _poison(dw, db)
    args = (x, dy, dx, _param(weight, mean), _param(bias, mean), mean, rstd, var_t, ab, pdw,
            pdb, dw if has_w else pdw, db if has_b else pdb,
            counters if fold == 2 else mean, p.s, p.cg, p.g, p.groups_blocks,
            p.c, p.col_tiles, p.tiles_per_sample, p.row_tiles, p.tiles_per_program, *p.strides,
            eps, 1.0 / p.count, rows)
    grid = (p.num_blocks, p.split)
    with _on_device(x):
        if fixed:
            wrap_triton(_bwd_kernel)[grid](*args, STAGE=3, FOLD=fold, **meta)
        elif not split:
            wrap_triton(_bwd_kernel)[grid](*args, STAGE=0, FOLD=fold, **meta)
        else:
            wrap_triton(_bwd_kernel)[grid](*args, STAGE=1, FOLD=0, **meta)
            wrap_triton(_bwd_kernel)[grid](*args, STAGE=2, FOLD=0, **meta)
        if (has_w or has_b) and not split and fold == 0:
            block = min(256, _next_pow2(p.c))
            wrap_triton(_reduce_rows_kernel)[(triton.cdiv(p.c, block),)](
                pdw, pdb, dw if has_w else pdw, db if has_b else pdb, rows, p.c,
                HAS_W=has_w, HAS_B=has_b, BLOCK=block,
            )
    return dx, dw, db


# ============================================================================================
# torch.library custom ops: eager impl, fake impl, autograd
# ============================================================================================
# Each op's body is a plain function that the eager twins below call too (one path).


def _stat_shape(x: Tensor, num_groups: int, over_batch: bool) -> Tuple[int, ...]:
    return (num_groups,) if over_batch else (x.shape[0], num_groups)


def _norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
    over_batch: bool, eps: float, activation: str, center: bool,
) -> Tuple[Tensor, Tensor]:
    """(y, statistics): float32 statistics of shape (5, G) or (5, N, G), rows mean, rstd,
    biased var, shifted mean, and zeros that the backward uses as arrival counters (and leaves
    zero). The shifted mean (of x minus the statistic's first element) is
    what :func:`triton_norm_bwd` takes: it keeps the digits that the rounded mean loses when
    |mean| >> std. Without ``center`` the statistics are about 0 (RMS: mean rows 0)."""
    return _launch_fwd(x, weight, bias, num_groups, over_batch, eps, activation, center)


def _norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stats: Tensor,
    num_groups: int, over_batch: bool, activation: str, center: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) given the forward's statistics; dweight/dbias are empty (0,)
    tensors when weight/bias is None."""
    return _launch_bwd(dy, x, weight, bias, stats[3], stats[1], None, num_groups, over_batch,
                       0.0, activation, center, stats[4])


def _norm_fixed(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, activation: str,
) -> Tensor:
    """act(w_c * (x - mean_c) / sqrt(var_c + eps) + b_c) with given per-channel statistics."""
    return _launch_fixed(x, mean, var, weight, bias, eps, activation)


def _norm_fixed_bwd(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, activation: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of :func:`triton_norm_fixed` (the statistics are constants)."""
    return _launch_bwd(dy, x, weight, bias, mean, mean, var, 1, True, eps, activation)


# triton_op registers its body as the fake impl too; the register_fake calls below replace it
# with the shape-only fakes, the same for both registrations
def _register(name: str, fn, mutates_args: tuple):
    """``torch.library.triton_op`` (TRITON_OP) or ``custom_op``, given ``fn`` with its annotations
    resolved: torch < 2.5 infers the schema from ``__annotations__`` without evaluating the
    strings ``from __future__ import annotations`` leaves there."""
    fn.__annotations__ = typing.get_type_hints(fn)
    op = torch.library.triton_op if TRITON_OP else torch.library.custom_op
    return op(name, fn, mutates_args=mutates_args)


triton_norm_fwd = _register("normlab::triton_norm_fwd", _norm_fwd, mutates_args=())
triton_norm_bwd = _register("normlab::triton_norm_bwd", _norm_bwd, mutates_args=())
triton_norm_fixed = _register("normlab::triton_norm_fixed", _norm_fixed, mutates_args=())
triton_norm_fixed_bwd = _register("normlab::triton_norm_fixed_bwd", _norm_fixed_bwd,
                                  mutates_args=())


@triton_norm_fwd.register_fake
def _(x, weight, bias, num_groups, over_batch, eps, activation, center):
    xk, _ = kernel_strides(x)
    stats = x.new_empty((5,) + _stat_shape(x, num_groups, over_batch), dtype=torch.float32)
    return torch.empty_like(xk), stats


def _grad_fakes(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    xk, _ = kernel_strides(x)
    c = x.shape[1]
    dw = x.new_empty((c,) if weight is not None else (0,),
                     dtype=weight.dtype if weight is not None else x.dtype)
    db = x.new_empty((c,) if bias is not None else (0,),
                     dtype=bias.dtype if bias is not None else x.dtype)
    return torch.empty_like(xk), dw, db


@triton_norm_bwd.register_fake
def _(dy, x, weight, bias, stats, num_groups, over_batch, activation, center):
    return _grad_fakes(x, weight, bias)


@triton_norm_fixed.register_fake
def _(x, mean, var, weight, bias, eps, activation):
    return torch.empty_like(kernel_strides(x)[0])


@triton_norm_fixed_bwd.register_fake
def _(dy, x, mean, var, weight, bias, eps, activation):
    return _grad_fakes(x, weight, bias)


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, over_batch, eps, activation, center = inputs
    y, stats = output
    ctx.save_for_backward(x, weight, bias, stats)
    ctx.cfg = (num_groups, over_batch, activation, center)
    ctx.mark_non_differentiable(stats)


def _fwd_backward(ctx, dy, dstats, bwd=None):
    x, weight, bias, stats = ctx.saved_tensors
    dx, dw, db = (bwd or triton_norm_bwd)(dy, x, weight, bias, stats, *ctx.cfg)
    return (dx, dw if weight is not None else None, db if bias is not None else None,
            None, None, None, None, None)


triton_norm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _fixed_setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, eps, activation = inputs
    ctx.save_for_backward(x, mean, var, weight, bias)
    ctx.cfg = (eps, activation)


def _fixed_backward(ctx, dy, bwd=None):
    x, mean, var, weight, bias = ctx.saved_tensors
    dx, dw, db = (bwd or triton_norm_fixed_bwd)(dy, x, mean, var, weight, bias, *ctx.cfg)
    return (dx, None, None, dw if weight is not None else None,
            db if bias is not None else None, None, None)


triton_norm_fixed.register_autograd(_fixed_backward, setup_context=_fixed_setup_context)


# --------------------------------------------------------------------------------------------
# eager twins of the custom ops
# --------------------------------------------------------------------------------------------
# torch.library's custom-op dispatch costs ~20 us of CPU per call in eager mode (measured on
# the 2-core development CPU: 26 us against 6 us for an autograd.Function), which a small
# layer's launch-bound eager step feels twice (forward and backward). Eager calls on plain
# tensors therefore go through these autograd.Functions, which run the ops' own bodies with
# the same saved tensors and backward formulas; under torch.compile, and for tensor subclasses
# (fake tensors of export or make_fx), the custom ops are used: tracing needs their fake
# implementations. The backward kernels have no derivative (the backward custom ops have no
# autograd formula, so torch raises when a double backward reaches them under torch.compile);
# when the backward itself is recorded (create_graph=True: a gradient penalty) the twins take
# the gradients of the reference formula instead, whose backward is differentiable (a plain
# launch would return gradients detached from the graph: the second-order terms would
# silently vanish).


def _act(code: str) -> Optional[str]:
    """The ops' activation argument ("none" for none) as the backends take it."""
    return None if code == "none" else code


def _batched(dy: Tensor) -> bool:
    """Whether the backward runs under ``torch.autograd.grad(..., is_grads_batched=True)`` (its
    vmap batches dy), where the kernels cannot read the batched tensor."""
    return torch._C._functorch.is_legacy_batchedtensor(dy)


def _recorded_grads(forward, dy: Tensor, inputs: tuple) -> tuple:
    """The gradients of ``forward()`` (the reference backend's formula for what a kernel
    computed) for the tensors of ``inputs`` that require grad (None for the others): the twins'
    backward where the kernels cannot serve. Under ``create_graph=True`` (a gradient penalty)
    the backward is itself differentiated, which the backward kernels are not: it is recorded
    here. Under ``torch.autograd.grad(..., is_grads_batched=True)`` dy is a batched tensor the
    kernels cannot read. Slower than the kernels; only then."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    record = torch.is_grad_enabled()
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(forward(), wanted, dy, create_graph=record,
                                         allow_unused=True)) if wanted else iter(())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


class _EagerNorm(torch.autograd.Function):
    """The last input, ``running``: None, or ``(running_mean, running_var, count, momentum)`` to
    update from the batch statistics inside forward, before autograd packs the saved tensors:
    a non-reentrant checkpoint recomputes up to the last of them, so BN's buffers move again
    there, as torch's BatchNorm's do."""

    @staticmethod
    def forward(ctx, *inputs):
        *inputs, running = inputs
        with _direct_launches():
            out = _norm_fwd(*inputs)
        if running is not None:
            stats = out[1]
            update_running_stats(running[0], running[1], stats[0], stats[2], *running[2:])
        _fwd_setup_context(ctx, inputs, out)
        ctx.eps = inputs[5]
        return out

    @staticmethod
    def backward(ctx, dy, dstats):
        if torch.is_grad_enabled() or _batched(dy):  # see _recorded_grads
            x, weight, bias, _ = ctx.saved_tensors
            num_groups, over_batch, activation, center = ctx.cfg
            return _recorded_grads(
                lambda: _REFERENCE.normalize(x, num_groups, over_batch, weight, bias, ctx.eps,
                                             _act(activation), center=center)[0],
                dy, (x, weight, bias)) + (None,) * 6
        with _direct_launches():
            return _fwd_backward(ctx, dy, dstats, bwd=_norm_bwd) + (None,)


class _EagerFixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        with _direct_launches():
            y = _norm_fixed(*inputs)
        _fixed_setup_context(ctx, inputs, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled() or _batched(dy):  # see _recorded_grads
            x, mean, var, weight, bias = ctx.saved_tensors
            eps, activation = ctx.cfg
            dx, dw, db = _recorded_grads(
                lambda: _REFERENCE.normalize_fixed(x, mean, var, weight, bias, eps,
                                                   _act(activation)),
                dy, (x, weight, bias))
            return dx, None, None, dw, db, None, None
        with _direct_launches():
            return _fixed_backward(ctx, dy, bwd=_norm_fixed_bwd)


_PEEK_FUNCTORCH = torch._C._functorch.peek_interpreter_stack
_FORWARD_AD = torch.autograd.forward_ad


def _transform_reason() -> Optional[str]:
    """Why a call cannot run here under a torch.func transform (vmap, grad, jvp, ...; whichever
    tensors it wraps: grad of the parameters leaves x plain) or inside a forward-mode AD
    ``dual_level``, else None. Neither the eager twins (autograd.Functions without
    setup_context or jvp, which functorch and forward AD refuse) nor the custom ops (no vmap or
    jvp rules) run there, so ``auto`` takes another backend and a named ``triton`` raises. Not
    asked inside torch.compile: TorchDynamo cannot trace the question."""
    if torch.compiler.is_compiling():
        return None
    if _PEEK_FUNCTORCH() is not None:
        return "torch.func transforms (vmap, grad, jvp, ...) are not supported"
    if getattr(_FORWARD_AD, "_current_level", -1) >= 0:
        return "forward-mode AD (inside torch.autograd.forward_ad.dual_level) is not supported"
    return None


def _eager(x: Tensor) -> bool:
    """Plain tensors outside a torch.compile trace take the eager twins."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


# ============================================================================================
# the backend object
# ============================================================================================


class TritonBackend:
    """The ``"triton"`` backend (see :mod:`normlab.backends`).

    Example (needs a CUDA GPU)::

        >>> import torch, normlab
        >>> with normlab.use_backend("triton"):  # doctest: +SKIP
        ...     y = normlab.nn.GroupNorm(32, 256).cuda()(torch.randn(8, 256, 32, 32, device="cuda"))
    """

    name = "triton"

    def available(self) -> bool:
        return torch.cuda.is_available() or triton_interpreting()

    def unsupported_reason(
        self, x: Tensor, num_groups: int, over_batch: bool, activation: Optional[str]
    ) -> Optional[str]:
        if x.device.type == "cpu":
            if not triton_interpreting():
                return "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1)"
            if not KERNELS_INTERPRETED:
                return ("CPU tensors run only in Triton's interpreter, and TRITON_INTERPRET=1 "
                        "was set after normlab.backends.triton_norm was imported (its kernels "
                        "are built for the GPU): set it before the first import")
        elif x.device.type != "cuda":
            return f"device {x.device} is not supported (CUDA only)"
        if x.dtype not in _SUPPORTED_DTYPES:
            return f"dtype {x.dtype} is not supported (float16, bfloat16, float32 only)"
        if not 2 <= x.dim() <= 5:
            return f"{x.dim()}-D input is not supported (2 to 5 dims)"
        if x.numel() == 0:
            return "empty input"
        per_sample = x.numel() // max(x.shape[0], 1)
        if per_sample >= 2**31:  # the kernels' in-sample offsets are int32
            return f"{per_sample} elements per sample (at most 2**31 - 1)"
        if activation is not None and activation not in ACT_CODES:
            return f"activation {activation!r} is not supported"
        return _transform_reason()

    def normalize(
        self,
        x: Tensor,
        num_groups: int,
        over_batch: bool,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        activation: Optional[str],
        running_mean: Optional[Tensor] = None,
        running_var: Optional[Tensor] = None,
        momentum: float = 0.1,
        *,
        center: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """``center=False``: statistics about 0 (RMSNorm: rstd = 1/sqrt(mean(x^2) + eps),
        y = x * rstd * w (+ b)); the mean returned is zeros and the running variance, if
        given, receives the mean of x^2."""
        xk, _ = kernel_strides(x)  # exotic strides -> one contiguous copy (autograd sees it)
        inputs = (xk, weight, bias, num_groups, over_batch, float(eps), activation or "none",
                  bool(center))
        running = None
        if running_mean is not None or running_var is not None:
            n, c = x.shape[0], x.shape[1]
            count = (c // num_groups) * math.prod(x.shape[2:]) * (n if over_batch else 1)
            running = (running_mean, running_var, count, momentum)
        # BN's update inside the eager op (see _EagerNorm); InstanceNorm's after it, once under
        # a checkpoint's recompute, as torch's; under a trace after the op, which has no
        # mutable arguments
        eager = _eager(xk)
        inside = eager and over_batch and running is not None
        if eager:
            y, stats = _EagerNorm.apply(*inputs, running if inside else None)
        else:
            y, stats = triton_norm_fwd(*inputs)
        mean, rstd, var = stats[0], stats[1], stats[2]
        if running is not None and not inside:
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return y, mean, rstd

    def normalize_fixed(
        self,
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        activation: Optional[str],
    ) -> Tensor:
        if (mean.requires_grad or var.requires_grad) and torch.is_grad_enabled():
            # the kernels do not differentiate the given statistics (detached below, their
            # gradients were silently None): the written-out formula does, as in native
            return _REFERENCE.normalize_fixed(x, mean, var, weight, bias, eps, activation)
        xk, _ = kernel_strides(x)
        op = _EagerFixed.apply if _eager(xk) else triton_norm_fixed
        return op(xk, mean.detach(), var.detach(), weight, bias, float(eps), activation or "none")


BACKEND = TritonBackend()
