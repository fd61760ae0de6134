"""What the other norms cost on CPU: FRN, EvoNorm-S0/B0, BatchRenorm, FrozenBN, ghost BN, SyncBN
and weight-standardized convs, against torch's BatchNorm2d and against their own formula.

Each case times, in interleaved rounds in one process (the method of ``cpu_layers.py``: on this
shared CPU only ratios measured in one run mean anything), three or four callables on the same
input (each sample ~20 ms of calls of one callable, after one untimed call of it):

* ``normlab``: the normlab module (or function) under test;
* ``bn``: ``torch.nn.BatchNorm2d`` at the same input shape, what the norm costs against the
  default choice (for a conv case: a BN over the conv's input);
* ``formula``: the same math written here as plain torch ops (an independent formula, on a deep
  copy of the module's parameters and buffers);
* ``conv`` (conv cases only): ``torch.nn.Conv2d`` with the same weight, the layer that
  WSConv2d / ScaledStdConv2d replace.

Ratios are of medians: ``vs_bn`` = normlab / bn, ``vs_formula`` = normlab / formula, ``vs_conv``
= normlab / conv. Each round runs the callables in another of their orders (all of them in
turn), so that each follows each other equally often. Before timing, every
case checks that normlab's output (train: and the gradients of x and of every trained
parameter, and the running buffers after the step) equals the formula's within float32
tolerances, on off-centre input (randn * 2 + 1) and random affine parameters and buffers;
``max_diff`` is the largest absolute difference found.

``--mode train``: forward + backward in train mode; ``--mode eval``: the forward of the eval
module under ``torch.no_grad()``. Both by default, one CSV. Cases labelled "tiny" measure the
per-call cost (a few microseconds of kernel). Threads: 1 by default (the project's convention
for CPU results); run with ``OMP_NUM_THREADS=1`` too.

``--ghost-step`` times instead the lab's ResNet-20 training step on 8x8 digits-sized input
(1 channel, batch 16 = 8 emulated devices x 2 images: what README and docs/datasets.md quote as
"16.8 -> 15.3 ms"): BN over the batch, ghost BN with consecutive and with interleaved slices of
2, and GN, in interleaved rounds (zero_grad, forward, cross-entropy, backward, SGD step).

    OMP_NUM_THREADS=1 python benchmarks/cpu_more_norms.py [--repeats 25] [--cases FRN EvoS0]
        [--mode train eval] [--threads 1] [--out benchmarks/results/cpu_more_norms_1thread.csv]
    OMP_NUM_THREADS=1 python benchmarks/cpu_more_norms.py --ghost-step [--repeats 25] [--runs 3]
        [--out benchmarks/results/cpu_ghost_step_1thread.csv]
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.nn as nlnn
from normlab.nn.syncbn import sync_batch_norm

FIELDS = ["device", "threads", "torch", "case", "norm", "shape", "mode", "normlab_us", "bn_us",
          "formula_us", "conv_us", "vs_bn", "vs_formula", "vs_conv", "max_diff"]

# input shapes, each for a reason
L = (8, 256, 28, 28)   # a ResNet-50 stage-2 layer at batch 8: 6.4 MB, past L2 (memory counts)
M = (32, 64, 32, 32)   # a CIFAR ResNet's first stage at batch 32: 8 MB, many samples
S = (64, 16, 8, 8)     # the lab's ResNet-20 on 8x8 digits: 256 KB, in L2 (op count counts)
T = (2, 64, 4, 4)      # tiny: 8 KB, the per-call cost (Python and dispatch above the kernels)
LAB = (16, 16, 8, 8)   # the lab's "8 devices x 2 images" batch (README's ghost-BN 16.8 -> 15.3 ms)


def _view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# the formulas: plain torch ops, written from the papers (not from normlab's code)
# --------------------------------------------------------------------------------------------

def _var(x, dim, keepdim=False):
    """The biased variance, two-pass: mean((x - mean)^2). Not torch.var: its CPU kernel costs
    ~100x a mean at one thread here (9 ms against 0.08 ms on (8,256,28,28), torch 2.13), which
    would make every formula with a variance a slow baseline."""
    mean = x.mean(dim=dim, keepdim=True)
    return (x - mean).square().mean(dim=dim, keepdim=keepdim)


def _running_update(m, mean, var_biased, count: int) -> None:
    """BatchNorm's running averages (unbiased variance), with momentum m.momentum, and the
    batch count."""
    with torch.no_grad():
        m.num_batches_tracked.add_(1)
        m.running_mean.mul_(1 - m.momentum).add_(mean.detach(), alpha=m.momentum)
        m.running_var.mul_(1 - m.momentum).add_(var_biased.detach() * (count / (count - 1)),
                                                alpha=m.momentum)


def frn_formula(m, x):
    """Singh & Krishnan eqs. 1-3: x * rsqrt(mean_HW(x^2) + eps) * gamma + beta, then max(., tau)."""
    nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
    y = x * torch.rsqrt(nu2 + m.eps) * _view(m.weight) + _view(m.bias)
    return torch.max(y, _view(m.tau))


def evo_s0_formula(m, x):
    """x * sigmoid(v x) / sqrt(group variance + eps) * gamma + beta (GroupNorm's groups, per
    sample, biased variance)."""
    n = x.shape[0]
    var = _var(x.reshape(n, m.num_groups, -1), 2, keepdim=True)
    num = (x * torch.sigmoid(_view(m.v) * x)).reshape(n, m.num_groups, -1)
    return (num / torch.sqrt(var + m.eps)).reshape(x.shape) * _view(m.weight) + _view(m.bias)


def evo_b0_formula(m, x):
    """x / max(sqrt(batch var + eps), v x + sqrt(instance var + eps)) * gamma + beta; the batch
    variance in training (running average updated), the running one in eval."""
    if m.training:
        var_b = _var(x, (0, 2, 3))
        with torch.no_grad():
            count = x.numel() // x.shape[1]
            m.running_var.mul_(1 - m.momentum).add_(var_b.detach() * (count / (count - 1)),
                                                    alpha=m.momentum)
    else:
        var_b = m.running_var
    var_i = _var(x, (2, 3), keepdim=True)
    den = torch.max(torch.sqrt(_view(var_b) + m.eps), _view(m.v) * x + torch.sqrt(var_i + m.eps))
    return x / den * _view(m.weight) + _view(m.bias)


def brn_formula(m, x):
    """Ioffe 2017, Algorithm 1 with fixed limits: x_hat = (x - mu_B) / sigma_B * r + d,
    r = clip(sigma_B / sigma), d = clip((mu_B - mu) / sigma), both without gradient; sigma from
    the running variance before this batch; then the affine. Eval: BatchNorm's."""
    if not m.training:
        return (x - _view(m.running_mean)) / torch.sqrt(_view(m.running_var) + m.eps) \
            * _view(m.weight) + _view(m.bias)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    centred = x - mean
    var = centred.square().mean(dim=(0, 2, 3), keepdim=True)
    sigma_b = torch.sqrt(var + m.eps)
    with torch.no_grad():
        sigma = torch.sqrt(m.running_var + m.eps)
        r = (sigma_b.flatten() / sigma).clamp(1 / m.r_max, m.r_max)
        d = ((mean.flatten() - m.running_mean) / sigma).clamp(-m.d_max, m.d_max)
    _running_update(m, mean.flatten(), var.flatten(), x.numel() // x.shape[1])
    x_hat = centred / sigma_b * _view(r) + _view(d)
    return x_hat * _view(m.weight) + _view(m.bias)


def frozen_formula(m, x):
    """x * scale + shift, scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    scale = m.weight * torch.rsqrt(m.running_var + m.eps)
    shift = m.bias - m.running_mean * scale
    return x * _view(scale) + _view(shift)


def bn_formula(m, x):
    """BatchNorm: batch mean and biased variance per channel in training (running averages of
    the mean and unbiased variance updated), the running ones in eval; then the affine."""
    if m.training:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        centred = x - mean
        var = centred.square().mean(dim=(0, 2, 3), keepdim=True)
        _running_update(m, mean.flatten(), var.flatten(), x.numel() // x.shape[1])
    else:
        centred, var = x - _view(m.running_mean), _view(m.running_var)
    return centred * torch.rsqrt(var + m.eps) * _view(m.weight) + _view(m.bias)


def ghost_formula(m, x):
    """BatchNorm over each slice of ``virtual_batch`` images, through a view: (K, n, C, H, W)
    (consecutive slices) or (n, K, C, H, W) (interleaved); running averages from slice 0."""
    if not m.training:
        return bn_formula(m, x)
    b, c, h, w = x.shape
    n, k = m.virtual_batch, b // m.virtual_batch
    if m.interleaved:
        xv, dims, s0 = x.reshape(n, k, c, h, w), (0, 3, 4), (slice(None), 0)
    else:
        xv, dims, s0 = x.reshape(k, n, c, h, w), (1, 3, 4), (0,)
    mean = xv.mean(dim=dims, keepdim=True)
    centred = xv - mean
    var = centred.square().mean(dim=dims, keepdim=True)
    _running_update(m, mean[s0].reshape(c), var[s0].reshape(c), n * h * w)
    y = centred * torch.rsqrt(var + m.eps) * m.weight.reshape(1, 1, c, 1, 1) \
        + m.bias.reshape(1, 1, c, 1, 1)
    return y.reshape(b, c, h, w)


def ws_formula(m, x):
    """Weight Standardization: (W - mean) / sqrt(var + eps) per output channel over its
    fan-in (biased variance), then the convolution."""
    w = m.weight
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    var = centred.square().mean(dim=(1, 2, 3), keepdim=True)
    return F.conv2d(x, centred / torch.sqrt(var + m.eps), m.bias, m.stride, m.padding,
                    m.dilation, m.groups)


def scaled_ws_formula(m, x):
    """NF-ResNet's Scaled WS as ScaledStdConv2d implements it (eps inside the root):
    gain * gamma * (W - mean) / (sqrt(fan_in) * sqrt(var + eps)), then the convolution."""
    w = m.weight
    fan_in = w[0].numel()
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    var = centred.square().mean(dim=(1, 2, 3), keepdim=True)
    wh = m.gain * m.gamma * centred / (math.sqrt(fan_in) * torch.sqrt(var + m.eps))
    return F.conv2d(x, wh, m.bias, m.stride, m.padding, m.dilation, m.groups)


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    label: str
    norm: str
    shape: tuple
    make: Callable[[int], nn.Module]  # C -> a fresh normlab module
    formula: Callable
    modes: tuple = ("train", "eval")
    conv: Optional[dict] = None  # Conv2d kwargs for the conv cases (plain Conv2d baseline)
    gloo: bool = False  # normlab = sync_batch_norm() in a gloo process group of one process


def _ghost(vb: int, interleaved: bool):
    return lambda c: nlnn.GhostBatchNorm2d(c, virtual_batch=vb, interleaved=interleaved)


def _brn(c):
    # fixed limits from the first step (the GN paper's comparison), so r and d act
    return nlnn.BatchRenorm2d(c, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0,
                              d_max_steps=0)


def _conv(kind, **kw):
    def make(c):
        args = dict(kw)
        cls = nlnn.WSConv2d if kind == "ws" else nlnn.ScaledStdConv2d
        extra = {} if kind == "ws" else {"gamma": 1.7139588594}
        return cls(c, args.pop("out"), args.pop("k"), **args, **extra)
    return make


def _shape(s):
    return "(" + ",".join(map(str, s)) + ")"


def build_cases() -> list[Case]:
    cases = []
    # the per-channel and per-sample norms: the four shapes
    for s in (L, M, S, T):
        tag = " tiny" if s is T else ""
        g = 32 if s[1] >= 64 else s[1] // 4  # EvoNorm-S0's groups: the paper's 32 where C allows
        cases += [
            Case(f"FRN {_shape(s)}{tag}", "FilterResponseNorm2d+TLU", s,
                 lambda c: nlnn.FilterResponseNorm2d(c), frn_formula),
            Case(f"EvoS0 G{g} {_shape(s)}{tag}", f"EvoNorm2dS0 (G={g})", s,
                 lambda c, g=g: nlnn.EvoNorm2dS0(c, num_groups=g), evo_s0_formula),
            Case(f"EvoB0 {_shape(s)}{tag}", "EvoNorm2dB0", s,
                 lambda c: nlnn.EvoNorm2dB0(c), evo_b0_formula),
            Case(f"BRN {_shape(s)}{tag}", "BatchRenorm2d (r_max 1.5, d_max 0.5)", s, _brn,
                 brn_formula),
            Case(f"FrozenBN {_shape(s)}{tag}", "FrozenBatchNorm2d", s,
                 lambda c: nlnn.FrozenBatchNorm2d(c), frozen_formula),
            Case(f"SyncBN {_shape(s)}{tag}", "SyncBatchNorm (no process group)", s,
                 lambda c: nlnn.SyncBatchNorm(c), bn_formula),
        ]
    # control: torch's BatchNorm2d in normlab's place; its vs_bn is the harness's own error
    for s in (M, T):
        tag = " tiny" if s is T else ""
        cases.append(Case(f"control torchBN {_shape(s)}{tag}", "torch.nn.BatchNorm2d (control)",
                          s, lambda c: nn.BatchNorm2d(c), bn_formula))
    # ghost BN: consecutive (default) and interleaved slices; the virtual batch per shape is a
    # per-device batch of the GN paper's kind: 4 devices x 2, 8 x 4, 8 x 8, the lab's 8 x 2, 2 x 1
    for s, vb in ((L, 2), (M, 4), (S, 8), (LAB, 2), (T, 1)):
        tag = " tiny" if s is T else ""
        for inter in (False, True):
            kind = "intl" if inter else "cons"
            # eval is exactly BatchNorm2d whatever the slices: timed once, on the consecutive one
            modes = ("train",) if inter else ("train", "eval")
            cases.append(Case(f"GhostBN {kind} vb{vb} {_shape(s)}{tag}",
                              f"GhostBatchNorm2d (virtual_batch={vb}, "
                              f"{'interleaved' if inter else 'consecutive'})",
                              s, _ghost(vb, inter), ghost_formula, modes))
    # SyncBN's own path (statistics gathered, backward in Python) on a gloo group of 1 process:
    # what a process pays in a real multi-process job, less the network
    for s in (L, S, T):
        tag = " tiny" if s is T else ""
        cases.append(Case(f"sync_batch_norm gloo1 {_shape(s)}{tag}",
                          "sync_batch_norm (gloo, world 1)", s,
                          lambda c: nlnn.SyncBatchNorm(c), bn_formula, ("train",), gloo=True))
    # weight-standardized convs: input shape, out channels, kernel
    convs = [
        # a ResNet stage-1 3x3 conv at batch 8: the conv takes tens of ms, the weight is 37K values
        ((8, 64, 32, 32), dict(out=64, k=3, padding=1, bias=False)),
        # a bottleneck's 1x1 conv: a 65K-value weight against a cheap conv, WS's largest share
        ((8, 256, 14, 14), dict(out=256, k=1, bias=False)),
        # the lab's ResNet-20 3x3 conv on 8x8 digits
        (S, dict(out=16, k=3, padding=1, bias=False)),
        # per-call cost
        (T, dict(out=64, k=3, padding=1, bias=False)),
    ]
    for s, kw in convs:
        tag = " tiny" if s is T else ""
        k = kw["k"]
        cases.append(Case(f"WSConv {k}x{k} {_shape(s)}{tag}", f"WSConv2d {k}x{k}", s,
                          _conv("ws", **kw), ws_formula, conv=kw))
        cases.append(Case(f"ScaledWS {k}x{k} {_shape(s)}{tag}", f"ScaledStdConv2d {k}x{k}", s,
                          _conv("scaled", **kw), scaled_ws_formula, conv=kw))
    return cases


CASES = build_cases()


# --------------------------------------------------------------------------------------------
# inputs, check, timing
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def randomize(module: nn.Module) -> nn.Module:
    """Random affine parameters and running buffers (not ones/zeros), so that every term of a
    formula shows in the check."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if not t.is_floating_point() or (leaf == "weight" and t.dim() > 1):
            continue  # the counter; conv weights keep their (random) kaiming init
        if leaf in ("weight", "v", "gain"):
            t.uniform_(0.5, 1.5)
        elif leaf in ("bias", "running_mean", "tau"):
            t.normal_(0.0, 0.5)
        elif leaf == "running_var":
            t.uniform_(0.5, 2.0)
    return module


class _Gloo:
    """A gloo process group of this one process (for sync_batch_norm's own path)."""

    def __init__(self):
        self.mine = False

    def __enter__(self):
        if not dist.is_initialized():
            fd, path = tempfile.mkstemp(prefix="normlab_gloo_")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
            self.mine = True
        return self

    def __exit__(self, *exc):
        if self.mine:
            dist.destroy_process_group()


def _callables(case: Case, mode: str):
    """{name: (fn(x) -> y, zero_grad())}: normlab, bn, formula (and conv), all in `mode`."""
    torch.manual_seed(1)
    c = case.shape[1]
    ours = randomize(case.make(c))
    theirs = copy.deepcopy(ours)  # the formula's own parameters and buffers
    bn = randomize(nn.BatchNorm2d(c))
    mods = [ours, theirs, bn]
    out = {}
    if case.gloo:
        def fn(x, m=ours):
            return sync_batch_norm(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps,
                                   m.momentum)
        out["normlab"] = (fn, ours.zero_grad)
    else:
        out["normlab"] = (ours, ours.zero_grad)
    out["bn"] = (bn, bn.zero_grad)
    out["formula"] = (lambda x, m=theirs: case.formula(m, x), theirs.zero_grad)
    if case.conv is not None:
        kw = dict(case.conv)
        conv = nn.Conv2d(c, kw.pop("out"), kw.pop("k"), **kw)
        with torch.no_grad():
            conv.weight.copy_(ours.weight)
        mods.append(conv)
        out["conv"] = (conv, conv.zero_grad)
    for m in mods:
        m.train(mode == "train")
    return out, ours, theirs


def _inputs(shape, mode):
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    x.requires_grad_(mode == "train")
    g = torch.randn(shape)
    return x, g


def _grads(module: nn.Module, x):
    return [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]


def check(case: Case, mode: str, runners, ours, theirs, x, g) -> float:
    """normlab's output equals the formula's (train: and the gradients of x and the trained
    parameters, and the running buffers after the step), float32 tolerances; returns the largest
    absolute difference. Raises AssertionError otherwise."""
    fn_ours, fn_theirs = runners["normlab"][0], runners["formula"][0]
    diffs = []

    def close(a, b, what):
        # torch.testing's float32 defaults (rtol 1.3e-6, atol 1e-5), the absolute tolerance
        # scaled by the largest value: a parameter's gradient sums over every position, a
        # conv's output over its fan-in, so their rounding grows with their size
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-5 * scale,
                                   msg=lambda m: f"{case.label} ({mode}): {what}: {m}")
        diffs.append(float((a - b).abs().max()) if a.numel() else 0.0)

    if mode == "train":
        results = []
        for fn, mod in ((fn_ours, ours), (fn_theirs, theirs)):
            x.grad = None
            mod.zero_grad(set_to_none=True)
            y = fn(x)
            y.backward(g)
            results.append((y.detach(), [t.clone() for t in _grads(mod, x)],
                            {k: b.clone() for k, b in mod.named_buffers()}))
        (y1, g1, b1), (y2, g2, b2) = results
        close(y1, y2, "output")
        for i, (a, b) in enumerate(zip(g1, g2)):
            close(a, b, "grad of x" if i == 0 else f"grad of parameter {i}")
        assert b1.keys() == b2.keys()
        for k in b1:  # the running statistics (not the batch counter: sync_batch_norm's
            if b1[k].is_floating_point():  # function leaves it to the module)
                close(b1[k], b2[k], f"buffer {k}")
        x.grad = None
    else:
        close(fn_ours(x), fn_theirs(x), "output")
    return max(diffs)


