"""The test-time-training inner step of H-ViT3 in plain torch ops: the
reference that the fast implementations are tested against, and what
tracers (FLOP counters, ONNX export, FX, TorchScript) see.

Each inner model takes ONE full-batch gradient step (learning rate 1) on the
dot-product loss ``L = -(scale / N) * sum_n <v_n, f(k_n)>``, in closed form,
and is then applied to the queries. Everything is differentiable torch ops,
so the outer loss back-propagates through the inner step, second-order terms
included.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..layout import map_to_tokens, tokens_to_map
from ..rope import rope_2d


def clip_by_norm(grad: torch.Tensor, dims: List[int]) -> torch.Tensor:
    """``grad / (||grad|| + 1)`` with the norm taken over ``dims``."""
    return grad / (torch.linalg.vector_norm(grad, dim=dims, keepdim=True) + 1)


def swiglu_grads(k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
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
    w1_new = w1 - clip_by_norm(g1, [-2])
    w2_new = w2 - clip_by_norm(g2, [-2])
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
    """One clipped inner step of the 3x3 depthwise-conv model, applied to
    ``q``.

    Shapes: q, k, v (B, d, H, W); w3 (d, 1, 3, 3). Returns (B, d, H, W).
    """
    batch, channels, height, width = q.shape
    grad = clip_by_norm(depthwise_grad(k, v, scale), [-2, -1])
    kernels = (w3.squeeze(1) - grad).reshape(batch * channels, 1, 3, 3)
    out = F.conv2d(
        q.reshape(1, batch * channels, height, width),
        kernels,
        padding=1,
        groups=batch * channels)
    return out.reshape(batch, channels, height, width)


def _split_heads(tokens: torch.Tensor, batch: int, num_tokens: int,
                 heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    return tokens.reshape(batch, num_tokens, heads, -1).transpose(1, 2)


def naive_ttt(qkv: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              w3: torch.Tensor, heads: int, height: int, width: int,
              scale: float) -> torch.Tensor:
    """Both inner branches of a TTT layer from its ``qkv`` projection.

    Args:
        qkv: (B, H*W, 3C + 3d), split as q1, k1, v1 (C each), q2, k2, v2 (d).
        w1, w2: (1, heads, d, d) SwiGLU inner weights; w3: (d, 1, 3, 3)
            depthwise inner kernels.
        heads: SwiGLU heads (C = heads * d).
        scale: the inner loss scale of both branches.
    Returns:
        (B, H*W, C + d): the SwiGLU branch's output (with RoPE on q1 and
        k1), then the depthwise branch's.
    """
    # the sizes of qkv, the input: under ONNX export those of the RoPE-ed
    # tensors would be fixed at the traced size
    batch, num_tokens = qkv.shape[0], qkv.shape[1]
    head_dim = w3.shape[0]
    dim = heads * head_dim
    q1, k1, v1, q2, k2, v2 = qkv.split([dim, dim, dim, head_dim, head_dim,
                                        head_dim], dim=-1)
    out1 = swiglu_ttt(
        _split_heads(rope_2d(q1, height, width), batch, num_tokens, heads),
        _split_heads(rope_2d(k1, height, width), batch, num_tokens, heads),
        _split_heads(v1, batch, num_tokens, heads), w1, w2, scale)
    out1 = out1.transpose(1, 2).reshape(batch, num_tokens, dim)
    out2 = depthwise_ttt(
        tokens_to_map(q2, height, width), tokens_to_map(k2, height, width),
        tokens_to_map(v2, height, width), w3, scale)
    return torch.cat([out1, map_to_tokens(out2)], dim=-1)
