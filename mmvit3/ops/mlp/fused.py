"""The H-ViT3 block MLP as one memory-lean ``autograd.Function``.

``y = fc2(GELU(s))``, ``s = h + dwc(h)``, ``h = GELU(a)``, ``a = fc1(x)``,
where ``dwc`` is a 3x3 depthwise conv over the (B, 4C, H, W) map of ``h``.
Torch autograd saves four 4C-channel maps for it (``a``, ``h``, ``s``,
``GELU(s)``) besides ``x``; this function saves ``x`` and ``a`` only and
recomputes the rest in backward: the depthwise conv and GELUs it recomputes
cost about what autograd spends on allocating and re-reading the maps it
saves. The depthwise conv carries an identity tap, so that one convolution
computes ``h + dwc(h)`` in forward and in backward.

Inference on a CPU computes large hidden maps in bands of rows
(:mod:`..bands`).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..bands import band_rows
from ..depthwise import (depthwise_conv3x3, depthwise_conv3x3_backward,
                         plus_identity_tap)
from ..layout import tokens_to_map


def _flat_tokens(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C); a view of a channels-last map."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _as_map(flat: torch.Tensor, batch: int, height: int,
            width: int) -> torch.Tensor:
    """(B*H*W, C) -> channels-last (B, C, H, W) view."""
    return tokens_to_map(
        flat.view(batch, height * width, flat.shape[-1]), height, width)


def _dwc_sum(h, kernels, dwc_bias, batch, height, width):
    """``s = h + dwc(h)`` on (B*N, 4C) tokens; ``kernels`` carry the
    identity tap."""
    return _flat_tokens(
        depthwise_conv3x3(_as_map(h, batch, height, width), kernels,
                          dwc_bias))


def _gelu_backward_(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    # grad * GELU'(pre) (exact erf form) by aten's fused kernel, written
    # over ``grad`` (fresh maps cost page faults on a CPU)
    return torch.ops.aten.gelu_backward.grad_input(grad, pre,
                                                   grad_input=grad)


def _forward(x, fc1_weight, fc1_bias, dwc_weight, dwc_bias, fc2_weight,
             fc2_bias, height, width, keep_a: bool):
    """``(y, a)``; ``a`` is None unless ``keep_a``. Each other map is freed
    (or overwritten in place) once used."""
    x2d = x.reshape(-1, x.shape[-1])
    a = torch.addmm(fc1_bias, x2d, fc1_weight.t())
    h = F.gelu(a) if keep_a else torch.ops.aten.gelu_(a)
    s = _dwc_sum(h, plus_identity_tap(dwc_weight), dwc_bias, x.shape[0],
                 height, width)
    del h
    y = torch.addmm(fc2_bias, torch.ops.aten.gelu_(s), fc2_weight.t())
    return y.view(*x.shape[:-1], -1), a if keep_a else None


def _forward_in_bands(x, fc1_weight, fc1_bias, dwc_weight, dwc_bias,
                      fc2_weight, fc2_bias, height, width, rows):
    """Inference forward, ``rows`` map rows at a time; each band recomputes
    ``h`` on its neighbours' edge rows for the depthwise conv."""
    batch, _, channels = x.shape
    maps = x.reshape(batch, height, width, channels)
    y = x.new_empty(batch, height, width, fc2_weight.shape[0])
    kernels = plus_identity_tap(dwc_weight)
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        low, high = max(start - 1, 0), min(stop + 1, height)
        h = torch.ops.aten.gelu_(
            torch.addmm(fc1_bias, maps[:, low:high].reshape(-1, channels),
                        fc1_weight.t()))
        # Padding 1 on the band: its edge rows are right only at the map's
        # border, and only the rows in [start, stop) are kept.
        s = depthwise_conv3x3(
            _as_map(h, batch, high - low, width), kernels,
            dwc_bias)[:, :, start - low:stop - low]
        y[:, start:stop] = torch.addmm(
            fc2_bias, torch.ops.aten.gelu_(_flat_tokens(s)),
            fc2_weight.t()).view(batch, stop - start, width, -1)
    return y.view(batch, height * width, -1)


