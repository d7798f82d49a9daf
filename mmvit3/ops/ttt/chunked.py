"""The TTT inner step as one memory-lean custom operator in torch ops.

Same mathematics as :mod:`.naive` (the reference), organised for speed and
memory where the Triton kernels (:mod:`.fused`) do not run:

- Both inner branches run inside one operator (``mmvit3::ttt_chunked``)
  that saves only its input (the ``qkv`` projection) and the tiny inner
  weights; its backward operator recomputes the rest and applies
  hand-derived gradients, second-order terms of the inner step included.
- The SwiGLU branch runs over token chunks, so its dozen elementwise
  intermediates exist for a few thousand tokens at a time, never for the
  whole map (on a CPU the memory traffic of such maps, not the matmuls,
  sets the speed). Its two inner matmuls run as one against ``[w1 | w2]``,
  RoPE is one complex multiplication with a per-size table, and each chain
  of elementwise ops between the matmuls is one compiled loop on a CPU
  (:mod:`.swiglu_chains`).
- The depthwise branch computes all per-image kernel gradients and all
  per-image convolutions as single grouped convolutions (one group per image
  and channel) on channels-last maps.
- The inner step always runs in float32 (float64 for float64 inputs), also
  under autocast, so that mixed precision cannot destabilise it.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..depthwise import depthwise_conv3x3, depthwise_conv3x3_backward
from ..rope import rope_table
from .swiglu_chains import swiglu_vjp, swiglu_vjp_backward

# Elements (tokens x channels) per chunk of the SwiGLU branch: its
# intermediates stay a few MiB, while each op still gets enough work that a
# few chunks, not hundreds, pay the per-op overhead (on a CPU shared with
# other processes, the thread synchronisation of each op, not its
# arithmetic, sets the time of small ops). GPUs want few, large chunks.
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pairs(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) real -> (B, T, h, d/2) complex view of its channel pairs."""
    return torch.view_as_complex(x.unflatten(-1, (heads, -1, 2)))


def _head_pairs(x: torch.Tensor) -> torch.Tensor:
    """(B, h, T, d) real -> (B, T, h, d/2) complex view of channel pairs."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2))).transpose(1, 2)


def _rotate_to_heads(tokens: torch.Tensor, table: torch.Tensor, heads: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """RoPE on a (B, T, C) slice, written head-major as (B*h, T, d)."""
    batch, length, channels = tokens.shape
    out = torch.empty(
        batch, heads, length, channels // heads, dtype=dtype,
        device=tokens.device)
    torch.mul(
        _pairs(tokens.to(dtype), heads),
        table.unflatten(-1, (heads, -1)),
        out=_head_pairs(out))
    return out.flatten(0, 1)


def _rotate_back_into(dest: torch.Tensor, grad: torch.Tensor,
                      table: torch.Tensor, heads: int):
    """Write the inverse RoPE of head-major ``grad`` (B*h, T, d) into ``dest``
    (B, T, C): the rotation is orthogonal, so its transpose undoes it."""
    grad = grad.unflatten(0, (dest.shape[0], heads))
    conj = table.conj().unflatten(-1, (heads, -1))
    if dest.dtype == grad.dtype:
        torch.mul(_head_pairs(grad), conj, out=_pairs(dest, heads))
    else:
        rotated = torch.view_as_real(_head_pairs(grad) * conj)
        dest.copy_(rotated.flatten(-3))


def _heads_view(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, h, T, d) strided view."""
    return tokens.unflatten(-1, (heads, -1)).transpose(1, 2)


