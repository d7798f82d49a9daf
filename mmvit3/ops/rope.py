"""2-D rotary position embedding (RoPE) of H-ViT3, recomputed for every map
size.

For C channels, C / 4 frequencies ``base ** (-k / (C / 4))``; channel pair
``p`` of the token at (y, x) turns by ``y * theta_p`` for the first C / 4
pairs and by ``x * theta_(p - C/4)`` for the last C / 4. The angles are
float32 whatever the input's dtype, so any H x W works without
interpolation.
"""
from functools import lru_cache

import torch

ROPE_BASE = 10000.0


def rope_angles(height: int, width: int, channels: int, device: torch.device,
                base: float = ROPE_BASE) -> torch.Tensor:
    """(H*W, C/2) float32 angles of the channel pairs, row-major tokens."""
    if channels % 4:
        raise ValueError(f'RoPE needs channels divisible by 4, got {channels}')
    num_freqs = channels // 4
    theta = base**(-torch.arange(
        num_freqs, device=device, dtype=torch.float32) / num_freqs)
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    angle_y = (ys[:, None] * theta).unsqueeze(1).expand(height, width, -1)
    angle_x = (xs[:, None] * theta).unsqueeze(0).expand(height, width, -1)
    return torch.cat([angle_y, angle_x], dim=-1).reshape(height * width, -1)


def rope_2d(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``x`` (..., H*W, C) with its channel pairs rotated, in ``x``'s dtype."""
    angles = rope_angles(height, width, x.shape[-1], x.device)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos],
                          dim=-1)
    return rotated.flatten(-2)


@lru_cache(maxsize=32)
def _cached_table(height: int, width: int, channels: int,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # built outside inference mode, so that autograd may use a cached table
    with torch.inference_mode(False), torch.no_grad():
        angles = rope_angles(height, width, channels, device)
        return torch.complex(angles.cos(), angles.sin()).to(dtype)


def rope_table(height: int, width: int, channels: int, device: torch.device,
               dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """(H*W, C/2) unit complex numbers that rotate the channel pairs;
    cached per size (a compiled graph builds its own)."""
    build = (_cached_table.__wrapped__
             if torch.compiler.is_compiling() else _cached_table)
    if channels % 4:
        raise ValueError(f'RoPE needs channels divisible by 4, got {channels}')
    return build(height, width, channels, torch.device(device), dtype)
