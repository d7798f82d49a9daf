"""The block MLP: the reference (:mod:`.naive`) and the fast
implementations beside it (:mod:`.fused`, :mod:`.kernels`), chosen by
:func:`mlp`."""
import torch

from .fused import fused_mlp
from .naive import naive_mlp

try:
    from . import kernels
except ImportError:  # no Triton: the torch implementations serve everywhere
    kernels = None

IMPLS = ('fast', 'plain')


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
        dwc_weight: torch.Tensor, dwc_bias: torch.Tensor,
        fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, height: int,
        width: int, impl: str = 'fast') -> torch.Tensor:
    """:func:`.naive.naive_mlp` by the implementation that suits the input:
    ``impl='plain'`` and tracers (FLOP counters, ONNX export) take the
    reference; CUDA tokens in float32, bf16 or fp16 take the Triton kernels
    (:func:`.kernels.triton_mlp`) where Triton is installed, and everything
    else :func:`.fused.fused_mlp`."""
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    args = (x, fc1_weight, fc1_bias, dwc_weight, dwc_bias, fc2_weight,
            fc2_bias, height, width)
    if impl == 'plain' or torch.jit.is_tracing():
        return naive_mlp(*args)
    if kernels is not None and kernels.applies(x):
        return kernels.triton_mlp(*args)
    return fused_mlp(*args)


__all__ = ['IMPLS', 'fused_mlp', 'mlp', 'naive_mlp']
