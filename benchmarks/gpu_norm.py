"""GPU benchmark of GroupNorm-family kernels against the memory-bandwidth floor (issue 3).

Wu & He, "Group Normalization" (ECCV 2018) is the operator; the question here is only speed.
For every shape (REFERENCE section 6 plus N = 1..32, SD-UNet and ResNet-50 activations), layout
(NCHW, channels_last), dtype (bf16, fp32) and mode (forward, forward+backward), each
implementation is timed eagerly and as a CUDA-graph replay:

* ``torch``          F.group_norm (eager ATen)
* ``torch_compile``  torch.compile(F.group_norm)
* ``liger``          Liger-Kernel's GroupNorm, if importable
* ``normlab``        normlab.functional.group_norm(..., backend="triton")
* ``normlab_noblock`` the same with one group per program in every layout (the v1 plan; A/B
  for the blocked channels_last path, benchmarks/NOTES.md v2)
* ``normlab_fold``   the same with the one-launch backward (``$NORMLAB_TRITON_FOLD``: the last
  program of each block sums the dw/db rows; A/B for benchmarks/NOTES.md "One-launch backward")
* ``torch_bn``       F.batch_norm in training mode (the cost GN should match)
* ``torch_ln``       F.layer_norm over (C, 1, 1), for the LayerNorm cases only (torch's LN
  kernel; ``torch`` there is its GroupNorm with G = 1)
* ``normlab_bn``     normlab's BatchNorm on the Triton backend (checked against torch_bn)

Floor model (minimal bytes / measured copy bandwidth): forward reads x and writes y (2 passes
over the activation), forward+backward adds reading dy and x and writing dx (5 passes).
Parameters and statistics are ignored (< 0.1% of the bytes for every shape here). The copy
bandwidth is measured on the device (a 1 GiB device-to-device copy, bytes read + written).

Inputs that fit in L2 are rotated over several buffers (>= 4x the L2 size in all) so that the
numbers measure DRAM, not the cache; the time reported is per call. Timing is triton's do_bench
(CUDA events, median, L2 flushed before each repetition); torch.compile and Triton compile in
the accuracy check that precedes the timings; torch.compile compiles once with dynamic shapes
(``--compile per-case``: a static compile per case from an empty dynamo cache). Weight and bias are in the input's
dtype (``--param-dtype fp32`` for float32): torch's CUDA GroupNorm rejects mixed dtypes.

Every row records the relative error against float64 (max over y, dx, dweight, dbias) and
``accurate`` (under REL_TOL). A failing impl or case gets ``status`` "error: ..." (Liger:
"n/a: ...", a limit of its kernel) and the run goes on; ``--time-budget`` starts no case after
that many seconds. ``--dry-run`` rehearses all of it on the CPU (tiny cases, Triton
interpreter, wall clock, torch.compile with the "eager" backend) and exits 1 if a non-optional
impl is wrong: tests/test_benchmarks.py runs it in CI.

Usage (on a CUDA machine)::

    python benchmarks/gpu_norm.py                    # the REFERENCE section 6 set
    python benchmarks/gpu_norm.py --set full         # + N sweep, SD-UNet, ResNet-50 shapes
    python benchmarks/gpu_norm.py --impls torch normlab --modes fwd --no-graph
    TRITON_INTERPRET=1 python benchmarks/gpu_norm.py --dry-run --out /tmp/x   # no GPU

Writes ``benchmarks/results/gpu_norm_<device>_<time>.csv`` and ``.json`` (or ``--out DIR``).
Without CUDA it prints why and exits with status 2; ``--list`` prints the shape table and the
floor bytes without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PASSES = {"fwd": 2, "fwdbwd": 5}  # passes over the activation tensor in the floor model
ALL_IMPLS = ("torch", "torch_compile", "liger", "normlab", "normlab_noblock", "normlab_fold",
             "torch_bn", "normlab_bn", "torch_ln")


# --------------------------------------------------------------------------------------------
# shape tables and the byte-count floor (CPU-only, tested)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str  # "ref6" (REFERENCE section 6), "sd-unet", "resnet50", "n-sweep", "ln"
    n: int
    c: int
    h: int
    w: int
    groups: int
    layout: str  # "nchw" or "nhwc" (channels_last)
    dtype: str  # "bf16", "fp32", "fp16"

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w

    def floor_bytes(self, mode: str) -> int:
        """Fewest bytes the mode must move: PASSES[mode] passes over the activation."""
        return PASSES[mode] * self.numel * ELEM_BYTES[self.dtype]


# REFERENCE section 6: (dtype, shape, layout) measured on an H100 with torch 2.11
REF6 = [
    ("bf16", (2, 320, 64, 64), "nchw"), ("bf16", (2, 320, 64, 64), "nhwc"),
    ("bf16", (8, 320, 64, 64), "nchw"), ("bf16", (8, 320, 64, 64), "nhwc"),
    ("bf16", (8, 640, 32, 32), "nhwc"), ("bf16", (8, 1280, 16, 16), "nhwc"),
    ("bf16", (32, 256, 56, 56), "nchw"), ("bf16", (32, 256, 56, 56), "nhwc"),
    ("bf16", (2, 256, 56, 56), "nhwc"), ("bf16", (32, 2048, 7, 7), "nhwc"),
    ("fp32", (8, 320, 64, 64), "nchw"), ("fp32", (32, 256, 56, 56), "nchw"),
    ("fp32", (32, 256, 56, 56), "nhwc"),
]
# Stable Diffusion U-Net GroupNorm inputs (C, H, W) at 512x512 (latent 64x64), G = 32
SD_UNET = [(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8), (960, 32, 32)]
# ResNet-50 normalization inputs (C, H, W) at 224x224, G = 32
RESNET50 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
            (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
N_SWEEP = (1, 2, 4, 8, 16, 32)
# LayerNorm over the features of (rows, C), run as (rows, C, 1, 1) with G = 1 (the same
# statistics as F.layer_norm over C; normlab takes its rows kernels): (dtype, rows, C)
LN_ROWS = [
    ("bf16", 12608, 768),   # ViT-B/16 at batch 64: 197 tokens x 64 images, 768 features
    ("bf16", 8192, 4096),   # an LLM block: 8192 tokens, 4096 features (the widest rows kernel)
    ("fp32", 4096, 1024),   # float32, BERT-large width
]


CASE_SETS = ("ref6", "full", "ref6+ln")


def build_cases(which: str = "ref6", dtypes: Sequence[str] = ("bf16", "fp32"),
                layouts: Sequence[str] = ("nchw", "nhwc"), groups: int = 32) -> List[Case]:
    """The benchmark shape set. ``ref6``: REFERENCE section 6 exactly; ``full``: ref6 plus every
    SD-UNet and ResNet-50 shape at N in N_SWEEP for each dtype and layout; ``ref6+ln``: ref6,
    then the LayerNorm rows of LN_ROWS. Duplicates dropped."""
    if which not in CASE_SETS:
        raise ValueError(f"unknown case set {which!r}; expected one of {', '.join(CASE_SETS)}")
    cases: List[Case] = []
    for dt, (n, c, h, w), layout in REF6:
        if dt in dtypes and layout in layouts:
            cases.append(Case("ref6", n, c, h, w, groups, layout, dt))
    if which == "full":
        for family, table in (("sd-unet", SD_UNET), ("resnet50", RESNET50)):
            for (c, h, w) in table:
                for n in N_SWEEP:
                    for dt in dtypes:
                        for layout in layouts:
                            cases.append(Case(family, n, c, h, w, groups, layout, dt))
    if which == "ref6+ln":
        cases += [Case("ln", rows, c, 1, 1, 1, "nchw", dt) for dt, rows, c in LN_ROWS
                  if dt in dtypes]
    seen, unique = set(), []
    for case in cases:
        key = (case.shape, case.layout, case.dtype, case.groups)
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique


def floor_us(case: Case, mode: str, copy_gbps: float) -> float:
    """Floor time in microseconds at ``copy_gbps`` (GB/s, bytes read + written)."""
    return case.floor_bytes(mode) / (copy_gbps * 1e9) * 1e6


def rotation_count(tensor_bytes: int, l2_bytes: int, cap: int = 16) -> int:
    """Buffers to rotate over so that the working set is >= 4x L2 (1 for tensors already big)."""
    if tensor_bytes <= 0:
        raise ValueError(f"tensor_bytes must be positive, got {tensor_bytes}")
    return max(1, min(cap, math.ceil(4 * l2_bytes / tensor_bytes)))


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------

# relative error (vs float64, max over y, dx, dweight, dbias) under which a row counts as
# accurate: float32 arithmetic lands far under 1e-4; half inputs and outputs round at 2^-8
REL_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}

# impls compared against F.batch_norm (training) instead of F.group_norm
BN_IMPLS = ("torch_bn", "normlab_bn")
# the impls that run on the LayerNorm cases (family "ln"); torch_ln runs on nothing else
LN_IMPLS = ("torch", "torch_ln", "normlab")


def applies(name: str, case: Case) -> bool:
    """Whether impl ``name`` is timed on ``case``: the LayerNorm rows get LN_IMPLS only."""
    return name in LN_IMPLS if case.family == "ln" else name != "torch_ln"

# impls whose failures are recorded as "n/a" (a limit of a third-party kernel), not "error"
OPTIONAL_IMPLS = ("liger",)

ROW_FIELDS = (
    "family", "n", "c", "h", "w", "groups", "layout", "dtype", "param_dtype", "impl", "mode",
    "graph", "rotate", "time_us", "gbps", "floor_us", "frac_of_floor", "rel_err", "accurate",
    "status",
)


def _liger_group_norm() -> Tuple[Optional[Callable], str]:
    """(f(x, w, b, groups), "") or (None, why). Liger-Kernel 0.8's ``LigerGroupNormFunction``
    takes (X, weight, bias, num_channels, num_groups, eps); its ``ensure_contiguous`` copies a
    channels_last input to NCHW (timed: that is what Liger costs there) and its output is NCHW."""
    try:  # Liger-Kernel is optional (a pure-Python wheel carried to the device)
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"liger_kernel not importable: {type(e).__name__}: {e}"[:200]

    def liger(x, w, b, groups, eps=1e-5):
        return LigerGroupNormFunction.apply(x, w, b, x.shape[1], groups, eps)

    return liger, ""


class _Tuned:
    """normlab with one TUNING entry switched (``group_blocks=False``: one group per program in
    every layout, the v1 plan; ``fold_rows=True``: the one-launch backward), as a context: the
    launch plan is read from TUNING at every launch, the backward's too, so the switch must
    hold around the backward (and around a CUDA-graph capture), not only the forward call."""

    def __init__(self, tn, key: str, value):
        self.tn, self.key, self.value = tn, key, value
        self.saved: List[object] = []

    def __enter__(self):
        self.saved.append(self.tn.TUNING.get(self.key))
        self.tn.TUNING[self.key] = self.value

    def __exit__(self, *exc):
        self.tn.TUNING[self.key] = self.saved.pop()
        return False


# A/B variants of ``normlab``: impl name -> the TUNING entry it switches
_TUNED_IMPLS = {"normlab_noblock": ("group_blocks", False), "normlab_fold": ("fold_rows", True)}


def _compiled_group_norm(backend: str = "inductor", dynamic: bool = False) -> Callable:
    """A fresh torch.compile of F.group_norm (see ``run_benchmarks``: once with dynamic
    shapes, or once per case with static ones)."""
    return torch.compile(lambda x, w, b, g: F.group_norm(x, g, w, b, 1e-5), dynamic=dynamic,
                         backend=backend)


def _allow_recompiles(limit: int = 64) -> None:
    """Dynamo recompiles a function for every new layout or dtype and, past its limit (8),
    silently runs it eagerly: raise the limit (the config name changed across versions)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(limit, getattr(cfg, name)))


