"""normlab.distributed helpers: DDP over 2 gloo processes against one process with the global
batch (GroupNorm, and BN converted to syncbn), the metric collectives, and the single-process
behaviour and argument checks of every helper.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
import dist_harness  # noqa: E402
import dist_workers  # noqa: E402

import normlab.distributed as nd  # noqa: E402

PER_PROCESS_BATCH = 4
SEED = 5


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    torch.manual_seed(99)
    out = str(tmp_path_factory.mktemp("ddp"))
    n = 2 * PER_PROCESS_BATCH
    x = torch.randn(n, 3, 8, 8) * 1.5 + 0.7
    y = torch.randint(0, 5, (n,))
    torch.save(dict(x=x, y=y, seed=SEED, batch=PER_PROCESS_BATCH), os.path.join(out, "data.pt"))
    dist_harness.run_workers(dist_workers.ddp_worker, 2, out, timeout=90)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    return x, y, ranks


def single_process_step(model, x, y):
    """One process, the global batch of 8 drawn by the same sampler, the same SGD step."""
    ds = TensorDataset(x, y, torch.arange(len(y)))
    sampler = nd.make_sampler(ds, shuffle=True, seed=SEED, num_replicas=1, this_rank=0)
    xb, yb, idx = next(iter(DataLoader(ds, batch_size=2 * PER_PROCESS_BATCH, sampler=sampler)))
    lr = nd.scaled_lr(2 * PER_PROCESS_BATCH, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    return model.state_dict(), idx, lr, loss.item()


# gn: DDP gradient averaging with a per-sample norm; syncbn: torch's BN model converted to
# normlab syncbn, against torch's own BN over the global batch (statistics must be global)
@pytest.mark.parametrize("name,build", [("gn", dist_workers.model_gn),
                                        ("syncbn", dist_workers.model_bn)])
def test_ddp_step_over_two_processes_equals_one_process_with_global_batch(ddp_run, name, build):
    x, y, ranks = ddp_run
    state, idx, lr, loss = single_process_step(build(), x, y)
    assert all(rk[f"{name}_wrapped"] == "DistributedDataParallel" for rk in ranks)
    # the two per-process batches together are exactly the single-process batch
    union = torch.cat([ranks[0][f"{name}_indices"], ranks[1][f"{name}_indices"]])
    assert sorted(union.tolist()) == sorted(idx.tolist())
    assert ranks[0][f"{name}_lr"] == lr  # linear scaling: 0.1 * 4 * 2 / 32 == 0.1 * 8 / 32
    assert ranks[0][f"{name}_loss_mean"] == pytest.approx(loss, rel=1e-5)
    moved = 0
    for key, ref in state.items():
        for rk in ranks:
            torch.testing.assert_close(rk[f"{name}_state"][key], ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")
        if ref.is_floating_point() and "running" not in key:
            moved += 1
    assert moved >= 5  # the comparison covered the model's parameters, not just buffers


def test_metric_collectives_and_identity(ddp_run):
    _, _, ranks = ddp_run
    for r, rk in enumerate(ranks):
        assert (rk["rank"], rk["world_size"], rk["is_distributed"], rk["is_main"]) == (
            r, 2, True, r == 0)
        assert rk["sum"] == [1.0 + 2.0, 0.0 + 2.0]
        assert rk["mean_unweighted"] == pytest.approx(0.5)
        assert rk["mean_weighted"] == pytest.approx(0.25)  # (0 * 3 + 1 * 1) / 4
        # weight 0 contributes nothing, not even its NaN (NaN * 0 made every rank's mean NaN)
        assert rk["mean_empty_rank"] == 2.5
        assert rk["broadcast"] == {"run": "from-rank-0"}
        assert "convert_norm(model, 'syncbn')" in rk["torch_syncbn_error"]


# --------------------------------------------------------------------------------------------
# single process
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "NORMLAB_DIST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)


def test_alone_everything_is_a_no_op(no_torchrun_env):
    assert (nd.rank(), nd.world_size(), nd.local_rank()) == (0, 1, 0)
    assert not nd.is_distributed() and nd.is_main_process()
    assert nd.setup(device="cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert nd.all_reduce_mean(2.5, weight=3) == 2.5
    assert nd.all_reduce_sum([1.0, 2.0]).tolist() == [1.0, 2.0]
    assert nd.broadcast_object({"a": 1}) == {"a": 1}
    model = nn.Linear(2, 2)
    assert nd.wrap_ddp(model, "cpu") is model and nd.unwrap(model) is model
    nd.barrier()
    nd.cleanup()


def test_env_is_read_before_setup(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (nd.rank(), nd.world_size(), nd.local_rank(), nd.is_main_process()) == (3, 4, 1, False)
    assert nd.rank_seed(7) == 7 + 1009 * 3
    # WORLD_SIZE > 1 without the rendezvous variables: a clear error naming them
    with pytest.raises(ValueError, match=r"\$MASTER_ADDR, \$MASTER_PORT"):
        nd.setup(device="cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match=r"\$RANK must be an integer, got 'x'"):
        nd.rank()


def test_scaled_lr_is_the_linear_rule():
    assert nd.scaled_lr(32, 1) == pytest.approx(0.1)
    assert nd.scaled_lr(4, 2) == pytest.approx(0.1 * 8 / 32)
    assert nd.scaled_lr(2, 8, base_lr=0.2, base_batch=64) == pytest.approx(0.2 * 16 / 64)
    with pytest.raises(ValueError, match="batch_per_process must be a positive int, got 0"):
        nd.scaled_lr(0, 2)
    with pytest.raises(ValueError, match="world must be a positive int, got 2.5"):
        nd.scaled_lr(4, 2.5)
    # a string was a TypeError from '>' that did not name the value; inf was accepted
    for bad in ("0.1", float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match=f"base_lr must be a finite number > 0, got {bad!r}"):
            nd.scaled_lr(4, 2, base_lr=bad)


@pytest.mark.parametrize("world", [2, 3])  # 3 does not divide 10: padding
def test_make_sampler_global_batches_do_not_depend_on_process_count(world):
    ds = TensorDataset(torch.arange(10))
    one = list(nd.make_sampler(ds, shuffle=True, seed=3, num_replicas=1, this_rank=0))
    shards = [list(nd.make_sampler(ds, shuffle=True, seed=3, num_replicas=world, this_rank=r))
              for r in range(world)]
    # position i of rank r is element r + i * world of the one-process order (padded)
    padded = one + one[: (-len(one)) % world]
    for r, shard in enumerate(shards):
        assert shard == padded[r::world]
    later = nd.make_sampler(ds, shuffle=True, seed=3, num_replicas=1, this_rank=0)
    nd.set_epoch(later, 1)
    assert list(later) != one and sorted(later) == sorted(one)  # a new epoch reshuffles
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        nd.make_sampler(ds, num_replicas=2, this_rank=2)


def test_eval_sampler_sees_every_item_exactly_once():
    ds = TensorDataset(torch.arange(7))  # 7 items over 3 ranks: 3, 2, 2
    shards = [list(nd.make_eval_sampler(ds, num_replicas=3, this_rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert [len(nd.make_eval_sampler(ds, num_replicas=3, this_rank=r)) for r in range(3)] == [3, 2, 2]


def test_torchrun_command_rendezvous_modes():
    base = ["-m", "normlab.lab.cli", "train", "--norm", "gn"]
    cmd = nd.torchrun_command(base, 2, python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[-5:] == ["-m", "normlab.lab.cli", "train", "--norm", "gn"]
    assert cmd[cmd.index("--max-restarts") + 1] == "0"
    static = nd.torchrun_command(["train.py"], 4, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                                 master_port=29400)
    i = static.index("--node-rank")
    assert static[i : i + 6] == ["--node-rank", "1", "--master-addr", "10.0.0.1",
                                 "--master-port", "29400"]
    assert static[-1] == "train.py" and "--standalone" not in static
    rdzv = nd.torchrun_command(["train.py"], 8, nnodes=3, rdzv_endpoint="head:29500")
    assert rdzv[rdzv.index("--rdzv-endpoint") + 1] == "head:29500"
    assert rdzv[rdzv.index("--rdzv-backend") + 1] == "c10d"


@pytest.mark.parametrize(
    "kwargs,err,needle",
    [(dict(argv="train.py", nproc_per_node=2), TypeError, "train.py"),     # a string, not a list
     (dict(argv=[], nproc_per_node=2), TypeError, r"\[\]"),                # empty
     (dict(argv=["-m"], nproc_per_node=2), ValueError, "needs a module"),  # -m without module
     (dict(argv=["t.py"], nproc_per_node=0), ValueError, "nproc_per_node.*0"),
     (dict(argv=["t.py"], nproc_per_node=2, nnodes=2, node_rank=2, master_port=1),
      ValueError, "node_rank.*2"),
     (dict(argv=["t.py"], nproc_per_node=2, master_port=70000), ValueError, "70000"),
     (dict(argv=["t.py"], nproc_per_node=2, nnodes=2), ValueError, "needs master_port"),
     (dict(argv=["t.py"], nproc_per_node=2, rdzv_endpoint="nohost"), ValueError, "nohost"),
     # a port out of range: torchrun itself failed on it with a traceback
     (dict(argv=["t.py"], nproc_per_node=2, rdzv_endpoint="head:99999"), ValueError,
      "head:99999"),
     # c10d assigns node ranks and hosts the store: static options were silently dropped
     (dict(argv=["t.py"], nproc_per_node=2, rdzv_endpoint="head:29400", master_port=29500),
      ValueError, "does not combine with master_port 29500"),
     (dict(argv=["t.py"], nproc_per_node=2, nnodes=2, node_rank=1, rdzv_endpoint="head:29400"),
      ValueError, "does not combine with node_rank 1")],
)
def test_launch_rejects_bad_arguments(kwargs, err, needle):
    with pytest.raises(err, match=needle):
        nd.launch(**kwargs)


def test_launch_refuses_a_master_port_in_use(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    marker = tmp_path / "started"
    script = tmp_path / "t.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    try:
        # node rank 0 of a static rendezvous hosts the store on master_port: one clear error
        # before torchrun starts (torchrun failed with an EADDRINUSE traceback and the launcher
        # blamed a worker)
        with pytest.raises(ValueError, match=f"master_port {port} cannot be used on this host"
                                             ".*already in use"):
            nd.launch([str(script)], nproc_per_node=2, master_port=port, timeout=30)
        # another node's rank does not host it: no check there (the port is on the master)
        cmd = nd.torchrun_command([str(script)], 2, nnodes=2, node_rank=1, master_port=port)
        assert cmd[cmd.index("--master-port") + 1] == str(port)
    finally:
        busy.close()
    assert not marker.exists()


# a rendezvous host that does not resolve: torchrun retried it for its whole rendezvous timeout
# (minutes); ".invalid" never resolves (RFC 2606)
@pytest.mark.parametrize("kwargs,needle", [
    (dict(master_addr="nosuchhost.invalid", master_port=29581, nnodes=2, node_rank=1),
     "master_addr 'nosuchhost.invalid' is not a known host"),           # static rendezvous
    (dict(rdzv_endpoint="nosuchhost.invalid:29400", nnodes=2),
     "rdzv_endpoint 'nosuchhost.invalid' is not a known host")])        # c10d rendezvous
def test_launch_refuses_an_unknown_rendezvous_host(tmp_path, kwargs, needle):
    marker = tmp_path / "started"
    script = tmp_path / "t.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match=needle):
        nd.launch([str(script)], nproc_per_node=1, timeout=30, **kwargs)
    assert not marker.exists()


# a bad collective timeout for the workers: each of them failed on it in setup(), one
# traceback per rank, and the launcher blamed "a worker"; "inf" and "1e30" overflowed timedelta
# there (an OverflowError traceback)
@pytest.mark.parametrize("raw", ["soon", "-3", "inf", "1e30"])
def test_launch_checks_the_workers_timeout_first(tmp_path, raw):
    marker = tmp_path / "started"
    script = tmp_path / "t.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match=f"NORMLAB_DIST_TIMEOUT must be .*got '{raw}'"):
        nd.launch([str(script)], nproc_per_node=2, timeout=30, env={"NORMLAB_DIST_TIMEOUT": raw})
    assert not marker.exists()


def test_all_reduce_mean_checks_its_weight_alone_too(no_torchrun_env):
    # the same bad call fails on one process as on many (it was checked only when distributed)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got -1"):
        nd.all_reduce_mean(1.0, weight=-1)
    assert nd.all_reduce_mean(1.5, weight=0) == 1.5


def test_setup_rejects_bad_timeout_and_device(no_torchrun_env, monkeypatch):
    with pytest.raises(ValueError, match="timeout must be a positive"):
        nd.setup(timeout=datetime.timedelta(seconds=-1), device="cpu")
    monkeypatch.setenv("NORMLAB_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="NORMLAB_DIST_TIMEOUT must be seconds, got 'soon'"):
        nd.setup(device="cpu")
    with pytest.raises(ValueError, match="'meta'"):
        nd.setup(device="meta")
