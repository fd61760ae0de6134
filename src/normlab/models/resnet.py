"""ResNets with any normalization (He et al., CVPR 2016; pre-activation: He et al., "Identity
Mappings in Deep Residual Networks", ECCV 2016), as used by the Group Normalization paper (Wu & He,
ECCV 2018).

Two families, both post-activation (conv-norm-ReLU, ReLU after the addition) or pre-activation
(norm-ReLU-conv, nothing after the addition):

* CIFAR-style, depth 6n+2: a 3x3 stem conv to ``width`` (16) channels, three stages of n basic
  blocks at widths (w, 2w, 4w) and strides (1, 2, 2). ``resnet20/32/56/110`` (post-activation) and
  ``preact_resnet20/32/56/110``.
* ImageNet-style: a 7x7 stride-2 stem conv and 3x3 stride-2 max pool (or, ``small_input=True``, a
  3x3 stride-1 stem conv and no pool, for 8x8-32x32 images), four stages at widths
  (w, 2w, 4w, 8w), strides (1, 2, 2, 2): ``resnet18/34`` (basic blocks, [2,2,2,2] / [3,4,6,3]) and
  ``resnet50/101`` (bottlenecks with expansion 4 and the stride on the 3x3 conv, [3,4,6,3] /
  [3,4,23,3]). ``preact=True`` gives their pre-activation form. Global average pooling makes any
  input size work (statistics layers need more than one value to normalize over, so InstanceNorm
  needs ``small_input=True`` on inputs below 64x64).

Every block's last normalization can start with gamma = 0 (``zero_init_last=True``, the GN paper's
init), making the block the identity at init. Pre-activation blocks take ``order="norm_act"``
(BN-ReLU-Conv, the standard) or ``order="act_norm"`` (ReLU-BN-Conv), the two orders compared by the
signal propagation plots of Brock, De & Smith (ICLR 2021). A transition block (stride or width
change) has a 1x1 projection shortcut (option B) followed by a norm (post-activation) or taking
the pre-activated input (pre-activation). The classifier is ``fc``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from torch import Tensor, nn

from normlab.factory import create_norm
from normlab.models.registry import keyword_names, register
from normlab.models.residual import ResidualBlock

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "PreActBasicBlock", "PreActBottleneck",
    "cifar_resnet", "imagenet_resnet",
]

NormLayer = Callable[[int], nn.Module]
_ORDERS = ("norm_act", "act_norm")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=False)


class _Block(ResidualBlock):
    expansion = 1

    def last_norm(self) -> nn.Module:
        """The residual branch's last normalization layer (gamma = 0 with zero_init_last)."""
        raise NotImplementedError


class BasicBlock(_Block):
    """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, planes: int, stride: int, norm: NormLayer) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv3x3(cin, planes, stride), norm(planes)
        self.conv2, self.norm2 = conv3x3(planes, planes), norm(planes)
        self.act = nn.ReLU()
        self.has_projection = stride != 1 or cin != planes
        self.shortcut = (nn.Sequential(conv1x1(cin, planes, stride), norm(planes))
                         if self.has_projection else nn.Identity())

    def last_norm(self) -> nn.Module:
        return self.norm2

    def forward(self, x: Tensor) -> Tensor:
        r = self.act(self.norm1(self.conv1(x)))
        r = self.branch_out(self.norm2(self.conv2(r)))
        return self.act(r + self.shortcut(x))


class Bottleneck(_Block):
    """Post-activation bottleneck: 1x1 reduce, 3x3 (stride), 1x1 expand (x4), each conv-norm,
    ReLU between and after the addition."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: NormLayer) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.norm1 = conv1x1(cin, planes), norm(planes)
        self.conv2, self.norm2 = conv3x3(planes, planes, stride), norm(planes)
        self.conv3, self.norm3 = conv1x1(planes, cout), norm(cout)
        self.act = nn.ReLU()
        self.has_projection = stride != 1 or cin != cout
        self.shortcut = (nn.Sequential(conv1x1(cin, cout, stride), norm(cout))
                         if self.has_projection else nn.Identity())

    def last_norm(self) -> nn.Module:
        return self.norm3

    def forward(self, x: Tensor) -> Tensor:
        r = self.act(self.norm1(self.conv1(x)))
        r = self.act(self.norm2(self.conv2(r)))
        r = self.branch_out(self.norm3(self.conv3(r)))
        return self.act(r + self.shortcut(x))