def make_impls(names: Iterable[str], compile_backend: str = "inductor",
               unavailable: Optional[Dict[str, str]] = None) -> Dict[str, Callable]:
    """name -> f(x, weight, bias, groups) for the implementations that exist here. An impl
    that cannot run at all (Liger not installed) is left out and its reason put in
    ``unavailable``. A callable with a ``context`` attribute must be called inside
    ``fn.context()`` for its forward and backward (``_impl_context``)."""
    import normlab.functional as NF

    impls: Dict[str, Callable] = {}
    for name in names:
        if name == "torch":
            impls[name] = lambda x, w, b, g: F.group_norm(x, g, w, b, 1e-5)
        elif name == "torch_compile":
            impls[name] = _compiled_group_norm(compile_backend)
        elif name == "liger":
            liger, why = _liger_group_norm()
            if liger is not None:
                impls[name] = lambda x, w, b, g, _f=liger: _f(x, w, b, g)
            elif unavailable is not None:
                unavailable[name] = why
        elif name == "normlab":
            impls[name] = lambda x, w, b, g: NF.group_norm(x, g, w, b, 1e-5, backend="triton")
        elif name in _TUNED_IMPLS:
            from normlab.backends import triton_norm as tn

            ctx = _Tuned(tn, *_TUNED_IMPLS[name])

            def tuned(x, w, b, g, _ctx=ctx):
                with _ctx:  # nested inside the benchmark's own context: restores, not sets
                    return NF.group_norm(x, g, w, b, 1e-5, backend="triton")

            tuned.context = lambda _ctx=ctx: _ctx
            impls[name] = tuned
        elif name == "normlab_bn":
            impls[name] = lambda x, w, b, g: NF.batch_norm(x, None, None, w, b, True, 0.1, 1e-5,
                                                           backend="triton")
        elif name == "torch_ln":
            impls[name] = lambda x, w, b, g: F.layer_norm(x, x.shape[1:], w.view(-1, 1, 1),
                                                          b.view(-1, 1, 1), 1e-5)
        elif name == "torch_bn":
            impls[name] = lambda x, w, b, g: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return impls


