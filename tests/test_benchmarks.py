"""The GPU benchmark scripts, exercised without a GPU.

``bash benchmarks/gpu_session.sh --dry-run`` rehearses the one device call on the CPU: it runs
``benchmarks/gpu_norm.py --dry-run`` and ``benchmarks/resnet50_step.py --dry-run`` with the
session's own options (the same code paths as on the device: impls, accuracy check, rows,
CSV/JSON, on tiny cases, normlab's Triton kernels in the interpreter), collects the GPU tests,
and prints its planned time. It runs once here (a module fixture) and the tests read its output.
Nothing here is timed: times are only checked to be present and positive.
"""

import csv
import glob
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_t_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _liger_wheel():
    """The Liger-Kernel wheel carried in .whl/ (ignored by git, so absent in CI: then None and
    the dry run must list liger as unavailable)."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "liger_kernel-*.whl")))
    return wheels[-1] if wheels else None


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(completed process, its output folder) of the session's dry run."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    tmp = tmp_path_factory.mktemp("session")
    env = dict(os.environ)
    env.update(OUT=str(tmp / "out"), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the script puts src/ first itself
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_session.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc, tmp


def _results(tmp_path, prefix):
    (csv_path,) = glob.glob(str(tmp_path / "out" / f"{prefix}_cpu-dry-run_*.csv"))
    (json_path,) = glob.glob(str(tmp_path / "out" / f"{prefix}_cpu-dry-run_*.json"))
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    with open(json_path) as f:
        data = json.load(f)
    assert not glob.glob(str(tmp_path / "out" / "*.tmp"))  # atomic rewrites left nothing behind
    return header, rows, data


def test_session_dry_run_plans_one_call_of_at_most_8_minutes(session):
    """The session's steps run in the issue's order, each within its limit; the plan (the sum
    of the limits) is at most 480 s; at most 8 files come back; the GPU test selection
    collects without errors and leaves the randomized test out."""
    proc, tmp = session
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"planned time: (\d+) s \(limit (\d+) s\)", proc.stdout)
    assert m and int(m.group(1)) <= int(m.group(2)) == 480, proc.stdout[:500]
    steps = re.findall(r"^== (\w+)", proc.stdout, re.M)
    assert steps == ["env", "tests", "kernels", "resnet50"]
    files = os.listdir(tmp / "out")
    assert len(files) <= 8, files
    with open(tmp / "out" / "tests.log") as f:
        log = f.read()
    assert re.search(r"\d+ tests? collected", log), log[-2000:]
    assert not re.search(r"\d+ errors?\b", log), log[-2000:]
    ids = [line for line in log.splitlines() if "::" in line]
    assert ids and not any("randomized" in i for i in ids) and "deselected" in log


def test_gpu_norm_dry_run_every_impl_matches_torch(session):
    """The dry cases (fp32 NCHW, bf16 channels_last, a LayerNorm row set), both modes, eager
    and 'graph' rows, every implementation the session times: each row has a time and a floor, and every impl but Liger
    agrees with float64 torch (y, dx, dweight, dbias) within REL_TOL. Liger runs when its wheel
    is carried; the Triton interpreter cannot run its kernel (a float eps), which must be
    recorded as 'n/a' after the call bound its arguments (no TypeError: the signature is right)."""
    gb = _load("gpu_norm")
    liger = _liger_wheel()
    header, rows, data = _results(session[1], "gpu_norm")
    assert tuple(header) == gb.ROW_FIELDS
    meta = data["meta"]
    assert meta["device"] == "cpu-dry-run" and meta["complete"] is True and meta["copy_gbps"] > 0
    assert len(data["rows"]) == len(rows)

    expected = set(_session_impls()) - ({"liger"} if liger is None else set())
    assert {r["impl"] for r in rows} == expected
    if liger is None:
        assert "liger" in meta["unavailable"]
    # every (case, impl) that applies (LayerNorm rows: torch, torch_ln, normlab) has the four
    # (mode, graph) rows
    combos = {}
    for r in rows:
        combos.setdefault((r["family"], r["layout"], r["dtype"], r["impl"]), set()).add(
            (r["mode"], r["graph"]))
    assert set(combos) == {(c.family, c.layout, c.dtype, name) for c in gb.DRY_CASES
                           for name in expected if gb.applies(name, c)}
    assert all(v == {("fwd", "False"), ("fwd", "True"), ("fwdbwd", "False"), ("fwdbwd", "True")}
               for v in combos.values())

    for r, jr in zip(rows, data["rows"]):
        assert float(r["floor_us"]) > 0 and jr["floor_us"] > 0
        # fwd+bwd floor = 5/2 of the forward's (5 passes against 2)
        n = int(r["n"]) * int(r["c"]) * int(r["h"]) * int(r["w"])
        assert jr["floor_us"] == pytest.approx(
            gb.PASSES[r["mode"]] * n * gb.ELEM_BYTES[r["dtype"]] / (meta["copy_gbps"] * 1e3))
        assert r["param_dtype"] == r["dtype"]
        if r["impl"] == "liger":
            assert r["status"] == "ok" or (r["status"].startswith("n/a:")
                                           and "TypeError" not in r["status"]), r
            continue
        assert r["status"] == "ok", r
        assert float(r["time_us"]) > 0 and jr["time_us"] > 0
        assert jr["frac_of_floor"] == pytest.approx(jr["floor_us"] / jr["time_us"])
        assert jr["accurate"] is True and jr["rel_err"] <= gb.REL_TOL[r["dtype"]], r


def test_resnet50_dry_run_three_norms(session):
    """BN, torch GN and normlab GN each build a ResNet-50 (53 norm layers) and take timed
    bf16-autocast channels_last SGD steps on the CPU, eager and in the 'graph' rows (timed
    eagerly there: no CUDA graph on the CPU); BN is the 1.0x baseline of each mode. Then the
    extra variant, normlab GN with its ReLUs fused by normlab.optimize, at the same points
    (its ratio against the BN row of the same batch and mode)."""
    rs = _load("resnet50_step")
    header, rows, data = _results(session[1], "resnet50_step")
    assert tuple(header) == rs.ROW_FIELDS
    assert data["meta"]["complete"] is True and data["meta"]["autocast"] == "bfloat16"
    assert data["meta"]["normlab_backend"]  # names a backend (native on CPU)
    assert [r["norm"] for r in rows] == list(rs.NORMS) * 2 + list(rs.EXTRA_NORMS) * 2
    assert [r["graph"] for r in data["rows"]] == [False] * 3 + [True] * 3 + [False, True]
    for r in data["rows"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["img_per_s"] > 0, r
        assert r["norm_layers"] == 53
    assert data["rows"][0]["vs_bn"] == 1.0 and data["rows"][3]["vs_bn"] == 1.0
    for extra, bn in ((6, 0), (7, 3)):
        ratio = data["rows"][extra]["ms"] / data["rows"][bn]["ms"]
        assert data["rows"][extra]["vs_bn"] == pytest.approx(ratio)


def test_resnet50_fused_variant_fuses_the_relus():
    """normlab_gn_act is the normlab_gn model with the ReLUs that only read a GN's output
    fused into it by normlab.optimize: the stem's and the first two of each of the 16
    bottlenecks (33); the one after each residual add is not a GN's output. Same outputs as
    the unfused model on the same weights."""
    rs = _load("resnet50_step")
    torch.manual_seed(0)
    plain = rs.build_resnet50("normlab_gn", "normlab", num_classes=10)
    torch.manual_seed(0)
    fused = rs.build_resnet50("normlab_gn_act", "normlab", num_classes=10)
    acts = [m.activation for m in fused.modules() if hasattr(m, "activation")]
    assert sum(a == "relu" for a in acts) == 33 and len(acts) == 53
    x = torch.randn(2, 3, 32, 32) * 2 + 0.5
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_resnet50_measure_order_puts_the_extras_last():
    rs = _load("resnet50_step")
    order = rs.measure_order([64, 128], ["eager", "graph"], ["normlab_gn_act", "bn", "torch_gn"])
    assert order[:4] == [(64, False, "bn"), (64, False, "torch_gn"), (64, True, "bn"),
                         (64, True, "torch_gn")]
    assert [k for _, _, k in order[-4:]] == ["normlab_gn_act"] * 4 and len(order) == 12


def test_gpu_norm_failing_impl_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """An implementation that raises gets rows with status 'error: ...' and no time (empty CSV
    cells, JSON null); the others are still measured and the files are written per case."""
    gb = _load("gpu_norm")

    def broken(x, w, b, g):
        raise RuntimeError("kernel exploded")

    good = lambda x, w, b, g: torch.nn.functional.group_norm(x, g, w, b, 1e-5)  # noqa: E731
    monkeypatch.setattr(gb, "make_impls", lambda *a, **k: {"torch": good, "broken": broken})
    base = str(tmp_path / "r")
    calls = []

    def on_case(rows):
        calls.append(len(rows))
        gb.write_results(rows, {"device": "test"}, base)

    rows = gb.run_benchmarks(gb.DRY_CASES[:2], ["torch"], ["fwd"], [False], 10.0, 0, on_case,
                             device="cpu")
    assert calls == [2, 4]  # rewritten after each of the two cases
    assert {r["status"] for r in rows if r["impl"] == "torch"} == {"ok"}
    bad = [r for r in rows if r["impl"] == "broken"]
    assert len(bad) == 2 and all(r["status"].startswith("error: RuntimeError: kernel exploded")
                                 and math.isnan(r["time_us"]) for r in bad)
    with open(base + ".json") as f:
        assert [r["time_us"] for r in json.load(f)["rows"] if r["impl"] == "broken"] == [None, None]
    with open(base + ".csv", newline="") as f:
        assert [r["time_us"] for r in csv.DictReader(f) if r["impl"] == "broken"] == ["", ""]


@pytest.mark.parametrize("impl,key,value", [("normlab_noblock", "group_blocks", False),
                                            ("normlab_fold", "fold_rows", True)])
def test_tuned_impls_hold_their_switch_through_backward(monkeypatch, impl, key, value):
    """normlab_noblock times the v1 plan, normlab_fold the one-launch backward: their TUNING
    entry must be switched when the backward plans its launch too (autograd runs it after the
    forward call has returned), and restored afterwards."""
    gb = _load("gpu_norm")
    from normlab.backends import triton_norm as tn

    seen = []
    real = tn.plan_launch

    def spy(*a, **k):
        seen.append(tn.TUNING[key])
        return real(*a, **k)

    monkeypatch.setattr(tn, "plan_launch", spy)
    before = tn.TUNING[key]
    impls = gb.make_impls([impl])
    case = gb.DRY_CASES[1]  # channels_last: the blocked and v1 plans differ there
    xs, dys, w, b = gb._inputs(case, 1, "cpu")
    gb._step(impls[impl], xs, dys, w, b, case.groups, "fwdbwd")()
    assert len(seen) >= 2 and all(v == value for v in seen)  # forward and backward
    assert tn.TUNING[key] == before


def _session_calls():
    """(script name, argument list) for every Python benchmark call in gpu_session.sh, as the
    device runs it: no --dry-run, the device's sizes."""
    with open(os.path.join(BENCH, "gpu_session.sh")) as f:
        text = f.read().replace("\\\n", " ")
    sizes = re.search(r'^sizes="([^"]*)"', text, re.M).group(1)
    budgets = dict(re.findall(r"(\w+_BUDGET)=(\d+)", text))
    calls = []
    for m in re.finditer(r'"\$py" benchmarks/(\w+)\.py([^>\n]*)>', text):
        args = m.group(2).replace('"$out"', "OUTDIR").replace("$dry_flag", "")
        args = args.replace("$sizes", sizes)
        for name, value in budgets.items():
            args = args.replace(f'"${name}"', value)
        calls.append((m.group(1), shlex.split(args)))
    return calls


