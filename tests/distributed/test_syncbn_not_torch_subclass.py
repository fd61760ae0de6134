"""Why normlab.nn.SyncBatchNorm is not a torch.nn.SyncBatchNorm (issue 13 item 8): DDP refuses
every CPU model that holds an instance of torch's class, and normlab's SyncBatchNorm exists to
synchronize BN on CPU (gloo) as well as CUDA. One process, gloo, an in-memory store."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import normlab.nn as nlnn
from formula import off_centre


@pytest.fixture
def gloo_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _TorchSubclass(nlnn.SyncBatchNorm, nn.SyncBatchNorm):
    """What a subclass of torch's SyncBatchNorm would be: normlab's forward, torch's type."""


def test_ddp_on_cpu_refuses_any_torch_syncbn_but_takes_normlabs(gloo_group):
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        DDP(nn.Sequential(nn.Conv2d(3, 4, 1), _TorchSubclass(4)))
    model = DDP(nn.Sequential(nn.Conv2d(3, 4, 1), nlnn.SyncBatchNorm(4)))
    x = off_centre(4, 3, 5, 5)
    y = model(x)
    bn = nn.BatchNorm2d(4)  # one process: the statistics of this batch, as BatchNorm's
    bn.load_state_dict(model.module[1].state_dict())
    torch.testing.assert_close(y, bn(model.module[0](x)).detach(), atol=1e-5, rtol=1e-5)
