"""H-ViT3: a hierarchical vision backbone built on test-time training.

Pure torch + mmengine: toolbox registration lives in ``mmvit3.registration``
so that this file imports where mmcv, mmdet and mmseg are not installed.
Module names follow the authors' ImageNet checkpoints (see
``mmvit3.models.checkpoint``), so their backbone keys load unchanged.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import depthwise_ttt, fast_ttt, fused_mlp, rope_2d, swiglu_ttt
from ..ops.bands import band_rows
from ..ops.conv import conv2d
from ..ops.depthwise import plus_identity_tap, tokens_as_map

HEAD_DIM = 32
# Loss scale of both inner branches: 9 ** -0.5 (three taps per side).
INNER_LOSS_SCALE = 9**-0.5

ARCH_SETTINGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    'tiny': dict(dims=(64, 128, 320, 512), depths=(1, 3, 9, 4)),
    'small': dict(dims=(64, 128, 320, 512), depths=(2, 6, 18, 8)),
    'base': dict(dims=(96, 192, 448, 640), depths=(2, 6, 18, 8)),
}


def drop_path(x: torch.Tensor, drop_prob: float, training: bool):
    """Stochastic depth per sample."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1))
    # the scale folded into the (B, 1, ...) mask: one pass over x, not two
    return x * mask.bernoulli_(keep_prob).div_(keep_prob)


class DropPath(nn.Module):

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return tokens_as_map(x, x.shape[0], height, width)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom / right of a (B, C, H, W) map to ``multiple``,
    returned channels-last.

    Channels-last maps are what oneDNN's convolutions run fastest on, and
    convolutions keep their input's format: the stem's and downsampling
    layers' outputs then flatten into row-major (B, N, C) tokens, which the
    linear layers, norms and fused ops of the blocks read without copies.
    """
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x.contiguous(memory_format=torch.channels_last)


class ConvNorm(nn.Sequential):
    """conv -> optional BatchNorm -> optional ReLU, keyed ``conv`` / ``norm``.

    In eval mode the BatchNorm is folded into the convolution's weights.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int = 1,
                 stride: int = 1,
                 groups: int = 1,
                 bias: bool = False,
                 norm: bool = True,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias)
        if norm:
            self.norm = nn.BatchNorm2d(out_channels)
        if act:
            self.act = nn.ReLU(inplace=True)

    @property
    def foldable(self) -> bool:
        """Whether the norm, if any, is an eval-mode BatchNorm."""
        norm = getattr(self, 'norm', None)
        return norm is None or (isinstance(norm, _BatchNorm)
                                and not norm.training
                                and norm.running_var is not None)

    def forward(self, x, pad_rows: bool = True):
        """``pad_rows=False`` pads the columns only: for bands of rows that
        bring their neighbours' rows (:func:`run_in_bands`)."""
        conv, norm = self.conv, getattr(self, 'norm', None)
        fold = self.foldable
        if not (fold or pad_rows):
            raise ValueError('bands of rows need eval-mode BatchNorm')
        weight, bias = conv.weight, conv.bias
        if fold and norm is not None:
            # Eval-mode BatchNorm is a per-channel affine map: folded into
            # the convolution it costs no pass over the (large, early) maps.
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            folded_bias = norm.bias - norm.running_mean * scale
            bias = folded_bias if bias is None else folded_bias + bias * scale
            weight = weight * scale[:, None, None, None]
        padding = conv.padding if pad_rows else (0, conv.padding[1])
        x = conv2d(x, weight, bias, conv.stride, padding, conv.groups)
        if not fold:
            x = norm(x)
        return self.act(x) if hasattr(self, 'act') else x

    def output_height(self, height: int) -> int:
        kernel, stride, pad = self._rows_geometry()
        return (height + 2 * pad - kernel) // stride + 1

    def input_rows(self, start: int, stop: int) -> Tuple[int, int]:
        """Input rows [low, high) that output rows [start, stop) read; they
        pass the map's border where the padding is read."""
        kernel, stride, pad = self._rows_geometry()
        return start * stride - pad, (stop - 1) * stride - pad + kernel

    def _rows_geometry(self) -> Tuple[int, int, int]:
        conv = self.conv
        return conv.kernel_size[0], conv.stride[0], conv.padding[0]