def _session_impls():
    (args,) = [a for name, a in _session_calls() if name == "gpu_norm"]
    i = args.index("--impls") + 1
    impls = []
    while i < len(args) and not args[i].startswith("--"):
        impls.append(args[i])
        i += 1
    return impls


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_session_script_syntax():
    proc = subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_session.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the benchmarks")
def test_session_script_passes_only_accepted_options(tmp_path):
    """Every option gpu_session.sh gives the scripts parses (argparse would exit with a usage
    error); without CUDA each script then refuses with status 2."""
    calls = _session_calls()
    assert [name for name, _ in calls] == ["gpu_norm", "resnet50_step"]
    for name, args in calls:
        args = [str(tmp_path) if a == "OUTDIR" else a for a in args]
        assert _load(name).main(args) == 2, (name, args)


def test_layer_norm_cases_follow_the_section6_shapes():
    """``ref6+ln``: the 13 section 6 GroupNorms first (the issue's order), then the LayerNorm
    rows as (rows, C, 1, 1) with one group; torch_ln is timed on those only, the BatchNorm and
    A/B impls not on them."""
    gb = _load("gpu_norm")
    cases = gb.build_cases("ref6+ln")
    assert [c.family for c in cases] == ["ref6"] * 13 + ["ln"] * len(gb.LN_ROWS)
    ln = cases[-1]
    assert (ln.h, ln.w, ln.groups) == (1, 1, 1)
    assert gb.applies("torch_ln", ln) and not gb.applies("torch_ln", cases[0])
    assert not gb.applies("torch_bn", ln) and not gb.applies("normlab_fold", ln)
    with pytest.raises(ValueError, match="'ln2'"):
        gb.build_cases("ln2")


