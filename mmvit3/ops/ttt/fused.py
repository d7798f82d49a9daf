"""The TTT inner step as fused Triton kernels, forward and backward.

Same mathematics as :mod:`.naive` (the reference) and the same operator
design as :mod:`.chunked` (one custom operator that saves only ``qkv`` and
the tiny inner weights; its backward recomputes the rest), written for a
GPU: bf16/fp16 ``tl.dot`` with float32 accumulation (fp32 inputs multiply
in full float32), the inner weights and every reduction in float32. On a
CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``
set before this module is imported), which the tests use.

Layout of the work, for head_dim d = 32:

- Token passes. A program owns one (image, head) of the SwiGLU branch, or
  one image of the depthwise branch, and a contiguous run of token blocks
  (``TOKEN_BLOCKS``); a pass has about ``TARGET_PROGRAMS`` programs. It
  reads its slice of ``qkv`` (RoPE computed in the kernel from the token
  positions), keeps the 32 x 32 inner weights in registers, and writes the
  per-token outputs and, where the pass reduces over tokens, ONE float32
  partial sum per program.
- Small programs, one per (image, head) or image, then sum those partials
  in a fixed order and clip and update the weights (backward: go through
  the clip). No atomics anywhere: the results are deterministic for given
  shapes.
- RoPE turns pairs of channels, so the SwiGLU kernels hold a head's
  channels as two 16-wide halves, the even and the odd channels: the
  rotation is elementwise between them, and the inner weights are read as
  their even and odd rows, ``k @ W = k_even @ W_even + k_odd @ W_odd``.

Forward, per branch: gradient partials -> update -> apply. Backward, per
branch: the output's backward (dq, and the partials of the updated weights'
gradient) -> the clip's backward -> the inner gradient's backward (dk, dv,
and for SwiGLU the partials of the gradient through ``z = k W``) -> the
weights' gradients summed over images. Backward recomputes everything from
``qkv`` and the saved inner state (a few KiB per image and head).
"""
import contextlib
import math
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from ..rope import ROPE_BASE
from .chunked import _Layout, compute_dtype

HEAD_DIM = 32
# (tokens per block, warps) of the token passes: the largest blocks for
# which ptxas (Triton 3.7, sm_90) reports no register spills; not tuned by
# timing. 'swiglu-float' is for float32 inputs, whose dots run in full
# float32 (tf32x3 would spill).
TOKEN_BLOCKS = {'swiglu': (64, 4), 'swiglu-float': (32, 8),
                'depthwise': (64, 8)}
# Programs a token pass aims at (about 8 per SM of an H100 or H200):
# programs walk several blocks, so the partials of a reduction stay few
# however large the map. Tests lower this and the blocks to exercise many
# blocks and splits on tiny maps.
TARGET_PROGRAMS = 1024
# qkv dtypes the dispatcher sends here on a GPU (float64 stays in torch ops).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The decorators below chose interpreted kernels when this was set.
INTERPRET = bool(knobs.runtime.interpret)

_D = tl.constexpr(HEAD_DIM)
_PAIRS = tl.constexpr(HEAD_DIM // 2)
_TAP_ROWS = tl.constexpr(16)  # the 9 taps of a 3x3 kernel, padded
# 2 pi in two parts, the first exact in few bits (Cody-Waite reduction).
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(2 * math.pi - 6.28125)
_INV_TWO_PI = tl.constexpr(1 / (2 * math.pi))
_LOG2_BASE = tl.constexpr(math.log2(ROPE_BASE))


def is_available(device=None) -> bool:
    """Whether the kernels can run on ``device`` (default: CUDA): compiled
    on a CUDA device, or interpreted on the CPU when this module was
    imported with ``TRITON_INTERPRET=1``."""
    device = torch.device('cuda' if device is None else device)
    if INTERPRET:
        return device.type == 'cpu'
    return device.type == 'cuda' and torch.cuda.is_available()


# ---------------------------------------------------------------- helpers


@triton.jit
def _rounded(x, DOT: tl.constexpr):
    """float32 ``x`` rounded to nearest even in DOT, kept in float32. The
    interpreter truncates float32 to bf16, so bf16 rounds by its bits."""
    if DOT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DOT).to(tl.float32)


@triton.jit
def _mm(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr,
        EMULATE: tl.constexpr):
    """a @ b with both operands rounded to DOT, accumulated in a's dtype.
    The interpreter multiplies bf16 as raw integers, so there (EMULATE) the
    rounded operands multiply in float32: the same products, exactly."""
    if EMULATE:
        return tl.dot(_rounded(a, DOT), _rounded(b, DOT),
                      input_precision='ieee')
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PRECISION)