class _PreAct(_Block):
    """norm+act in the chosen order: ``act(norm(x))`` (norm_act) or ``norm(act(x))`` (act_norm)."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order
        self.act = nn.ReLU()

    def pre(self, norm: nn.Module, x: Tensor) -> Tensor:
        return self.act(norm(x)) if self.order == "norm_act" else norm(self.act(x))


class PreActBasicBlock(_PreAct):
    """Pre-activation basic block: ``x + conv2(pre2(conv1(pre1(x))))``; a projection shortcut
    takes ``pre1(x)``."""

    def __init__(self, cin: int, planes: int, stride: int, norm: NormLayer,
                 order: str = "norm_act") -> None:
        super().__init__(order)
        self.norm1, self.conv1 = norm(cin), conv3x3(cin, planes, stride)
        self.norm2, self.conv2 = norm(planes), conv3x3(planes, planes)
        self.has_projection = stride != 1 or cin != planes
        self.shortcut = conv1x1(cin, planes, stride) if self.has_projection else nn.Identity()

    def last_norm(self) -> nn.Module:
        return self.norm2

    def forward(self, x: Tensor) -> Tensor:
        p = self.pre(self.norm1, x)
        skip = self.shortcut(p) if self.has_projection else x
        r = self.conv1(p)
        r = self.branch_out(self.conv2(self.pre(self.norm2, r)))
        return r + skip


class PreActBottleneck(_PreAct):
    """Pre-activation bottleneck: pre-conv1x1, pre-conv3x3 (stride), pre-conv1x1 (x4)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: NormLayer,
                 order: str = "norm_act") -> None:
        super().__init__(order)
        cout = planes * self.expansion
        self.norm1, self.conv1 = norm(cin), conv1x1(cin, planes)
        self.norm2, self.conv2 = norm(planes), conv3x3(planes, planes, stride)
        self.norm3, self.conv3 = norm(planes), conv1x1(planes, cout)
        self.has_projection = stride != 1 or cin != cout
        self.shortcut = conv1x1(cin, cout, stride) if self.has_projection else nn.Identity()

    def last_norm(self) -> nn.Module:
        return self.norm3

    def forward(self, x: Tensor) -> Tensor:
        p = self.pre(self.norm1, x)
        skip = self.shortcut(p) if self.has_projection else x
        r = self.conv1(p)
        r = self.conv2(self.pre(self.norm2, r))
        r = self.branch_out(self.conv3(self.pre(self.norm3, r)))
        return r + skip


