"""H-ViT3 ImageNet classifier: the backbone, a BatchNorm1d and a linear head.

A subclass of :class:`HViT3` built without the dense-prediction output
norms, so the modules are the OpenMMLab backbone's own and the authors'
ImageNet checkpoints load with their keys as published: ``patch_embed``,
``layers``, ``norm`` (BatchNorm1d on the pooled features) and ``head``.
The interface is timm's (``feature_info``, ``forward_features``,
``forward_head``, ``forward_intermediates``, ``checkpoint_filter_fn``);
registration into timm lives in ``mmvit3.timm_models``, so this file needs
only torch and mmengine.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .checkpoint import (describe_arch, infer_arch, read_checkpoint,
                         select_state_dict)
from .hvit3 import HViT3, resolve_arch

# Fixed-size RoPE tables of the authors' model; HViT3 recomputes RoPE.
ROPE_TABLE = re.compile(r'\.rope\.rotations$')
HEAD_KEYS = ('head.weight', 'head.bias')


def take_indices(num_stages: int,
                 indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """timm's stage selection: None all, an int the last n, else the
    listed indices (negative ones count from the end); sorted."""
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


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: 'HViT3Classifier') -> Dict[str, torch.Tensor]:
    """Fit an authors' ImageNet state dict to ``model``.

    Drops the RoPE tables, refuses a checkpoint of another variant, and
    drops the classifier when its shape does not fit ``model``'s head
    (another ``num_classes``, or none), which then keeps its fresh init.
    """
    state_dict = {
        k: v
        for k, v in state_dict.items() if not ROPE_TABLE.search(k)
    }
    ckpt_arch = infer_arch(state_dict)
    model_arch = (tuple(model.dims), tuple(model.depths))
    if ckpt_arch != model_arch:
        raise ValueError(
            f'The checkpoint looks like {describe_arch(*ckpt_arch)}, but the '
            f'model is {describe_arch(*model_arch)}: create the model of the '
            'same variant.')
    own = model.state_dict()
    for key in HEAD_KEYS:
        if key in state_dict and (key not in own or
                                  own[key].shape != state_dict[key].shape):
            del state_dict[key]
    return state_dict


class HViT3Classifier(HViT3):
    """H-ViT3 for ImageNet: stages, average pool, BatchNorm1d, linear head.

    Args:
        arch: 'tiny', 'small', 'base', or dict(dims=..., depths=...).
        num_classes: classifier outputs; 0 for no classifier.
        in_chans: channels of the input image.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth at the last block.
        with_cp: gradient checkpointing per block.
        pretrained_state: which weights :meth:`load_pretrained` takes from an
            authors' file: 'model' (default) or 'ema' (``state_dict_ema``).
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 num_classes: int = 1000,
                 in_chans: int = 3,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 with_cp: bool = False,
                 pretrained_state: str = 'model'):
        num_stages = len(resolve_arch(arch)['dims'])
        super().__init__(
            arch,
            in_channels=in_chans,
            drop_path_rate=drop_path_rate,
            out_indices=range(num_stages),
            with_cp=with_cp,
            pretrained_state=pretrained_state,
            out_norms=False)
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.norm = nn.BatchNorm1d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        if global_pool not in (None, 'avg'):
            raise ValueError('H-ViT3 classifies average-pooled features; '
                             f'global_pool={global_pool!r} is not supported')
        self.num_classes = num_classes
        self.head = (
            nn.Linear(self.num_features, num_classes)
            if num_classes > 0 else nn.Identity())
        self.head.apply(self._init_linear)

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.layers:
            stage.with_cp = enable

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
        (last map computed, maps).
        """
        if norm:
            raise ValueError('H-ViT3 has no norm for stage maps: its '
                             'BatchNorm1d acts on pooled features')
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        taken = take_indices(len(self.layers), indices)
        stages = self.layers
        if stop_early or intermediates_only:
            stages = stages[:taken[-1] + 1]
        self._check_input(x)
        x = self.patch_embed(x)
        intermediates = []
        for i, stage in enumerate(stages):
            feature, x = stage(x)
            if i in taken:
                intermediates.append(feature)
        if intermediates_only:
            return intermediates
        return feature, intermediates

    def prune_intermediate_layers(
            self,
            indices: Optional[Union[int, Sequence[int]]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True) -> List[int]:
        """Drop what the maps of ``indices`` do not need; return them."""
        taken = take_indices(len(self.layers), indices)
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
        return self.forward_intermediates(x, 1, intermediates_only=True)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = self.head_drop(self.norm(x.mean((2, 3))))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, path: str) -> None:
        """Load an authors' ImageNet file as published (timm's custom_load).

        Opened with mmvit3's reader (no yacs, nothing pickled is run); any
        key left over or missing is an error, except a classifier that
        :func:`checkpoint_filter_fn` dropped for not fitting.
        """
        source = select_state_dict(
            read_checkpoint(path), self.pretrained_state)
        state_dict = checkpoint_filter_fn(source, self)
        refitted = {k for k in HEAD_KEYS if k in source} - set(state_dict)
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if k not in refitted]
        if missing or result.unexpected_keys:
            raise KeyError(f'Checkpoint {path!r} does not match '
                           f'{type(self).__name__}:\n'
                           f'  missing keys: {missing}\n'
                           f'  unexpected keys: {result.unexpected_keys}')
