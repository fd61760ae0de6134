"""Skip marks for the tests whose reference needs a newer torch or Triton than normlab's floor
(pyproject: torch>=2.4, triton>=3.0). normlab itself works there (README, "Versions"); these
tests compare with a torch or Triton feature that older versions lack."""

import importlib.util
import inspect

import pytest
import torch
from torch import nn

# torch >= 2.11: BatchNorm, InstanceNorm, GroupNorm and SyncBatchNorm take bias=
TORCH_NORM_BIAS = "bias" in inspect.signature(nn.BatchNorm2d).parameters
needs_torch_norm_bias = pytest.mark.skipif(
    not TORCH_NORM_BIAS,
    reason="the reference is torch's norm with bias=, which this torch lacks (< 2.11)")

# triton.knobs (not in Triton 3.0-3.2): Triton's own reading of its environment
needs_triton_knobs = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.knobs") is None,
    reason="the reference is triton.knobs, which this Triton lacks")


def _has_triton_kernels_for_op() -> bool:
    try:
        from torch._library import triton as library_triton
    except ImportError:  # torch 2.4: no torch._library.triton
        return False
    return hasattr(library_triton, "get_triton_kernels_for_op")


# torch._library.triton.get_triton_kernels_for_op (absent from torch 2.4 and 2.6; 2.4 has no
# torch.library.triton_op either): torch's record of a triton_op's kernels, which the test of
# the ops registered as triton_ops ($NORMLAB_TRITON_OP=1) reads
needs_triton_kernels_for_op = pytest.mark.skipif(
    not _has_triton_kernels_for_op(),
    reason="the test reads torch._library.triton.get_triton_kernels_for_op (torch's record of "
           "a triton_op's kernels), which this torch lacks")

# torch >= 2.5: torch.onnx.export(..., dynamo=True), the exporter of torch.export's programs
TORCH_ONNX_DYNAMO = "dynamo" in inspect.signature(torch.onnx.export).parameters
needs_torch_onnx_dynamo = pytest.mark.skipif(
    not TORCH_ONNX_DYNAMO,
    reason="torch.onnx.export has no dynamo= in this torch (< 2.5): the torch.export-based "
           "exporter is not there to test")


def _has_sharding_apis() -> bool:
    """FSDP2's public fully_shard, the public DTensor module, tensor parallel and DCP's
    state_dict helpers (all public from torch 2.6; 2.4 keeps fully_shard and DTensor private)."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    try:
        import torch.distributed.checkpoint.state_dict  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
        from torch.distributed.tensor.parallel import SequenceParallel  # noqa: F401
    except ImportError:
        return False
    return True


needs_torch_sharding = pytest.mark.skipif(
    not _has_sharding_apis(),
    reason="the reference is torch.distributed's public fully_shard (FSDP2), DTensor, tensor "
           "parallel and DCP state_dict APIs, which this torch lacks (< 2.6)")
