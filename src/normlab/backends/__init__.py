"""Backend registry and selection for the normalization operator.

A backend computes the one operator of :func:`normlab.functional.normalize`. Three exist:

``reference``
    Readable pure torch (``backends/reference.py``). Correct in float64; the spec that every fast
    path is tested against. Slow.
``native``
    ATen's fused kernels (``F.batch_norm``, ``F.group_norm``, ...) wherever they compute the same
    thing (``backends/native.py``). The fastest choice on CPU.
``triton``
    Fused Triton kernels for CUDA tensors (``backends/triton_norm.py``). Also runs on CPU tensors
    under ``TRITON_INTERPRET=1`` (slow; for testing only).

Selection, strongest first: the ``backend=`` argument of a functional call, the innermost
``with normlab.use_backend(name):`` block, the ``NORMLAB_BACKEND`` environment variable, and
finally ``"auto"``. An explicitly named backend that cannot run the call raises
:class:`BackendUnavailable`; ``"auto"`` picks the fastest backend that supports the call and
falls back silently. Under ``torch.onnx.export`` (either exporter) the backend in force is not
used: the program is written with ATen's ops (``native``; functional.py writes the TorchScript
exporter's other calls with torch's own ops), since a Triton kernel's custom op has no ONNX
form. A plain ``torch.export`` keeps that op.

Every backend implements the :class:`Backend` interface below.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import threading
from typing import Iterator, Optional, Protocol, Tuple

import torch
from torch import Tensor

__all__ = [
    "Backend",
    "BackendUnavailable",
    "available_backends",
    "current_backend",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "use_backend",
    "BACKEND_NAMES",
]

ENV_VAR = "NORMLAB_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call (not installed, wrong device, ...)."""