class FusedMlp(torch.autograd.Function):
    """Saves ``x``, ``a = fc1(x)`` and the weights it needs."""

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, dwc_weight, dwc_bias,
                fc2_weight, fc2_bias, height, width):
        y, a = _forward(x, fc1_weight, fc1_bias, dwc_weight, dwc_bias,
                        fc2_weight, fc2_bias, height, width, keep_a=True)
        ctx.save_for_backward(x, fc1_weight, dwc_weight, dwc_bias,
                              fc2_weight, a)
        ctx.size = height, width
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, fc1_weight, dwc_weight, dwc_bias, fc2_weight, a = \
            ctx.saved_tensors
        height, width = ctx.size
        need = ctx.needs_input_grad
        batch = x.shape[0]
        x2d = x.reshape(-1, x.shape[-1])
        grad_y = grad_y.reshape(-1, grad_y.shape[-1])
        grads: List[Optional[torch.Tensor]] = [None] * 9
        # Same dtype as forward: autocast, if any, acted before the function.
        with torch.autocast(x.device.type, enabled=False):
            h = F.gelu(a)
            kernels = plus_identity_tap(dwc_weight)
            s = _dwc_sum(h, kernels, dwc_bias, batch, height, width)
            grad_s = None
            if any(need[:5]):
                grad_s = _gelu_backward_(grad_y.mm(fc2_weight), s)
            if need[5]:
                grads[5] = grad_y.t().mm(torch.ops.aten.gelu_(s))
            del s
            if need[6]:
                grads[6] = grad_y.sum(0)
            if grad_s is None:
                return tuple(grads)
            # through s = h + dwc(h) at once: the kernels carry the identity
            grad_h, grads[3], grads[4] = depthwise_conv3x3_backward(
                _as_map(grad_s, batch, height, width),
                _as_map(h, batch, height, width), kernels, any(need[:3]),
                need[3], need[4])
            del h, grad_s
            if any(need[:3]):
                grad_a = _gelu_backward_(_flat_tokens(grad_h), a)
                del grad_h
                if need[0]:
                    grads[0] = grad_a.mm(fc1_weight).view_as(x)
                if need[1]:
                    grads[1] = grad_a.t().mm(x2d)
                if need[2]:
                    grads[2] = grad_a.sum(0)
        return tuple(grads)


def check_shapes(x: torch.Tensor, fc1_weight: torch.Tensor,
                 dwc_weight: torch.Tensor, fc2_weight: torch.Tensor,
                 height: int, width: int, name: str) -> int:
    """A clear error unless ``x`` is (B, H*W, C) tokens and the weights fit
    it; returns the hidden width."""
    if x.dim() != 3 or x.shape[1] != height * width:
        raise ValueError(f'{name}: x must be (B, {height}*{width}, C), got '
                         f'{tuple(x.shape)}')
    hidden = fc1_weight.shape[0]
    if (tuple(fc1_weight.shape) != (hidden, x.shape[2])
            or tuple(dwc_weight.shape) != (hidden, 1, 3, 3)
            or tuple(fc2_weight.shape[1:]) != (hidden, )):
        raise ValueError(f'{name}: weight shapes do not match x')
    return hidden


def _autocast_inputs(device: str, *tensors: torch.Tensor
                     ) -> List[torch.Tensor]:
    """``tensors`` cast to the autocast dtype when autocast is on, as
    ``nn.Linear`` / ``nn.Conv2d`` would compute them (autograd.Functions are
    opaque to autocast); float64 stays (autocast's own rule)."""
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device)
    return [t if t.dtype == torch.float64 else t.to(dtype) for t in tensors]


def fused_mlp(x: torch.Tensor, fc1_weight: torch.Tensor,
              fc1_bias: torch.Tensor, dwc_weight: torch.Tensor,
              dwc_bias: torch.Tensor, fc2_weight: torch.Tensor,
              fc2_bias: torch.Tensor, height: int,
              width: int) -> torch.Tensor:
    """:func:`.naive.naive_mlp`, memory-lean in training and banded at CPU
    inference. Only first derivatives are supported
    (``once_differentiable``)."""
    hidden = check_shapes(x, fc1_weight, dwc_weight, fc2_weight, height,
                          width, 'fused_mlp')
    device = x.device.type
    args = _autocast_inputs(device, x, fc1_weight, fc1_bias, dwc_weight,
                            dwc_bias, fc2_weight, fc2_bias)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in args):
            return FusedMlp.apply(*args, height, width)
        tokens = args[0]
        rows = band_rows(
            tokens.shape[0] * width * hidden * tokens.element_size(), height,
            tokens.device)
        if rows < height:
            return _forward_in_bands(*args, height, width, rows)
        return _forward(*args, height, width, keep_a=False)[0]