def map_heights(layers: Sequence[ConvNorm], height: int) -> List[int]:
    """The input map's height, then each layer's output height."""
    heights = [height]
    for layer in layers:
        heights.append(layer.output_height(heights[-1]))
    return heights


def run_in_bands(layers: Sequence[ConvNorm], x: torch.Tensor,
                 rows: int) -> torch.Tensor:
    """``layers`` applied in turn to ``x``, ``rows`` output rows at a time
    (eval-mode norms): each band computes just the rows of each layer that
    it reads, with zero rows for the padding at the map's top and bottom."""
    heights = map_heights(layers, x.shape[2])
    bands = []
    for start in range(0, heights[-1], rows):
        # Last layer first: the rows each layer reads (needed) and those of
        # them inside its input map (wanted).
        wanted = [(start, min(start + rows, heights[-1]))]
        needed = []
        for layer, height in zip(layers[::-1], heights[-2::-1]):
            low, high = layer.input_rows(*wanted[-1])
            needed.append((low, high))
            wanted.append((max(low, 0), min(high, height)))
        band = x[:, :, wanted[-1][0]:wanted[-1][1]]
        for layer, (low, high), (in_low, in_high) in zip(
                layers, needed[::-1], wanted[:0:-1]):
            if low < in_low or high > in_high:
                band = F.pad(band, (0, 0, in_low - low, high - in_high))
            band = layer(band, pad_rows=False)
        bands.append(band)
    return torch.cat(bands, dim=2)


def run_conv_layers(layers: Sequence[ConvNorm], x: torch.Tensor,
                    band_row_bytes: int) -> torch.Tensor:
    """``layers`` applied in turn to ``x``; at inference on a CPU in bands
    of rows where the largest map, of ``band_row_bytes`` per output row,
    would be large (see :mod:`mmvit3.ops.bands`)."""
    height = map_heights(layers, x.shape[2])[-1]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for layer in layers for p in layer.parameters()))
    rows = height
    # Tracers (FLOP counters, ONNX export) see the whole-map convolutions.
    if (not needs_grad and not torch.jit.is_tracing()
            and all(layer.foldable for layer in layers)):
        rows = band_rows(band_row_bytes, height, x.device)
    if rows < height:
        return run_in_bands(layers, x, rows)
    for layer in layers:
        x = layer(x)
    return x


