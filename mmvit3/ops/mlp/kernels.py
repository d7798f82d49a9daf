"""The block MLP and the blocks' CPE on a GPU: Triton kernels for a 3x3
depthwise convolution (padding 1) with an identity tap and a bias over
channels-last tokens, with an optional exact GELU before and after it.

MLP: ``y = fc2(GELU(t))``, ``t = s + dwc(s) + b``, ``s = GELU(a)``,
``a = fc1(x)``. The linear layers stay cuBLAS matmuls (torch); the chain
from ``a`` to ``GELU(t)`` is one kernel. CPE: ``x + dwc(x) + b``, the same
kernel without the GELUs. Each is one custom operator, forward and
backward, so that ``torch.compile`` sees one opaque node and CUDA graphs
capture its launches (they depend on shapes only: no host syncs).

The kernels, for tokens (B, H*W, K) in row-major map order:

- The row pass: forward, and the first pass of the MLP's backward. A
  program owns a strip of BLOCK_W map columns by BLOCK_C channels of one
  image and walks down a band of rows. It reads each input row once at
  three column shifts (the shifted loads hit the cache), takes the GELU
  there, and adds the row's products with the three kernel rows to the
  output rows above, at and below it; an output row is written once its
  last input row is in. So the GELU is computed 3 times per element, not
  9, and two partial rows stay in registers. In backward it recomputes
  ``t`` and writes ``GELU(t)`` (for fc2's weight gradient) and
  ``grad_t = grad * GELU'(t)``, over ``grad``.
- The token pass: the second backward pass (the CPE's only one). A program
  owns BLOCK_C channels of one image and a run of token blocks. It reads
  ``grad_t`` at the 9 neighbours of each token, sums them through the
  kernels (the transposed convolution, identity tap included) and writes
  ``grad_a = grad_s * GELU'(a)``. The kernels' gradient,
  ``sum_p grad_t[p] s[p + o]`` for the tap at offset ``o``, is summed as
  ``sum_q grad_t[q - o] s[q]`` from the same loads, so no neighbour of
  ``s`` is needed; it leaves with the biases' gradients as one partial sum
  per program.
- A reduction sums the partials in a fixed order into the depthwise
  kernels', its bias's and (MLP) fc1's bias gradients. No atomics: results
  are deterministic for given shapes.

The MLP saves only ``x`` and ``a`` for backward, as :mod:`.fused` does; the
row pass recomputes the rest. Arithmetic is float32 (float64 for float64
tokens) whatever the tokens' dtype; the depthwise weights are read in
their own dtype, float32 under AMP (no cast kernels, and no rounding of
them to bf16 as autocast's convolution would). On a CPU the kernels run
under the Triton interpreter (``TRITON_INTERPRET=1`` set before this
module is imported), which the tests use.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ttt.fused import _device_guard, is_available
from .fused import _autocast_inputs, check_shapes

# (map columns or tokens, channels, warps) of a row-pass and a token-pass
# program: the largest tiles for which ptxas (Triton 3.7, sm_90) reports no
# register spills, at about 100 and 140 registers a thread; not tuned by
# timing. 64 channels divide every width of the T/S/B models (64 to 2560).
ROW_TILE = (16, 64, 4)
TOKEN_TILE = (16, 64, 4)
# Programs a pass aims at (about 8 per SM of an H100 or H200). The row
# pass splits the map into bands of at least MIN_BAND_ROWS rows for them,
# each band reading two rows more than it writes. Tests lower these and
# the tiles to exercise many strips, bands and splits on tiny maps.
TARGET_PROGRAMS = 1024
MIN_BAND_ROWS = 8
# Partials the reduction loads at a time, per channel block and row.
PARTIALS_BLOCK = 64
# Token dtypes the dispatchers send here on a GPU (float64 stays in torch).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows of a token-pass program's partial sums: the 9 taps' kernel
# gradients, the depthwise bias's gradient, and the sum of the input
# gradient (fc1's bias gradient in the MLP).
_TAPS = tl.constexpr(9)
_PARTIAL_ROWS = tl.constexpr(11)
_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1 / math.sqrt(2 * math.pi))


def applies(x) -> bool:
    """Whether the kernels serve tokens ``x``: a CUDA tensor (not an FX
    proxy, not under ``torch.jit.trace``) of a dtype in ``DTYPES``."""
    return (isinstance(x, Tensor) and x.is_cuda and x.dtype in DTYPES
            and not torch.jit.is_tracing() and is_available(x.device))


# ---------------------------------------------------------------- helpers


@triton.jit
def _gelu_parts(x):
    """GELU(x) = x Phi(x) (the exact erf form, torch's default) and its
    derivative Phi(x) + x phi(x); constants in x's precision."""
    cdf = 0.5 * (1 + tl.math.erf(x * tl.full([], _SQRT_HALF, x.dtype)))
    pdf = tl.exp(-0.5 * x * x) * tl.full([], _INV_SQRT_2PI, x.dtype)
    return x * cdf, cdf + x * pdf


@triton.jit
def _tap(taps, chan_ok, TAP: tl.constexpr, ACC: tl.constexpr):
    """Tap TAP (row-major in 3x3) of each channel's kernel, (1, BLOCK_C);
    ``taps`` points at each channel's 9."""
    return tl.load(taps + TAP, mask=chan_ok, other=0.).to(ACC)[None, :]


@triton.jit
def _channel_block(BLOCK_C: tl.constexpr):
    """This program's channels, 4 to a thread: with bf16's 16-byte loads
    of 8, each thread would hold every kernel tap and partial sum for 8
    channels, and the token pass would spill registers."""
    return tl.max_contiguous(
        tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), 4)