def _impl_context(fn: Callable):
    ctx = getattr(fn, "context", None)
    return ctx() if ctx is not None else contextlib.nullcontext()


def measure_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), median of do_bench."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_copy_gbps_wall(nbytes: int = 1 << 24, reps: int = 5) -> float:
    """The same on the CPU with a wall clock (dry run only: the floor column gets a number)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def _inputs(case: Case, count: int, device: str = "cuda", param_dtype: str = "input"):
    """``count`` (x, dy) pairs in the case's layout, and weight, bias (never zeros: random).
    The parameters are in x's dtype by default (a bf16 model): torch's CUDA GroupNorm takes no
    bf16 input with float32 weight (mixed dtypes are a CPU-only feature in ATen), and every
    impl gets the same parameters. ``param_dtype="fp32"`` gives float32 ones (autocast style)."""
    dtype = DTYPES[case.dtype]
    pdtype = dtype if param_dtype == "input" else DTYPES[param_dtype]
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    xs, dys = [], []
    for _ in range(count):
        x = (torch.randn(case.shape, device=device) * 2 + 0.5).to(dtype)
        xs.append(x.contiguous(memory_format=fmt).requires_grad_())
        dys.append(torch.randn(case.shape, device=device).to(dtype).contiguous(memory_format=fmt))
    w = (torch.randn(case.c, device=device) * 0.5 + 1).to(pdtype).requires_grad_()
    b = torch.randn(case.c, device=device).to(pdtype).requires_grad_()
    return xs, dys, w, b


def _step(fn, xs, dys, w, b, groups, mode):
    """One timed unit: the op (and its backward) over every rotation buffer. The backward is
    ``autograd.grad`` (fresh gradient tensors, nothing accumulates into ``.grad``), so a
    captured graph replays the same work every time and no gradient needs zeroing."""
    def run():
        with _impl_context(fn):
            for x, dy in zip(xs, dys):
                y = fn(x, w, b, groups)
                if mode == "fwdbwd":
                    torch.autograd.grad(y, (x, w, b), dy)
    return run


# do_bench's warm-up and measuring time per timing (ms). Triton's defaults are 25 / 100; half
# of that still gives >= 250 repetitions of every kernel here (all under 200 us) for the median,
# and fits the 13 section 6 shapes x 8 implementations x 4 timings and the LayerNorm rows into
# the device session's kernels budget (about 0.15 s per timing instead of 0.3)
WARMUP_MS, REP_MS = 10, 50


def _time_ms(run: Callable[[], None], graph: bool) -> float:
    """Median ms of ``run`` on the GPU: triton's do_bench (CUDA events, warm-up, an L2 flush
    before every repetition), eagerly or as the replay of a CUDA graph captured after a
    warm-up on a side stream (Triton/inductor compilation happens there, never in capture)."""
    from triton.testing import do_bench

    if not graph:
        return do_bench(run, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream before capture
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return do_bench(g.replay, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def _time_ms_wall(run: Callable[[], None], graph: bool, reps: int = 1) -> float:
    """Dry run (CPU): the median wall-clock time of ``reps`` calls (the accuracy check before
    it has compiled what needs compiling; the interpreter is slow, so no further warm-up). No
    CUDA graph exists there: ``graph=True`` rows time the same calls (bookkeeping only)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _check(case: Case, impl: Callable, ref: Callable, device: str = "cuda",
           param_dtype: str = "input") -> float:
    """Relative error of impl vs the reference computed in float64 on fresh data: the largest
    of y, dx, dweight and dbias (NaN if any is NaN)."""
    xs, dys, w, b = _inputs(case, 1, device, param_dtype)
    x, dy = xs[0], dys[0]
    with _impl_context(impl):
        y = impl(x, w, b, case.groups)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = ref(*leaves, case.groups)
    grads64 = torch.autograd.grad(y64, leaves, dy.double())
    errs = [_rel(y, y64)] + [_rel(g, g64) for g, g64 in zip(grads, grads64)]
    return float("nan") if any(math.isnan(e) for e in errs) else max(errs)


