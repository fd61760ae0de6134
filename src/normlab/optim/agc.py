r"""Adaptive Gradient Clipping (Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image
Recognition Without Normalization", ICML 2021).

Unit-wise: for every unit i of a parameter W with gradient G,

.. math::
    G_i \leftarrow \begin{cases}
        \lambda \dfrac{\max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert} G_i &
            \text{if } \dfrac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda \\
        G_i & \text{otherwise}
    \end{cases}

with Frobenius norms, ``lambda = clip`` (0.01 at batch 1024-4096) and ``eps = 1e-3`` (so
zero-initialized parameters can still move). A *unit* is one output row: for a weight of shape
(out, ...) (Linear (out, in), Conv (out, in/groups, kh, kw), a Scaled-WS gain (out, 1, 1, 1)) the
unit is ``W[o]``, the whole fan-in of output o. 0-d and 1-d parameters (biases, norm affines,
SkipInit scalars) are by default one unit each, the whole tensor, as in the official NFNets code
(``vector_unit="tensor"``); ``vector_unit="element"`` makes every entry its own unit.

The Scaled-WS gain differs from the official code: there it is a vector (out,) and so one unit,
the whole tensor; here it has the shape (out, 1, 1, 1) and each output channel's gain is its own
unit, clipped to ``lambda * max(|g_o|, eps)`` (as timm's AGC does with its gains of that shape).

The final classifier must not be clipped: :class:`AGC` and :func:`agc_parameters` exclude it
by module name, never by position. By default (``exclude=None``) the names are
:func:`classifier_names`'s, which finds the classifier of normlab's models (``fc``), timm's
(``get_classifier()``: ``fc``, ``head.fc``, ``classifier``, ``head``, ...) and an
``nn.Sequential`` that ends in a Linear layer; ``exclude=()`` clips every parameter.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["unitwise_norm", "adaptive_grad_clip_", "agc_parameters", "classifier_names",
           "AGC"]

Params = Union[Tensor, Iterable[Tensor]]
_VECTOR_UNITS = ("tensor", "element")


def unitwise_norm(x: Tensor, vector_unit: str = "tensor") -> Tensor:
    """The L2 norm of every unit of ``x``, broadcastable against ``x``: over dims 1.. for
    ``x.dim() >= 2``; for 0-d/1-d ``x`` the whole-tensor norm (``"tensor"``) or ``|x|``
    (``"element"``).

    >>> unitwise_norm(torch.ones(4, 3, 2, 2)).flatten()
    tensor([3.4641, 3.4641, 3.4641, 3.4641])
    """
    if vector_unit not in _VECTOR_UNITS:
        raise ValueError(f"vector_unit must be one of {_VECTOR_UNITS}, got {vector_unit!r}")
    if x.dim() >= 2:
        return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)
    if vector_unit == "element":
        return x.abs()
    return torch.linalg.vector_norm(x)


def _check_number(value: Any, what: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"finite number, got {value!r}")
    return float(value)


@torch.no_grad()
def adaptive_grad_clip_(parameters: Params, clip: float = 0.01, eps: float = 1e-3, *,
                        vector_unit: str = "tensor") -> None:
    """Clip the gradients of ``parameters`` in place, unit-wise (see the module docstring).

    Parameters whose ``.grad`` is None are skipped. Sparse gradients are a TypeError. Computed in
    the gradient's dtype (float32 accumulation for half types).

    Args:
        parameters: a tensor or an iterable of tensors (e.g. ``agc_parameters(model)``).
        clip: lambda, the largest allowed ``||G_i|| / max(||W_i||, eps)``.
        eps: the floor on the weight norm.
        vector_unit: "tensor" or "element", for 0-d/1-d parameters.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential()
        >>> model.add_module("conv", torch.nn.Linear(8, 8)); model.add_module("fc", torch.nn.Linear(8, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> loss = model(torch.randn(4, 8)).square().mean()
        >>> loss.backward()
        >>> adaptive_grad_clip_(agc_parameters(model, exclude=("fc",)), clip=0.01)
        >>> optimizer.step()
    """
    clip = _check_number(clip, "clip")
    eps = _check_number(eps, "eps", allow_zero=True)
    if vector_unit not in _VECTOR_UNITS:
        raise ValueError(f"vector_unit must be one of {_VECTOR_UNITS}, got {vector_unit!r}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    for i, p in enumerate(parameters):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters must be tensors, got {type(p).__name__} at index {i}")
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise TypeError(f"adaptive_grad_clip_ does not support sparse gradients (index {i})")
        compute = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        w_norm = unitwise_norm(p.detach().to(compute), vector_unit).clamp_min(eps)
        g_norm = unitwise_norm(g.to(compute), vector_unit)
        max_norm = w_norm * clip
        # scale = max_norm / ||G_i|| where the ratio exceeds clip, else 1 (no division by 0 there)
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-30),
                            torch.ones_like(g_norm))
        g.mul_(scale.to(g.dtype))


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _last_linear(seq: nn.Sequential) -> Optional[str]:
    """The name, under ``seq``, of the layer it ends in when that is a Linear (through trailing
    Sequentials, and past trailing parameter-free layers such as Dropout or Flatten)."""
    for name, child in reversed(list(seq.named_children())):
        if isinstance(child, nn.Linear):
            return name
        if isinstance(child, nn.Sequential):
            sub = _last_linear(child)
            return None if sub is None else f"{name}.{sub}"
        if any(True for _ in child.parameters()):
            return None
    return None


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The module names of ``model``'s final classifier, for ``exclude`` of
    :func:`agc_parameters` and :class:`AGC`:

    * what ``model.get_classifier()`` returns, timm's convention (``fc``, ``head.fc``,
      ``classifier``, ``head``; a tuple of layers, as distilled DeiT's head and head_dist, gives
      each); a model of your own may define it too;
    * else a module named ``fc`` (every normlab model's classifier);
    * else, for an ``nn.Sequential``, the Linear layer it ends in.

    A ValueError, listing the model's top-level names, when none of these gives a layer with
    parameters (e.g. a timm model built with ``num_classes=0``: no classifier).

    >>> classifier_names(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                                      torch.nn.Linear(8, 2)))
    ('2',)
    """
    where = {id(m): n for n, m in model.named_modules()}
    tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
    what = type(model).__name__
    get = getattr(model, "get_classifier", None)
    if callable(get):
        found = get()
        layers = tuple(found) if isinstance(found, (tuple, list)) else (found,)
        names = tuple(where.get(id(m)) for m in layers)
        if any(n is None for n in names):
            raise ValueError(f"{what}.get_classifier() returned a module that is not one of "
                             f"the model's: {layers!r}")
        if not all(any(True for _ in model.get_submodule(n).parameters()) for n in names):
            raise ValueError(f"{what}.get_classifier() returned {names} with no parameters "
                             f"(a model without a classifier, e.g. num_classes=0)")
        return names
    if isinstance(getattr(model, "fc", None), nn.Module) and any(
            True for _ in model.fc.parameters()):
        return ("fc",)
    if isinstance(model, nn.Sequential):
        name = _last_linear(model)
        if name is not None:
            return (name,)
    raise ValueError(f"cannot tell the classifier of {what}: it has no get_classifier() "
                     f"method (timm's convention), no module named 'fc', and is not an "
                     f"nn.Sequential ending in a Linear layer; its top-level names are {tops}")


def agc_parameters(model: nn.Module,
                   exclude: Optional[Sequence[str]] = None) -> list[nn.Parameter]:
    """The parameters of ``model`` that AGC should clip: all but those of the modules (or
    parameters) named in ``exclude`` (a name matches itself and everything under it:
    ``"fc"`` matches ``fc.weight`` and ``fc.bias``, not ``fc2.weight``); ``None``: the
    classifier, :func:`classifier_names` (a ValueError where it cannot tell it).

    Each entry of ``exclude`` must match at least one parameter (ValueError otherwise, listing
    the model's top-level names), so a renamed classifier cannot silently get clipped.
    """
    if exclude is None:
        exclude = classifier_names(model)
    if isinstance(exclude, str):
        exclude = (exclude,)
    named = list(model.named_parameters())
    for e in exclude:
        if not isinstance(e, str) or not e:
            raise TypeError(f"exclude entries must be non-empty module names, got {e!r}")
        if not any(_matches(n, e) for n, _ in named):
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise ValueError(
                f"exclude={e!r} matches no parameter of {type(model).__name__}; "
                f"its top-level names are {tops}"
            )
    return [p for n, p in named if not any(_matches(n, e) for e in exclude)]


class AGC:
    """Wrap any optimizer so that each ``step()`` first clips, unit-wise, the gradients of the
    parameters the optimizer updates (its ``param_groups`` at that step, so groups added later
    with ``add_param_group`` are clipped too), except those of ``model``'s modules named in
    ``exclude`` (default: the classifier, :func:`classifier_names`). Parameters of ``model``
    that the optimizer does not hold are left alone (another optimizer may own them).

    Everything else (``zero_grad``, ``param_groups``, ``state_dict``, schedulers via
    ``.optimizer``) is the wrapped optimizer's; with a GradScaler, ``scaler.step(agc)`` unscales
    first and then calls ``agc.step()``, so the clipping sees the true gradients.

    Example::

        >>> from normlab.models import create
        >>> model = create("nf_resnet20")                # its classifier is ``fc``
        >>> opt = AGC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
        ...           clip=0.01, exclude=("fc",))
        >>> loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, clip: float = 0.01,
                 eps: float = 1e-3, exclude: Optional[Sequence[str]] = None,
                 vector_unit: str = "tensor") -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.clip = _check_number(clip, "clip")
        self.eps = _check_number(eps, "eps", allow_zero=True)
        if vector_unit not in _VECTOR_UNITS:
            raise ValueError(f"vector_unit must be one of {_VECTOR_UNITS}, got {vector_unit!r}")
        self.vector_unit = vector_unit
        if exclude is None:
            exclude = classifier_names(model)
        kept = {id(p) for p in agc_parameters(model, exclude)}
        # the excluded tensors themselves (not their ids, which a freed tensor's successor reuses)
        self._excluded = [p for p in model.parameters() if id(p) not in kept]
        self.exclude = tuple((exclude,) if isinstance(exclude, str) else exclude)

    @property
    def clipped(self) -> list[Tensor]:
        """The parameters the next ``step`` clips: the optimizer's, minus the excluded ones."""
        excluded = {id(p) for p in self._excluded}
        out, seen = [], set()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in excluded and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def clip_grads_(self) -> None:
        """Clip now (``step`` calls this)."""
        adaptive_grad_clip_(self.clipped, self.clip, self.eps, vector_unit=self.vector_unit)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if closure is not None:  # the closure recomputes the gradients: clip after each call
            def clipped_closure() -> Any:
                loss = closure()
                self.clip_grads_()
                return loss
            return self.optimizer.step(clipped_closure)
        self.clip_grads_()
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":  # not yet set (during unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return (f"AGC(clip={self.clip}, eps={self.eps}, exclude={self.exclude}, "
                f"optimizer={self.optimizer!r})")