@triton.jit
def _columns(cols, chans, chan_ok, width, channels, DX: tl.constexpr):
    """In-row offsets and mask of columns ``cols + DX``: zero padding
    outside the map."""
    x = cols + DX
    inside = (x >= 0) & (x < width)
    return (x[:, None] * channels + chans[None, :],
            inside[:, None] & chan_ok[None, :])


@triton.jit
def _load_row(ptr, row, height, row_stride, columns, column_ok,
              GELU: tl.constexpr, ACC: tl.constexpr):
    """Map row ``row`` at the given columns, after the GELU if GELU; zero
    outside the map (the zero padding, since GELU(0) = 0)."""
    value = tl.load(ptr + row * row_stride + columns,
                    mask=column_ok & (row >= 0) & (row < height),
                    other=0.).to(ACC)
    if GELU:
        value = _gelu_parts(value)[0]
    return value


@triton.jit
def _kernel_row(taps, chan_ok, ROW: tl.constexpr, left, centre, right):
    """The products of one input row with kernel row ROW."""
    return (_tap(taps, chan_ok, 3 * ROW, left.dtype) * left +
            _tap(taps, chan_ok, 3 * ROW + 1, left.dtype) * centre +
            _tap(taps, chan_ok, 3 * ROW + 2, left.dtype) * right)


@triton.jit
def _finish_row(t, offsets, mask, out_ptr, grad_ptr, GELU: tl.constexpr,
                BACKWARD: tl.constexpr):
    """Stores GELU(t) (or t); BACKWARD also turns the gradient w.r.t. it
    into the gradient w.r.t. t, in place."""
    if BACKWARD:
        value, slope = _gelu_parts(t)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.).to(t.dtype)
        tl.store(grad_ptr + offsets,
                 (grad * slope).to(grad_ptr.dtype.element_ty), mask=mask)
    elif GELU:
        value = _gelu_parts(t)[0]
    else:
        value = t
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _through_tap(grads, offsets, inside, shift, taps, chan_ok,
                 TAP: tl.constexpr, s, grad_s, grad_weight):
    """One tap of the backward: with ``g = grad_t`` ``shift`` elements on
    from each token (zero where not ``inside`` the map), returns
    ``grad_s + w g`` and the tap's kernel gradient
    ``grad_weight + sum(g s)`` over the tokens."""
    g = tl.load(grads + offsets + shift, mask=inside, other=0.).to(s.dtype)
    return (grad_s + _tap(taps, chan_ok, TAP, s.dtype) * g,
            grad_weight + tl.sum(g * s, axis=0))


@triton.jit
def _store_partial(ptr, ROW: tl.constexpr, chans, chan_ok, channels, value):
    tl.store(ptr + ROW * channels + chans, value, mask=chan_ok)


