"""The 3x3 depthwise convolution (padding 1) as the fused ops compute it."""
from typing import List, Optional

import torch
import torch.nn.functional as F


def depthwise_conv3x3(maps: torch.Tensor, kernels: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One 3x3 kernel (``kernels``: (C, 1, 3, 3)) per channel, padding 1."""
    return F.conv2d(maps, kernels, bias, padding=1, groups=maps.shape[1])


def plus_identity_tap(kernels: torch.Tensor) -> torch.Tensor:
    """(C, 1, 3, 3) kernels plus 1 at the centre tap, so that one
    convolution computes ``x + dwconv(x)``: a pass over the map less, in
    forward and in backward. Differentiable; the kernels' gradient is
    unchanged."""
    # a constant of known size (ONNX export keeps the conv's shapes dynamic)
    identity = torch.tensor([[[[0., 0., 0.], [0., 1., 0.], [0., 0., 0.]]]],
                            dtype=kernels.dtype, device=kernels.device)
    return kernels + identity


def depthwise_conv3x3_backward(
    grad_out: torch.Tensor, maps: torch.Tensor, kernels: torch.Tensor,
    need_input: bool, need_kernels: bool, need_bias: bool = False
) -> List[Optional[torch.Tensor]]:
    """Input, kernel and bias gradients of :func:`depthwise_conv3x3`, each
    None unless asked for. The kernel gradient is the correlation of the
    zero-padded ``maps`` with ``grad_out``, per channel."""
    return list(
        torch.ops.aten.convolution_backward(
            grad_out, maps, kernels, [kernels.shape[0]], [1, 1], [1, 1],
            [1, 1], False, [0, 0], maps.shape[1],
            [need_input, need_kernels, need_bias]))
