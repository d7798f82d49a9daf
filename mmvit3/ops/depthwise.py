"""Channels-last token maps and the 3x3 depthwise convolution on them, as
the fused functions (:mod:`.ttt_fast`, :mod:`.fused_mlp`) compute them; and
strided depthwise convolutions with a fast input gradient in half precision
on a CPU."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .autocast import autocast_inputs

HALF_DTYPES = (torch.float16, torch.bfloat16)


def tokens_as_map(tokens: torch.Tensor, batch: int, height: int,
                  width: int) -> torch.Tensor:
    """(B, H*W, C) or (B*H*W, C) row-major tokens -> (B, C, H, W) view.

    The view is channels-last even at batch 1, so oneDNN's depthwise convs
    take their fast NHWC path (transpose + reshape gives batch stride C
    there).
    """
    # the channels spelled out, not -1: with symbolic sizes under
    # torch.compile, inductor cannot simplify (B*H*W*C) // (B*H*W) to C
    return tokens.view(batch, height, width,
                       tokens.shape[-1]).permute(0, 3, 1, 2)


def depthwise_conv3x3(maps: torch.Tensor, kernels: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One 3x3 kernel (``kernels``: (C, 1, 3, 3)) per channel, padding 1."""
    return F.conv2d(maps, kernels, bias, padding=1, groups=maps.shape[1])


def plus_identity_tap(kernels: torch.Tensor) -> torch.Tensor:
    """(C, 1, 3, 3) kernels plus 1 at the centre tap, so that one
    convolution computes ``x + dwconv(x)``: a pass over the map less, in
    forward and in backward. Differentiable; the kernels' gradient is
    unchanged."""
    identity = kernels.new_zeros(1, 1, 3, 3)
    identity[..., 1, 1] = 1
    return kernels + identity


def depthwise_conv3x3_backward(
    grad_out: torch.Tensor, maps: torch.Tensor, kernels: torch.Tensor,
    need_input: bool, need_kernels: bool, need_bias: bool = False,
    stride: Tuple[int, int] = (1, 1), padding: Tuple[int, int] = (1, 1)
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """Input, kernel and bias gradients of :func:`depthwise_conv3x3` (or of
    a depthwise convolution of another ``stride`` / ``padding``), each None
    unless asked for. The kernel gradient is the correlation of the
    zero-padded ``maps`` with ``grad_out``, per channel."""
    channels = maps.shape[1]
    return torch.ops.aten.convolution_backward(
        grad_out, maps, kernels, [channels], list(stride), list(padding),
        [1, 1], False, [0, 0], channels,
        [need_input, need_kernels, need_bias])


class StridedDepthwiseConv(torch.autograd.Function):
    """A strided depthwise convolution whose input gradient is computed in
    float32 and rounded once.

    On a CPU, aten's bfloat16 / float16 kernel for that gradient is 6 to
    47 x slower than its float32 one (the first downsampling layer's,
    2 x 512 x 64² -> 128²: 122 ms, against 29 ms with the casts).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        return F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        need = ctx.needs_input_grad
        channels = x.shape[1]
        grad_x = grad_weight = grad_bias = None
        # in float32 as meant, also where backward runs under autocast
        with torch.autocast(x.device.type, enabled=False):
            if need[0]:
                # rows / columns at the bottom / right that no output reads
                unread = [
                    size - ((out - 1) * step - 2 * pad + kernel)
                    for size, out, step, pad, kernel in zip(
                        x.shape[2:], grad_out.shape[2:], stride, padding,
                        weight.shape[2:])
                ]
                grad_x = F.conv_transpose2d(grad_out.float(), weight.float(),
                                            None, stride, padding, unread,
                                            channels).to(x.dtype)
            if need[1] or need[2]:
                _, grad_weight, grad_bias = depthwise_conv3x3_backward(
                    grad_out, x, weight, False, need[1], need[2], stride,
                    padding)
        return grad_x, grad_weight, grad_bias, None, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], stride: Tuple[int, int],
                     padding: Tuple[int, int]) -> torch.Tensor:
    """``F.conv2d`` with one group per channel. A strided one that needs
    gradients on a CPU in half precision (autocast included) goes through
    :class:`StridedDepthwiseConv`; tracers (FLOP counters, ONNX export) see
    ``F.conv2d``."""
    if (x.device.type == 'cpu' and tuple(stride) != (1, 1)
            and torch.is_grad_enabled() and not torch.jit.is_tracing()):
        args = autocast_inputs('cpu', x, weight, bias)
        if args[0].dtype in HALF_DTYPES and any(
                t is not None and t.requires_grad for t in args):
            with torch.autocast('cpu', enabled=False):
                return StridedDepthwiseConv.apply(*args, tuple(stride),
                                                  tuple(padding))
    return F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1])
