"""Convolutions whose slow half-precision gradients on a CPU are computed in
float32.

On a CPU without fp16 matrix units, aten computes some convolution
gradients in half precision far slower than in float32
(``benchmarks/half_conv_grads.py``: 2 threads, channels-last, H-ViT3-T's
convolutions in a 2 x 512² step):

- fp16, every weight gradient: 50 to 850 x (the stem's stride-2 one:
  16.5 s, against 30 ms in float32);
- fp16, depthwise input gradients: 2 to 13 x;
- bf16 and fp16, strided depthwise input gradients: 7 x (the first
  downsampling layer's: 119 ms, against 18 ms).

Those gradients are computed from float32 copies of the operands they
read and rounded once. aten's half-precision kernels accumulate in float32
as well, so the results agree to the rounding. Everything else, and the
forward, stays on aten's kernels in the caller's dtype.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .autocast import autocast_inputs

HALF_DTYPES = (torch.float16, torch.bfloat16)


def slow_half_grads(dtype: torch.dtype, depthwise: bool,
                    stride: Sequence[int]) -> Tuple[bool, bool]:
    """Whether aten's CPU kernels for the (input, weight and bias) gradients
    of a convolution in ``dtype`` are the slow ones."""
    if dtype not in HALF_DTYPES:
        return False, False
    fp16 = dtype == torch.float16
    strided = tuple(stride) != (1, 1)
    return depthwise and (fp16 or strided), fp16


def _aten_conv_backward(grad_out, x, weight, stride, padding, groups, mask):
    return torch.ops.aten.convolution_backward(grad_out, x, weight,
                                               [weight.shape[0]],
                                               list(stride), list(padding),
                                               [1, 1], False, [0, 0], groups,
                                               mask)


def _input_grad(grad_out, weight, input_size, stride, padding, groups):
    """The input gradient as a transposed convolution, which, unlike aten's
    convolution backward, does not read the input (no float32 copy of it)."""
    # rows / columns at the bottom / right that no output reads
    unread = [
        size - ((out - 1) * step - 2 * pad + kernel)
        for size, out, step, pad, kernel in zip(
            input_size[2:], grad_out.shape[2:], stride, padding,
            weight.shape[2:])
    ]
    return F.conv_transpose2d(grad_out, weight, None, stride, padding, unread,
                              groups)


def _slow_cpu_grads(x: torch.Tensor, weight: torch.Tensor, groups: int,
                    stride: Sequence[int]) -> Tuple[bool, bool]:
    """:func:`slow_half_grads` for this convolution; none off a CPU."""
    if x.device.type != 'cpu':
        return False, False
    depthwise = groups == x.shape[1] == weight.shape[0] > 1
    return slow_half_grads(x.dtype, depthwise, stride)


def conv_backward(grad_out: torch.Tensor, x: torch.Tensor,
                  weight: torch.Tensor, stride: Sequence[int],
                  padding: Sequence[int], groups: int, need: Sequence[bool]
                  ) -> List[Optional[torch.Tensor]]:
    """Input, weight and bias gradients of ``F.conv2d(x, weight, bias,
    stride, padding, groups=groups)``, each None unless ``need``-ed; on a
    CPU those that :func:`slow_half_grads` names are computed in float32."""
    slow_input, slow_params = _slow_cpu_grads(x, weight, groups, stride)
    in_float = [
        wanted and slow
        for wanted, slow in zip(need, (slow_input, slow_params, slow_params))
    ]
    on_aten = [wanted and not slow for wanted, slow in zip(need, in_float)]
    grads: List[Optional[torch.Tensor]] = [None, None, None]
    if any(on_aten):
        grads = list(
            _aten_conv_backward(grad_out, x, weight, stride, padding, groups,
                                on_aten))
    if not any(in_float):
        return grads
    grad_out32, weight32 = grad_out.float(), weight.float()
    if in_float[0]:
        grads[0] = _input_grad(grad_out32, weight32, x.shape, stride,
                               padding, groups).to(x.dtype)
    if in_float[1] or in_float[2]:
        _, grad_weight, grad_bias = _aten_conv_backward(
            grad_out32, x.float(), weight32, stride, padding, groups,
            [False, *in_float[1:]])
        grads[1:] = [
            None if grad is None else grad.to(weight.dtype)
            for grad in (grad_weight, grad_bias)
        ]
    return grads


class HalfConv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward is :func:`conv_backward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, groups
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        # in the dtypes chosen, also where backward runs under autocast
        with torch.autocast(x.device.type, enabled=False):
            grads = conv_backward(grad_out, x, weight, *ctx.geometry,
                                  ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


def conv2d(x: torch.Tensor,
           weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None,
           stride: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0),
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` (dilation 1). One that needs a gradient aten computes
    slowly in half precision on a CPU (autocast included) goes through
    :class:`HalfConv2d`; tracers (FLOP counters, ONNX export) see
    ``F.conv2d``."""
    stride, padding = tuple(stride), tuple(padding)
    if (x.device.type == 'cpu' and torch.is_grad_enabled()
            and not torch.jit.is_tracing()):
        args = autocast_inputs('cpu', x, weight, bias)
        if any(_slow_cpu_grads(args[0], args[1], groups, stride)) and any(
                t is not None and t.requires_grad for t in args):
            with torch.autocast('cpu', enabled=False):
                return HalfConv2d.apply(*args, stride, padding, groups)
    return F.conv2d(x, weight, bias, stride, padding, 1, groups)
