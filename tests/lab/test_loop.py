"""One run: a resumed run equals an uninterrupted one, what a run records, old checkpoints."""

import math

import pytest
import torch

import normlab
from normlab.lab.config import RunConfig
from normlab.lab.loop import train_run
from normlab.lab.store import Store

# a small, fast run: 8x8 synthetic images, ResNet-20, 3 epochs of 12 steps
TINY = dict(data="synthetic", data_kwargs={"n_train": 96, "n_test": 64, "image_size": 8,
                                           "channels": 2, "num_classes": 4},
            batch_size=8, epochs=3, threads=1)


class _Stop(Exception):
    pass


def test_resumed_run_equals_uninterrupted(tmp_path):
    cfg = RunConfig(norm="bn", **TINY)
    with Store(tmp_path / "a") as a:
        a.claim(cfg.run_id(), cfg.to_dict())
        full = train_run(cfg, a)
        hist_a = a.epochs(cfg.run_id())

    def stop_in_epoch_2(event, info):  # dies during the third epoch, after two checkpoints
        if event == "step" and info.get("advance") and stop_in_epoch_2.epoch == 2:
            raise _Stop
        if event == "start":
            stop_in_epoch_2.epoch = info["epoch"]
    stop_in_epoch_2.epoch = 0
    with Store(tmp_path / "b") as b:
        b.claim(cfg.run_id(), cfg.to_dict())
        with pytest.raises(_Stop):
            train_run(cfg, b, progress=stop_in_epoch_2)
        assert b.run(cfg.run_id())["status"] == "running"
        assert len(b.epochs(cfg.run_id())) == 2
        assert b.checkpoint_path(cfg.run_id()).is_file()
        resumed = train_run(cfg, b)
        hist_b = b.epochs(cfg.run_id())
        assert resumed["resumed_from"] == 2 and b.run(cfg.run_id())["status"] == "done"
        assert not b.checkpoint_path(cfg.run_id()).exists()
    assert full["resumed_from"] == 0
    for ra, rb in zip(hist_a, hist_b, strict=True):
        for k in ("train_loss", "test_loss", "test_error"):
            assert ra[k] == rb[k], k  # same data order, RNG state and weights: identical


def test_records_versions_device_and_throughput(tmp_path):
    cfg = RunConfig(norm="gn", norm_kwargs={"num_groups": 4}, **{**TINY, "epochs": 1})
    with Store(tmp_path) as s:
        s.claim(cfg.run_id(), cfg.to_dict())
        train_run(cfg, s)
        r = s.run(cfg.run_id())
    assert r["device"].startswith("cpu") and r["versions"]["torch"] == torch.__version__
    assert r["images_per_s"] > 0 and r["wall_time"] > 0
    assert 0 <= r["final_test_error"] <= 100 and math.isfinite(r["final_test_loss"])
    assert r["config"]["norm_kwargs"] == {"num_groups": 4}
    # the report's cost columns: the backend that ran, the training's peak memory (CPU: the
    # tensor bytes of a step; ResNet-20's 0.27M parameters alone, x3 with grads and momentum,
    # are 3.1 MiB)
    assert r["backend"] == "native"
    assert r["peak_memory_mb"] > 3.0


def test_a_named_backend_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "reference")
    cfg = RunConfig(norm="gn", norm_kwargs={"num_groups": 4}, **{**TINY, "epochs": 1})
    with Store(tmp_path) as s:
        s.claim(cfg.run_id(), cfg.to_dict())
        train_run(cfg, s)
        assert s.run(cfg.run_id())["backend"] == "reference"


@pytest.mark.lab_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_device_trains_on_the_gpu(tmp_path):
    # device "auto" (the default) picks CUDA when there is one: bf16 autocast, channels_last
    cfg = RunConfig(norm="gn", norm_kwargs={"num_groups": 4}, **{**TINY, "epochs": 1})
    assert cfg.device == "auto"
    with Store(tmp_path) as s:
        s.claim(cfg.run_id(), cfg.to_dict())
        res = train_run(cfg, s)
    assert res["device"].startswith("cuda:") and math.isfinite(res["final_test_loss"])