def _sync(device: str) -> None:
    """Surface an asynchronous CUDA error at the case that caused it (best effort)."""
    if device == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a sticky error fails every later case anyway
            pass


def _fail(name: str, e: BaseException) -> str:
    kind = "n/a" if name in OPTIONAL_IMPLS else "error"
    return f"{kind}: {type(e).__name__}: {e}"[:240]


def run_benchmarks(cases: List[Case], impl_names: Sequence[str], modes: Sequence[str],
                   graphs: Sequence[bool], copy_gbps: float, l2_bytes: int,
                   on_case: Optional[Callable[[List[dict]], None]] = None, *,
                   device: str = "cuda", compile_backend: str = "inductor",
                   param_dtype: str = "input", time_budget_s: Optional[float] = None,
                   unavailable: Optional[Dict[str, str]] = None,
                   compile_once: bool = True) -> List[dict]:
    """Time every (case, impl, mode, graph); ``on_case(rows so far)`` after each case. An
    exception in one impl or case is recorded in its rows' ``status`` and the run goes on.
    With ``time_budget_s`` no case is started after that many seconds. ``compile_once``: one
    torch.compile with dynamic shapes for every case (a recompile per layout and dtype only);
    else a fresh static compile per case (tens of seconds each on the device)."""
    t_start = time.monotonic()
    impls = make_impls(impl_names, compile_backend, unavailable)
    if "torch_compile" in impls and compile_once:
        _allow_recompiles()
        impls["torch_compile"] = _compiled_group_norm(compile_backend, dynamic=True)
    timer = _time_ms if device == "cuda" else _time_ms_wall
    torch_ref = lambda x, w, b, g: F.group_norm(x, g, w, b, 1e-5)  # noqa: E731
    bn_ref = lambda x, w, b, g: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)  # noqa: E731
    rows: List[dict] = []
    for case in cases:
        if time_budget_s is not None and time.monotonic() - t_start > time_budget_s:
            print(f"time budget of {time_budget_s:.0f} s spent: stopping before {case}",
                  flush=True)
            break
        if "torch_compile" in impls and not compile_once:
            # dynamo caches one entry per shape/dtype/layout and, past its recompile limit (8),
            # silently runs eager: start every case from an empty cache with a fresh callable
            torch._dynamo.reset()
            impls["torch_compile"] = _compiled_group_norm(compile_backend)
        rot = rotation_count(case.numel * ELEM_BYTES[case.dtype], l2_bytes)
        try:
            xs, dys, w, b = _inputs(case, rot, device, param_dtype)
            case_error = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record, next case
            xs = dys = w = b = None
            case_error = f"error: inputs: {type(e).__name__}: {e}"[:240]
        for name, fn in impls.items():
            if not applies(name, case):
                continue
            err: Optional[float] = None
            check_status = None
            if case_error is None:
                try:
                    err = _check(case, fn, bn_ref if name in BN_IMPLS else torch_ref, device,
                                 param_dtype)
                except Exception as e:  # noqa: BLE001 - record, keep benchmarking
                    check_status = _fail(name, e)
                    _sync(device)
            for mode in modes:
                for graph in graphs:
                    if case_error is not None:
                        ms, status = float("nan"), case_error
                    else:
                        try:
                            run = _step(fn, xs, dys, w, b, case.groups, mode)
                            ms = timer(run, graph) / rot
                            status = check_status or "ok"
                        except Exception as e:  # noqa: BLE001
                            ms, status = float("nan"), _fail(name, e)
                            _sync(device)
                    fl = floor_us(case, mode, copy_gbps)
                    us = ms * 1e3
                    accurate = None if err is None or math.isnan(err) else err <= REL_TOL[
                        case.dtype]
                    row = dict(
                        **asdict(case), param_dtype=case.dtype if param_dtype == "input"
                        else param_dtype, impl=name, mode=mode, graph=graph, rotate=rot,
                        time_us=us, gbps=case.floor_bytes(mode) / (us * 1e-6) / 1e9,
                        floor_us=fl, frac_of_floor=fl / us, rel_err=err, accurate=accurate,
                        status=status,
                    )
                    assert tuple(row) == ROW_FIELDS, tuple(row)
                    rows.append(row)
                    errs = "n/a" if err is None else f"{err:.1e}"
                    print(f"{case.family:8s} {str(case.shape):20s} {case.layout} {case.dtype} "
                          f"{name:15s} {mode:6s} graph={int(graph)} {us:9.1f} us "
                          f"({100 * fl / us:5.1f}% of floor) err {errs} {status}", flush=True)
        del xs, dys
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_case is not None:
            on_case(rows)
    return rows


