"""H-ViT3: a hierarchical vision backbone built on test-time training.

ViT^3 ("Unlocking Test-Time Training in Vision", Han et al., CVPR 2026,
arXiv:2512.01643) replaces attention by test-time training: per image, the
keys and values of all tokens train a compact inner model in one full-batch
gradient step, and the updated model is applied to the queries. The cost is
linear in the number of tokens.

One model in timm's interface (``forward_features``,
``forward_intermediates``, ``forward_head``, ``reset_classifier``,
``feature_info``, ``checkpoint_filter_fn``), written in torch only; the
OpenMMLab backbone (:mod:`.backbone`) is a thin subclass. Module names follow
the authors' checkpoints, so their files load with their keys as published.
The TTT inner step and the MLP run through :mod:`mmvit3.ops`; tracers
(FX, ``torch.jit.trace``, ONNX export, FLOP counters) see the ops as leaf
functions or their reference implementations, and TorchScript compiles the
references.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..ops import cpe as cpe_ops
from ..ops.bands import run_conv_layers
from ..ops.depthwise import plus_identity_tap
from ..ops.layout import map_to_tokens, tokens_to_map
from ..ops.mlp import IMPLS, mlp, naive_mlp
from ..ops.ttt import naive_ttt, ttt_inner_step

__all__ = ['ARCH_SETTINGS', 'HViT3', 'checkpoint_filter_fn', 'set_impl']

HEAD_DIM = 32
# Loss scale of both inner branches: 9 ** -0.5 (three taps per side).
INNER_LOSS_SCALE = 9**-0.5

ARCH_SETTINGS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    'tiny': dict(dims=(64, 128, 320, 512), depths=(1, 3, 9, 4)),
    'small': dict(dims=(64, 128, 320, 512), depths=(2, 6, 18, 8)),
    'base': dict(dims=(96, 192, 448, 640), depths=(2, 6, 18, 8)),
}

# Fixed-size RoPE tables of the authors' training code (classification:
# ``layers.i.blocks.j.rope``, detection / segmentation:
# ``layers.i.blocks.j.attn.rope``); RoPE is recomputed for every map here.
ROPE_TABLE = re.compile(r'(^|\.)layers\.\d+\.blocks\.\d+\.(attn\.)?rope\.'
                        r'rotations$')


def check_input(x: torch.Tensor, in_chans: int):
    """A clear error for anything but a (B, in_chans, H, W) image batch."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f'H-ViT3 expects a 4-D image batch (B, {in_chans}, H, W), got '
            f'shape {list(x.shape)}; convert the images or set in_chans / '
            'in_channels')


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom / right of a (B, C, H, W) map to ``multiple``,
    returned channels-last.

    Channels-last maps are what oneDNN's convolutions run fastest on, and
    convolutions keep their input's format: the stem's and downsampling
    layers' outputs then flatten into row-major (B, N, C) tokens, which the
    blocks read without copies.
    """
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, [0, pad_w, 0, pad_h])
    return x.contiguous(memory_format=torch.channels_last)


# Leaves for FX tracing (torchvision's create_feature_extractor, timm's FX
# features): they branch on shapes and devices, which symbolic tracing
# cannot follow; at run time they are the eager functions.
torch.fx.wrap('check_input')
torch.fx.wrap('pad_to_multiple')
torch.fx.wrap('ttt_inner_step')
torch.fx.wrap('mlp')


def drop_path(x: torch.Tensor, drop_prob: float, training: bool):
    """Stochastic depth per sample of (B, N, C) tokens."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1)
    # the scale folded into the (B, 1, ...) mask: one pass over x, not two
    return x * mask.bernoulli_(keep_prob).div_(keep_prob)


class DropPath(nn.Module):

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


class ConvNorm(nn.Sequential):
    """conv -> optional BatchNorm -> optional ReLU, keyed ``conv`` /
    ``norm``. :meth:`reparameterize` folds the BatchNorm into the conv."""

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

    @torch.no_grad()
    def reparameterize(self):
        """Fold the (eval-mode) BatchNorm into the convolution, for
        inference (timm's ``reparameterize_model`` calls this): a pass over
        the map less per layer. Changes the state dict's keys."""
        norm = getattr(self, 'norm', None)
        if not isinstance(norm, _BatchNorm):
            return
        conv = self.conv
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        fused = nn.Conv2d(conv.in_channels, conv.out_channels,
                          conv.kernel_size, conv.stride, conv.padding,
                          groups=conv.groups, bias=True).to(conv.weight)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bias)
        self.conv = fused
        self.norm = nn.Identity()


