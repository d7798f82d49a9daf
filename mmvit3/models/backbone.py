"""H-ViT3 as an OpenMMLab backbone (``type='HViT3'`` in mmdet and mmseg).

A thin subclass of the timm-style :class:`~.hvit3.HViT3`: no classifier, the
stages after the last of ``out_indices`` pruned, and each returned stage map
passed through its own LayerNorm (``norm{i}``), with mmdet's and mmseg's
backbone conventions (``init_cfg``, ``frozen_stages``, ``norm_eval``,
``with_cp``, mmseg's ``pretrained=``).
"""
import re
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from .hvit3 import HViT3, checkpoint_filter_fn, resolve_arch

# Output norms exist only here: an ImageNet file has none.
OUTPUT_NORM = re.compile(r'^norm\d+\.')


class HViT3Backbone(HViT3, BaseModule):
    """H-ViT3 backbone for dense prediction: four stages at strides 4, 8,
    16, 32.

    Args:
        arch: 'tiny', 'small', 'base', or dict(dims=..., depths=...).
        in_channels: channels of the input image.
        drop_path_rate: stochastic depth at the last block; it rises
            linearly from 0 over all blocks.
        out_indices: stages whose LayerNorm-ed maps are returned.
        frozen_stages: freeze the stem (0) and the first ``frozen_stages``
            stages; -1 freezes nothing.
        norm_eval: keep BatchNorm layers in eval mode during training.
        with_cp: gradient checkpointing per block (less memory, slower).
        pretrained_state: which state dict of an authors' ImageNet file
            ``init_cfg=dict(type='Pretrained', checkpoint=...)`` loads:
            'model' (default; always present) or 'ema' (``state_dict_ema``).
        pretrained: deprecated (mmseg's convention, which model-level
            ``pretrained`` settings reach): the same as
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
        init_cfg: mmengine init config; ``type='Pretrained'`` takes a path or
            an http(s) URL and an optional ``prefix`` (e.g. ``'backbone.'``
            for a detector's or segmentor's checkpoint).
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
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        num_stages = len(resolve_arch(arch)['dims'])
        out_indices = tuple(out_indices)
        if not out_indices or any(not 0 <= i < num_stages
                                  for i in out_indices):
            raise ValueError(f'out_indices {out_indices} out of range: each '
                             f'must be in [0, {num_stages - 1}]')
        if not -1 <= frozen_stages <= max(out_indices) + 1:
            raise ValueError('frozen_stages must be in [-1, '
                             f'{max(out_indices) + 1}], got {frozen_stages}')
        if pretrained_state not in ('model', 'ema'):
            raise ValueError("pretrained_state must be 'model' or 'ema', got "
                             f'{pretrained_state!r}')
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('Set init_cfg or pretrained, not both')
            warnings.warn('HViT3: pretrained is deprecated, use '
                          "init_cfg=dict(type='Pretrained', checkpoint=...)",
                          DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(arch, num_classes=0, in_chans=in_channels,
                         drop_path_rate=drop_path_rate)
        self.init_cfg = init_cfg
        self.out_indices = tuple(sorted(out_indices))
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.pretrained_state = pretrained_state
        self.prune_intermediate_layers(self.out_indices, prune_norm=True)
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.dims[i]))
        self.feature_info = [
            dict(num_chs=self.dims[i], reduction=4 * 2**i, module=f'norm{i}')
            for i in self.out_indices
        ]
        self.set_grad_checkpointing(with_cp)
        self._freeze_stages()

    @property
    def out_channels(self) -> List[int]:
        return [self.dims[i] for i in self.out_indices]

    def init_weights(self):
        init_cfg = self.init_cfg
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            self.load_pretrained(init_cfg['checkpoint'],
                                 init_cfg.get('prefix'))
            self._is_init = True
        else:
            super().init_weights()

    def load_pretrained(self, source: str, prefix: Optional[str] = None):
        """Load an H-ViT3 checkpoint (path or URL) strictly: only the
        classifier and the RoPE tables may be left over, only the output
        norms may be missing; anything else raises with the keys listed."""
        from ..checkpoint import load_file, select_state_dict
        state_dict = checkpoint_filter_fn(
            select_state_dict(load_file(source), self.pretrained_state,
                              prefix), self)
        own = self.state_dict()
        shape_errors = [
            f'{k}: checkpoint {tuple(v.shape)} vs model '
            f'{tuple(own[k].shape)}' for k, v in state_dict.items()
            if k in own and v.shape != own[k].shape
        ]
        if shape_errors:
            raise ValueError(f'Shape mismatch loading {source!r}:\n  ' +
                             '\n  '.join(shape_errors))
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not OUTPUT_NORM.match(k)]
        if missing or result.unexpected_keys:
            raise KeyError(f'Checkpoint {source!r} does not match HViT3:\n'
                           f'  missing keys: {missing}\n'
                           f'  unexpected keys: {result.unexpected_keys}')

    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield self.patch_embed
        for i in range(self.frozen_stages):
            yield self.layers[i]
            if i in self.out_indices:
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

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        maps = self.forward_intermediates(
            x, self.out_indices, intermediates_only=True)
        return tuple(
            getattr(self, f'norm{i}')(feature.permute(0, 2, 3, 1)).permute(
                0, 3, 1, 2).contiguous()
            for i, feature in zip(self.out_indices, maps))
