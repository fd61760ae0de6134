r"""Normalizer-free ResNets (Brock, De & Smith, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets", ICLR 2021).

No normalization layer anywhere. Each residual block computes

.. math::
    x_{l+1} = \mathrm{shortcut}(x_l) + \alpha \, f_l(x_l / \beta_l)

where ``f_l`` is a pre-activation residual branch of Scaled-WS convolutions
(:class:`normlab.nn.ScaledStdConv2d`) and gamma-scaled activations, built so that
``Var(f_l(z)) = Var(z)`` at initialization for unit-Gaussian-like z.

The analytic variance (why ``beta`` is what it is)
--------------------------------------------------
Write ``v_l`` for the expected variance of the block input ``x_l``; the stem output has
``v_0 = 1`` (a Scaled-WS conv with gamma = 1 on unit-Gaussian input). ``beta_l = sqrt(v_l)``
makes the branch input ``x_l / beta_l`` unit-variance, so the branch output has variance 1
and, the branch and the shortcut being uncorrelated at init,

* an identity-shortcut block gives ``v_{l+1} = v_l + alpha^2``;
* a transition block (first of a stage, stride or width change) has a Scaled-WS 1x1 shortcut
  conv that takes the block's normalized, activated input ``act(x_l / beta_l)`` (the same
  pre-activation as the branch), whose output has variance 1 exactly as for the branch convs, so
  the variance *resets*: ``v_{l+1} = 1 + alpha^2``.

Hence within a stage the variance grows as ``1 + k alpha^2`` (k blocks since the reset); for
ResNet-50 with alpha = 0.2 the 1/beta per block are 1, .9806, .9623 | .9449, .9806, .9623,
.9449 | .9285, .9806, ... | .8980, .9806, .9623. Every block stores its
``beta`` and ``expected_var`` (= v_{l+1}); :meth:`NFResNet.betas` lists them. ``beta`` is the
same with SkipInit or ``zero_init_last``, but ``expected_var`` describes active branches: with
either, every branch starts at 0 and the measured variance starts near 1 at every block.

Only a transition *resets* the variance; a first block without a projection (the CIFAR nets' and
ResNet-18/34's first stage: same width, stride 1) keeps its identity shortcut and grows it.

``v_0 = 1`` holds for the 3x3 stems (``stem="cifar"``/``"small"``), not after the ImageNet stem's
3x3/2 max pool: a max of ~9 near-independent unit Gaussians has mean ~1.49 and variance ~0.36.
The betas assume 1 all the same, as the official NF-ResNet code does (its nets are bottlenecks,
whose first block is a transition). With that stem the ``expected_var`` do not describe the net:
measured at init, NF-ResNet-18/34's first stage runs at ~0.4 of them, with a squared channel mean
~2, and the next transitions ~1.2x; :func:`normlab.spp.expected_variance` leaves such nets out.

Activation gamma: ``gamma = 1 / std(act(z))``, z ~ N(0, 1), so ``gamma * act`` is
variance-preserving on unit-Gaussian input; it is folded into the Scaled-WS conv that follows the
activation. Known activations use the official empirical values (:data:`GAMMAS`);
:func:`activation_gamma` computes it for any callable by numerical integration (for ReLU it gives
the closed form ``sqrt(2 / (1 - 1/pi)) = 1.71286``).

Other options: SkipInit (a learnable scalar on each branch, init 0, De & Smith 2020) or a
zero-init gain on each branch's last conv, dropout before the classifier, stochastic depth with
rate ``stochastic_depth * block_index / num_blocks``, and ``std_conv=False`` (plain convs with He
init and an un-scaled activation: the "unnormalized ResNet with He init" of the signal propagation
plots, whose channel means drift).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.registry import keyword_names, register
from normlab.models.residual import DropPath, ResidualBlock
from normlab.nn import ScaledStdConv2d

__all__ = ["GAMMAS", "ACTIVATIONS", "activation_gamma", "get_activation", "NFResNet",
           "NFBasicBlock", "NFBottleneck", "analytic_betas", "nf_cifar_resnet",
           "nf_imagenet_resnet"]

#: Official empirical gammas (the NFNets code of Brock et al. 2021).
GAMMAS: dict[str, float] = {
    "identity": 1.0, "relu": 1.7139588594, "gelu": 1.7015043498, "silu": 1.7881293297,
    "tanh": 1.5939117670, "elu": 1.2716004849, "leaky_relu": 1.7059034109,
    "relu6": 1.7131484747, "sigmoid": 4.8038353920, "softplus": 1.9203323126,
}

#: The activation functions by name (leaky_relu with slope 0.01, gelu exact).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
    "tanh": torch.tanh, "elu": F.elu, "leaky_relu": F.leaky_relu, "relu6": F.relu6,
    "sigmoid": torch.sigmoid, "softplus": F.softplus,
}

Activation = Union[str, Callable[[Tensor], Tensor]]


def get_activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    """The function for an activation name (:data:`ACTIVATIONS`) or the callable itself."""
    if isinstance(activation, str):
        key = activation.strip().lower()
        if key not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)} "
                "(or pass a callable)"
            )
        return ACTIVATIONS[key]
    if callable(activation):
        return activation
    raise TypeError(f"activation must be a name or a callable, got {type(activation).__name__}")


def activation_gamma(activation: Activation, *, numeric: bool = False,
                     points: int = 2 ** 18 + 1, bound: float = 12.0) -> float:
    r"""``gamma = 1 / sqrt(Var[act(z)])`` for z ~ N(0, 1).

    Named activations return :data:`GAMMAS` unless ``numeric=True``; callables are always
    integrated numerically: composite Simpson's rule in float64 on ``points`` nodes over
    ``[-bound, bound]`` of :math:`E[f] = \int f(z) \phi(z) dz` and :math:`E[f^2]` (error below 1e-8
    for piecewise-smooth activations like ReLU). ``act`` must map a float64 tensor elementwise.

    Example::

        >>> round(activation_gamma("relu", numeric=True), 5)     # sqrt(2 / (1 - 1/pi))
        1.71286
        >>> import torch
        >>> round(activation_gamma(lambda x: torch.relu(x) ** 2), 5)   # any elementwise callable
        0.89443
    """
    if isinstance(activation, str) and not numeric:
        get_activation(activation)
        return GAMMAS[activation.strip().lower()]
    fn = get_activation(activation)
    if isinstance(points, bool) or not isinstance(points, int) or points < 101 or points % 2 == 0:
        raise ValueError(f"points must be an odd int >= 101 (Simpson's rule), got {points!r}")
    if not (isinstance(bound, (int, float)) and bound > 0 and math.isfinite(bound)):
        raise ValueError(f"bound must be a positive finite number, got {bound!r}")
    z = torch.linspace(-bound, bound, points, dtype=torch.float64)
    w = torch.ones_like(z)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w *= (z[1] - z[0]) / 3 * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    with torch.no_grad():
        y = fn(z)
    if not isinstance(y, Tensor) or y.shape != z.shape:
        raise ValueError("activation must map a tensor elementwise to a tensor of the same shape")
    y = y.to(torch.float64)
    mean = (w * y).sum()
    var = (w * (y - mean) ** 2).sum().item()
    if not math.isfinite(var) or var <= 0:
        raise ValueError(f"activation has variance {var!r} on N(0, 1) input; no gamma exists")
    return 1.0 / math.sqrt(var)


def analytic_betas(num_blocks_and_projection: Sequence[bool], alpha: float) -> list[float]:
    """beta_l for a sequence of blocks given whether each has a projection (transition) shortcut:
    ``v_0 = 1``; ``beta_l = sqrt(v_l)``; ``v_{l+1} = 1 + alpha^2`` after a transition, else
    ``v_l + alpha^2``.

    >>> [round(1 / b, 4) for b in analytic_betas([True, False, False, True], 0.2)]
    [1.0, 0.9806, 0.9623, 0.9449]
    """
    betas, v = [], 1.0
    for proj in num_blocks_and_projection:
        betas.append(math.sqrt(v))
        v = 1.0 + alpha ** 2 if proj else v + alpha ** 2
    return betas


def _conv(cin: int, cout: int, k: int, stride: int, *, gamma: float, std_conv: bool,
          gain_init: float = 1.0) -> nn.Conv2d:
    """A Scaled-WS conv (``gamma``), or with ``std_conv=False`` a plain conv with He init (ReLU
    gain for convs after an activation, i.e. ``gamma != 1``; gamma itself is then unused)."""
    if std_conv:
        conv = ScaledStdConv2d(cin, cout, k, stride, k // 2, bias=True, gamma=gamma,
                               gain_init=gain_init)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
    else:
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=True)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in",
                                nonlinearity="relu" if gamma != 1.0 else "linear")
        if gain_init == 0.0:
            nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _NFBlock(ResidualBlock):
    """Shared parts: beta/alpha scaling, shortcut, SkipInit, drop path."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, *, act: Callable[[Tensor], Tensor],
                 gamma: float, alpha: float, beta: float, skipinit: bool, drop_path: float,
                 std_conv: bool) -> None:
        super().__init__()
        self.act, self.alpha, self.beta = act, float(alpha), float(beta)
        self.expected_var = float("nan")  # set by NFResNet: the analytic Var(x_{l+1})
        self.has_projection = stride != 1 or cin != cout
        self.shortcut = (_conv(cin, cout, 1, stride, gamma=gamma, std_conv=std_conv)
                         if self.has_projection else None)
        self.skip_gain = nn.Parameter(torch.zeros(())) if skipinit else None
        self.drop_path = DropPath(drop_path)

    def branch(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(x / self.beta)
        skip = self.shortcut(out) if self.shortcut is not None else x
        r = self.drop_path(self.branch_out(self.branch(out)))
        if self.skip_gain is not None:
            r = r * self.skip_gain
        return skip + self.alpha * r

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}, expected_var={self.expected_var:.4f}"