def result_base(meta: dict, out_dir: str) -> str:
    """``OUT/gpu_norm_<device>_<utc time>`` (the .csv and .json share it)."""
    os.makedirs(out_dir, exist_ok=True)
    dev = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in meta["device"])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(out_dir, f"gpu_norm_{dev}_{stamp}")


def _json_safe(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_results(rows: List[dict], meta: dict, base: str) -> Tuple[str, str]:
    """(Re)write ``base``.csv and .json with every row so far: called after each case, so a
    run stopped by a time limit keeps what it measured (``meta['complete']`` says whether it
    finished). Both are written to a temporary name and renamed: a kill mid-write leaves the
    previous complete file. NaN (no time) is an empty CSV cell and null in the JSON."""
    tmp = base + ".csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        writer.writerows([{k: ("" if _json_safe(v) is None else v) for k, v in r.items()}
                          for r in rows])
    os.replace(tmp, base + ".csv")
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": [{k: _json_safe(v) for k, v in r.items()}
                                          for r in rows]}, f, indent=1)
    os.replace(tmp, base + ".json")
    return base + ".csv", base + ".json"


# tiny cases for --dry-run (CPU, Triton interpreter): both layouts, a float32 and a bf16 one;
# C = 8, G = 4 (Cg = 2: channels_last takes normlab's blocked path)
DRY_CASES = [Case("dry", 2, 8, 4, 3, 4, "nchw", "fp32"), Case("dry", 2, 8, 4, 3, 4, "nhwc", "bf16"),
             Case("ln", 6, 8, 1, 1, 1, "nchw", "fp32")]  # LN rows: torch_ln, the rows kernels


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="ref6", choices=CASE_SETS)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"], choices=("nchw", "nhwc"))
    p.add_argument("--impls", nargs="+", default=list(ALL_IMPLS), choices=ALL_IMPLS)
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=sorted(PASSES))
    p.add_argument("--no-graph", action="store_true", help="eager timings only")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--param-dtype", default="input", choices=("input", "fp32"),
                   help="weight/bias dtype: the input's (default) or float32")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new case after S seconds (results so far are kept)")
    p.add_argument("--compile", default="once", choices=("once", "per-case"),
                   help="torch.compile once with dynamic shapes (default) or per case, static")
    p.add_argument("--list", action="store_true", help="print the cases and floor bytes, exit")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: tiny cases, Triton interpreter, wall clock, torch.compile "
                        "with the 'eager' backend; checks every impl against float64 and "
                        "writes the same CSV/JSON (exit 1 if a non-optional impl fails)")
    p.add_argument("--out", default=None,
                   help="result folder (default benchmarks/results; dry run: a temp folder)")
    args = p.parse_args(argv)

    if args.dry_run:
        return _dry_run(args)
    cases = build_cases(args.set, args.dtypes, args.layouts)
    if args.max_cases:
        cases = cases[: args.max_cases]
    if args.list:
        for c in cases:
            print(f"{c.family:8s} {str(c.shape):20s} {c.layout} {c.dtype} "
                  f"fwd {c.floor_bytes('fwd') / 1e6:8.2f} MB  "
                  f"fwd+bwd {c.floor_bytes('fwdbwd') / 1e6:8.2f} MB")
        return 0
    if not torch.cuda.is_available():
        print("gpu_norm.py needs a CUDA device (none found); nothing was measured.",
              file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("gpu_norm.py needs triton; nothing was measured.", file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    copy_gbps = measure_copy_gbps()
    meta = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), copy_gbps=copy_gbps, l2_bytes=l2,
                sm_count=props.multi_processor_count, set=args.set, param_dtype=args.param_dtype,
                timer="triton.testing.do_bench median (CUDA events, L2 flushed per repetition)",
                time=_dt.datetime.now(_dt.timezone.utc).isoformat())
    print(f"device {props.name}: copy bandwidth {copy_gbps:.0f} GB/s, L2 {l2 >> 20} MiB",
          flush=True)
    graphs = [False] if args.no_graph else [False, True]
    return _run_and_write(args, cases, graphs, meta, copy_gbps, l2, "cuda", "inductor")


