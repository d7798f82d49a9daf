"""The test-time-training inner step of H-ViT3, as pure functions.

Each function takes the layer's projected queries/keys/values and its inner
weights, takes ONE full-batch gradient step (learning rate 1) of the inner
model on the dot-product loss ``L = -(scale / N) * sum_n <v_n, f(k_n)>`` in
closed form, and applies the updated inner model to the queries. Everything is
built from differentiable torch ops, so the outer loss back-propagates through
the inner step, second-order terms included.
"""
import torch
import torch.nn.functional as F


def rope_2d(x: torch.Tensor, height: int, width: int,
            base: float = 10000.0) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (..., H*W, C) by 2-D absolute positions.

    ``C / 4`` frequencies ``base ** (-k / (C / 4))``; the first ``C / 4``
    pairs turn with the row index, the last ``C / 4`` with the column index.
    The angles are computed in float32 for every call, so any H x W works.
    """
    channels = x.shape[-1]
    if channels % 4:
        raise ValueError(f'RoPE needs channels divisible by 4, got {channels}')
    num_freqs = channels // 4
    device = x.device
    theta = base**(-torch.arange(num_freqs, device=device, dtype=torch.float32)
                   / num_freqs)
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    angle_y = (ys[:, None] * theta).unsqueeze(1).expand(height, width, -1)
    angle_x = (xs[:, None] * theta).unsqueeze(0).expand(height, width, -1)
    angles = torch.cat([angle_y, angle_x], dim=-1).reshape(height * width, -1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos],
                          dim=-1)
    return rotated.flatten(-2)


def clip_by_norm(grad: torch.Tensor, dims) -> torch.Tensor:
    """``grad / (||grad|| + 1)`` with the norm taken over ``dims``."""
    return grad / (torch.linalg.vector_norm(grad, dim=dims, keepdim=True) + 1)


def swiglu_grads(k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, scale: float):
    """Closed-form gradients of the SwiGLU inner loss w.r.t. ``w1``, ``w2``.

    Shapes: k, v (B, h, N, d); w1, w2 (1 or B, h, d, d).
    Inner model f(x) = (x w1) * silu(x w2).
    """
    z1 = k @ w1
    z2 = k @ w2
    sig = torch.sigmoid(z2)
    err = v * (-scale / k.shape[-2])
    g1 = k.transpose(-1, -2) @ (err * z2 * sig)
    g2 = k.transpose(-1, -2) @ (err * z1 * sig * (1 + z2 * (1 - sig)))
    return g1, g2


def swiglu_ttt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               w1: torch.Tensor, w2: torch.Tensor,
               scale: float) -> torch.Tensor:
    """One clipped inner step of the SwiGLU model, applied to ``q``.

    Shapes: q, k, v (B, h, N, d); w1, w2 (1, h, d, d). Returns (B, h, N, d).
    """
    g1, g2 = swiglu_grads(k, v, w1, w2, scale)
    w1_new = w1 - clip_by_norm(g1, -2)
    w2_new = w2 - clip_by_norm(g2, -2)
    return (q @ w1_new) * F.silu(q @ w2_new)


def depthwise_grad(k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Closed-form gradient of the depthwise-conv inner loss w.r.t. the kernel.

    Shapes: k, v (B, d, H, W). Returns (B, d, 3, 3): per image and channel,
    the correlation of the zero-padded keys with ``-scale * v / (H * W)``,
    computed as one grouped convolution over all images and channels.
    """
    batch, channels, height, width = k.shape
    err = v * (-scale / (height * width))
    grad = F.conv2d(
        F.pad(k, (1, 1, 1, 1)).reshape(1, batch * channels, height + 2,
                                       width + 2),
        err.reshape(batch * channels, 1, height, width),
        groups=batch * channels)
    return grad.reshape(batch, channels, 3, 3)


def depthwise_ttt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  w3: torch.Tensor, scale: float) -> torch.Tensor:
    """One clipped inner step of the 3x3 depthwise-conv model, applied to ``q``.

    Shapes: q, k, v (B, d, H, W); w3 (d, 1, 3, 3). Returns (B, d, H, W).
    """
    batch, channels, height, width = q.shape
    grad = clip_by_norm(depthwise_grad(k, v, scale), (-2, -1))
    kernels = (w3.squeeze(1) - grad).reshape(batch * channels, 1, 3, 3)
    out = F.conv2d(
        q.reshape(1, batch * channels, height, width),
        kernels,
        padding=1,
        groups=batch * channels)
    return out.reshape(batch, channels, height, width)