# ---------------------------------------------------------------- kernels


@triton.jit
def _rows_kernel(in_ptr, weight_ptr, bias_ptr, out_ptr, grad_ptr, height,
                 width, channels, rows_per_band, BLOCK_W: tl.constexpr,
                 BLOCK_C: tl.constexpr, GELU_IN: tl.constexpr,
                 GELU_OUT: tl.constexpr, BACKWARD: tl.constexpr,
                 ACC: tl.constexpr):
    """``t = s + dwc(s) + bias``, ``s = GELU(in)`` if GELU_IN else ``in``,
    over this program's band of rows; stores GELU(t) if GELU_OUT else t.
    BACKWARD (with GELU_OUT): ``grad`` holds the gradient w.r.t. GELU(t)
    and gets the gradient w.r.t. t."""
    bands = tl.cdiv(height, rows_per_band)
    image, band = tl.program_id(2) // bands, tl.program_id(2) % bands
    first = band * rows_per_band
    last = tl.minimum(first + rows_per_band, height)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    chans = _channel_block(BLOCK_C)
    chan_ok = chans < channels
    taps = weight_ptr + chans * 9
    image_offset = image.to(tl.int64) * height * width * channels
    source = in_ptr + image_offset
    bias = tl.load(bias_ptr + chans, mask=chan_ok, other=0.).to(ACC)[None, :]
    left, left_ok = _columns(cols, chans, chan_ok, width, channels, -1)
    centre, centre_ok = _columns(cols, chans, chan_ok, width, channels, 0)
    right, right_ok = _columns(cols, chans, chan_ok, width, channels, 1)
    row_stride = width * channels
    # output rows row - 1 and row, waiting for their inputs below
    pending = tl.zeros((BLOCK_W, BLOCK_C), ACC)
    upcoming = tl.zeros((BLOCK_W, BLOCK_C), ACC)
    for row in range(first - 1, last + 1):
        s_left = _load_row(source, row, height, row_stride, left, left_ok,
                           GELU_IN, ACC)
        s_centre = _load_row(source, row, height, row_stride, centre,
                             centre_ok, GELU_IN, ACC)
        s_right = _load_row(source, row, height, row_stride, right,
                            right_ok, GELU_IN, ACC)
        done = pending + _kernel_row(taps, chan_ok, 2, s_left, s_centre,
                                     s_right)
        # + s: the identity tap
        pending = upcoming + s_centre + _kernel_row(taps, chan_ok, 1, s_left,
                                                    s_centre, s_right)
        upcoming = _kernel_row(taps, chan_ok, 0, s_left, s_centre, s_right)
        # output row row - 1 is complete; the band's first pass only
        # primes the partial rows
        _finish_row(done + bias, image_offset + (row - 1) * row_stride +
                    centre, centre_ok & (row > first), out_ptr, grad_ptr,
                    GELU_OUT, BACKWARD)


