"""The small CNN of the BatchNorm + dropout ablation (CIFAR-10; BN: Ioffe & Szegedy,
ICML 2015; dropout: Srivastava et al., JMLR 2014).

    conv 5x5, 32  [+ norm] + ReLU, max-pool 2
    conv 5x5, 64  [+ norm] + ReLU, max-pool 2
    dense 1024    [+ norm] + ReLU, dropout p
    dense num_classes                                   (named ``fc``)

Switches: ``bn_conv`` (norm after both convs), ``bn_dense`` (norm after the hidden dense layer),
``dropout`` (p after the hidden dense layer). The twelve configurations of the ablation are
dropout in {0, 0.2, 0.4} x (bn_conv, bn_dense) in {F, T}^2; the default is the configuration
the ablation reports best (BN on conv and dense layers, dropout 0.4; the lab's ``bn-dropout``
study quotes it and states that the ablation's paper is not named in this project's sources).
Convs pad 2 ("same"), so an HxW input reaches the dense layer as 64 x (H//4) x (W//4):
``image_size`` (default 8 for one-channel input, the 8x8 digits, else 32 for CIFAR) fixes that
size; another input size raises a ValueError naming the ``image_size`` to use.

``norm`` is any :func:`normlab.create_norm` spec. The dense layer's norm is the 2-D module applied
to the (N, 1024) activations viewed as (N, 1024, 1, 1), so "bn" there is exactly BatchNorm1d
(statistics over the batch per feature), "gn"/"ln"/"ln2d" normalize over features per sample;
"in" is undefined on one value per channel and rejected for the dense layer.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

from normlab.factory import canonical_name, create_norm
from normlab.models.registry import keyword_names, register

__all__ = ["BNDropoutCNN"]


class _Dense2d(nn.Module):
    """Apply a (N, C, *spatial) norm to (N, C) features through a (N, C, 1, 1) view."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x[:, :, None, None]).flatten(1)


class BNDropoutCNN(nn.Module):
    """The BN + dropout ablation CNN.

    Args:
        norm: normalization spec (default "bn").
        bn_conv: norm after each conv layer.
        bn_dense: norm after the hidden dense layer.
        dropout: dropout probability after the hidden dense layer, in [0, 1).
        num_classes, in_chans: outputs and input channels.
        image_size: input H = W (or (H, W)); default 8 if ``in_chans == 1`` else 32.
        hidden: hidden dense units (1024).
        norm_kwargs: passed to every norm layer.

    Shape: (N, in_chans, H, W) -> (N, num_classes).

    Example::

        >>> model = BNDropoutCNN(bn_conv=True, bn_dense=False, dropout=0.2)
        >>> digits = BNDropoutCNN(in_chans=1)          # 8x8 one-channel input
    """

    def __init__(self, *, norm: Any = "bn", bn_conv: bool = True, bn_dense: bool = True,
                 dropout: float = 0.4, num_classes: int = 10, in_chans: int = 3,
                 image_size: Optional[Union[int, Sequence[int]]] = None, hidden: int = 1024,
                 norm_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        for flag, what in ((bn_conv, "bn_conv"), (bn_dense, "bn_dense")):
            if not isinstance(flag, bool):
                raise TypeError(f"{what} must be a bool, got {flag!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if image_size is None:
            image_size = 8 if in_chans == 1 else 32
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 4 for s in hw):
            raise ValueError(
                f"image_size must be an int >= 4 or an (H, W) pair, got {image_size!r}"
            )
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        kw = dict(norm_kwargs or {})
        if norm is None:
            norm = "none"
        if bn_dense and isinstance(norm, str) and canonical_name(norm) == "in":
            raise ValueError(
                "norm='in' is undefined after the dense layer (one value per sample and channel); "
                "use bn_dense=False or another norm"
            )

        # a layer followed by a real norm needs no bias; with norm "none" it keeps its bias
        has_norm = not (isinstance(norm, str) and canonical_name(norm) == "none")
        conv_bias = not (bn_conv and has_norm)
        dense_bias = not (bn_dense and has_norm)

        def make(c: int) -> nn.Module:
            return create_norm(norm, c, **kw)

        def conv_unit(cin: int, cout: int) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 5, padding=2, bias=conv_bias)]
            if bn_conv:
                layers.append(make(cout))
            return nn.Sequential(*layers, nn.ReLU(), nn.MaxPool2d(2))

        self.image_size, self.in_chans, self.num_classes = hw, in_chans, num_classes
        self.features = nn.Sequential(conv_unit(in_chans, 32), conv_unit(32, 64))
        self.flat_features = 64 * (hw[0] // 4) * (hw[1] // 4)
        dense = [nn.Linear(self.flat_features, hidden, bias=dense_bias)]
        if bn_dense:
            dense.append(_Dense2d(make(hidden)))
        self.dense = nn.Sequential(*dense, nn.ReLU(), nn.Dropout(float(dropout)))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        if tuple(h.shape[-2:]) != (self.image_size[0] // 4, self.image_size[1] // 4):
            raise ValueError(
                f"bn_dropout_cnn was built for {self.image_size[0]}x{self.image_size[1]} inputs; "
                f"got input of shape {tuple(x.shape)}: create it with "
                f"image_size=({x.shape[-2]}, {x.shape[-1]})"
            )
        return self.fc(self.dense(h.flatten(1)))


register("bn_dropout_cnn", lambda **kw: BNDropoutCNN(**kw),
         options=keyword_names(BNDropoutCNN, ("norm", "num_classes", "in_chans")))
