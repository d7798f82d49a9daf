"""The TTT inner step: the reference (:mod:`.naive`) and the fast
implementations beside it, chosen by :func:`ttt_inner_step`."""
import torch

from .chunked import chunked_ttt
from .naive import (clip_by_norm, depthwise_grad, depthwise_ttt, naive_ttt,
                    swiglu_grads, swiglu_ttt)

try:
    from . import fused
except ImportError:  # no Triton: the torch implementations serve everywhere
    fused = None

IMPLS = ('fast', 'plain')


def ttt_inner_step(qkv: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   w3: torch.Tensor, heads: int, height: int, width: int,
                   scale: float, impl: str = 'fast') -> torch.Tensor:
    """:func:`.naive.naive_ttt` by the implementation that suits the input.

    ``impl='plain'`` and tracers (FLOP counters, ONNX export) take the
    reference; otherwise CUDA tensors in float32, bf16 or fp16 take the
    Triton kernels (:func:`.fused.fused_ttt`) where Triton is installed,
    and everything else :func:`.chunked.chunked_ttt`.
    """
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    if impl == 'plain' or torch.jit.is_tracing():
        return naive_ttt(qkv, w1, w2, w3, heads, height, width, scale)
    if (fused is not None and qkv.is_cuda and qkv.dtype in fused.DTYPES
            and fused.is_available(qkv.device)):
        return fused.fused_ttt(qkv, w1, w2, w3, heads, height, width, scale)
    return chunked_ttt(qkv, w1, w2, w3, heads, height, width, scale)


__all__ = [
    'IMPLS', 'chunked_ttt', 'clip_by_norm', 'depthwise_grad', 'depthwise_ttt',
    'naive_ttt', 'swiglu_grads', 'swiglu_ttt', 'ttt_inner_step'
]