class NFBasicBlock(_NFBlock):
    """``x + alpha * conv3x3(act(conv3x3(act(x / beta))))`` (pre-activation basic block)."""

    def __init__(self, cin: int, planes: int, stride: int, *, zero_init_last: bool,
                 **kw: Any) -> None:
        super().__init__(cin, planes, stride, **kw)
        g, s = kw["gamma"], kw["std_conv"]
        self.conv1 = _conv(cin, planes, 3, stride, gamma=g, std_conv=s)
        self.conv2 = _conv(planes, planes, 3, 1, gamma=g, std_conv=s,
                           gain_init=0.0 if zero_init_last else 1.0)

    def branch(self, out: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(out)))


class NFBottleneck(_NFBlock):
    """Pre-activation bottleneck: 1x1 reduce, 3x3 (stride), 1x1 expand (x4), act between."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, zero_init_last: bool,
                 **kw: Any) -> None:
        super().__init__(cin, planes * 4, stride, **kw)
        g, s = kw["gamma"], kw["std_conv"]
        self.conv1 = _conv(cin, planes, 1, 1, gamma=g, std_conv=s)
        self.conv2 = _conv(planes, planes, 3, stride, gamma=g, std_conv=s)
        self.conv3 = _conv(planes, planes * 4, 1, 1, gamma=g, std_conv=s,
                           gain_init=0.0 if zero_init_last else 1.0)

    def branch(self, out: Tensor) -> Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(out)))))


class NFResNet(nn.Module):
    """A normalizer-free ResNet.

    Args:
        block: :class:`NFBasicBlock` or :class:`NFBottleneck`.
        layers: blocks per stage; widths: base channels per stage.
        stem: "cifar"/"small" (3x3 conv) or "imagenet" (7x7/2 conv + 3x3/2 max pool); the stem
            conv has gamma = 1 (its input is the raw image, not an activation).
        num_classes, in_chans: classifier outputs (``fc``) and input channels.
        alpha: the residual branch scale (0.2).
        activation: a name in :data:`ACTIVATIONS` or any elementwise callable.
        gamma: override the activation's gamma (default: :func:`activation_gamma`).
        drop_rate: dropout before the classifier.
        stochastic_depth: max drop-path rate; block i of L drops with ``rate * i / L``.
        skipinit: a zero-init learnable scalar on each residual branch.
        zero_init_last: zero-init the gain of each branch's last conv.
        std_conv: Scaled WS (True) or plain He-init convs with an un-scaled activation (False).

    Shape: (N, in_chans, H, W) -> (N, num_classes).
    """

    def __init__(self, block: type, layers: Sequence[int], widths: Sequence[int], *,
                 stem: str = "cifar", num_classes: int = 10, in_chans: int = 3,
                 alpha: float = 0.2, activation: Activation = "relu",
                 gamma: Optional[float] = None, drop_rate: float = 0.0,
                 stochastic_depth: float = 0.0, skipinit: bool = True,
                 zero_init_last: bool = False, std_conv: bool = True) -> None:
        super().__init__()
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        for v, what in ((drop_rate, "drop_rate"), (stochastic_depth, "stochastic_depth")):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{what} must be in [0, 1), got {v!r}")
        if stem not in ("cifar", "imagenet", "small"):
            raise ValueError(f"stem must be 'cifar', 'imagenet' or 'small', got {stem!r}")
        for v, what in ((skipinit, "skipinit"), (zero_init_last, "zero_init_last"),
                        (std_conv, "std_conv")):
            if not isinstance(v, bool):
                raise TypeError(f"{what} must be a bool, got {v!r}")
        act = get_activation(activation)
        if gamma is None:
            gamma = activation_gamma(activation)
        elif not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.alpha, self.gamma, self.activation = float(alpha), float(gamma), activation
        self.act = act
        w0 = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(_conv(in_chans, w0, 7, 2, gamma=1.0, std_conv=std_conv),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(_conv(in_chans, w0, 3, 1, gamma=1.0, std_conv=std_conv))
        total, idx, v = sum(layers), 0, 1.0
        stages, cin = [], w0
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                b = block(cin, w, stride, zero_init_last=zero_init_last, act=act,
                          gamma=self.gamma, alpha=alpha, beta=math.sqrt(v), skipinit=skipinit,
                          drop_path=stochastic_depth * idx / total, std_conv=std_conv)
                v = 1.0 + alpha ** 2 if b.has_projection else v + alpha ** 2
                b.expected_var = v
                blocks.append(b)
                cin, idx = w * block.expansion, idx + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(float(drop_rate))
        self.fc = nn.Linear(cin, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def betas(self) -> list[float]:
        """The analytic beta of every block, in order."""
        return [b.beta for b in self.modules() if isinstance(b, _NFBlock)]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.act(self.stages(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(self.forward_features(x)).flatten(1)))


# -------------------------------------------------------------------------------- builders


def _check_width(width: Any) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    return width


def _sd(stochastic_depth: float, drop_path_rate: Optional[float]) -> float:
    if drop_path_rate is not None:
        if stochastic_depth:
            raise ValueError("give one of stochastic_depth and drop_path_rate, got "
                             f"stochastic_depth={stochastic_depth!r}, "
                             f"drop_path_rate={drop_path_rate!r}")
        return drop_path_rate
    return stochastic_depth


def nf_cifar_resnet(depth: int, *, width: int = 16, stochastic_depth: float = 0.0,
                    drop_path_rate: Optional[float] = None, **kw: Any) -> NFResNet:
    """CIFAR-style NF-ResNet of depth 6n+2 (3 stages of n basic blocks, 3x3 stem)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth!r}")
    n, w = (depth - 2) // 6, _check_width(width)
    return NFResNet(NFBasicBlock, (n, n, n), (w, 2 * w, 4 * w), stem="cifar",
                    stochastic_depth=_sd(stochastic_depth, drop_path_rate), **kw)