class ResNet(nn.Module):
    """A ResNet from a block type and blocks per stage.

    Args:
        block: one of :class:`BasicBlock`, :class:`Bottleneck`, :class:`PreActBasicBlock`,
            :class:`PreActBottleneck`.
        layers: blocks per stage, e.g. (3, 3, 3) for ResNet-20.
        widths: base channels per stage (blocks output ``width * block.expansion``).
        stem: "cifar" (3x3 conv), "imagenet" (7x7/2 conv + 3x3/2 max pool) or "small" (3x3 conv,
            no pool). Post-activation stems have norm + ReLU after the conv; pre-activation CIFAR
            stems are the conv alone, pre-activation ImageNet stems keep norm + ReLU before the
            pool.
        norm: builds a norm layer for C channels.
        order: pre-activation blocks only: "norm_act" or "act_norm".
        num_classes, in_chans: classifier outputs and input channels.
        zero_init_last: gamma = 0 on each block's last norm, if that gamma is a learnable
            parameter (no effect with ``norm="none"``, ``"frozenbn"`` or ``affine=False``).

    Shape: (N, in_chans, H, W) -> (N, num_classes), any H, W >= 1 (adaptive average pooling).
    """

    def __init__(self, block: type, layers: Sequence[int], widths: Sequence[int], *,
                 stem: str, norm: NormLayer, order: str = "norm_act", num_classes: int = 10,
                 in_chans: int = 3, zero_init_last: bool = False) -> None:
        super().__init__()
        preact = issubclass(block, _PreAct)
        _check_bool(zero_init_last, "zero_init_last")
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        if stem not in ("cifar", "imagenet", "small"):
            raise ValueError(f"stem must be 'cifar', 'imagenet' or 'small', got {stem!r}")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.preact, self.order = preact, order
        w0 = widths[0]
        if stem == "imagenet":
            conv = nn.Conv2d(in_chans, w0, 7, 2, 3, bias=False)
            self.stem = nn.Sequential(conv, norm(w0), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        elif preact and stem == "cifar":
            self.stem = nn.Sequential(conv3x3(in_chans, w0))
        else:
            self.stem = nn.Sequential(conv3x3(in_chans, w0), norm(w0), nn.ReLU())
        kw = {"order": order} if preact else {}
        stages, cin = [], w0
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, w, stride, norm, **kw))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        if preact:
            self.final = nn.Sequential(norm(cin), nn.ReLU()) if order == "norm_act" \
                else nn.Sequential(nn.ReLU(), norm(cin))
        else:
            self.final = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self._init(zero_init_last)

    def _init(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, _Block):
                    w = getattr(m.last_norm(), "weight", None)
                    # only a learnable gamma: a frozen one (FrozenBatchNorm's weight is a buffer)
                    # set to 0 would switch the residual branch off for good
                    if isinstance(w, nn.Parameter):
                        nn.init.zeros_(w)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.final(self.stages(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


# -------------------------------------------------------------------------------- builders


def _norm_layer(norm: Any, norm_kwargs: Optional[dict]) -> NormLayer:
    if norm_kwargs is not None and not isinstance(norm_kwargs, dict):
        raise TypeError(f"norm_kwargs must be a dict, got {type(norm_kwargs).__name__}")
    kw = dict(norm_kwargs or {})
    if norm is None:
        norm = "none"
    create_norm(norm, 8, **kw)  # fail at build time, with the factory's message, on a bad norm
    return lambda c: create_norm(norm, c, **kw)


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, got {value!r}")
    return value


def _check_width(width: Any) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    return width


def cifar_resnet(depth: int, *, preact: bool = False, norm: Any = "bn",
                 norm_kwargs: Optional[dict] = None, num_classes: int = 10, in_chans: int = 3,
                 width: int = 16, zero_init_last: bool = False, order: str = "norm_act") -> ResNet:
    """CIFAR-style ResNet of depth 6n+2 (basic blocks, 3 stages of n blocks).

    Example::

        >>> model = cifar_resnet(20, norm="gn", norm_kwargs={"num_groups": 8})
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth!r}")
    w = _check_width(width)
    _check_bool(preact, "preact")
    n = (depth - 2) // 6
    if not preact and order != "norm_act":
        raise ValueError(f"order={order!r} applies to pre-activation models only")
    block = PreActBasicBlock if preact else BasicBlock
    return ResNet(block, (n, n, n), (w, 2 * w, 4 * w), stem="cifar",
                  norm=_norm_layer(norm, norm_kwargs), order=order, num_classes=num_classes,
                  in_chans=in_chans, zero_init_last=zero_init_last)


_IMAGENET = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)),
             50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3))}


def imagenet_resnet(depth: int, *, preact: bool = False, norm: Any = "bn",
                    norm_kwargs: Optional[dict] = None, num_classes: int = 10, in_chans: int = 3,
                    width: int = 64, zero_init_last: bool = False, small_input: bool = False,
                    order: str = "norm_act") -> ResNet:
    """ImageNet-style ResNet-18/34/50/101; ``small_input=True`` for a 3x3 stride-1 stem, no pool.

    Example::

        >>> model = imagenet_resnet(50, norm="gn", num_classes=1000, zero_init_last=True)
    """
    if depth not in _IMAGENET:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET)}, got {depth!r}")
    if not preact and order != "norm_act":
        raise ValueError(f"order={order!r} applies to pre-activation models only")
    _check_bool(preact, "preact")
    _check_bool(small_input, "small_input")
    bottleneck, layers = _IMAGENET[depth]
    if preact:
        block = PreActBottleneck if bottleneck else PreActBasicBlock
    else:
        block = Bottleneck if bottleneck else BasicBlock
    w = _check_width(width)
    return ResNet(block, layers, (w, 2 * w, 4 * w, 8 * w),
                  stem="small" if small_input else "imagenet",
                  norm=_norm_layer(norm, norm_kwargs), order=order, num_classes=num_classes,
                  in_chans=in_chans, zero_init_last=zero_init_last)


def _register() -> None:
    common = ("depth", "norm", "num_classes", "in_chans")
    post = keyword_names(cifar_resnet, common)
    pre = keyword_names(cifar_resnet, common + ("preact",))
    big = keyword_names(imagenet_resnet, common)
    for d in (20, 32, 56, 110):
        register(f"resnet{d}", lambda d=d, **kw: cifar_resnet(d, **kw), options=post)
        register(f"preact_resnet{d}", lambda d=d, **kw: cifar_resnet(d, preact=True, **kw),
                 options=pre)
    for d in _IMAGENET:
        register(f"resnet{d}", lambda d=d, **kw: imagenet_resnet(d, **kw), options=big)


_register()