class Stem(nn.Module):
    """Stride-4 convolutional stem: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        mid = dim // 2
        self.conv = nn.Sequential(
            ConvNorm(in_channels, mid, 3, stride=2),
            ConvNorm(mid, mid, 3),
            ConvNorm(mid, mid, 3),
            ConvNorm(mid, 4 * dim, 3, stride=2),
            ConvNorm(4 * dim, dim, 1, act=False),
        )

    def forward(self, x):
        x = pad_to_multiple(x, 4)
        for layer in self.conv[:3]:
            x = layer(x)
        # the 4C-channel map at stride 4 is the large one
        batch, _, _, width = x.shape
        wide = self.conv[3].conv.out_channels
        return run_conv_layers(self.conv[3:], x,
                               batch * wide * (width // 2) * x.element_size())


class Downsample(nn.Module):
    """Inverted-bottleneck stride-2 downsampling between stages."""

    def __init__(self, dim: int, dim_out: int, ratio: int = 4):
        super().__init__()
        hidden = ratio * dim_out
        self.conv = nn.Sequential(
            ConvNorm(dim, hidden, 1, bias=True, norm=False),
            ConvNorm(
                hidden, hidden, 3, stride=2, groups=hidden, bias=True,
                norm=False),
            ConvNorm(hidden, dim_out, 1, bias=True, act=False),
        )

    def forward(self, x):
        x = pad_to_multiple(x, 2)
        # the expanded map, two input rows per output row, is the large one
        batch, _, _, width = x.shape
        hidden = self.conv[0].conv.out_channels
        return run_conv_layers(self.conv, x,
                               2 * batch * hidden * width * x.element_size())


class _Switchable:
    """A ``'fast'`` / ``'plain'`` implementation switch (``self.impl``)."""

    IMPLS = ('fast', 'plain')

    @classmethod
    def _check_impl(cls, impl: str) -> str:
        if impl not in cls.IMPLS:
            raise ValueError(f'impl must be one of {cls.IMPLS}, got '
                             f'{impl!r}')
        return impl

    @classmethod
    def set_impl(cls, model: nn.Module, impl: str) -> int:
        """Switch every ``cls`` layer in ``model`` to ``impl``; return how
        many."""
        cls._check_impl(impl)
        layers = [m for m in model.modules() if isinstance(m, cls)]
        for layer in layers:
            layer.impl = impl
        return len(layers)


def set_impl(model: nn.Module, impl: str) -> int:
    """Switch every TTT layer and MLP in ``model`` to ``impl`` ('fast' or
    'plain'); return how many."""
    return _Switchable.set_impl(model, impl)


class TTT(_Switchable, nn.Module):
    """Test-time-training token mixer (the ``attn`` of each block).

    Two inner models learn from the keys/values of the whole image in one
    gradient step and are applied to the queries: a per-head simplified
    SwiGLU over all channels (with 2-D RoPE on q/k) and a 3x3 depthwise conv
    over a ``HEAD_DIM``-channel map.

    Args:
        dim: channels.
        head_dim: channels per SwiGLU head and of the depthwise branch.
        impl: ``'fast'`` (default): :func:`mmvit3.ops.fast_ttt`, one
            memory-lean autograd function; ``'plain'``: the spec written out
            in torch ops (:mod:`mmvit3.ops.ttt`), the reference the fast path
            is tested against, and what FLOP counters trace.
    """

    def __init__(self, dim: int, head_dim: int = HEAD_DIM, impl: str = 'fast'):
        super().__init__()
        if dim % head_dim:
            raise ValueError(
                f'TTT dim must be a multiple of head_dim={head_dim}, '
                f'got {dim}')
        self.dim = dim
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = INNER_LOSS_SCALE
        self.impl = self._check_impl(impl)
        self.qkv = nn.Linear(dim, 3 * dim + 3 * head_dim)
        self.w1 = nn.Parameter(torch.empty(1, self.num_heads, head_dim, head_dim))
        self.w2 = nn.Parameter(torch.empty(1, self.num_heads, head_dim, head_dim))
        self.w3 = nn.Parameter(torch.empty(head_dim, 1, 3, 3))
        self.proj = nn.Linear(dim + head_dim, dim)
        for weight in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(weight, std=.02)

    def extra_repr(self):
        return f'dim={self.dim}, heads={self.num_heads}, impl={self.impl!r}'

    def forward(self, x: torch.Tensor, height: int, width: int):
        qkv = self.qkv(x)
        # Tracers (FLOP counters, ONNX export) cannot look inside the fast
        # path's custom operator; the plain path computes the same.
        if self.impl == 'fast' and not torch.jit.is_tracing():
            return self.proj(
                fast_ttt(qkv, self.w1, self.w2, self.w3, self.num_heads,
                         height, width, self.scale))
        return self.proj(self._plain_inner_step(qkv, height, width))

    def _plain_inner_step(self, qkv: torch.Tensor, height: int, width: int):
        batch, num_tokens, _ = qkv.shape
        q1, k1, v1, q2, k2, v2 = qkv.split(
            [self.dim] * 3 + [self.head_dim] * 3, dim=-1)

        def heads(t):
            return t.reshape(batch, num_tokens, self.num_heads,
                             self.head_dim).transpose(1, 2)

        q1 = heads(rope_2d(q1, height, width))
        k1 = heads(rope_2d(k1, height, width))
        out1 = swiglu_ttt(q1, k1, heads(v1), self.w1, self.w2, self.scale)
        out1 = out1.transpose(1, 2).reshape(batch, num_tokens, self.dim)

        out2 = depthwise_ttt(
            tokens_to_map(q2, height, width), tokens_to_map(k2, height, width),
            tokens_to_map(v2, height, width), self.w3, self.scale)
        return torch.cat([out1, map_to_tokens(out2)], dim=-1)


class DepthwiseConv(nn.Conv2d):
    """3x3 depthwise conv with bias applied to (B, N, C) tokens; with
    ``residual=True`` it returns ``x + dwconv(x)`` from one convolution."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, height: int, width: int, residual: bool = False):
        weight = plus_identity_tap(self.weight) if residual else self.weight
        return map_to_tokens(
            conv2d(tokens_to_map(x, height, width), weight, self.bias,
                   self.stride, self.padding, self.groups))