def _run_and_write(args, cases, graphs, meta, copy_gbps, l2, device, compile_backend) -> int:
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    base = result_base(meta, out)
    unavailable: Dict[str, str] = {}
    meta.update(complete=False, impls=list(args.impls), unavailable=unavailable,
                compile=args.compile)
    rows = run_benchmarks(cases, args.impls, args.modes, graphs, copy_gbps, l2,
                          on_case=lambda so_far: write_results(so_far, meta, base),
                          device=device, compile_backend=compile_backend,
                          param_dtype=args.param_dtype, time_budget_s=args.time_budget,
                          unavailable=unavailable, compile_once=args.compile == "once")
    for name, why in unavailable.items():
        print(f"{name}: n/a ({why})", flush=True)
    meta["complete"] = len({(r["family"], r["n"], r["c"], r["h"], r["w"], r["layout"],
                            r["dtype"]) for r in rows}) == len(cases)
    csv_path, json_path = write_results(rows, meta, base)
    print(f"wrote {csv_path} and {json_path}")
    if device == "cuda":
        return 0
    bad = [r for r in rows if r["impl"] not in OPTIONAL_IMPLS
           and (r["status"] != "ok" or r["accurate"] is not True)]
    for r in bad:
        print(f"FAILED: {r['impl']} {r['layout']} {r['dtype']} {r['mode']} "
              f"rel_err={r['rel_err']} {r['status']}", file=sys.stderr)
    return 1 if bad else 0


def _dry_run(args) -> int:
    """CPU rehearsal of the GPU path (see --dry-run): same impls, rows and files."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            print("--dry-run needs TRITON_INTERPRET=1 before triton is imported",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    cases = [c for c in DRY_CASES if c.dtype in args.dtypes and c.layout in args.layouts]
    if args.max_cases:
        cases = cases[: args.max_cases]
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "normlab-dry-run")
    copy_gbps = measure_copy_gbps_wall()
    meta = dict(device="cpu-dry-run", torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), copy_gbps=copy_gbps, l2_bytes=0,
                sm_count=0, set="dry", param_dtype=args.param_dtype,
                timer="wall clock (dry run; graph rows are not captured)",
                time=_dt.datetime.now(_dt.timezone.utc).isoformat())
    graphs = [False] if args.no_graph else [False, True]
    return _run_and_write(args, cases, graphs, meta, copy_gbps, 0, "cpu", "eager")


if __name__ == "__main__":
    sys.exit(main())
