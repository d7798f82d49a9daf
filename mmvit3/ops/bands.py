"""CPU inference in bands of map rows.

glibc serves allocations of 32 MiB and more (its largest dynamic mmap
threshold) from fresh pages every time, paying a page fault per 4 KiB
touched; bands of a few MiB are reused from the heap and stay in cache. So at
inference on a CPU, the stem, the downsampling layers and the MLPs compute
their large hidden maps a band of rows at a time. ``CPU_INFERENCE_BANDS =
False`` turns this off; GPUs, training and tracers never use bands.
"""
from typing import List, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

CPU_INFERENCE_BANDS = True
CPU_BAND_THRESHOLD_BYTES = 32 << 20
CPU_BAND_BYTES = 8 << 20


def band_rows(row_bytes: int, height: int, device: torch.device) -> int:
    """Rows per band for a map of ``height`` rows of ``row_bytes`` each (the
    largest intermediate's bytes per output row): all of them, except on a
    CPU where the map would reach ``CPU_BAND_THRESHOLD_BYTES``; then bands of
    about ``CPU_BAND_BYTES``."""
    if (not CPU_INFERENCE_BANDS or torch.device(device).type != 'cpu'
            or row_bytes * height < CPU_BAND_THRESHOLD_BYTES):
        return height
    return max(1, CPU_BAND_BYTES // row_bytes)


def _geometry(layer: nn.Sequential, dim: int) -> Tuple[int, int, int]:
    """Kernel size, stride and padding of ``layer``'s conv along the rows
    (``dim`` 0) or columns (1)."""
    conv = layer[0]
    return conv.kernel_size[dim], conv.stride[dim], conv.padding[dim]


def _output_sizes(layers: Sequence[nn.Sequential], size: int,
                  dim: int = 0) -> List[int]:
    """The input map's height (``dim`` 0) or width (1), then each layer's
    output's."""
    sizes = [size]
    for layer in layers:
        kernel, stride, pad = _geometry(layer, dim)
        sizes.append((sizes[-1] + 2 * pad - kernel) // stride + 1)
    return sizes


def _largest_row_bytes(layers: Sequence[nn.Sequential],
                       x: torch.Tensor) -> int:
    """Bytes per output row of the largest map the layers make."""
    heights = _output_sizes(layers, x.shape[2])
    widths = _output_sizes(layers, x.shape[3], dim=1)
    return max(x.shape[0] * layer[0].out_channels * width * height //
               heights[-1] * x.element_size()
               for layer, height, width in zip(layers, heights[1:],
                                               widths[1:]))


def _run_on_band(layer: nn.Sequential, band: torch.Tensor) -> torch.Tensor:
    """``layer`` on rows that bring their neighbours: padded by columns
    only."""
    conv = layer[0]
    band = F.conv2d(band, conv.weight, conv.bias, conv.stride,
                    (0, conv.padding[1]), conv.dilation, conv.groups)
    for module in list(layer)[1:]:
        band = module(band)
    return band


def _run_in_bands(layers: Sequence[nn.Sequential], x: torch.Tensor,
                  rows: int) -> torch.Tensor:
    layers = list(layers)
    heights = _output_sizes(layers, x.shape[2])
    bands = []
    for start in range(0, heights[-1], rows):
        # Last layer first: the rows each layer reads (needed) and those of
        # them inside its input map (wanted).
        wanted = [(start, min(start + rows, heights[-1]))]
        needed = []
        for layer, height in zip(layers[::-1], heights[-2::-1]):
            kernel, stride, pad = _geometry(layer, 0)
            low = wanted[-1][0] * stride - pad
            high = (wanted[-1][1] - 1) * stride - pad + kernel
            needed.append((low, high))
            wanted.append((max(low, 0), min(high, height)))
        band = x[:, :, wanted[-1][0]:wanted[-1][1]]
        for layer, (low, high), (in_low, in_high) in zip(
                layers, needed[::-1], wanted[:0:-1]):
            if low < in_low or high > in_high:  # zero rows at the border
                band = F.pad(band, (0, 0, in_low - low, high - in_high))
            band = _run_on_band(layer, band)
        bands.append(band)
    return torch.cat(bands, dim=2)


def run_conv_layers(layers: Sequence[nn.Sequential],
                    x: torch.Tensor) -> torch.Tensor:
    """``layers`` (each a convolution followed by pointwise modules) applied
    in turn to ``x``; at CPU inference in bands of rows where the largest
    map they make would be large."""
    tracing = torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)
    needs_grad = torch.is_grad_enabled() and not tracing and (
        x.requires_grad or any(p.requires_grad for layer in layers
                               for p in layer.parameters()))
    batch_stats = any(
        isinstance(m, _BatchNorm) and m.training for layer in layers
        for m in layer)
    if not (tracing or needs_grad or batch_stats):
        height = _output_sizes(layers, x.shape[2])[-1]
        rows = band_rows(_largest_row_bytes(layers, x), height, x.device)
        if rows < height:
            return _run_in_bands(layers, x, rows)
    for layer in layers:
        x = layer(x)
    return x