class Mlp(_Switchable, nn.Module):
    """fc1 -> GELU -> (+ depthwise conv) -> GELU -> fc2.

    Args:
        impl: ``'fast'`` (default): :func:`mmvit3.ops.fused_mlp`, which
            saves ``x`` and ``fc1(x)`` for backward where autograd saves four
            4C-channel maps, and at inference works in place on two maps;
            ``'plain'``: torch ops throughout. Tracing always takes the plain
            ops.
    """

    def __init__(self, dim: int, ratio: int = 4, impl: str = 'fast'):
        super().__init__()
        hidden = ratio * dim
        self.impl = self._check_impl(impl)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwc = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def extra_repr(self):
        return f'impl={self.impl!r}'

    def forward(self, x, height: int, width: int):
        # Tracers (FLOP counters, ONNX export) cannot look inside the
        # autograd.Function.
        if self.impl == 'fast' and not torch.jit.is_tracing():
            return fused_mlp(x, self.fc1.weight, self.fc1.bias,
                             self.dwc.weight, self.dwc.bias, self.fc2.weight,
                             self.fc2.bias, height, width)
        x = self.act(self.fc1(x))
        x = self.act(x + self.dwc(x, height, width))
        return self.fc2(x)


class Block(nn.Module):
    """CPE, then TTT and MLP residual branches with pre-LayerNorm."""

    def __init__(self, dim: int, drop_path_rate: float = 0.):
        super().__init__()
        self.cpe = DepthwiseConv(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TTT(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x, height: int, width: int):
        x = self.cpe(x, height, width, residual=True)  # x + cpe(x)
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class Stage(nn.Module):
    """Blocks at one resolution, then (except the last) a downsample.

    ``forward`` returns the map before downsampling (the stage's output
    feature) and the downsampled map that feeds the next stage.
    """

    def __init__(self,
                 dim: int,
                 depth: int,
                 drop_path_rates: Sequence[float],
                 dim_out: Optional[int] = None,
                 with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.blocks = nn.ModuleList(
            Block(dim, rate) for rate in drop_path_rates[:depth])
        self.downsample = Downsample(dim, dim_out) if dim_out else None

    def forward(self, x: torch.Tensor):
        height, width = x.shape[-2:]
        x = map_to_tokens(x)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, height, width, use_reentrant=False)
            else:
                x = block(x, height, width)
        feature = tokens_to_map(x, height, width)
        if self.downsample is None:
            return feature, None
        return feature, self.downsample(feature)


def resolve_arch(arch: Union[str, dict]) -> Dict[str, Tuple[int, ...]]:
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'Unknown H-ViT3 arch {arch!r}: expected one of '
                             f'{sorted(ARCH_SETTINGS)} or a dict with '
                             "'dims' and 'depths'")
        return ARCH_SETTINGS[arch]
    if not isinstance(arch, dict) or set(arch) != {'dims', 'depths'}:
        raise ValueError("A custom H-ViT3 arch must be a dict with exactly "
                         f"the keys 'dims' and 'depths', got {arch!r}")
    dims, depths = tuple(arch['dims']), tuple(arch['depths'])
    if len(dims) != len(depths) or not dims:
        raise ValueError('arch dims and depths must be non-empty and of equal '
                         f'length, got dims={dims}, depths={depths}')
    bad = [d for d in dims if d % HEAD_DIM]
    if bad:
        raise ValueError(f'arch dims must be multiples of {HEAD_DIM} (the TTT '
                         f'head dim), got {dims}')
    return dict(dims=dims, depths=depths)