class Stem(nn.Module):
    """Stride-4 convolutional stem: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        mid = dim // 2
        self.conv = nn.Sequential(
            ConvNorm(in_chans, mid, 3, stride=2),
            ConvNorm(mid, mid, 3),
            ConvNorm(mid, mid, 3),
            ConvNorm(mid, 4 * dim, 3, stride=2),
            ConvNorm(4 * dim, dim, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 4)
        if not torch.jit.is_scripting():
            # the 4C-channel map at stride 4 is the one worth banding
            for layer in self.conv[:3]:
                x = layer(x)
            return run_conv_layers(self.conv[3:], x)
        return self.conv(x)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2)
        if not torch.jit.is_scripting():
            return run_conv_layers(self.conv, x)
        return self.conv(x)


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    return impl


class TTT(nn.Module):
    """Test-time-training token mixer (the ``attn`` of each block).

    Two inner models learn from the keys/values of the whole image in one
    gradient step and are applied to the queries: a per-head simplified
    SwiGLU over all channels (with 2-D RoPE on q/k) and a 3x3 depthwise conv
    over a ``HEAD_DIM``-channel map (:mod:`mmvit3.ops.ttt`).

    Args:
        dim: channels.
        head_dim: channels per SwiGLU head and of the depthwise branch.
        impl: ``'fast'`` (default): the fastest implementation for the
            device; ``'plain'``: the reference in torch ops.
    """

    def __init__(self, dim: int, head_dim: int = HEAD_DIM,
                 impl: str = 'fast'):
        super().__init__()
        if dim % head_dim:
            raise ValueError(
                f'TTT dim must be a multiple of head_dim={head_dim}, '
                f'got {dim}')
        self.dim = dim
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = INNER_LOSS_SCALE
        self.impl = _check_impl(impl)
        self.qkv = nn.Linear(dim, 3 * dim + 3 * head_dim)
        self.w1 = nn.Parameter(
            torch.empty(1, self.num_heads, head_dim, head_dim))
        self.w2 = nn.Parameter(
            torch.empty(1, self.num_heads, head_dim, head_dim))
        self.w3 = nn.Parameter(torch.empty(head_dim, 1, 3, 3))
        self.proj = nn.Linear(dim + head_dim, dim)
        for weight in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(weight, std=.02)

    def extra_repr(self):
        return f'dim={self.dim}, heads={self.num_heads}, impl={self.impl!r}'

    def forward(self, x: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
        qkv = self.qkv(x)
        if torch.jit.is_scripting():
            inner = naive_ttt(qkv, self.w1, self.w2, self.w3,
                              self.num_heads, height, width, self.scale)
        else:
            inner = ttt_inner_step(qkv, self.w1, self.w2, self.w3,
                                   self.num_heads, height, width,
                                   self.scale, self.impl)
        return self.proj(inner)


class DepthwiseConv(nn.Conv2d):
    """3x3 depthwise conv with bias on (B, N, C) tokens, returning
    ``x + dwconv(x)`` from one convolution (the identity folded into the
    centre tap)."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
        # nested: TorchScript skips a branch on is_scripting() alone
        if not torch.jit.is_scripting():
            if cpe_ops.uses_kernels(x):
                return cpe_ops.triton_cpe(x, self.weight, self.bias, height,
                                          width)
        return map_to_tokens(
            F.conv2d(tokens_to_map(x, height, width),
                     plus_identity_tap(self.weight), self.bias, padding=1,
                     groups=self.groups))


