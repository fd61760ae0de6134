"""Run checkpoints are read with torch.load(weights_only=True): a planted file cannot run code,
and an unusable one is named, moved aside and treated as absent (issue 14 items 1 and 3)."""

import os
import pickle
import random

import pytest
import torch
from torch import nn

from normlab.lab.checkpoint import discard, read, save


class _Payload:
    """Unpickling it calls os.mkdir(path): what a planted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _state():
    """A real checkpoint: a conv + BN model and SGD with momentum after one step (so the
    optimizer holds momentum buffers), with the loop's bookkeeping."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 6, 6) + 0.5).square().mean().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "history": [{"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 0.1} for e in range(4)],
            "elapsed": 12.5, "train_time": 10.0, "train_images": 256, "run_id": "abc",
            "world_size": 1, "batch_per_process": 32}


def test_a_real_checkpoint_round_trips_under_weights_only(tmp_path):
    state = _state()
    save(tmp_path / "r.pt", state)
    got, problem = read(tmp_path / "r.pt")
    assert problem is None
    assert all(torch.equal(got["model"][k], v) for k, v in state["model"].items())
    buf = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(got["optimizer"]["state"][0]["momentum_buffer"], buf)
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert got["history"] == state["history"] and got["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["r.pt"]  # no temporary left
    assert read(tmp_path / "absent.pt") == (None, None)


@pytest.mark.parametrize("write", [
    lambda p, payload: torch.save({**_state(), "model": payload}, p),  # torch's zip format
    lambda p, payload: p.write_bytes(pickle.dumps({"model": payload})),  # a bare pickle
], ids=["torch.save", "pickle"])
def test_a_planted_checkpoint_cannot_run_code(tmp_path, write):
    marker = tmp_path / "payload-ran"
    write(tmp_path / "r.pt", _Payload(marker))
    state, problem = read(tmp_path / "r.pt")
    assert state is None and not marker.exists()
    assert problem.startswith("does not load (refused by torch.load(weights_only=True)")


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(random.Random(0).randbytes(2048)), "does not load (refused"),
    (lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),         # cut off
     "failed reading zip archive"),
    (lambda p: p.write_bytes(b""), "does not load"),                           # empty
    (lambda p: torch.save([1, 2], p), "holds a list"),                         # not a dict
    (lambda p: torch.save({**_state(), "epoch": "3"}, p), "mistypes epoch"),   # wrong type
    (lambda p: torch.save({"model": {}}, p), "lacks or mistypes optimizer"),   # wrong keys
])
def test_an_unusable_checkpoint_is_named_and_moved_aside(tmp_path, damage, needle):
    p = tmp_path / "run1.pt"
    save(p, _state())
    damage(p)
    state, problem = read(p)
    assert state is None and needle in problem, problem
    line = discard(p, problem)
    assert str(p) in line and "moved to run1.pt.damaged" in line and "epoch 0" in line
    assert not p.exists() and (tmp_path / "run1.pt.damaged").is_file()
    assert read(p) == (None, None)


def test_a_checkpoint_that_is_no_regular_file_is_moved_aside_unread(tmp_path):
    # a FIFO planted at a run's checkpoint name (run ids are predictable) blocked torch.load,
    # and the run, forever; a link to a device the same
    p = tmp_path / "run1.pt"
    os.mkfifo(p)
    assert read(p) == (None, "is not a regular file")
    assert "moved to run1.pt.damaged" in discard(p, "is not a regular file")
    os.symlink("/dev/zero", p)
    assert read(p) == (None, "is not a regular file")


def test_a_second_damaged_checkpoint_does_not_replace_the_first(tmp_path):
    # os.replace moved the second one over run1.pt.damaged: the first file set aside "for a
    # look" (another recipe's checkpoint, say) was gone
    p = tmp_path / "run1.pt"
    for i, text in enumerate(("first", "second", "third")):
        p.write_text(text)
        assert f"moved to {['run1.pt.damaged', 'run1.pt.damaged.1', 'run1.pt.damaged.2'][i]};" \
            in discard(p, "does not load")
    kept = ("run1.pt.damaged", "run1.pt.damaged.1", "run1.pt.damaged.2")
    assert [(tmp_path / n).read_text() for n in kept] == ["first", "second", "third"]


# seeds of 2048 random bytes whose torch.load(weights_only=True) raises something other than
# UnpicklingError (found by trying seeds 0-299): read() let these through and the run crashed
@pytest.mark.parametrize("seed, raised", [(2, "IndexError"), (20, "KeyError"),
                                          (195, "UnicodeDecodeError")])
def test_any_garbage_is_a_damaged_checkpoint_not_a_crash(tmp_path, seed, raised):
    p = tmp_path / "run1.pt"
    p.write_bytes(random.Random(seed).randbytes(2048))
    state, problem = read(p)
    assert state is None and problem.startswith(f"does not load ({raised}"), problem
