"""Row-major token sequences (B, H*W, C) and their (B, C, H, W) maps."""
import torch


def tokens_to_map(tokens: torch.Tensor, height: int,
                  width: int) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) view, channels-last (even at
    batch 1, so that oneDNN's depthwise convolutions take their NHWC path)."""
    # the sizes spelled out, not -1: with symbolic sizes under
    # torch.compile, inductor cannot simplify (B*H*W*C) // (B*H*W) to C
    return tokens.view(tokens.shape[0], height, width,
                       tokens.shape[-1]).permute(0, 3, 1, 2)


def map_to_tokens(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view of a channels-last map."""
    return maps.flatten(2).transpose(1, 2)