@triton.jit
def _tokens_kernel(grad_t_ptr, in_ptr, weight_ptr, grad_in_ptr, part_ptr,
                   num_tokens, height, width, channels, blocks_per_split,
                   num_blocks, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                   GELU_IN: tl.constexpr, ACC: tl.constexpr):
    """``grad_s = grad_t + dwc^T(grad_t)``, ``grad_in = grad_s GELU'(in)``
    (or ``grad_s``) for this program's tokens, and its partial sums: each
    tap's ``sum grad_t[q - o] s[q]``, ``sum grad_t``, ``sum grad_in``."""
    split, image = tl.program_id(0), tl.program_id(2)
    chans = _channel_block(BLOCK_C)
    chan_ok = chans < channels
    taps = weight_ptr + chans * 9
    image_offset = image.to(tl.int64) * num_tokens * channels
    grads = grad_t_ptr + image_offset
    step = width * channels  # one map row on
    d0 = tl.zeros((BLOCK_C, ), ACC)
    d1, d2, d3, d4, d5, d6, d7, d8 = d0, d0, d0, d0, d0, d0, d0, d0
    d_bias, d_in = d0, d0
    start = split * blocks_per_split
    for block in range(start, tl.minimum(start + blocks_per_split,
                                         num_blocks)):
        tokens = block * BLOCK_N + tl.arange(0, BLOCK_N)
        y, x = tokens // width, tokens % width
        inside = tokens < num_tokens
        offsets = tokens[:, None] * channels + chans[None, :]
        mask = inside[:, None] & chan_ok[None, :]
        # where the neighbours q - o lie inside the map
        above = mask & (y >= 1)[:, None]
        below = mask & (y < height - 1)[:, None]
        left = (x >= 1)[:, None]
        right = (x < width - 1)[:, None]
        s = tl.load(in_ptr + image_offset + offsets, mask=mask,
                    other=0.).to(ACC)
        if GELU_IN:
            s, slope = _gelu_parts(s)
        centre = tl.load(grads + offsets, mask=mask, other=0.).to(ACC)
        grad_s = centre  # the identity tap
        d_bias += tl.sum(centre, axis=0)
        # the tap at offset o = (i - 1, j - 1) takes grad_t at q - o
        grad_s, d0 = _through_tap(grads, offsets, below & right,
                                  step + channels, taps, chan_ok, 0, s,
                                  grad_s, d0)
        grad_s, d1 = _through_tap(grads, offsets, below, step, taps,
                                  chan_ok, 1, s, grad_s, d1)
        grad_s, d2 = _through_tap(grads, offsets, below & left,
                                  step - channels, taps, chan_ok, 2, s,
                                  grad_s, d2)
        grad_s, d3 = _through_tap(grads, offsets, mask & right, channels,
                                  taps, chan_ok, 3, s, grad_s, d3)
        grad_s, d4 = _through_tap(grads, offsets, mask, 0, taps, chan_ok, 4,
                                  s, grad_s, d4)
        grad_s, d5 = _through_tap(grads, offsets, mask & left, -channels,
                                  taps, chan_ok, 5, s, grad_s, d5)
        grad_s, d6 = _through_tap(grads, offsets, above & right,
                                  channels - step, taps, chan_ok, 6, s,
                                  grad_s, d6)
        grad_s, d7 = _through_tap(grads, offsets, above, -step, taps,
                                  chan_ok, 7, s, grad_s, d7)
        grad_s, d8 = _through_tap(grads, offsets, above & left,
                                  -step - channels, taps, chan_ok, 8, s,
                                  grad_s, d8)
        if GELU_IN:
            grad_s = grad_s * slope
        tl.store(grad_in_ptr + image_offset + offsets,
                 grad_s.to(grad_in_ptr.dtype.element_ty), mask=mask)
        d_in += tl.sum(grad_s, axis=0)
    part = part_ptr + (image * tl.num_programs(0) + split) * (
        _PARTIAL_ROWS * channels)
    _store_partial(part, 0, chans, chan_ok, channels, d0)
    _store_partial(part, 1, chans, chan_ok, channels, d1)
    _store_partial(part, 2, chans, chan_ok, channels, d2)
    _store_partial(part, 3, chans, chan_ok, channels, d3)
    _store_partial(part, 4, chans, chan_ok, channels, d4)
    _store_partial(part, 5, chans, chan_ok, channels, d5)
    _store_partial(part, 6, chans, chan_ok, channels, d6)
    _store_partial(part, 7, chans, chan_ok, channels, d7)
    _store_partial(part, 8, chans, chan_ok, channels, d8)
    _store_partial(part, 9, chans, chan_ok, channels, d_bias)
    _store_partial(part, 10, chans, chan_ok, channels, d_in)


@triton.jit
def _sum_partials_kernel(part_ptr, weight_grad_ptr, bias_grad_ptr,
                         in_bias_grad_ptr, parts, channels,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         ACC: tl.constexpr):
    """Row ``program_id(1)`` of the partials summed over all programs, in
    a fixed order, stored where its gradient goes: a tap of the (K, 1, 3,
    3) kernels' gradient, the depthwise bias's, or fc1's bias's."""
    row = tl.program_id(1)
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < channels
    total = tl.zeros((BLOCK_P, BLOCK_C), ACC)
    for start in range(0, parts, BLOCK_P):
        part = start + tl.arange(0, BLOCK_P)
        total += tl.load(
            part_ptr + (part[:, None] * _PARTIAL_ROWS + row) * channels +
            chans[None, :], mask=(part < parts)[:, None] & chan_ok[None, :],
            other=0.)
    total = tl.sum(total, axis=0)
    if row < _TAPS:
        tl.store(weight_grad_ptr + chans * 9 + row,
                 total.to(weight_grad_ptr.dtype.element_ty), mask=chan_ok)
    elif row == _TAPS:
        tl.store(bias_grad_ptr + chans,
                 total.to(bias_grad_ptr.dtype.element_ty), mask=chan_ok)
    else:
        tl.store(in_bias_grad_ptr + chans,
                 total.to(in_bias_grad_ptr.dtype.element_ty), mask=chan_ok)


