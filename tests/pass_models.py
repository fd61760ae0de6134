"""Small models the model-pass tests (tests/test_fold.py, tests/test_optimize.py) share."""

import torch
from torch import nn


class SequentialKeepingAll(nn.Sequential):
    """A Sequential subclass whose forward also returns each layer's output (feature
    extraction): the norm's and the conv's outputs are read, which no trace of this model can
    show (fx cannot trace it: the branch on a tensor's value)."""

    def forward(self, x):
        outs = []
        for layer in self:
            x = layer(x)
            outs.append(x.mean())
        return torch.stack(outs) if x.sum() > -1e9 else -torch.stack(outs)  # untraceable