_IMAGENET = {18: (NFBasicBlock, (2, 2, 2, 2)), 34: (NFBasicBlock, (3, 4, 6, 3)),
             50: (NFBottleneck, (3, 4, 6, 3)), 101: (NFBottleneck, (3, 4, 23, 3))}


def nf_imagenet_resnet(depth: int, *, width: int = 64, small_input: bool = False,
                       stochastic_depth: float = 0.0, drop_path_rate: Optional[float] = None,
                       **kw: Any) -> NFResNet:
    """ImageNet-style NF-ResNet-18/34/50/101; ``small_input=True``: 3x3 stride-1 stem, no pool."""
    if depth not in _IMAGENET:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET)}, got {depth!r}")
    if not isinstance(small_input, bool):
        raise TypeError(f"small_input must be a bool, got {small_input!r}")
    block, layers = _IMAGENET[depth]
    w = _check_width(width)
    return NFResNet(block, layers, (w, 2 * w, 4 * w, 8 * w),
                    stem="small" if small_input else "imagenet",
                    stochastic_depth=_sd(stochastic_depth, drop_path_rate), **kw)


def _register() -> None:
    net = keyword_names(NFResNet, ("block", "layers", "widths", "stem", "num_classes",
                                   "in_chans", "stochastic_depth"))
    small = keyword_names(nf_cifar_resnet, ("depth",)) + net
    big = keyword_names(nf_imagenet_resnet, ("depth",)) + net
    for d in (20, 32, 56, 110):
        register(f"nf_resnet{d}", lambda d=d, **kw: nf_cifar_resnet(d, **kw), uses_norm=False,
                 options=small)
    for d in _IMAGENET:
        register(f"nf_resnet{d}", lambda d=d, **kw: nf_imagenet_resnet(d, **kw),
                 uses_norm=False, options=big)


_register()