# ------------------------------------------------------------------- host


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows_pass(source: Tensor, weight: Tensor, bias: Tensor, out: Tensor,
               height: int, width: int, gelu_in: bool, gelu_out: bool,
               grad: Optional[Tensor] = None):
    """The row pass over (B, H*W, K) ``source`` into ``out``; with
    ``grad`` (needs ``gelu_out``), its backward's first pass."""
    batch, channels = source.shape[0], source.shape[-1]
    block_w, block_c, warps = ROW_TILE
    strips = triton.cdiv(width, block_w)
    channel_blocks = triton.cdiv(channels, block_c)
    bands = max(1, min(
        triton.cdiv(TARGET_PROGRAMS, strips * channel_blocks * batch),
        height // MIN_BAND_ROWS))
    rows = triton.cdiv(height, bands)
    grid = (strips, channel_blocks, batch * triton.cdiv(height, rows))
    _rows_kernel[grid](source, weight, bias, out,
                       out if grad is None else grad, height, width,
                       channels, rows, BLOCK_W=block_w, BLOCK_C=block_c,
                       GELU_IN=gelu_in, GELU_OUT=gelu_out,
                       BACKWARD=grad is not None, ACC=_acc(source.dtype),
                       num_warps=warps)


def _tokens_pass(grad_t: Tensor, source: Tensor, weight: Tensor,
                 bias: Tensor, grad_in: Tensor, height: int, width: int,
                 gelu_in: bool, in_bias: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The token pass into ``grad_in``, then the partials' sum: the
    gradients of the kernels, of ``bias``, and of ``in_bias`` (the sum of
    ``grad_in``) where given, each in its parameter's dtype."""
    batch, num_tokens, channels = source.shape
    block_n, block_c, warps = TOKEN_TILE
    acc = _acc(source.dtype)
    num_blocks = triton.cdiv(num_tokens, block_n)
    channel_blocks = triton.cdiv(channels, block_c)
    wanted = max(1, triton.cdiv(TARGET_PROGRAMS, channel_blocks * batch))
    per_split = triton.cdiv(num_blocks, min(num_blocks, wanted))
    splits = triton.cdiv(num_blocks, per_split)
    partials = torch.empty(batch * splits, _PARTIAL_ROWS.value, channels,
                           dtype=torch.float64 if acc == tl.float64 else
                           torch.float32, device=source.device)
    _tokens_kernel[(splits, channel_blocks, batch)](
        grad_t, source, weight, grad_in, partials, num_tokens, height,
        width, channels, per_split, num_blocks, BLOCK_N=block_n,
        BLOCK_C=block_c, GELU_IN=gelu_in, ACC=acc, num_warps=warps)
    weight_grad = torch.empty_like(weight)
    bias_grad = torch.empty_like(bias)
    in_bias_grad = None if in_bias is None else torch.empty_like(in_bias)
    rows = _PARTIAL_ROWS.value - (in_bias is None)
    _sum_partials_kernel[(channel_blocks, rows)](
        partials, weight_grad, bias_grad,
        bias_grad if in_bias_grad is None else in_bias_grad, batch * splits,
        channels, BLOCK_P=PARTIALS_BLOCK, BLOCK_C=block_c, ACC=acc,
        num_warps=4)
    return weight_grad, bias_grad, in_bias_grad


def _check_map_size(height: int, width: int, channels: int, name: str):
    """Maps the kernels' 32-bit offsets within an image can address
    (H-ViT3-T: inputs up to about 11500 x 11500)."""
    if height * width * channels >= 2**31:
        raise ValueError(f'{name}: a map of {height}x{width}x{channels} is '
                         'too large for the kernels')


# --------------------------------------------------------------------- MLP


def _mlp_forward(x, fc1_weight, fc1_bias, dwc_weight, dwc_bias, fc2_weight,
                 fc2_bias, height, width) -> Tuple[Tensor, Tensor]:
    """``y`` and ``a = fc1(x)``, both (B, N, .)."""
    tokens = x.shape[:-1]
    a = torch.addmm(fc1_bias, x.reshape(-1, x.shape[-1]), fc1_weight.t())
    g = torch.empty_like(a)
    _rows_pass(a.view(*tokens, -1), dwc_weight.contiguous(), dwc_bias, g,
               height, width, gelu_in=True, gelu_out=True)
    y = torch.addmm(fc2_bias, g, fc2_weight.t())
    return y.view(*tokens, -1), a.view(*tokens, -1)


def _mlp_backward(grad_y, x, a, fc1_weight, fc1_bias, dwc_weight, dwc_bias,
                  fc2_weight, fc2_bias, height, width) -> Tuple[Tensor, ...]:
    """Gradients w.r.t. x and the six weights, each in its dtype."""
    x2d = x.reshape(-1, x.shape[-1])
    grad_y = grad_y.reshape(-1, grad_y.shape[-1])
    dwc_weight = dwc_weight.contiguous()
    # grad w.r.t. GELU(t), turned into the grad w.r.t. t by the row pass
    grad_t = grad_y.mm(fc2_weight)
    g = torch.empty_like(grad_t)
    _rows_pass(a, dwc_weight, dwc_bias, g, height, width, gelu_in=True,
               gelu_out=True, grad=grad_t)
    grad_fc2_weight = grad_y.t().mm(g)
    grad_fc2_bias = grad_y.sum(0)
    # g's memory takes grad_a: the matmul above, its last reader, runs
    # first on the stream
    grad_a = g
    grad_dwc_weight, grad_dwc_bias, grad_fc1_bias = _tokens_pass(
        grad_t.view_as(a), a, dwc_weight, dwc_bias, grad_a, height, width,
        gelu_in=True, in_bias=fc1_bias)
    return (grad_a.mm(fc1_weight).view_as(x), grad_a.t().mm(x2d),
            grad_fc1_bias, grad_dwc_weight, grad_dwc_bias, grad_fc2_weight,
            grad_fc2_bias)


@torch.library.custom_op('mmvit3::triton_mlp', mutates_args=())
def _mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor,
            dwc_weight: Tensor, dwc_bias: Tensor, fc2_weight: Tensor,
            fc2_bias: Tensor, height: int, width: int
            ) -> Tuple[Tensor, Tensor]:
    with _device_guard(x):
        return _mlp_forward(x, fc1_weight, fc1_bias, dwc_weight, dwc_bias,
                            fc2_weight, fc2_bias, height, width)


@_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, dwc_weight, dwc_bias, fc2_weight, fc2_bias,
      height, width):
    tokens = x.shape[:-1]
    return (x.new_empty(*tokens, fc2_weight.shape[0]),
            x.new_empty(*tokens, fc1_weight.shape[0]))


@torch.library.custom_op('mmvit3::triton_mlp_backward', mutates_args=())
def _mlp_backward_op(grad_y: Tensor, x: Tensor, a: Tensor,
                     fc1_weight: Tensor, fc1_bias: Tensor,
                     dwc_weight: Tensor, dwc_bias: Tensor,
                     fc2_weight: Tensor, fc2_bias: Tensor, height: int,
                     width: int) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                          Tensor, Tensor, Tensor]:
    with _device_guard(x):
        return _mlp_backward(grad_y, x, a, fc1_weight, fc1_bias, dwc_weight,
                             dwc_bias, fc2_weight, fc2_bias, height, width)