class HViT3(BaseModule):
    """H-ViT3 backbone for dense prediction.

    Args:
        arch: 'tiny', 'small', 'base', or dict(dims=..., depths=...).
        in_channels: channels of the input image.
        drop_path_rate: stochastic depth at the last block; it rises
            linearly from 0 over all blocks.
        out_indices: stages whose (LayerNorm-ed) maps are returned.
        frozen_stages: freeze the stem (0) and the first ``frozen_stages``
            stages; -1 freezes nothing.
        norm_eval: keep BatchNorm layers in eval mode during training.
        with_cp: gradient checkpointing per block (less memory, slower).
        pretrained_state: which state dict of an authors' ImageNet file
            ``init_cfg=dict(type='Pretrained', checkpoint=...)`` loads:
            'model' (default; always present) or 'ema' (``state_dict_ema``).
        out_norms: LayerNorm each returned map (``norm{i}``), as dense
            prediction needs; False returns the raw stage maps and builds no
            such norms, like the ImageNet classifier.
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 drop_path_rate: float = 0.1,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 pretrained_state: str = 'model',
                 out_norms: bool = True,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(init_cfg=init_cfg)
        settings = resolve_arch(arch)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.dims, self.depths = settings['dims'], settings['depths']
        num_stages = len(self.dims)
        out_indices = tuple(out_indices)
        bad = [i for i in out_indices if not 0 <= i < num_stages]
        if bad or not out_indices:
            raise ValueError(f'out_indices {out_indices} out of range: each '
                             f'must be in [0, {num_stages - 1}]')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {num_stages}], '
                             f'got {frozen_stages}')
        if pretrained_state not in ('model', 'ema'):
            raise ValueError("pretrained_state must be 'model' or 'ema', got "
                             f'{pretrained_state!r}')
        self.in_channels = in_channels
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.pretrained_state = pretrained_state
        self.out_norms = out_norms

        self.patch_embed = Stem(in_channels, self.dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            start = sum(self.depths[:i])
            self.layers.append(
                Stage(
                    dim,
                    depth,
                    rates[start:start + depth],
                    dim_out=self.dims[i + 1] if i + 1 < num_stages else None,
                    with_cp=with_cp))
        if out_norms:
            for i in out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(self.dims[i]))
        self.feature_info = [
            dict(
                num_chs=self.dims[i],
                reduction=4 * 2**i,
                module=f'norm{i}' if out_norms else f'layers.{i}')
            for i in out_indices
        ]
        self.apply(self._init_linear)
        self._freeze_stages()

    @staticmethod
    def _init_linear(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def out_channels(self) -> List[int]:
        return [self.dims[i] for i in self.out_indices]

    def init_weights(self):
        from .checkpoint import load_pretrained
        init_cfg = self.init_cfg
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            load_pretrained(
                self,
                init_cfg['checkpoint'],
                state=self.pretrained_state,
                prefix=init_cfg.get('prefix'))
            self._is_init = True
            self._freeze_stages()
        else:
            super().init_weights()

    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield self.patch_embed
        for i in range(self.frozen_stages):
            yield self.layers[i]
            if self.out_norms and i in self.out_indices:
                yield getattr(self, f'norm{i}')

    def _freeze_stages(self):
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def _check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)
            raise ValueError('HViT3 expects a 4-D image batch (B, '
                             f'{self.in_channels}, H, W), got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f'HViT3 expects {self.in_channels} input channels, got '
                f'{x.shape[1]} (input shape {tuple(x.shape)}); convert the '
                'images or set in_channels')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            feature, x = stage(x)
            if i in self.out_indices:
                if self.out_norms:
                    norm = getattr(self, f'norm{i}')
                    feature = norm(feature.permute(0, 2, 3, 1)).permute(
                        0, 3, 1, 2)
                outs.append(feature.contiguous())
            if i == max(self.out_indices):
                break
        return tuple(outs)