class Mlp(nn.Module):
    """fc1 -> GELU -> (+ depthwise conv) -> GELU -> fc2
    (:mod:`mmvit3.ops.mlp`).

    Args:
        impl: ``'fast'`` (default): one memory-lean fused function;
            ``'plain'``: the reference in torch ops.
    """

    def __init__(self, dim: int, ratio: int = 4, impl: str = 'fast'):
        super().__init__()
        hidden = ratio * dim
        self.impl = _check_impl(impl)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def extra_repr(self):
        return f'impl={self.impl!r}'

    def forward(self, x: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
        if torch.jit.is_scripting():
            return naive_mlp(x, self.fc1.weight, self.fc1.bias,
                             self.dwc.weight, self.dwc.bias, self.fc2.weight,
                             self.fc2.bias, height, width)
        return mlp(x, self.fc1.weight, self.fc1.bias, self.dwc.weight,
                   self.dwc.bias, self.fc2.weight, self.fc2.bias, height,
                   width, self.impl)


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

    def forward(self, x: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
        x = self.cpe(x, height, width)  # x + cpe(x)
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class BlockSequence(nn.Sequential):
    """A stage's blocks, from its input map to its output map (the stage's
    feature, ``layers.i.blocks`` in ``feature_info``)."""

    def __init__(self, blocks: Sequence[Block]):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        tokens = map_to_tokens(x)
        for block in self:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                tokens = checkpoint(block, tokens, height, width,
                                    use_reentrant=False)
            else:
                tokens = block(tokens, height, width)
        return tokens_to_map(tokens, height, width)


class Stage(nn.Module):
    """Blocks at one resolution, then (except the last) a downsample."""

    def __init__(self,
                 dim: int,
                 depth: int,
                 drop_path_rates: Sequence[float],
                 dim_out: Optional[int] = None):
        super().__init__()
        self.blocks = BlockSequence(
            [Block(dim, rate) for rate in drop_path_rates[:depth]])
        self.downsample = Downsample(dim, dim_out) if dim_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


def resolve_arch(arch: Union[str, dict]) -> Dict[str, Tuple[int, ...]]:
    """dims and depths of ``arch``: a name of :data:`ARCH_SETTINGS` or a
    dict(dims=..., depths=...)."""
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


def feature_take_indices(
        num_stages: int,
        indices: Optional[Union[int, Sequence[int]]] = None) -> List[int]:
    """timm's stage selection: None all, an int the last n, else the listed
    indices (negative ones count from the end); sorted."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f'Cannot take the last {indices} of '
                             f'{num_stages} stages')
        return list(range(num_stages - indices, num_stages))
    taken = sorted({i + num_stages if i < 0 else i for i in indices})
    if not taken or taken[0] < 0 or taken[-1] >= num_stages:
        raise ValueError(f'Stage indices {tuple(indices)} out of range for '
                         f'{num_stages} stages')
    return taken


def _drop_rope_tables(module, state_dict, prefix, *args):
    """Load-state-dict pre-hook: the authors' fixed-size RoPE tables are
    recomputed here, so they are dropped quietly wherever a state dict is
    loaded (timm, mmengine's ``load_checkpoint``, ``load_state_dict``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if ROPE_TABLE.search(key[len(prefix):]):
            del state_dict[key]


class HViT3(nn.Module):
    """H-ViT3 for ImageNet: stem, four stages, average pool, BatchNorm1d and
    a linear head.

    Args:
        arch: 'tiny', 'small', 'base', or dict(dims=..., depths=...).
        num_classes: classifier outputs; 0 for no classifier.
        in_chans: channels of the input image.
        global_pool: 'avg', or '' for the unpooled last map.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth at the last block; it rises
            linearly from 0 over all blocks.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 num_classes: int = 1000,
                 in_chans: int = 3,
                 global_pool: str = 'avg',
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1):
        super().__init__()
        settings = resolve_arch(arch)
        self.dims, self.depths = settings['dims'], settings['depths']
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.grad_checkpointing = False

        self.patch_embed = Stem(in_chans, self.dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        stages = []
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            start = sum(self.depths[:i])
            stages.append(
                Stage(dim, depth, rates[start:start + depth],
                      self.dims[i + 1] if i + 1 < len(self.dims) else None))
        self.layers = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=dim, reduction=4 * 2**i, module=f'layers.{i}.blocks')
            for i, dim in enumerate(self.dims)
        ]
        self.norm = nn.BatchNorm1d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)
        self.apply(_init_weights)
        self.register_load_state_dict_pre_hook(_drop_rope_tables)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int,
                         global_pool: Optional[str] = None):
        """A new head of ``num_classes`` outputs (0: none); ``global_pool``
        'avg' or '' (the head, if any, then acts on each position)."""
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError("global_pool must be 'avg' or '', got "
                                 f'{global_pool!r}')
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = (nn.Linear(self.num_features, num_classes)
                     if num_classes > 0 else nn.Identity())
        self.head.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.blocks.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order, for timm's layer-wise lr decay.

        A stage's downsample runs after its blocks and the pre-classifier
        norm after the last block, so each joins the group before it.
        """
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^layers\.(\d+)\.downsample', (99999, )),
                (r'^norm\.', (99999, )),
            ])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage maps (B, C_i, H_i, W_i) before downsampling, timm-style.

        Returns the maps of ``indices`` or, unless ``intermediates_only``,
        (last stage's map, maps).
        """
        if norm:
            raise ValueError('H-ViT3 has no norm for stage maps: its '
                             'BatchNorm1d acts on pooled features')
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        taken = feature_take_indices(len(self.layers), indices)
        last = taken[-1] if stop_early or intermediates_only else len(
            self.layers) - 1
        check_input(x, self.in_chans)
        x = self.patch_embed(x)
        intermediates = []
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage.blocks(x)
            if i in taken:
                intermediates.append(x)
            if stage.downsample is not None and i < last:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Optional[Union[int, Sequence[int]]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True) -> List[int]:
        """Drop what the maps of ``indices`` do not need; return them."""
        taken = feature_take_indices(len(self.layers), indices)
        last = taken[-1]
        prune_end = last < len(self.layers) - 1
        self.layers = self.layers[:last + 1]
        # its output fed only the stages just dropped
        self.layers[last].downsample = None
        if prune_end:
            self.num_features = self.head_hidden_size = self.dims[last]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0)
        return taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map, (B, C, H/32, W/32) for the full model."""
        check_input(x, self.in_chans)
        return self.layers(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor,
                     pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = self.head_drop(self.norm(x.mean([2, 3])))
            return x if pre_logits else self.head(x)
        # per position: BatchNorm1d takes (B, C, L)
        x = self.head_drop(self.norm(x.flatten(2))).view(x.shape)
        if pre_logits:
            return x
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def set_impl(model: nn.Module, impl: str) -> int:
    """Switch every TTT layer and MLP in ``model`` to ``impl`` ('fast' or
    'plain'); return how many."""
    _check_impl(impl)
    layers = [m for m in model.modules() if isinstance(m, (TTT, Mlp))]
    for layer in layers:
        layer.impl = impl
    return len(layers)


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> Tuple[tuple, tuple]:
    """(dims, depths) of the H-ViT3 that wrote ``state_dict``."""
    depths: Dict[int, int] = {}
    dims: Dict[int, int] = {}
    for key, value in state_dict.items():
        match = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.norm1\.weight$', key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
            dims[stage] = value.shape[0]
    stages = sorted(depths)
    return tuple(dims[s] for s in stages), tuple(depths[s] for s in stages)


def describe_arch(dims: tuple, depths: tuple) -> str:
    for name, setting in ARCH_SETTINGS.items():
        if (tuple(setting['dims']), tuple(setting['depths'])) == (dims,
                                                                  depths):
            return f"H-ViT3 arch '{name}'"
    return f'an H-ViT3 with dims={dims}, depths={depths}'


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: HViT3) -> Dict[str, torch.Tensor]:
    """Fit an H-ViT3 state dict (the authors' ImageNet, detection or
    segmentation layouts, or mmvit3's) to ``model``.

    Refuses a checkpoint of another variant or model; drops the RoPE
    tables, the keys of parts ``model`` does not have (the classifier, or
    pruned stages and output norms), and a classifier whose shape does not
    fit ``model``'s head (another ``num_classes``), which then keeps its
    fresh init.
    """
    own = model.state_dict()
    model_arch = (tuple(model.dims), tuple(model.depths))
    ckpt_arch = infer_arch(state_dict)
    if not ckpt_arch[0]:
        sample = sorted(state_dict)[:5]
        raise ValueError(
            'The checkpoint holds no H-ViT3 weights (no '
            "'layers.<i>.blocks.<j>' keys; its keys begin "
            f'{sample}): point the checkpoint at an H-ViT3 file, e.g. the '
            "authors' ImageNet file of the variant.")
    own_stages = len(model.layers)
    if ckpt_arch[0][:own_stages] != model_arch[0][:own_stages] or (
            ckpt_arch[1][:own_stages] != model_arch[1][:own_stages]):
        raise ValueError(
            f'The checkpoint looks like {describe_arch(*ckpt_arch)}, but the '
            f'model is {describe_arch(*model_arch)}: use the checkpoint of '
            'the same variant, or change the arch.')
    kept = {}
    for key, value in state_dict.items():
        if ROPE_TABLE.search(key):
            continue
        stage = re.match(r'layers\.(\d+)\.', key)
        if stage and int(stage.group(1)) >= own_stages:
            continue  # a stage pruned from the model
        if key not in own and (key.startswith(('head.', 'norm.')) or
                               re.match(r'norm\d+\.|layers\.\d+\.downsample'
                                        r'\.', key)):
            continue  # a part the model does not have
        if key.startswith('head.') and own[key].shape != value.shape:
            continue
        kept[key] = value
    return kept


# timm registration: optional, the model needs only torch.
try:
    from timm.data import (DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN,
                           IMAGENET_DEFAULT_STD)
    from timm.models import (build_model_with_cfg, generate_default_cfgs,
                             register_model, resolve_pretrained_cfg)
except ImportError:
    pass
else:
    # The authors' releases (LeapLabTHU/ViTTT, classification README).
    RELEASES = {
        'hvit3_tiny.in1k':
        'https://cloud.tsinghua.edu.cn/f/f0c7c73ceabe49b7b161/?dl=1',
        'hvit3_small.in1k':
        'https://cloud.tsinghua.edu.cn/f/3eeab8621a7f43929a87/?dl=1',
        'hvit3_base.in1k':
        'https://cloud.tsinghua.edu.cn/f/1d0d7fb840254275b29d/?dl=1',
    }

    def _pretrained_state_dict(variant: str, pretrained_cfg, overlay,
                               state: str) -> Dict[str, torch.Tensor]:
        """The weights of ``variant``'s pretrained source (an in-memory
        state dict, a file or a URL), read with mmvit3's safe loader."""
        from ..checkpoint import load_file, select_state_dict
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=overlay)
        if cfg.state_dict:
            return cfg.state_dict
        source = cfg.file or cfg.url
        if not source:
            raise ValueError(f'{variant}: no pretrained weights to load; pass '
                             'pretrained_cfg_overlay=dict(file=PATH)')
        return select_state_dict(load_file(source), state)

    def _create_hvit3(variant: str, pretrained: bool = False,
                      pretrained_state: str = 'model', **kwargs) -> HViT3:
        overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
        if pretrained:
            # timm's own loader refuses the authors' files (a pickled yacs
            # config) and cannot name a cache file for their URLs: the
            # weights are read here and handed to timm as a state dict.
            overlay['state_dict'] = _pretrained_state_dict(
                variant, kwargs.get('pretrained_cfg'), overlay,
                pretrained_state)
        model = build_model_with_cfg(
            HViT3,
            variant,
            pretrained,
            pretrained_cfg_overlay=overlay,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
            **kwargs)
        # the loaded weights, not a second copy of them in the cfg (the
        # features wrapper keeps a cfg of its own)
        for module in model.modules():
            getattr(module, 'pretrained_cfg', {}).pop('state_dict', None)
        return model

    def _cfg(url: str, **kwargs) -> dict:
        return dict(
            url=url,
            num_classes=1000,
            input_size=(3, 224, 224),
            pool_size=(7, 7),
            crop_pct=DEFAULT_CROP_PCT,
            interpolation='bicubic',
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv='patch_embed.conv.0.conv',
            classifier='head',
            license='apache-2.0',
            paper_ids='arXiv:2512.01643',
            paper_name='ViT^3: Unlocking Test-Time Training in Vision',
            origin_url='https://github.com/LeapLabTHU/ViTTT',
            **kwargs)

    default_cfgs = generate_default_cfgs(
        {name: _cfg(url)
         for name, url in RELEASES.items()})

    @register_model
    def hvit3_tiny(pretrained: bool = False, **kwargs) -> HViT3:
        return _create_hvit3('hvit3_tiny', pretrained, arch='tiny', **kwargs)

    @register_model
    def hvit3_small(pretrained: bool = False, **kwargs) -> HViT3:
        return _create_hvit3('hvit3_small', pretrained, arch='small',
                             **kwargs)

    @register_model
    def hvit3_base(pretrained: bool = False, **kwargs) -> HViT3:
        return _create_hvit3('hvit3_base', pretrained, arch='base', **kwargs)