@_mlp_backward_op.register_fake
def _(grad_y, x, a, fc1_weight, fc1_bias, dwc_weight, dwc_bias, fc2_weight,
      fc2_bias, height, width):
    return tuple(t.new_empty(t.shape) for t in (
        x, fc1_weight, fc1_bias, dwc_weight, dwc_bias, fc2_weight, fc2_bias))


def _mlp_setup_context(ctx, inputs, output):
    *tensors, height, width = inputs
    x, fc1_weight, fc1_bias, dwc_weight, dwc_bias, fc2_weight, fc2_bias = \
        tensors
    # the biases for their dtypes only (the gradients are returned in them)
    ctx.save_for_backward(x, output[1], fc1_weight, fc1_bias, dwc_weight,
                          dwc_bias, fc2_weight, fc2_bias)
    ctx.mark_non_differentiable(output[1])
    ctx.size = height, width


def _mlp_autograd_backward(ctx, grad_y, unused_grad_a):
    grads = _mlp_backward_op(grad_y, *ctx.saved_tensors, *ctx.size)
    return (*grads, None, None)


_mlp_op.register_autograd(_mlp_autograd_backward,
                          setup_context=_mlp_setup_context)


def triton_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor,
               dwc_weight: Tensor, dwc_bias: Tensor, fc2_weight: Tensor,
               fc2_bias: Tensor, height: int, width: int) -> Tensor:
    """:func:`.naive.naive_mlp` by the Triton kernels, the linear layers by
    torch; backward saves ``x`` and ``fc1(x)`` only. Under autocast, the
    linear layers' inputs are cast as ``nn.Linear`` casts them."""
    hidden = check_shapes(x, fc1_weight, dwc_weight, fc2_weight, height,
                          width, 'triton_mlp')
    _check_map_size(height, width, hidden, 'triton_mlp')
    device = x.device.type
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = _autocast_inputs(
        device, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    with torch.autocast(device, enabled=False):
        return _mlp_op(x, fc1_weight, fc1_bias, dwc_weight, dwc_bias,
                       fc2_weight, fc2_bias, height, width)[0]


# --------------------------------------------------------------------- CPE


@torch.library.custom_op('mmvit3::triton_cpe', mutates_args=())
def _cpe_op(x: Tensor, weight: Tensor, bias: Tensor, height: int,
            width: int) -> Tensor:
    out = x.new_empty(x.shape)
    with _device_guard(x):
        _rows_pass(x.contiguous(), weight.contiguous(), bias, out, height,
                   width, gelu_in=False, gelu_out=False)
    return out


@_cpe_op.register_fake
def _(x, weight, bias, height, width):
    return x.new_empty(x.shape)


@torch.library.custom_op('mmvit3::triton_cpe_backward', mutates_args=())
def _cpe_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor,
                     bias: Tensor, height: int,
                     width: int) -> Tuple[Tensor, Tensor, Tensor]:
    grad_x = x.new_empty(x.shape)
    with _device_guard(x):
        grad_weight, grad_bias, _ = _tokens_pass(
            grad_out.contiguous(), x.contiguous(), weight.contiguous(), bias,
            grad_x, height, width, gelu_in=False)
    return grad_x, grad_weight, grad_bias


