"""The H-ViT3 block MLP in plain torch ops: the reference for
:mod:`.fused`, and what tracers see."""
from typing import Optional

import torch
import torch.nn.functional as F

from ..layout import map_to_tokens, tokens_to_map


def naive_mlp(x: torch.Tensor, fc1_weight: torch.Tensor,
              fc1_bias: Optional[torch.Tensor], dwc_weight: torch.Tensor,
              dwc_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
              fc2_bias: Optional[torch.Tensor], height: int,
              width: int) -> torch.Tensor:
    """``fc2(GELU(h + dwc(h)))`` with ``h = GELU(fc1(x))``.

    Args:
        x: (B, H*W, C) tokens in row-major map order.
        fc1_weight, fc1_bias: (4C, C), (4C,); dwc_weight, dwc_bias:
            (4C, 1, 3, 3), (4C,) (3x3 depthwise, padding 1);
            fc2_weight, fc2_bias: (C, 4C), (C,).
    Returns:
        (B, H*W, C).
    """
    h = F.gelu(F.linear(x, fc1_weight, fc1_bias))
    local = F.conv2d(tokens_to_map(h, height, width), dwc_weight, dwc_bias,
                     padding=1, groups=dwc_weight.shape[0])
    return F.linear(F.gelu(h + map_to_tokens(local)), fc2_weight, fc2_bias)