class Backend(Protocol):
    """What a backend provides. All tensors keep their device; shapes are documented per argument.

    ``normalize`` returns ``(y, mean, rstd)``: ``y`` has ``x``'s shape, dtype and memory format;
    ``mean`` and ``rstd`` are float32 (float64 for float64 input) of shape ``(G,)`` when
    ``over_batch`` else ``(N, G)``. When ``running_mean``/``running_var`` (shape ``(G,)``) are given,
    they are updated in place with ``momentum`` (the weight of the new batch statistic; the
    running variance receives the unbiased batch variance). ``y`` is differentiable with respect to
    ``x``, ``weight`` and ``bias``; ``mean`` and ``rstd`` are not meant to be differentiated.
    :func:`normlab.functional.normalize` checks the arguments for every backend: running buffers
    arrive as floating ``(G,)`` tensors, and never requiring grad while grad is enabled (that is
    its RuntimeError, as torch's batch_norm raises one).

    ``center=False`` (keyword-only) takes the statistics without centering (RMSNorm, Filter
    Response Normalization): ``y = act(gamma_c * x * rstd + beta_c)`` with ``rstd = 1 /
    sqrt(mean_S(x^2) + eps)``; the returned ``mean`` is zeros. It is never combined with running
    statistics (:func:`normlab.functional.normalize` rejects that). A backend takes it when its
    ``normalize`` has the ``center`` parameter (or it sets the class attribute
    ``supports_uncentered``, which wins); ``auto`` skips one that does not, and naming it
    explicitly for such a call raises :class:`BackendUnavailable`.
    """

    name: str

    def available(self) -> bool:
        """Whether this backend can run at all in this process (installed, has a device)."""

    def unsupported_reason(
        self, x: Tensor, num_groups: int, over_batch: bool, activation: Optional[str]
    ) -> Optional[str]:
        """``None`` if the call is supported, else a short human-readable reason."""

    def normalize(
        self,
        x: Tensor,  # (N, C, *spatial), any memory format
        num_groups: int,
        over_batch: bool,
        weight: Optional[Tensor],  # (C,)
        bias: Optional[Tensor],  # (C,)
        eps: float,
        activation: Optional[str],
        running_mean: Optional[Tensor],  # (G,), updated in place
        running_var: Optional[Tensor],  # (G,), updated in place
        momentum: float,
        *,
        center: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        ...

    def normalize_fixed(
        self,
        x: Tensor,  # (N, C, *spatial)
        mean: Tensor,  # (C,) fixed statistics, e.g. BN running mean
        var: Tensor,  # (C,) fixed biased variance, e.g. BN running var
        weight: Optional[Tensor],  # (C,)
        bias: Optional[Tensor],  # (C,)
        eps: float,
        activation: Optional[str],
    ) -> Tensor:
        """Per-channel normalization with given statistics (BatchNorm in eval)."""


BACKEND_NAMES = ("reference", "native", "triton")

# the values of $TRITON_INTERPRET that turn Triton's interpreter on, as Triton reads them
# (any case)
_INTERPRET_ON = ("1", "true", "on", "yes")


def triton_interpreting() -> bool:
    """Whether ``$TRITON_INTERPRET`` asks for Triton's interpreter (``1``, ``true``, ``on`` or
    ``yes``, in any case, as Triton itself reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _INTERPRET_ON
# Modules implementing each backend, imported lazily so that a missing optional dependency
# (triton) only matters when that backend is asked for.
_MODULES = {
    "reference": "normlab.backends.reference",
    "native": "normlab.backends.native",
    "triton": "normlab.backends.triton_norm",
}
_INSTANCES: dict[str, Optional[Backend]] = {}


# Per-thread stack of ``use_backend`` names: the attribute ``stack`` of a plain
# ``threading.local`` (an attribute read, cheap on the hot path), made by a thread's first
# use_backend or current_backend. Not a subclass of threading.local that makes it in
# ``__init__``: TorchDynamo 2.4 cannot read such a subclass's attributes (it saw a placeholder
# object, truthy, and failed on ``stack[-1]``), while it reads and guards a plain
# threading.local's on every torch normlab supports, so torch.compile retraces when the stack
# changes.
_local = threading.local()


def register_backend(name: str, backend: Backend) -> None:
    """Register (or replace) a backend instance under ``name``."""
    _INSTANCES[name] = backend


def get_backend(name: str) -> Backend:
    """The backend instance called ``name``; raises BackendUnavailable if it cannot be loaded."""
    if name not in _INSTANCES:
        if name not in _MODULES:
            raise ValueError(
                f"unknown normalization backend {name!r}; known: 'auto', "
                + ", ".join(repr(n) for n in sorted(set(_MODULES) | set(_INSTANCES)))
            )
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as e:  # optional dependency missing
            _INSTANCES[name] = None
            _IMPORT_ERRORS[name] = f"{type(e).__name__}: {e}"
        else:
            _INSTANCES[name] = _BUILTIN[name] = module.BACKEND
    backend = _INSTANCES[name]
    if backend is None:
        raise BackendUnavailable(
            f"backend {name!r} cannot be loaded ({_IMPORT_ERRORS.get(name, 'not installed')})"
        )
    return backend


_IMPORT_ERRORS: dict[str, str] = {}
_BUILTIN: dict[str, Backend] = {}  # name -> normlab's own instance, once loaded


def available_backends() -> list[str]:
    """Names of the backends that can run in this process."""
    names = []
    for name in BACKEND_NAMES:
        try:
            if get_backend(name).available():
                names.append(name)
        except BackendUnavailable:
            pass
    return names


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    name = name.strip().lower()
    if name != "auto" and name not in _MODULES and name not in _INSTANCES:
        raise ValueError(
            f"unknown normalization backend {name!r}; known: 'auto', "
            + ", ".join(repr(n) for n in BACKEND_NAMES)
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting the backend for every normlab call in this thread.

    Example::

        with normlab.use_backend("reference"):
            y = model(x)
    """
    name = _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _env_reader(name: str):
    """A function returning ``os.environ.get(name, "")``, read on every call (the variable may
    change at run time), but cheaply: ``os.environ.get`` encodes the key each time (~0.5-1 us, a
    tenth of a small layer's forward). CPython's ``os.environ`` keeps the encoded mapping in
    ``_data``, which ``os.environ[...] = ...`` and ``del`` update; look the pre-encoded key up there,
    and fall back to ``os.environ.get`` on an implementation without it."""
    data = getattr(os.environ, "_data", None)
    encodekey = getattr(os.environ, "encodekey", None)
    decodevalue = getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return lambda: os.environ.get(name, "")
    key = encodekey(name)
    environ = os.environ
    if isinstance(key, bytes):
        # POSIX: the values are bytes, which os.environ decodes with the filesystem encoding and
        # surrogateescape. Decoded here as str(value, ...), the same thing, which TorchDynamo
        # 2.4 can trace (it cannot trace bytes.decode, os.environ's decodevalue)
        encoding = sys.getfilesystemencoding()

        def decodevalue(value: bytes) -> str:
            return str(value, encoding, "surrogateescape")

    def read() -> str:
        if os.environ is not environ:  # os.environ itself was replaced (a test's setattr)
            return os.environ.get(name, "")
        value = data.get(key)
        return "" if value is None else decodevalue(value)

    return read


_read_env = _env_reader(ENV_VAR)


def current_backend() -> str:
    """The backend name in force here: innermost ``use_backend``, else $NORMLAB_BACKEND, else auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if stack is None and not torch.compiler.is_compiling():
        # this thread's first call: make its (empty) stack, so that later reads find it (a
        # missing attribute costs an AttributeError, ~1.5 us a read). Not in a torch.compile
        # trace: TorchDynamo 2.4 cannot trace the creation (the trace guards on the absence)
        _local.stack = []
    env = _read_env().strip()
    if env:
        try:
            return _check_name(env)
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}: {e}") from None
    return "auto"


# The order "auto" tries backends in; the first that is available and supports the call wins.
_AUTO_ORDER = ("triton", "native", "reference")


def resolve_backend(
    name: Optional[str],
    x: Tensor,
    num_groups: int,
    over_batch: bool,
    activation: Optional[str],
    center: bool = True,
) -> Backend:
    """Pick the backend for one call (see the module docstring for the rules)."""
    name = current_backend() if name is None else _check_name(name)
    if name == "auto" and x.is_cpu:
        # hot path: on CPU auto always means native (it supports every call)
        native = _INSTANCES.get("native")
        if native is not None:
            return native
    if onnx_exporting():  # ATen's ops have ONNX forms, a Triton kernel's custom op has none
        return get_backend("native")
    if name != "auto":
        backend = get_backend(name)
        if not backend.available():
            raise BackendUnavailable(f"backend {name!r} is not available in this process")
        reason = backend.unsupported_reason(x, num_groups, over_batch, activation)
        if reason is None and not center and not _uncentered(backend):
            reason = "statistics without centering (center=False) are not supported"
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run this call: {reason}")
        return backend
    for candidate in _AUTO_ORDER:
        # Triton runs CPU tensors only in the (slow) interpreter: never choose it for them.
        if candidate == "triton" and x.device.type != "cuda":
            continue
        try:
            backend = get_backend(candidate)
        except BackendUnavailable:
            continue
        if (backend.available() and (center or _uncentered(backend))
                and backend.unsupported_reason(x, num_groups, over_batch, activation) is None):
            return backend
    return get_backend("reference")


def native_in_force(name: Optional[str], x: Tensor) -> bool:
    """Whether :func:`resolve_backend` gives normlab's own native backend for a call on ``x``
    whatever its shape and options: ``native`` named (argument, :func:`use_backend`,
    $NORMLAB_BACKEND), or ``auto`` on a CPU tensor, and not replaced through
    :func:`register_backend`. A caller that knows this may call the one ATen op that native
    runs for the call directly (``torch.layer_norm`` on the input as it is, where the operator
    takes a (rows, features) view): the same arithmetic, without the views and the returned
    statistics. False until native is loaded (the first call through the operator loads it)."""
    name = current_backend() if name is None else _check_name(name)
    if name != "native" and not (name == "auto" and x.is_cpu):
        return False
    native = _INSTANCES.get("native")
    return native is not None and native is _BUILTIN.get("native")


#: torch.compiler.is_exporting (torch >= 2.5, else None), looked up once: 30 ns a call
IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing the call, with either exporter: torch.export's
    (``dynamo=True``) or the TorchScript one (a torch.jit trace). ``is_exporting`` and
    ``is_tracing`` first (30 and 170 ns), where ``is_in_onnx_export`` takes a microsecond."""
    return (((IS_EXPORTING is not None and IS_EXPORTING()) or torch.jit.is_tracing())
            and torch.onnx.is_in_onnx_export())


_UNCENTERED: dict = {}  # backend type -> whether its normalize takes center (looked up once)


def _uncentered(backend: Backend) -> bool:
    """Whether ``backend`` takes ``center=False``: its ``supports_uncentered`` attribute, else
    whether its ``normalize`` has a ``center`` parameter."""
    kind = type(backend)
    if kind not in _UNCENTERED:
        flag = getattr(backend, "supports_uncentered", None)
        if flag is None:
            try:
                flag = "center" in inspect.signature(backend.normalize).parameters
            except (TypeError, ValueError):
                flag = False
        _UNCENTERED[kind] = bool(flag)
    return _UNCENTERED[kind]


def _preload() -> None:
    """Load the backends up front, so that resolving one never imports a module inside a
    torch.compile trace (dynamo cannot trace importlib). Triton is loaded only where it can run
    (a CUDA device, or the interpreter), and silently left out when it is not installed."""
    for name in ("reference", "native"):
        get_backend(name)
    if torch.cuda.is_available() or triton_interpreting():
        try:
            get_backend("triton")
        except BackendUnavailable:
            pass


_preload()