def _chunks(num_tokens: int, channels: int, device: torch.device):
    cuda = device.type == 'cuda'
    budget = GPU_CHUNK_ELEMENTS if cuda else CPU_CHUNK_ELEMENTS
    step = max(1, budget // channels)
    return [(start, min(start + step, num_tokens))
            for start in range(0, num_tokens, step)]


def _clip(grad: torch.Tensor, dims) -> Tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
    return grad / (norm + 1), norm


def _clip_backward(grad: torch.Tensor, norm: torch.Tensor,
                   grad_clipped: torch.Tensor, dims) -> torch.Tensor:
    """Gradient through ``g / (||g|| + 1)``; a zero ``g`` has a zero norm
    gradient, as in torch's own norm backward."""
    inner = (grad_clipped * grad).sum(dims, keepdim=True)
    safe_norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    radial = torch.where(norm > 0, inner / (safe_norm * (norm + 1)**2),
                         torch.zeros_like(norm))
    return grad_clipped / (norm + 1) - grad * radial


def _grouped_map(tokens: torch.Tensor, height: int, width: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """(B, N, d) tokens -> channels-last (1, B*d, H, W): one group per image
    and channel, so per-image kernels need no loop."""
    batch, num_tokens, channels = tokens.shape
    out = torch.empty((1, batch * channels, height, width),
                      dtype=dtype,
                      device=tokens.device,
                      memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).view(num_tokens, batch,
                                 channels).copy_(tokens.transpose(0, 1))
    return out


def _write_tokens(dest: torch.Tensor, grouped: torch.Tensor):
    """Inverse of :func:`_grouped_map` into ``dest`` (B, N, d)."""
    batch, num_tokens, channels = dest.shape
    dest.copy_(
        grouped.permute(0, 2, 3, 1).reshape(num_tokens, batch,
                                            channels).transpose(0, 1))


class _Layout:
    """Channel split of the ``qkv`` projection and the map size."""

    def __init__(self, qkv: torch.Tensor, heads: int, height: int,
                 width: int):
        self.batch, self.num_tokens, total = qkv.shape
        if self.num_tokens != height * width:
            raise ValueError(f'{self.num_tokens} tokens do not form a '
                             f'{height} x {width} map')
        if total % 3:
            raise ValueError(f'qkv has {total} channels, not 3 * (C + d)')
        self.heads, self.height, self.width = heads, height, width
        self.dim = total // 3 * heads // (heads + 1)
        self.head_dim = self.dim // heads
        if self.dim + self.head_dim != total // 3:
            raise ValueError(f'qkv with {total} channels does not split into '
                             f'{heads} heads plus one depthwise head')
        dim, head_dim = self.dim, self.head_dim
        starts = [0, dim, 2 * dim, 3 * dim, 3 * dim + head_dim,
                  3 * dim + 2 * head_dim, total]
        self.slices = [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]

    def split(self, qkv: torch.Tensor):
        """q1, k1, v1, q2, k2, v2 as views of ``qkv`` (or of its gradient)."""
        return [qkv[..., s] for s in self.slices]


def _swiglu_forward(q, k, v, w_cat, table, layout, scale, dtype, out):
    """Inner step of the SwiGLU branch; writes its output into ``out``.

    Returns the unclipped gradient [g1 | g2] (B*h, d, 2d), its column norms
    and the updated weights [w1' | w2'] (B*h, d, 2d).
    """
    batch, heads, head_dim = layout.batch, layout.heads, layout.head_dim
    chunks = _chunks(layout.num_tokens, layout.dim, q.device)
    grad = q.new_zeros(batch * heads, head_dim, 2 * head_dim, dtype=dtype)
    for start, stop in chunks:
        k_rot = _rotate_to_heads(k[:, start:stop], table[start:stop], heads,
                                 dtype)
        # the -scale/N applied once below
        terms = swiglu_vjp(
            torch.bmm(k_rot, w_cat), _heads_view(v[:, start:stop], heads))
        grad.baddbmm_(k_rot.transpose(1, 2), terms)
    grad.mul_(-scale / layout.num_tokens)
    clipped, norm = _clip(grad, -2)
    w_new = w_cat - clipped
    for start, stop in chunks:
        q_rot = _rotate_to_heads(q[:, start:stop], table[start:stop], heads,
                                 dtype)
        p1, p2 = torch.bmm(q_rot, w_new).chunk(2, dim=-1)
        torch.mul(
            p1.unflatten(0, (batch, heads)),
            F.silu(p2).unflatten(0, (batch, heads)),
            out=_heads_view(out[:, start:stop, :layout.dim], heads))
    return grad, norm, w_new


def _swiglu_backward(q, k, v, w_cat, table, layout, scale, dtype, grad_out,
                     grad_qkv_parts, grad, norm, w_new):
    """Gradients of the SwiGLU branch w.r.t. q1, k1, v1 (written into
    ``grad_qkv_parts``) and [w1 | w2] (returned, (h, d, 2d))."""
    batch, heads = layout.batch, layout.heads
    dq_dest, dk_dest, dv_dest = grad_qkv_parts
    chunks = _chunks(layout.num_tokens, layout.dim, q.device)
    # Pass 1: through out = p1 * silu(p2), p = q_rot @ [w1' | w2'].
    grad_w_new = torch.zeros_like(w_new)
    for start, stop in chunks:
        q_rot = _rotate_to_heads(q[:, start:stop], table[start:stop], heads,
                                 dtype)
        d_p = swiglu_vjp(
            torch.bmm(q_rot, w_new),
            _heads_view(grad_out[:, start:stop, :layout.dim], heads))
        grad_w_new.baddbmm_(q_rot.transpose(1, 2), d_p)
        _rotate_back_into(dq_dest[:, start:stop],
                          torch.bmm(d_p, w_new.transpose(1, 2)),
                          table[start:stop], heads)
    # Through the clipped update w' = w - clip(g); then g = c * k^T [a | b].
    grad_w_cat = grad_w_new.clone()
    d_grad = _clip_backward(grad, norm, grad_w_new.neg_(), -2)
    d_grad.mul_(-scale / layout.num_tokens)
    # Pass 2: through the inner gradient, recomputed chunk by chunk.
    for start, stop in chunks:
        k_rot = _rotate_to_heads(k[:, start:stop], table[start:stop], heads,
                                 dtype)
        terms, d_v, d_z = swiglu_vjp_backward(
            torch.bmm(k_rot, w_cat), _heads_view(v[:, start:stop], heads),
            torch.bmm(k_rot, d_grad))
        d_k = torch.bmm(terms, d_grad.transpose(1, 2))
        _heads_view(dv_dest[:, start:stop], heads).copy_(
            d_v.unflatten(0, (batch, heads)))
        d_k.baddbmm_(d_z, w_cat.transpose(1, 2))
        grad_w_cat.baddbmm_(k_rot.transpose(1, 2), d_z)
        _rotate_back_into(dk_dest[:, start:stop], d_k, table[start:stop],
                          heads)
    return grad_w_cat.unflatten(0, (batch, heads)).sum(0)


def _depthwise_forward(q, k, v, w3, layout, scale, dtype, out):
    """Inner step of the depthwise branch; writes its output into ``out``."""
    batch, height, width = layout.batch, layout.height, layout.width
    shared_kernels = w3.to(dtype).repeat(batch, 1, 1, 1)
    k_map = _grouped_map(k, height, width, dtype)
    v_map = _grouped_map(v, height, width, dtype)
    # the kernel gradient of the inner loss: k correlated with v
    _, grad, _ = depthwise_conv3x3_backward(v_map, k_map, shared_kernels,
                                            False, True)
    grad = grad * (-scale / (height * width))
    clipped, norm = _clip(grad, (-2, -1))
    kernels = shared_kernels - clipped
    _write_tokens(
        out, depthwise_conv3x3(_grouped_map(q, height, width, dtype), kernels))
    return grad, norm, kernels


def _depthwise_backward_all(q, k, v, layout, scale, dtype, grad_out,
                            grad_qkv_parts, grad, norm, kernels):
    """Gradients of the depthwise branch w.r.t. q2, k2, v2 (written into
    ``grad_qkv_parts``) and w3 (returned)."""
    batch, height, width = layout.batch, layout.height, layout.width
    dq_dest, dk_dest, dv_dest = grad_qkv_parts
    d_out = _grouped_map(grad_out, height, width, dtype)
    d_q, d_kernels, _ = depthwise_conv3x3_backward(
        d_out, _grouped_map(q, height, width, dtype), kernels, True, True)
    _write_tokens(dq_dest, d_q)
    grad_w3 = d_kernels.unflatten(0, (batch, -1)).sum(0)
    d_grad = _clip_backward(grad, norm, -d_kernels, (-2, -1))
    d_grad.mul_(-scale / (height * width))
    # grad = correlation(k, v): bilinear, so each factor's gradient is a
    # depthwise convolution with d_grad.
    k_map = _grouped_map(k, height, width, dtype)
    v_map = _grouped_map(v, height, width, dtype)
    d_k, _, _ = depthwise_conv3x3_backward(v_map, k_map, d_grad, True, False)
    _write_tokens(dk_dest, d_k)
    _write_tokens(dv_dest, depthwise_conv3x3(k_map, d_grad))
    return grad_w3


def _forward(qkv: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, rope: Tensor,
             heads: int, height: int, width: int,
             scale: float) -> Tuple[Tensor, ...]:
    """The output, then what backward needs besides ``qkv``: [w1 | w2] per
    image, and each branch's inner gradient, its norm and updated weights
    (the depthwise ones flattened, so that their strides are plain)."""
    layout = _Layout(qkv, heads, height, width)
    dtype = compute_dtype(qkv.dtype)
    out = qkv.new_empty(layout.batch, layout.num_tokens,
                        layout.dim + layout.head_dim)
    q1, k1, v1, q2, k2, v2 = layout.split(qkv)
    table = torch.view_as_complex(rope)
    # a copy per image (tiny), so that the saved tensor has plain strides
    w_cat = torch.cat([w1, w2], dim=-1).to(dtype).expand(
        layout.batch, -1, -1, -1).reshape(-1, layout.head_dim,
                                          2 * layout.head_dim).contiguous()
    with torch.autocast(qkv.device.type, enabled=False):
        swiglu_state = _swiglu_forward(q1, k1, v1, w_cat, table, layout,
                                       scale, dtype, out[..., :layout.dim])
        depthwise_state = _depthwise_forward(q2, k2, v2, w3, layout, scale,
                                             dtype, out[..., layout.dim:])
    return (out, w_cat, *swiglu_state,
            *(t.flatten(1) for t in depthwise_state))


def _backward(grad_out: Tensor, qkv: Tensor, rope: Tensor, w_cat: Tensor,
              *state: Tensor, heads: int, height: int, width: int,
              scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. ``qkv``, [w1 | w2] (h, d, 2d) and w3 (d, 9), in the
    compute dtype for the weights."""
    layout = _Layout(qkv, heads, height, width)
    dtype = compute_dtype(qkv.dtype)
    table = torch.view_as_complex(rope)
    depthwise_grad, depthwise_norm, kernels = state[3:]
    depthwise_state = (depthwise_grad.unflatten(1, (1, 3, 3)),
                       depthwise_norm.unflatten(1, (1, 1, 1)),
                       kernels.unflatten(1, (1, 3, 3)))
    grad_qkv = torch.empty_like(qkv)
    parts, grad_parts = layout.split(qkv), layout.split(grad_qkv)
    with torch.autocast(qkv.device.type, enabled=False):
        grad_w_cat = _swiglu_backward(*parts[:3], w_cat, table, layout, scale,
                                      dtype, grad_out, grad_parts[:3],
                                      *state[:3])
        grad_w3 = _depthwise_backward_all(
            *parts[3:], layout, scale, dtype, grad_out[..., layout.dim:],
            grad_parts[3:], *depthwise_state)
    return grad_qkv, grad_w_cat, grad_w3.flatten(1)


# Custom operators, so that torch.compile sees the inner step as one opaque
# node of known output shapes (Dynamo cannot trace the complex views written
# with out= and the shape-dependent chunks): the backbone compiles as one
# graph. The RoPE table is an input, not a cache inside: a CUDA graph may
# own no tensor that outlives its run.
@torch.library.custom_op('mmvit3::ttt_chunked', mutates_args=())
def _chunked_op(qkv: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                rope: Tensor, heads: int, height: int, width: int,
                scale: float
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                           Tensor, Tensor]:
    return _forward(qkv, w1, w2, w3, rope, heads, height, width, scale)


@_chunked_op.register_fake
def _(qkv, w1, w2, w3, rope, heads, height, width, scale):
    layout = _Layout(qkv, heads, height, width)
    dtype = compute_dtype(qkv.dtype)
    out = qkv.new_empty(layout.batch, layout.num_tokens,
                        layout.dim + layout.head_dim)
    inner = qkv.new_empty(
        layout.batch * heads, layout.head_dim, 2 * layout.head_dim,
        dtype=dtype)
    inner_norm = qkv.new_empty(
        layout.batch * heads, 1, 2 * layout.head_dim, dtype=dtype)
    kernels = qkv.new_empty(layout.batch * layout.head_dim, 9, dtype=dtype)
    kernels_norm = qkv.new_empty(layout.batch * layout.head_dim, 1,
                                 dtype=dtype)
    return (out, inner, torch.empty_like(inner), inner_norm,
            torch.empty_like(inner), kernels, kernels_norm,
            torch.empty_like(kernels))


@torch.library.custom_op('mmvit3::ttt_chunked_backward', mutates_args=())
def _chunked_backward_op(grad_out: Tensor, qkv: Tensor, rope: Tensor,
                         w_cat: Tensor, swiglu_grad: Tensor,
                         swiglu_norm: Tensor, w_new: Tensor,
                         depthwise_grad: Tensor, depthwise_norm: Tensor,
                         kernels: Tensor, heads: int, height: int,
                         width: int, scale: float
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(
        grad_out, qkv, rope, w_cat, swiglu_grad, swiglu_norm, w_new,
        depthwise_grad, depthwise_norm, kernels, heads=heads, height=height,
        width=width, scale=scale)


@_chunked_backward_op.register_fake
def _(grad_out, qkv, rope, w_cat, *state_and_sizes):
    *_, heads, height, width, scale = state_and_sizes
    head_dim = w_cat.shape[1]
    return (torch.empty_like(qkv),
            w_cat.new_empty(heads, head_dim, 2 * head_dim),
            w_cat.new_empty(head_dim, 9))


def _setup_context(ctx, inputs, output):
    qkv, w1, w2, w3, rope, heads, height, width, scale = inputs
    ctx.save_for_backward(qkv, rope, *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.sizes = dict(heads=heads, height=height, width=width, scale=scale)
    ctx.weight_dtypes = (w1.dtype, w2.dtype, w3.dtype)
    ctx.w3_shape = w3.shape


def _autograd_backward(ctx, grad_out, *unused_state_grads):
    grad_qkv, grad_w_cat, grad_w3 = _chunked_backward_op(
        grad_out, *ctx.saved_tensors, **ctx.sizes)
    w1_dtype, w2_dtype, w3_dtype = ctx.weight_dtypes
    grad_w1, grad_w2 = grad_w_cat.unsqueeze(0).chunk(2, dim=-1)
    return (grad_qkv, grad_w1.to(w1_dtype), grad_w2.to(w2_dtype),
            grad_w3.view(ctx.w3_shape).to(w3_dtype), None, None, None, None,
            None)


_chunked_op.register_autograd(_autograd_backward,
                              setup_context=_setup_context)


def chunked_ttt(qkv: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, heads: int,
                height: int, width: int, scale: float) -> Tensor:
    """:func:`.naive.naive_ttt`, computed chunk by chunk in float32; backward
    saves only ``qkv`` and the small inner weights, and recomputes the
    rest."""
    layout = _Layout(qkv, heads, height, width)
    table = rope_table(height, width, layout.dim, qkv.device,
                       torch.complex128 if compute_dtype(qkv.dtype) ==
                       torch.float64 else torch.complex64)
    return _chunked_op(qkv, w1, w2, w3, torch.view_as_real(table), heads,
                       height, width, scale)[0]