def _train_step(fn, zero, x, g):
    x.grad = None
    zero(set_to_none=True)
    fn(x).backward(g)


def _eval_step(fn, zero, x, g):
    fn(x)


def _time_once(step, fn, zero, x, g, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        step(fn, zero, x, g)
    return (time.perf_counter() - t0) / inner


def measure_case(case: Case, mode: str, repeats: int, target_s: float = 0.02) -> dict:
    runners, ours, theirs = _callables(case, mode)
    x, g = _inputs(case.shape, mode)
    diff = check(case, mode, runners, ours, theirs, x, g)
    step = _train_step if mode == "train" else _eval_step
    names = list(runners)
    for name in names:  # warm-up
        for _ in range(3):
            step(*runners[name], x, g)
    probe = 1 if mode == "train" else 5
    # each callable's samples take about target_s (sized by its own time: sized by the slowest,
    # a fast callable's sample was a few calls, and its first call, after another callable had
    # filled the caches and the heap, weighed: torch's BN against itself measured 1.2)
    inner = {n: max(1, int(target_s / max(_time_once(step, *runners[n], x, g, probe), 1e-7)))
             for n in names}
    times = {n: [] for n in names}
    # round r runs the callables in the r-th of all their orders: each one follows each other
    # one equally often (a formula's fresh buffers slow the next callable's sample by ~5-10%:
    # with a rotation, normlab followed the formula in 2 rounds of 3, BN in 1)
    orders = list(itertools.permutations(names))
    for r in range(repeats):
        for name in orders[r % len(orders)]:
            step(*runners[name], x, g)  # untimed: each sample starts from its own callable's state
            times[name].append(_time_once(step, *runners[name], x, g, inner[name]))
    med = {n: statistics.median(t) for n, t in times.items()}
    row = {
        "case": case.label, "norm": case.norm, "shape": _shape(case.shape), "mode": mode,
        "normlab_us": round(med["normlab"] * 1e6, 1), "bn_us": round(med["bn"] * 1e6, 1),
        "formula_us": round(med["formula"] * 1e6, 1),
        "conv_us": round(med["conv"] * 1e6, 1) if "conv" in med else "",
        "vs_bn": round(med["normlab"] / med["bn"], 3),
        "vs_formula": round(med["normlab"] / med["formula"], 3),
        "vs_conv": round(med["normlab"] / med["conv"], 3) if "conv" in med else "",
        "max_diff": f"{diff:.2g}",
    }
    return row


def measure(repeats: int, only=(), modes=("train", "eval"), target_s: float = 0.02,
            log=print) -> list[dict]:
    """Rows for the cases whose label starts with one of ``only`` (all if empty), each mode."""
    rows = []
    for mode in modes:
        for case in CASES:
            if only and not any(case.label.startswith(o) for o in only):
                continue
            if mode not in case.modes:
                continue
            if case.gloo:
                with _Gloo():
                    row = measure_case(case, mode, repeats, target_s)
            elif mode == "eval":
                with torch.no_grad():
                    row = measure_case(case, mode, repeats, target_s)
            else:
                row = measure_case(case, mode, repeats, target_s)
            rows.append(row)
            conv = f"  vs conv {row['vs_conv']:5.2f}" if row["vs_conv"] != "" else ""
            log(f"{mode:5s} {case.label:34s} normlab {row['normlab_us']:9.1f} us  vs BN "
                f"{row['vs_bn']:5.2f}  vs formula {row['vs_formula']:5.2f}{conv}  "
                f"(diff {row['max_diff']})")
    return rows


STEP_FIELDS = ["device", "threads", "torch", "run", "model", "batch", "norm", "ms",
               "vs_ghost_intl"]
STEP_NORMS = {  # name: (normlab.models.create norm, norm_kwargs)
    "bn": ("bn", {}),
    "ghost_cons": ("ghostbn", {"virtual_batch": 2}),
    "ghost_intl": ("ghostbn", {"virtual_batch": 2, "interleaved": True}),
    "gn": ("gn", {}),
}


def ghost_step(repeats: int, batch: int = 16, side: int = 8, log=print, run: int = 1
               ) -> list[dict]:
    """Median ms of the lab's ResNet-20 SGD step (1 input channel, 10 classes) per norm of
    STEP_NORMS, in interleaved rounds; the same weights (seed) and data for every model."""
    from normlab import models

    torch.manual_seed(0)
    x = torch.randn(batch, 1, side, side) * 2 + 1
    target = torch.randint(0, 10, (batch,))
    steps = {}
    for name, (norm, kw) in STEP_NORMS.items():
        torch.manual_seed(0)
        model = models.create("resnet20", norm=norm, num_classes=10, in_chans=1,
                              **({"norm_kwargs": kw} if kw else {}))
        opt = torch.optim.SGD(model.parameters(), lr=0.00625, momentum=0.9, weight_decay=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()
        for _ in range(5):
            step()
        steps[name] = step

    def timed(step, inner):
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        return (time.perf_counter() - t0) / inner

    inner = {n: max(1, int(0.05 / timed(s, 1))) for n, s in steps.items()}
    times = {n: [] for n in steps}
    names = list(steps)
    orders = list(itertools.permutations(names))  # as measure_case: each after each equally
    for r in range(repeats):
        for name in orders[r % len(orders)]:
            steps[name]()  # untimed
            times[name].append(timed(steps[name], inner[name]))
    med = {n: statistics.median(t) for n, t in times.items()}
    rows = []
    for name in names:
        rows.append({"device": f"cpu:{platform.machine()}", "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "run": run,
                     "model": f"resnet20 1x{side}x{side}",
                     "batch": batch, "norm": name, "ms": round(med[name] * 1e3, 3),
                     "vs_ghost_intl": round(med[name] / med["ghost_intl"], 3)})
        log(f"run {run} {name:11s} {med[name] * 1e3:7.2f} ms  "
            f"vs ghost_intl {rows[-1]['vs_ghost_intl']:.3f}")
    return rows


def write_csv(rows: list[dict], path: str, fields=FIELDS) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({"device": f"cpu:{platform.machine()}", "threads": torch.get_num_threads(),
                        "torch": torch.__version__, **r})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--cases", nargs="*", default=[],
                    help="only the cases whose label starts with one of these")
    ap.add_argument("--mode", nargs="+", choices=("train", "eval"), default=["train", "eval"],
                    help="train: forward + backward; eval: forward in eval mode under no_grad")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-ms", type=float, default=20.0,
                    help="time of one timed sample (inner loop) of the slowest callable")
    ap.add_argument("--ghost-step", action="store_true",
                    help="time the lab's ResNet-20 step with BN / ghost BN / GN instead")
    ap.add_argument("--runs", type=int, default=3,
                    help="--ghost-step: measurements, one after the other (rows 'run')")
    ap.add_argument("--out", default=None, help="default: results/cpu_more_norms_1thread.csv, "
                    "with --ghost-step results/cpu_ghost_step_1thread.csv")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(__file__), "results",
                                "cpu_ghost_step_1thread.csv" if args.ghost_step
                                else "cpu_more_norms_1thread.csv")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, normlab {normlab.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); backend auto -> native on CPU",
          flush=True)
    t0 = time.perf_counter()
    if args.ghost_step:
        rows = [r for run in range(1, args.runs + 1)
                for r in ghost_step(args.repeats, log=lambda s: print(s, flush=True), run=run)]
        write_csv(rows, args.out, STEP_FIELDS)
        print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s; wrote {args.out}")
        return 0
    rows = measure(args.repeats, args.cases, args.mode, args.target_ms / 1e3,
                   log=lambda s: print(s, flush=True))
    if not rows:
        print("no case matched", file=sys.stderr)
        return 1
    write_csv(rows, args.out)
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