@_cpe_backward_op.register_fake
def _(grad_out, x, weight, bias, height, width):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), \
        bias.new_empty(bias.shape)


def _cpe_setup_context(ctx, inputs, output):
    x, weight, bias, height, width = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.size = height, width


def _cpe_autograd_backward(ctx, grad_out):
    grads = _cpe_backward_op(grad_out, *ctx.saved_tensors, *ctx.size)
    return (*grads, None, None)


_cpe_op.register_autograd(_cpe_autograd_backward,
                          setup_context=_cpe_setup_context)


def triton_cpe(x: Tensor, weight: Tensor, bias: Tensor, height: int,
               width: int) -> Tensor:
    """``x + dwconv3x3(x) + bias`` on (B, H*W, C) tokens (``weight``:
    (C, 1, 3, 3)) by the Triton kernels, in ``x``'s dtype; under autocast
    ``x`` is cast as ``nn.Conv2d`` casts its input."""
    if (x.dim() != 3 or x.shape[1] != height * width
            or tuple(weight.shape) != (x.shape[2], 1, 3, 3)):
        raise ValueError(f'triton_cpe: x must be (B, {height}*{width}, C) '
                         f'and weight (C, 1, 3, 3), got {tuple(x.shape)} and '
                         f'{tuple(weight.shape)}')
    _check_map_size(height, width, x.shape[2], 'triton_cpe')
    device = x.device.type
    x, = _autocast_inputs(device, x)
    with torch.autocast(device, enabled=False):
        return _cpe_op(x, weight, bias, height, width)