def test_cpu_models_tiny_case(tmp_path):
    """cpu_models.py on its one tiny case (resnet18, batch 2, 32 px, one round, one thread):
    both pairs (timm vs normlab.optimize, torch GN vs normlab GN), both layouts, train step and
    eval forward; each row has two positive times and its ratio, and each pair computes the same
    outputs. Nothing is timed against anything."""
    cm = _load("cpu_models")
    import_timm = pytest.importorskip("timm_import").import_timm
    import_timm()  # skips when timm or torchvision is missing
    out = tmp_path / "cpu_models.csv"
    threads = torch.get_num_threads()
    try:
        assert cm.main(["--tiny", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tuple(cm.FIELDS)
        rows = list(reader)
    assert {(r["variant"], r["layout"], r["mode"]) for r in rows} == {
        (v, lay, m) for v in ("optimize", "gn") for lay in ("nchw", "cl") for m in ("train", "eval")}
    assert len(rows) == 8
    for r in rows:
        assert r["model"] == "resnet18" and r["threads"] == "1" and r["cpu"] and r["torch"]
        b, c = float(r["base_ms"]), float(r["cand_ms"])
        assert b > 0 and c > 0 and float(r["ratio"]) == pytest.approx(c / b, rel=0.02, abs=2e-3)
        assert float(r["max_diff"]) < 1e-4
    opt = next(r for r in rows if r["variant"] == "optimize")
    assert opt["record"].startswith("20 replaced, ") and "relu" in opt["record"]
    gn = next(r for r in rows if r["variant"] == "gn")
    assert gn["record"].startswith("20 GN")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cpu_layers_tiny_cases_in_both_modes(mode):
    """cpu_layers.py on its per-call ("tiny") cases, one repeat: a row per case with two
    positive times and their ratio, in the mode asked for. Nothing is timed against anything."""
    cl = _load("cpu_layers")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rows = [r for c in ("GN32 (2,", "BN (2,", "LN (2,", "RMS (2,")
                for r in cl.measure(1, c, mode)]
    finally:
        torch.set_num_threads(threads)
    assert [r["case"].split()[0] for r in rows] == ["GN32", "BN", "LN", "RMS"]
    for r in rows:
        assert r["case"].endswith("tiny") and r["mode"] == mode
        ours, theirs = r["normlab_us"], r["torch_us"]
        assert ours > 0 and theirs > 0 and r["ratio"] == pytest.approx(ours / theirs, rel=0.02)


def test_cpu_more_norms_tiny_cases(tmp_path):
    """cpu_more_norms.py on its per-call ("tiny") cases, one round, both modes, through main():
    every norm gets a row (train and eval), each after its check against the formula passed
    (max_diff within float32 rounding), with positive times and consistent ratios; the CSV has
    the script's columns. Nothing is timed against anything."""
    mn = _load("cpu_more_norms")
    out = tmp_path / "more.csv"
    threads = torch.get_num_threads()
    try:
        assert mn.main(["--cases", "FRN (2", "EvoS0 G32 (2", "EvoB0 (2", "BRN (2",
                        "FrozenBN (2", "SyncBN (2", "GhostBN cons vb1 (2", "WSConv 3x3 (2",
                        "ScaledWS 3x3 (2", "sync_batch_norm gloo1 (2", "--repeats", "1",
                        "--target-ms", "0.5",
                        "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == mn.FIELDS
        rows = list(reader)
    norms = ["FRN", "EvoS0", "EvoB0", "BRN", "FrozenBN", "SyncBN", "GhostBN", "WSConv", "ScaledWS"]
    assert sorted((r["case"].split()[0], r["mode"]) for r in rows) == sorted(
        [(n, m) for n in norms for m in ("train", "eval")] + [("sync_batch_norm", "train")])
    assert not torch.distributed.is_initialized()  # the gloo group of the sync case is gone
    for r in rows:
        assert r["case"].endswith("tiny") and r["shape"] == "(2,64,4,4)" and r["threads"] == "1"
        assert r["device"].startswith("cpu:") and r["torch"] == torch.__version__
        assert float(r["max_diff"]) < 1e-3, r
        ours, bn, formula = float(r["normlab_us"]), float(r["bn_us"]), float(r["formula_us"])
        assert ours > 0 and bn > 0 and formula > 0
        assert float(r["vs_bn"]) == pytest.approx(ours / bn, rel=0.02, abs=2e-3)
        assert float(r["vs_formula"]) == pytest.approx(ours / formula, rel=0.02, abs=2e-3)
        is_conv = r["case"].startswith(("WSConv", "ScaledWS"))
        assert (r["conv_us"] != "") == is_conv and (r["vs_conv"] != "") == is_conv


def test_cpu_more_norms_ghost_step_tiny(tmp_path):
    """--ghost-step's code on a batch of 4 (2 slices of 2), one round: the four ResNet-20 steps
    (BN, ghost BN consecutive and interleaved, GN) each get a positive time and its ratio to
    the interleaved one."""
    mn = _load("cpu_more_norms")
    rows = mn.ghost_step(1, batch=4, log=lambda s: None)
    assert [r["norm"] for r in rows] == list(mn.STEP_NORMS)
    intl = next(r for r in rows if r["norm"] == "ghost_intl")
    assert intl["vs_ghost_intl"] == 1.0
    for r in rows:
        assert r["ms"] > 0 and r["vs_ghost_intl"] == pytest.approx(r["ms"] / intl["ms"], rel=0.02)
    out = tmp_path / "step.csv"
    mn.write_csv(rows, str(out), mn.STEP_FIELDS)
    with open(out, newline="") as f:
        assert csv.DictReader(f).fieldnames == mn.STEP_FIELDS


def test_cpu_more_norms_check_catches_a_wrong_formula():
    """The check before timing is real: FRN's formula without its TLU, or EvoNorm-B0's with
    the unbiased batch variance, is refused with an AssertionError naming the case."""
    import dataclasses

    mn = _load("cpu_more_norms")
    frn = next(c for c in mn.CASES if c.label.startswith("FRN (2,"))

    def no_tlu(m, x):
        return x * torch.rsqrt(x.pow(2).mean((2, 3), keepdim=True) + m.eps) \
            * mn._view(m.weight) + mn._view(m.bias)

    with pytest.raises(AssertionError, match=r"FRN \(2,64,4,4\) tiny \(eval\): output"):
        with torch.no_grad():
            mn.measure_case(dataclasses.replace(frn, formula=no_tlu), "eval", 1, 1e-4)
    b0 = next(c for c in mn.CASES if c.label.startswith("EvoB0 (2,"))

    def unbiased(m, x):
        var_b = x.var(dim=(0, 2, 3))
        var_i = x.var(dim=(2, 3), unbiased=False, keepdim=True)
        den = torch.max(torch.sqrt(mn._view(var_b) + m.eps),
                        mn._view(m.v) * x + torch.sqrt(var_i + m.eps))
        return x / den * mn._view(m.weight) + mn._view(m.bias)

    with pytest.raises(AssertionError, match=r"EvoB0 \(2,64,4,4\) tiny \(train\)"):
        mn.measure_case(dataclasses.replace(b0, formula=unbiased), "train", 1, 1e-4)