def test_nf_checkpoint_of_the_one_group_optimizer_starts_over(tmp_path):
    # a checkpoint written when NF models had one (all-decayed) parameter group is another
    # recipe: the run restarts from epoch 0 instead of failing on load at every re-run
    cfg = RunConfig(model="nf_resnet20", **{**TINY, "epochs": 2})
    with Store(tmp_path) as s:
        s.claim(cfg.run_id(), cfg.to_dict())
        torch.manual_seed(cfg.seed)
        from normlab.lab.recipe import build_model

        model = build_model(cfg, 4, 2, 8)
        old_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        ckpt = s.checkpoint_path(cfg.run_id())
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": old_opt.state_dict(), "epoch": 0,
                    "history": [{"epoch": 0}], "elapsed": 1.0, "train_time": 1.0,
                    "train_images": 96, "run_id": cfg.run_id(), "world_size": 1,
                    "batch_per_process": 8}, ckpt)
        with pytest.warns(RuntimeWarning, match="does not fit this run .*parameter group"):
            res = train_run(cfg, s)  # said, naming the file, which is moved aside
        assert not ckpt.exists() and ckpt.with_name(ckpt.name + ".damaged").is_file()
        assert res["resumed_from"] == 0 and s.run(cfg.run_id())["status"] == "done"
        assert [e["epoch"] for e in s.epochs(cfg.run_id())] == [0, 1]


def test_precise_bn_evaluates_a_copy_and_leaves_training_alone(tmp_path, monkeypatch):
    """--set precise_bn=B: every epoch tests a copy whose BN statistics precise_bn recomputed
    over B training batches; the training itself is bit for bit the same."""
    from normlab.lab import loop

    calls = []

    def spy(model, batches, num_batches, **kw):
        record = normlab.precise_bn(model, batches, num_batches, **kw)
        calls.append((record.batches, sorted(record.recomputed)))
        return record

    monkeypatch.setattr(loop, "precise_bn", spy)
    histories = {}
    for b in (0, 5, 50):
        cfg = RunConfig(norm="bn", precise_bn=b, **TINY)
        with Store(tmp_path / f"p{b}") as store:
            store.claim(cfg.run_id(), cfg.to_dict())
            train_run(cfg, store)
            histories[b] = store.epochs(cfg.run_id())
    bns = sorted(_resnet20_bn_names())
    assert calls == [(5, bns)] * 3 + [(12, bns)] * 3  # 12 steps per epoch: all of them
    for b in (5, 50):
        for plain, precise in zip(histories[0], histories[b], strict=True):
            assert precise["train_loss"] == plain["train_loss"]  # training unchanged
            assert precise["test_loss"] != plain["test_loss"]  # other statistics tested
    assert histories[5][-1]["test_loss"] != histories[50][-1]["test_loss"]


def _resnet20_bn_names():
    from normlab import models

    net = models.create("resnet20", norm="bn", num_classes=4, in_chans=2)
    return [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_precise_bn_is_in_the_run_id_only_when_on():
    assert "precise_bn" not in RunConfig().identity()  # ids of runs stored before it stay
    assert RunConfig(precise_bn=0).run_id() == RunConfig().run_id()
    assert RunConfig(precise_bn=20).identity()["precise_bn"] == 20
    for bad, kind in ((-1, "must be a number of batches >= 0"), (True, "precise_bn"),
                      (2.5, "precise_bn")):
        with pytest.raises(ValueError, match=kind):
            RunConfig(precise_bn=bad).validate()


def test_an_owner_taken_over_leaves_its_successors_checkpoint(tmp_path):
    # _write_epoch saved the checkpoint before record_epochs checked the owner: an owner taken
    # over as stale (stopped, then woken) wrote its checkpoint over its successor's once, so a
    # successor killed before its next epoch resumed from the old owner's state
    from types import SimpleNamespace

    from normlab.lab import checkpoint
    from normlab.lab.loop import _write_epoch
    from normlab.lab.store import TakenOver

    cfg = RunConfig(norm="gn", batch_size=2, epochs=3)
    model = torch.nn.Linear(2, 2)
    with Store(tmp_path) as s:
        s.claim(cfg.run_id(), cfg.to_dict())
        run = SimpleNamespace(cfg=cfg, store=s, ckpt=str(s.checkpoint_path(cfg.run_id())),
                              model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1),
                              history=[{"epoch": 0, "train_loss": 1.0}], elapsed=1.0,
                              train_time=1.0, train_images=8, batch=2)
        _write_epoch(run, 0, {})  # ours: written
        assert checkpoint.read(run.ckpt)[0]["epoch"] == 0
        # the successor took the run over and checkpointed its epoch 1
        s.con.execute("UPDATE runs SET owner='other-host:7' WHERE run_id=?", (cfg.run_id(),))
        theirs = {**checkpoint.read(run.ckpt)[0], "epoch": 1, "elapsed": 42.0}
        checkpoint.save(run.ckpt, theirs)
        run.history.append({"epoch": 1, "train_loss": 9.0})
        with pytest.raises(TakenOver, match="other-host:7"):
            _write_epoch(run, 1, {})
        state, _ = checkpoint.read(run.ckpt)
        assert (state["epoch"], state["elapsed"]) == (1, 42.0)  # the successor's, untouched
        assert not list(s.checkpoint_dir.glob("*.tmp*"))  # the stale write removed