@triton.jit
def _mm_halves(a_even, a_odd, b_even, b_odd, DOT: tl.constexpr,
               PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b, a's columns and b's rows held as even and odd halves."""
    return (_mm(a_even, b_even, DOT, PRECISION, EMULATE) +
            _mm(a_odd, b_odd, DOT, PRECISION, EMULATE))


@triton.jit
def _swiglu_pre(x_even, x_odd, w1_even, w1_odd, w2_even, w2_odd,
                DOT: tl.constexpr, PRECISION: tl.constexpr,
                EMULATE: tl.constexpr):
    """x W1 and x W2 (the SwiGLU model's pre-activations)."""
    return (_mm_halves(x_even, x_odd, w1_even, w1_odd, DOT, PRECISION,
                       EMULATE),
            _mm_halves(x_even, x_odd, w2_even, w2_odd, DOT, PRECISION,
                       EMULATE))


@triton.jit
def _add_outer(acc_even, acc_odd, x_even, x_odd, y, DOT: tl.constexpr,
               PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """acc + x^T y, with x and acc held as even and odd halves."""
    return (acc_even + _mm(tl.trans(x_even), y, DOT, PRECISION, EMULATE),
            acc_odd + _mm(tl.trans(x_odd), y, DOT, PRECISION, EMULATE))


@triton.jit
def _store_partial(part_ptr, group, g1_even, g1_odd, g2_even, g2_odd):
    """This program's partial sum [g1 | g2] (32 x 64) of its group."""
    part = part_ptr + (group * tl.num_programs(0) + tl.program_id(0)) * (
        2 * _D * _D)
    _store_halves(part, 2 * _D, g1_even, g1_odd)
    _store_halves(part + _D, 2 * _D, g2_even, g2_odd)


@triton.jit
def _silu_parts(z):
    """sigmoid(z), silu(z) and silu'(z) = sigmoid(z) (1 + z - silu(z))."""
    sig = tl.sigmoid(z)
    silu = z * sig
    return sig, silu, sig * (1 + z - silu)


@triton.jit
def _rope_freqs(head, dim):
    """Frequency of each of a head's 16 channel pairs and whether the pair
    turns with y (else with x). As :mod:`..rope`: the float32 exponent
    -k / (C/4), the power taken in float64 and rounded to float32, which is
    what torch's float32 power gives up to its own last-bit rounding."""
    pair = head * _PAIRS + tl.arange(0, _PAIRS)
    quarter = dim // 4
    is_y = pair < quarter
    freq = tl.where(is_y, pair, pair - quarter)
    exponent = (-freq.to(tl.float64) / quarter).to(tl.float32)
    log2_base = tl.full([_PAIRS], _LOG2_BASE, tl.float64)
    theta = tl.exp2(exponent.to(tl.float64) * log2_base).to(tl.float32)
    return theta, is_y


@triton.jit
def _rope_cos_sin(tokens, width, theta, is_y, ACC: tl.constexpr):
    """cos and sin (BLOCK_N, 16) of the pairs' angles at row-major tokens.
    Angles reach hundreds of radians; they are reduced to [-pi, pi] first,
    since tl.sin may lower to a hardware approximation accurate only
    there."""
    y = (tokens // width).to(tl.float32)
    x = (tokens % width).to(tl.float32)
    angle = tl.where(is_y[None, :], y[:, None], x[:, None]) * theta[None, :]
    turns = tl.floor(angle * _INV_TWO_PI + 0.5)
    angle = angle - turns * _TWO_PI_HI - turns * _TWO_PI_LO
    return tl.cos(angle).to(ACC), tl.sin(angle).to(ACC)


@triton.jit
def _pair_offsets(tokens, row_stride):
    """(BLOCK_N, 16, 2) offsets of a head's channel pairs."""
    pairs = tl.arange(0, _PAIRS)
    parity = tl.arange(0, 2)
    return (tokens[:, None, None] * row_stride + 2 * pairs[None, :, None] +
            parity[None, None, :])


@triton.jit
def _load_rotated(ptr, tokens, mask, row_stride, cos, sin,
                  ACC: tl.constexpr):
    """A head's channels at ``tokens`` after RoPE, as (even, odd) halves."""
    pairs = tl.load(ptr + _pair_offsets(tokens, row_stride),
                    mask=mask[:, None, None], other=0.).to(ACC)
    even, odd = tl.split(pairs)
    return even * cos - odd * sin, even * sin + odd * cos


@triton.jit
def _store_unrotated(ptr, tokens, mask, row_stride, grad_even, grad_odd, cos,
                     sin):
    """The gradient w.r.t. a head's channels before RoPE (the transposed
    rotation of the halves' gradients), stored in ``ptr``'s dtype."""
    even = grad_even * cos + grad_odd * sin
    odd = grad_odd * cos - grad_even * sin
    tl.store(ptr + _pair_offsets(tokens, row_stride),
             tl.join(even, odd).to(ptr.dtype.element_ty),
             mask=mask[:, None, None])


@triton.jit
def _load_keys_values(base, dim, tokens, mask, row_stride, width, theta,
                      is_y, ACC: tl.constexpr):
    """cos and sin of the tokens' RoPE angles, the head's keys after RoPE
    (even and odd halves) and its values."""
    cos, sin = _rope_cos_sin(tokens, width, theta, is_y, ACC)
    k_even, k_odd = _load_rotated(base + dim, tokens, mask, row_stride, cos,
                                  sin, ACC)
    v = _load_head(base + 2 * dim, tokens, mask, row_stride, ACC)
    return cos, sin, k_even, k_odd, v


@triton.jit
def _load_inner_weights(w1_ptr, w2_ptr, head, ACC: tl.constexpr):
    """A head's W1 and W2 as even and odd rows."""
    w1_even, w1_odd = _load_halves(w1_ptr + head * _D * _D, _D, ACC)
    w2_even, w2_odd = _load_halves(w2_ptr + head * _D * _D, _D, ACC)
    return w1_even, w1_odd, w2_even, w2_odd


@triton.jit
def _load_head(ptr, tokens, mask, row_stride, ACC: tl.constexpr):
    channels = tl.arange(0, _D)
    return tl.load(ptr + tokens[:, None] * row_stride + channels[None, :],
                   mask=mask[:, None], other=0.).to(ACC)


@triton.jit
def _store_head(ptr, tokens, mask, row_stride, value):
    channels = tl.arange(0, _D)
    tl.store(ptr + tokens[:, None] * row_stride + channels[None, :],
             value.to(ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _load_halves(ptr, row_stride, ACC: tl.constexpr):
    """Even and odd rows (16 x 32 each) of a 32 x 32 block."""
    rows = 2 * tl.arange(0, _PAIRS)
    offsets = rows[:, None] * row_stride + tl.arange(0, _D)[None, :]
    return (tl.load(ptr + offsets).to(ACC),
            tl.load(ptr + offsets + row_stride).to(ACC))


@triton.jit
def _store_halves(ptr, row_stride, even, odd):
    rows = 2 * tl.arange(0, _PAIRS)
    offsets = rows[:, None] * row_stride + tl.arange(0, _D)[None, :]
    tl.store(ptr + offsets, even)
    tl.store(ptr + offsets + row_stride, odd)


@triton.jit
def _load_shifted(ptr, tokens, mask, height, width, row_stride,
                  DY: tl.constexpr, DX: tl.constexpr, ACC: tl.constexpr):
    """The 32 channels at (y + DY, x + DX) of each token (y, x); zero
    outside the map (the 3x3 convolutions' zero padding)."""
    y = tokens // width + DY
    x = tokens % width + DX
    inside = mask & (y >= 0) & (y < height) & (x >= 0) & (x < width)
    return _load_head(ptr, y * width + x, inside, row_stride, ACC)


@triton.jit
def _tap_row(acc, TAP: tl.constexpr, value):
    """``acc`` (16, 32) plus ``value`` (32,) in row TAP."""
    rows = tl.arange(0, _TAP_ROWS)
    return acc + tl.where(rows[:, None] == TAP, value[None, :], 0.)


@triton.jit
def _sum_splits(ptr, splits, offsets, mask, size, ACC: tl.constexpr):
    """Sum of ``splits`` consecutive partials of ``size`` elements, in
    order."""
    total = tl.zeros(offsets.shape, ACC)
    for split in range(splits):
        total += tl.load(ptr + split * size + offsets, mask=mask, other=0.)
    return total


@triton.jit
def _clip_columns(grad):
    """grad / (||column||_2 + 1), and the column norms."""
    norm = tl.sqrt(tl.sum(grad * grad, axis=0))
    return grad / (norm[None, :] + 1), norm


@triton.jit
def _clip_backward(grad, norm, grad_clipped):
    """Gradient through ``g / (||g|| + 1)`` per column; a zero column has a
    zero norm gradient, as in torch's own norm backward."""
    inner = tl.sum(grad_clipped * grad, axis=0)
    safe = tl.where(norm > 0, norm, 1.)
    radial = tl.where(norm > 0, inner / (safe * (norm + 1) * (norm + 1)), 0.)
    return grad_clipped / (norm[None, :] + 1) - grad * radial[None, :]


@triton.jit
def _loss_factor(num_tokens, SCALE: tl.constexpr, ACC: tl.constexpr):
    """-scale / N in ACC (a float kernel argument would be float32)."""
    return tl.full([], -SCALE, ACC) / num_tokens


@triton.jit
def _block_range(blocks_per_split, num_blocks):
    split = tl.program_id(0)
    start = split * blocks_per_split
    return start, tl.minimum(start + blocks_per_split, num_blocks)


# ------------------------------------------------------ SwiGLU branch kernels


@triton.jit
def _swiglu_grad_kernel(qkv_ptr, w1_ptr, w2_ptr, part_ptr, num_tokens, width,
                        heads, dim, row_stride, blocks_per_split, num_blocks,
                        BLOCK_N: tl.constexpr, ACC: tl.constexpr,
                        DOT: tl.constexpr, PRECISION: tl.constexpr,
                        EMULATE: tl.constexpr):
    """Partial k^T [v silu(z2) | v z1 silu'(z2)] (32 x 64) over this
    program's tokens, z = k [W1 | W2] (the -scale/N comes in the update)."""
    group = tl.program_id(1)
    image, head = group // heads, group % heads
    base = qkv_ptr + image.to(tl.int64) * num_tokens * row_stride + head * _D
    theta, is_y = _rope_freqs(head, dim)
    w1_even, w1_odd, w2_even, w2_odd = _load_inner_weights(
        w1_ptr, w2_ptr, head, ACC)
    g1_even = tl.zeros((_PAIRS, _D), ACC)
    g1_odd = tl.zeros((_PAIRS, _D), ACC)
    g2_even = tl.zeros((_PAIRS, _D), ACC)
    g2_odd = tl.zeros((_PAIRS, _D), ACC)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        cos, sin, k_even, k_odd, v = _load_keys_values(
            base, dim, tokens, mask, row_stride, width, theta, is_y, ACC)
        z1, z2 = _swiglu_pre(k_even, k_odd, w1_even, w1_odd, w2_even,
                             w2_odd, DOT, PRECISION, EMULATE)
        _, silu, dsilu = _silu_parts(z2)
        terms1 = v * silu
        terms2 = v * z1 * dsilu
        g1_even, g1_odd = _add_outer(g1_even, g1_odd, k_even, k_odd, terms1,
                                     DOT, PRECISION, EMULATE)
        g2_even, g2_odd = _add_outer(g2_even, g2_odd, k_even, k_odd, terms2,
                                     DOT, PRECISION, EMULATE)
    _store_partial(part_ptr, group, g1_even, g1_odd, g2_even, g2_odd)


@triton.jit
def _swiglu_update_kernel(part_ptr, w1_ptr, w2_ptr, grad_ptr, norm_ptr,
                          w_new_ptr, splits, heads, num_tokens,
                          SCALE: tl.constexpr, ACC: tl.constexpr):
    """[g1 | g2] = -scale / N * (sum of the partials); the clipped update
    [W1' | W2'] = [W1 | W2] - clip(g). Stores g, its column norms and W'."""
    group = tl.program_id(0)
    head = group % heads
    rows = tl.arange(0, _D)[:, None]
    cols = tl.arange(0, 2 * _D)[None, :]
    offsets = rows * 2 * _D + cols
    size = 2 * _D * _D
    factor = _loss_factor(num_tokens, SCALE, ACC)
    grad = factor * _sum_splits(part_ptr + group * splits * size, splits,
                                offsets, offsets < size, size, ACC)
    # [W1 | W2]: W1's columns, then W2's
    w_offsets = head * _D * _D + rows * _D + cols % _D
    w = tl.where(cols < _D, tl.load(w1_ptr + w_offsets),
                 tl.load(w2_ptr + w_offsets)).to(ACC)
    clipped, norm = _clip_columns(grad)
    tl.store(grad_ptr + group * size + offsets, grad)
    tl.store(norm_ptr + group * 2 * _D + tl.arange(0, 2 * _D), norm)
    tl.store(w_new_ptr + group * size + offsets, w - clipped)


@triton.jit
def _swiglu_apply_kernel(qkv_ptr, w_new_ptr, out_ptr, num_tokens, width,
                         heads, dim, row_stride, out_stride, blocks_per_split,
                         num_blocks, BLOCK_N: tl.constexpr,
                         ACC: tl.constexpr, DOT: tl.constexpr,
                         PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """out1 = (q W1') * silu(q W2') for this program's tokens."""
    group = tl.program_id(1)
    image, head = group // heads, group % heads
    image_tokens = image.to(tl.int64) * num_tokens
    base = qkv_ptr + image_tokens * row_stride + head * _D
    out = out_ptr + image_tokens * out_stride + head * _D
    theta, is_y = _rope_freqs(head, dim)
    w_new = w_new_ptr + group * 2 * _D * _D
    w1_even, w1_odd = _load_halves(w_new, 2 * _D, ACC)
    w2_even, w2_odd = _load_halves(w_new + _D, 2 * _D, ACC)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        cos, sin = _rope_cos_sin(tokens, width, theta, is_y, ACC)
        q_even, q_odd = _load_rotated(base, tokens, mask, row_stride, cos,
                                      sin, ACC)
        p1, p2 = _swiglu_pre(q_even, q_odd, w1_even, w1_odd, w2_even,
                             w2_odd, DOT, PRECISION, EMULATE)
        _, silu, _ = _silu_parts(p2)
        _store_head(out, tokens, mask, out_stride, p1 * silu)


@triton.jit
def _swiglu_out_backward_kernel(qkv_ptr, grad_out_ptr, w_new_ptr,
                                grad_qkv_ptr, part_ptr, num_tokens, width,
                                heads, dim, row_stride, out_stride,
                                blocks_per_split, num_blocks,
                                BLOCK_N: tl.constexpr, ACC: tl.constexpr,
                                DOT: tl.constexpr, PRECISION: tl.constexpr,
                                EMULATE: tl.constexpr):
    """Through out1 = p1 * silu(p2), p = q [W1' | W2']: dq (stored, RoPE
    undone) and the partial q^T dp, the gradient of [W1' | W2']."""
    group = tl.program_id(1)
    image, head = group // heads, group % heads
    image_tokens = image.to(tl.int64) * num_tokens
    base = qkv_ptr + image_tokens * row_stride + head * _D
    grad_base = grad_qkv_ptr + image_tokens * row_stride + head * _D
    grad_out = grad_out_ptr + image_tokens * out_stride + head * _D
    theta, is_y = _rope_freqs(head, dim)
    w_new = w_new_ptr + group * 2 * _D * _D
    w1_even, w1_odd = _load_halves(w_new, 2 * _D, ACC)
    w2_even, w2_odd = _load_halves(w_new + _D, 2 * _D, ACC)
    w1t_even, w1t_odd = tl.trans(w1_even), tl.trans(w1_odd)
    w2t_even, w2t_odd = tl.trans(w2_even), tl.trans(w2_odd)
    d1_even = tl.zeros((_PAIRS, _D), ACC)
    d1_odd = tl.zeros((_PAIRS, _D), ACC)
    d2_even = tl.zeros((_PAIRS, _D), ACC)
    d2_odd = tl.zeros((_PAIRS, _D), ACC)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        cos, sin = _rope_cos_sin(tokens, width, theta, is_y, ACC)
        q_even, q_odd = _load_rotated(base, tokens, mask, row_stride, cos,
                                      sin, ACC)
        p1, p2 = _swiglu_pre(q_even, q_odd, w1_even, w1_odd, w2_even,
                             w2_odd, DOT, PRECISION, EMULATE)
        d_out = _load_head(grad_out, tokens, mask, out_stride, ACC)
        _, silu, dsilu = _silu_parts(p2)
        dp1 = d_out * silu
        dp2 = d_out * p1 * dsilu
        d1_even, d1_odd = _add_outer(d1_even, d1_odd, q_even, q_odd, dp1,
                                     DOT, PRECISION, EMULATE)
        d2_even, d2_odd = _add_outer(d2_even, d2_odd, q_even, q_odd, dp2,
                                     DOT, PRECISION, EMULATE)
        dq_even = (_mm(dp1, w1t_even, DOT, PRECISION, EMULATE) +
                   _mm(dp2, w2t_even, DOT, PRECISION, EMULATE))
        dq_odd = (_mm(dp1, w1t_odd, DOT, PRECISION, EMULATE) +
                  _mm(dp2, w2t_odd, DOT, PRECISION, EMULATE))
        _store_unrotated(grad_base, tokens, mask, row_stride, dq_even,
                         dq_odd, cos, sin)
    _store_partial(part_ptr, group, d1_even, d1_odd, d2_even, d2_odd)


@triton.jit
def _swiglu_clip_backward_kernel(part_ptr, grad_ptr, norm_ptr, d_w_new_ptr,
                                 d_grad_ptr, splits, num_tokens,
                                 SCALE: tl.constexpr, ACC: tl.constexpr):
    """Sums the partials into d[W1' | W2'] (stored: part of the weights'
    gradient) and goes back through W' = W - clip(g) and g = -scale / N *
    k^T [...]: stores d_grad, the gradient w.r.t. the clip's input times
    -scale / N."""
    group = tl.program_id(0)
    rows = tl.arange(0, _D)[:, None]
    cols = tl.arange(0, 2 * _D)[None, :]
    offsets = rows * 2 * _D + cols
    size = 2 * _D * _D
    d_w_new = _sum_splits(part_ptr + group * splits * size, splits, offsets,
                          offsets < size, size, ACC)
    grad = tl.load(grad_ptr + group * size + offsets)
    norm = tl.load(norm_ptr + group * 2 * _D + tl.arange(0, 2 * _D))
    d_grad = _loss_factor(num_tokens, SCALE, ACC) * _clip_backward(
        grad, norm, -d_w_new)
    tl.store(d_w_new_ptr + group * size + offsets, d_w_new)
    tl.store(d_grad_ptr + group * size + offsets, d_grad)


@triton.jit
def _swiglu_inner_backward_kernel(qkv_ptr, w1_ptr, w2_ptr, d_grad_ptr,
                                  grad_qkv_ptr, part_ptr, num_tokens, width,
                                  heads, dim, row_stride, blocks_per_split,
                                  num_blocks,
                                  BLOCK_N: tl.constexpr, ACC: tl.constexpr,
                                  DOT: tl.constexpr, PRECISION: tl.constexpr,
                                  EMULATE: tl.constexpr):
    """Through g = k^T [a | b], a = v silu(z2), b = v z1 silu'(z2), z = k W,
    given D = d_grad (scale included): dk (RoPE undone) and dv stored, and
    the partial k^T dz, the gradient of W through z."""
    group = tl.program_id(1)
    image, head = group // heads, group % heads
    image_offset = image.to(tl.int64) * num_tokens * row_stride + head * _D
    base = qkv_ptr + image_offset
    grad_base = grad_qkv_ptr + image_offset
    theta, is_y = _rope_freqs(head, dim)
    w1_even, w1_odd, w2_even, w2_odd = _load_inner_weights(
        w1_ptr, w2_ptr, head, ACC)
    w1t_even, w1t_odd = tl.trans(w1_even), tl.trans(w1_odd)
    w2t_even, w2t_odd = tl.trans(w2_even), tl.trans(w2_odd)
    d_grad = d_grad_ptr + group * 2 * _D * _D
    g1_even, g1_odd = _load_halves(d_grad, 2 * _D, ACC)
    g2_even, g2_odd = _load_halves(d_grad + _D, 2 * _D, ACC)
    g1t_even, g1t_odd = tl.trans(g1_even), tl.trans(g1_odd)
    g2t_even, g2t_odd = tl.trans(g2_even), tl.trans(g2_odd)
    dw1_even = tl.zeros((_PAIRS, _D), ACC)
    dw1_odd = tl.zeros((_PAIRS, _D), ACC)
    dw2_even = tl.zeros((_PAIRS, _D), ACC)
    dw2_odd = tl.zeros((_PAIRS, _D), ACC)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        cos, sin, k_even, k_odd, v = _load_keys_values(
            base, dim, tokens, mask, row_stride, width, theta, is_y, ACC)
        z1, z2 = _swiglu_pre(k_even, k_odd, w1_even, w1_odd, w2_even,
                             w2_odd, DOT, PRECISION, EMULATE)
        sig, silu, dsilu = _silu_parts(z2)
        # silu''(z) = sigmoid(z) (1 - sigmoid(z)) (2 + z - 2 silu(z))
        d2silu = sig * (1 - sig) * (2 + z2 - 2 * silu)
        z1_dsilu = z1 * dsilu
        terms1 = v * silu
        terms2 = v * z1_dsilu
        # gradients w.r.t. the terms, then through them
        d_terms1, d_terms2 = _swiglu_pre(k_even, k_odd, g1_even, g1_odd,
                                         g2_even, g2_odd, DOT, PRECISION,
                                         EMULATE)
        dv = d_terms1 * silu + d_terms2 * z1_dsilu
        dz1 = d_terms2 * dsilu * v
        dz2 = (d_terms1 * dsilu + d_terms2 * z1 * d2silu) * v
        dk_even = (_mm(terms1, g1t_even, DOT, PRECISION, EMULATE) +
                   _mm(terms2, g2t_even, DOT, PRECISION, EMULATE) +
                   _mm(dz1, w1t_even, DOT, PRECISION, EMULATE) +
                   _mm(dz2, w2t_even, DOT, PRECISION, EMULATE))
        dk_odd = (_mm(terms1, g1t_odd, DOT, PRECISION, EMULATE) +
                  _mm(terms2, g2t_odd, DOT, PRECISION, EMULATE) +
                  _mm(dz1, w1t_odd, DOT, PRECISION, EMULATE) +
                  _mm(dz2, w2t_odd, DOT, PRECISION, EMULATE))
        dw1_even, dw1_odd = _add_outer(dw1_even, dw1_odd, k_even, k_odd, dz1,
                                       DOT, PRECISION, EMULATE)
        dw2_even, dw2_odd = _add_outer(dw2_even, dw2_odd, k_even, k_odd, dz2,
                                       DOT, PRECISION, EMULATE)
        _store_head(grad_base + 2 * dim, tokens, mask, row_stride, dv)
        _store_unrotated(grad_base + dim, tokens, mask, row_stride, dk_even,
                         dk_odd, cos, sin)
    _store_partial(part_ptr, group, dw1_even, dw1_odd, dw2_even, dw2_odd)


# --------------------------------------------------- depthwise branch kernels


@triton.jit
def _depthwise_grad_kernel(qkv_ptr, part_ptr, num_tokens, height, width,
                           dim, row_stride, blocks_per_split, num_blocks,
                           BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Partial sum over this program's tokens of kpad[y+i, x+j] v[y, x], per
    tap (i, j) and channel (the -scale/(H*W) comes in the update)."""
    image = tl.program_id(1)
    base = qkv_ptr + image.to(tl.int64) * num_tokens * row_stride + 3 * dim
    acc = tl.zeros((_TAP_ROWS, _D), ACC)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        v = _load_head(base + 2 * _D, tokens, mask, row_stride, ACC)
        for tap in tl.static_range(9):
            k = _load_shifted(base + _D, tokens, mask, height, width,
                              row_stride, tap // 3 - 1, tap % 3 - 1, ACC)
            acc = _tap_row(acc, tap, tl.sum(k * v, axis=0))
    rows = tl.arange(0, _TAP_ROWS)
    part = part_ptr + (image * tl.num_programs(0) + tl.program_id(0)) * (
        9 * _D)
    tl.store(part + rows[:, None] * _D + tl.arange(0, _D)[None, :], acc,
             mask=rows[:, None] < 9)


@triton.jit
def _depthwise_update_kernel(part_ptr, w3_ptr, grad_ptr, norm_ptr,
                             w_new_ptr, splits, num_tokens,
                             SCALE: tl.constexpr, ACC: tl.constexpr):
    """g = -scale / (H*W) * (sum of the partials), (9 taps, 32 channels);
    the clipped update w3' = w3 - clip(g) (norm over each channel's taps)."""
    image = tl.program_id(0)
    rows = tl.arange(0, _TAP_ROWS)[:, None]
    cols = tl.arange(0, _D)[None, :]
    offsets = rows * _D + cols
    inside = rows < 9
    size = 9 * _D
    factor = _loss_factor(num_tokens, SCALE, ACC)
    grad = factor * _sum_splits(part_ptr + image * splits * size, splits,
                                offsets, inside, size, ACC)
    # w3 is (32, 1, 3, 3): channel-major
    w = tl.load(w3_ptr + cols * 9 + rows, mask=inside, other=0.).to(ACC)
    clipped, norm = _clip_columns(grad)
    tl.store(grad_ptr + image * size + offsets, grad, mask=inside)
    tl.store(norm_ptr + image * _D + tl.arange(0, _D), norm)
    tl.store(w_new_ptr + image * size + offsets, w - clipped, mask=inside)


@triton.jit
def _depthwise_apply_kernel(qkv_ptr, w_new_ptr, out_ptr, num_tokens, height,
                            width, dim, row_stride, out_stride,
                            blocks_per_split, num_blocks,
                            BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """out2 = 3x3 depthwise convolution of q2 with this image's w3'."""
    image = tl.program_id(1)
    image_tokens = image.to(tl.int64) * num_tokens
    base = qkv_ptr + image_tokens * row_stride + 3 * dim
    out = out_ptr + image_tokens * out_stride + dim
    w_new = w_new_ptr + image * 9 * _D + tl.arange(0, _D)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        acc = tl.zeros((BLOCK_N, _D), ACC)
        for tap in tl.static_range(9):
            q = _load_shifted(base, tokens, mask, height, width, row_stride,
                              tap // 3 - 1, tap % 3 - 1, ACC)
            acc += q * tl.load(w_new + tap * _D)[None, :]
        _store_head(out, tokens, mask, out_stride, acc)


@triton.jit
def _depthwise_out_backward_kernel(qkv_ptr, grad_out_ptr, w_new_ptr,
                                   grad_qkv_ptr, part_ptr, num_tokens,
                                   height, width, dim, row_stride,
                                   out_stride, blocks_per_split, num_blocks,
                                   BLOCK_N: tl.constexpr,
                                   ACC: tl.constexpr):
    """Through out2 = conv(q2; w3'): dq2 (the transposed convolution of the
    output's gradient, stored) and the partial gradient of w3'."""
    image = tl.program_id(1)
    image_tokens = image.to(tl.int64) * num_tokens
    base = qkv_ptr + image_tokens * row_stride + 3 * dim
    grad_base = grad_qkv_ptr + image_tokens * row_stride + 3 * dim
    grad_out = grad_out_ptr + image_tokens * out_stride + dim
    w_new = w_new_ptr + image * 9 * _D + tl.arange(0, _D)
    acc = tl.zeros((_TAP_ROWS, _D), ACC)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        d_out = _load_head(grad_out, tokens, mask, out_stride, ACC)
        dq = tl.zeros((BLOCK_N, _D), ACC)
        for tap in tl.static_range(9):
            dy, dx = tap // 3 - 1, tap % 3 - 1
            q = _load_shifted(base, tokens, mask, height, width, row_stride,
                              dy, dx, ACC)
            acc = _tap_row(acc, tap, tl.sum(q * d_out, axis=0))
            d_out_back = _load_shifted(grad_out, tokens, mask, height, width,
                                       out_stride, -dy, -dx, ACC)
            dq += d_out_back * tl.load(w_new + tap * _D)[None, :]
        _store_head(grad_base, tokens, mask, row_stride, dq)
    rows = tl.arange(0, _TAP_ROWS)
    part = part_ptr + (image * tl.num_programs(0) + tl.program_id(0)) * (
        9 * _D)
    tl.store(part + rows[:, None] * _D + tl.arange(0, _D)[None, :], acc,
             mask=rows[:, None] < 9)


@triton.jit
def _depthwise_clip_backward_kernel(part_ptr, grad_ptr, norm_ptr,
                                    d_w_new_ptr, d_grad_ptr, splits,
                                    num_tokens, SCALE: tl.constexpr,
                                    ACC: tl.constexpr):
    """As :func:`_swiglu_clip_backward_kernel`, for the (9, 32) kernels."""
    image = tl.program_id(0)
    rows = tl.arange(0, _TAP_ROWS)[:, None]
    cols = tl.arange(0, _D)[None, :]
    offsets = rows * _D + cols
    inside = rows < 9
    size = 9 * _D
    d_w_new = _sum_splits(part_ptr + image * splits * size, splits, offsets,
                          inside, size, ACC)
    grad = tl.load(grad_ptr + image * size + offsets, mask=inside, other=0.)
    norm = tl.load(norm_ptr + image * _D + tl.arange(0, _D))
    d_grad = _loss_factor(num_tokens, SCALE, ACC) * _clip_backward(
        grad, norm, -d_w_new)
    tl.store(d_w_new_ptr + image * size + offsets, d_w_new, mask=inside)
    tl.store(d_grad_ptr + image * size + offsets, d_grad, mask=inside)


@triton.jit
def _depthwise_inner_backward_kernel(qkv_ptr, d_grad_ptr, grad_qkv_ptr,
                                     num_tokens, height, width, dim,
                                     row_stride, blocks_per_split,
                                     num_blocks, BLOCK_N: tl.constexpr,
                                     ACC: tl.constexpr):
    """Through g = correlation(kpad, v), given D = d_grad (scale included):
    dv2 = conv(k2; D), dk2 = the transposed convolution of v2 with D."""
    image = tl.program_id(1)
    image_offset = image.to(tl.int64) * num_tokens * row_stride + 3 * dim
    base = qkv_ptr + image_offset
    grad_base = grad_qkv_ptr + image_offset
    d_grad = d_grad_ptr + image * 9 * _D + tl.arange(0, _D)
    start, stop = _block_range(blocks_per_split, num_blocks)
    for block in range(start, stop):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = tokens < num_tokens
        dk = tl.zeros((BLOCK_N, _D), ACC)
        dv = tl.zeros((BLOCK_N, _D), ACC)
        for tap in tl.static_range(9):
            dy, dx = tap // 3 - 1, tap % 3 - 1
            d_tap = tl.load(d_grad + tap * _D)[None, :]
            k = _load_shifted(base + _D, tokens, mask, height, width,
                              row_stride, dy, dx, ACC)
            v = _load_shifted(base + 2 * _D, tokens, mask, height, width,
                              row_stride, -dy, -dx, ACC)
            dv += k * d_tap
            dk += v * d_tap
        _store_head(grad_base + _D, tokens, mask, row_stride, dk)
        _store_head(grad_base + 2 * _D, tokens, mask, row_stride, dv)


@triton.jit
def _weight_grad_kernel(direct_ptr, part_ptr, out_ptr, images, groups,
                        splits, SIZE: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr):
    """out[g] = sum over images b of direct[b, g] + sum over splits s of
    part[b, g, s] (the weights are shared by all images), in order."""
    group = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < SIZE
    total = tl.zeros((BLOCK, ), ACC)
    for image in range(images):
        index = image * groups + group
        total += tl.load(direct_ptr + index * SIZE + offsets, mask=inside,
                         other=0.)
        total += _sum_splits(part_ptr + index * splits * SIZE, splits,
                             offsets, inside, SIZE, ACC)
    tl.store(out_ptr + group * SIZE + offsets, total, mask=inside)


# ------------------------------------------------------------------- host


class _Plan:
    """Sizes, grids and kernel constants of one call."""

    def __init__(self, qkv: Tensor, heads: int, height: int, width: int):
        layout = _Layout(qkv, heads, height, width)
        if layout.head_dim != HEAD_DIM:
            raise ValueError(f'the fused TTT kernels need head_dim '
                             f'{HEAD_DIM}, got {layout.head_dim}')
        self.batch, self.heads = layout.batch, heads
        self.num_tokens, self.dim = layout.num_tokens, layout.dim
        self.out_stride = layout.dim + HEAD_DIM
        self.dtype, self.device = compute_dtype(qkv.dtype), qkv.device
        self.acc = tl.float64 if self.dtype == torch.float64 else tl.float32
        half = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
        dot = half.get(qkv.dtype, self.acc)
        # the precision applies to float32 operands only
        dots = dict(DOT=dot, PRECISION='tf32' if qkv.dtype in half else 'ieee',
                    EMULATE=INTERPRET and qkv.dtype in half)
        sizes = dict(num_tokens=self.num_tokens, dim=self.dim,
                     row_stride=qkv.shape[-1])
        self.swiglu_grid, self.swiglu_args = self._token_pass(
            'swiglu' if qkv.dtype in half else 'swiglu-float',
            self.batch * heads, sizes, width=width, heads=heads, **dots)
        self.depthwise_grid, self.depthwise_args = self._token_pass(
            'depthwise', self.batch, sizes, height=height, width=width)

    def _token_pass(self, kind: str, groups: int, sizes: dict, **more):
        """Grid (programs along the tokens, groups) of a pass over the
        tokens of ``groups`` (image, head) pairs or images, and its
        arguments besides the tensors."""
        block, warps = TOKEN_BLOCKS[kind]
        num_blocks = triton.cdiv(sizes['num_tokens'], block)
        wanted = max(1, triton.cdiv(TARGET_PROGRAMS, groups))
        per_split = triton.cdiv(num_blocks, min(num_blocks, wanted))
        grid = (triton.cdiv(num_blocks, per_split), groups)
        return grid, dict(sizes, blocks_per_split=per_split,
                          num_blocks=num_blocks, BLOCK_N=block, ACC=self.acc,
                          num_warps=warps, **more)

    def new(self, *shape) -> Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)


def _forward(qkv: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, heads: int,
             height: int, width: int, scale: float) -> Tuple[Tensor, ...]:
    """The output, then what backward needs besides ``qkv`` and the
    weights: each branch's inner gradient, its norms and updated weights."""
    plan = _Plan(qkv, heads, height, width)
    qkv, w1, w2, w3 = (t.contiguous() for t in (qkv, w1, w2, w3))
    batch, groups, d = plan.batch, plan.batch * heads, HEAD_DIM
    out = qkv.new_empty(batch, plan.num_tokens, plan.out_stride)
    update = dict(num_tokens=plan.num_tokens, SCALE=scale, ACC=plan.acc)

    grid, args = plan.swiglu_grid, plan.swiglu_args
    partials = plan.new(groups, grid[0], d, 2 * d)
    _swiglu_grad_kernel[grid](qkv, w1, w2, partials, **args)
    swiglu_state = (plan.new(groups, d, 2 * d), plan.new(groups, 2 * d),
                    plan.new(groups, d, 2 * d))
    _swiglu_update_kernel[(groups, )](partials, w1, w2, *swiglu_state,
                                      grid[0], heads, **update)
    _swiglu_apply_kernel[grid](qkv, swiglu_state[2], out,
                               out_stride=plan.out_stride, **args)

    grid, args = plan.depthwise_grid, plan.depthwise_args
    partials = plan.new(batch, grid[0], 9, d)
    _depthwise_grad_kernel[grid](qkv, partials, **args)
    depthwise_state = (plan.new(batch, 9, d), plan.new(batch, d),
                       plan.new(batch, 9, d))
    _depthwise_update_kernel[(batch, )](partials, w3, *depthwise_state,
                                        grid[0], **update)
    _depthwise_apply_kernel[grid](qkv, depthwise_state[2], out,
                                  out_stride=plan.out_stride, **args)
    return (out, *swiglu_state, *depthwise_state)


def _backward(grad_out: Tensor, qkv: Tensor, w1: Tensor, w2: Tensor,
              swiglu_grad: Tensor, swiglu_norm: Tensor, swiglu_w_new: Tensor,
              depthwise_grad: Tensor, depthwise_norm: Tensor,
              depthwise_w_new: Tensor, heads: int, height: int, width: int,
              scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. ``qkv``, [w1 | w2] (h, d, 2d) and w3 as (9 taps,
    d), the weights' in the compute dtype."""
    plan = _Plan(qkv, heads, height, width)
    qkv, w1, w2, grad_out = (t.contiguous()
                             for t in (qkv, w1, w2, grad_out))
    batch, groups, d = plan.batch, plan.batch * heads, HEAD_DIM
    grad_qkv = torch.empty_like(qkv)
    clip = dict(num_tokens=plan.num_tokens, SCALE=scale, ACC=plan.acc)

    grid, args = plan.swiglu_grid, plan.swiglu_args
    partials = plan.new(groups, grid[0], d, 2 * d)
    _swiglu_out_backward_kernel[grid](qkv, grad_out, swiglu_w_new, grad_qkv,
                                      partials, out_stride=plan.out_stride,
                                      **args)
    d_w_new, d_grad = plan.new(groups, d, 2 * d), plan.new(groups, d, 2 * d)
    _swiglu_clip_backward_kernel[(groups, )](partials, swiglu_grad,
                                             swiglu_norm, d_w_new, d_grad,
                                             grid[0], **clip)
    _swiglu_inner_backward_kernel[grid](qkv, w1, w2, d_grad, grad_qkv,
                                        partials, **args)
    grad_w_cat = plan.new(heads, d, 2 * d)
    _weight_grad_kernel[(heads, )](d_w_new, partials, grad_w_cat, batch,
                                   heads, grid[0], SIZE=2 * d * d,
                                   BLOCK=2 * d * d, ACC=plan.acc)

    grid, args = plan.depthwise_grid, plan.depthwise_args
    partials = plan.new(batch, grid[0], 9, d)
    _depthwise_out_backward_kernel[grid](qkv, grad_out, depthwise_w_new,
                                         grad_qkv, partials,
                                         out_stride=plan.out_stride, **args)
    d_w_new, d_grad = plan.new(batch, 9, d), plan.new(batch, 9, d)
    _depthwise_clip_backward_kernel[(batch, )](partials, depthwise_grad,
                                               depthwise_norm, d_w_new,
                                               d_grad, grid[0], **clip)
    _depthwise_inner_backward_kernel[grid](qkv, d_grad, grad_qkv, **args)
    grad_w3 = plan.new(9, d)
    # w3' = w3 - clip(g) for every image, and g does not depend on w3
    _weight_grad_kernel[(1, )](d_w_new, d_w_new, grad_w3, batch, 1, 0,
                               SIZE=9 * d, BLOCK=16 * d, ACC=plan.acc)
    return grad_qkv, grad_w_cat, grad_w3


def _device_guard(tensor: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# Custom operators, so that torch.compile sees the inner step as one opaque
# node of known output shapes, and CUDA graphs capture its launches (they
# depend on shapes only: no host syncs).
@torch.library.custom_op('mmvit3::ttt_fused', mutates_args=())
def _fused_op(qkv: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, heads: int,
              height: int, width: int, scale: float
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                         Tensor]:
    with _device_guard(qkv):
        return _forward(qkv, w1, w2, w3, heads, height, width, scale)


@_fused_op.register_fake
def _(qkv, w1, w2, w3, heads, height, width, scale):
    layout = _Layout(qkv, heads, height, width)
    dtype = compute_dtype(qkv.dtype)
    batch, d = layout.batch, layout.head_dim
    out = qkv.new_empty(batch, layout.num_tokens, layout.dim + d)
    inner = qkv.new_empty(batch * heads, d, 2 * d, dtype=dtype)
    inner_norm = qkv.new_empty(batch * heads, 2 * d, dtype=dtype)
    kernels = qkv.new_empty(batch, 9, d, dtype=dtype)
    kernels_norm = qkv.new_empty(batch, d, dtype=dtype)
    return (out, inner, inner_norm, torch.empty_like(inner), kernels,
            kernels_norm, torch.empty_like(kernels))


@torch.library.custom_op('mmvit3::ttt_fused_backward', mutates_args=())
def _fused_backward_op(grad_out: Tensor, qkv: Tensor, w1: Tensor,
                       w2: Tensor, swiglu_grad: Tensor, swiglu_norm: Tensor,
                       swiglu_w_new: Tensor, depthwise_grad: Tensor,
                       depthwise_norm: Tensor, depthwise_w_new: Tensor,
                       heads: int, height: int, width: int, scale: float
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    with _device_guard(qkv):
        return _backward(grad_out, qkv, w1, w2, swiglu_grad, swiglu_norm,
                         swiglu_w_new, depthwise_grad, depthwise_norm,
                         depthwise_w_new, heads, height, width, scale)


@_fused_backward_op.register_fake
def _(grad_out, qkv, w1, w2, swiglu_grad, *state_and_sizes):
    heads = state_and_sizes[-4]
    d = swiglu_grad.shape[1]
    return (torch.empty_like(qkv), swiglu_grad.new_empty(heads, d, 2 * d),
            swiglu_grad.new_empty(9, d))


def _setup_context(ctx, inputs, output):
    qkv, w1, w2, w3, heads, height, width, scale = inputs
    ctx.save_for_backward(qkv, w1, w2, *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.sizes = dict(heads=heads, height=height, width=width, scale=scale)
    ctx.w3_dtype = w3.dtype


def _autograd_backward(ctx, grad_out, *unused_state_grads):
    qkv, w1, w2, *state = ctx.saved_tensors
    grad_qkv, grad_w_cat, grad_w3 = _fused_backward_op(
        grad_out, qkv, w1, w2, *state, **ctx.sizes)
    grad_w1, grad_w2 = grad_w_cat.unsqueeze(0).chunk(2, dim=-1)
    # (9 taps, d) -> w3's (d, 1, 3, 3)
    grad_w3 = grad_w3.t().reshape(-1, 1, 3, 3)
    return (grad_qkv, grad_w1.to(w1.dtype), grad_w2.to(w2.dtype),
            grad_w3.to(ctx.w3_dtype), None, None, None, None)


_fused_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def fused_ttt(qkv: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, heads: int,
              height: int, width: int, scale: float) -> Tensor:
    """:func:`.naive.naive_ttt` by the fused Triton kernels; backward saves
    only ``qkv``, the weights and the small per-image inner state, and
    recomputes the rest."""
    return _fused_op(qkv, w1, w2, w3, heads, height, width, scale)[0]
