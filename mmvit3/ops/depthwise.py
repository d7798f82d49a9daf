"""Channels-last token maps and the 3x3 depthwise convolution on them, as
the fused functions (:mod:`.ttt_fast`, :mod:`.fused_mlp`) compute them."""
from typing import List, Optional

import torch
import torch.nn.functional as F

from .conv import conv_backward


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
    need_input: bool, need_kernels: bool, need_bias: bool = False
) -> List[Optional[torch.Tensor]]:
    """Input, kernel and bias gradients of :func:`depthwise_conv3x3`, each
    None unless asked for. The kernel gradient is the correlation of the
    zero-padded ``maps`` with ``grad_out``, per channel."""
    return conv_backward(grad_out, maps, kernels, (1, 1), (1, 1),
                         maps.shape[1], (need_input, need_kernels, need_bias))
