"""Loading the authors' ImageNet checkpoints into :class:`HViT3`.

Published files hold ``model`` (and ``state_dict_ema`` for EMA-trained ones)
next to training state whose ``config`` is a pickled yacs ``CfgNode``. They
are opened with a restricted unpickler: tensors and plain containers load,
every other class in the pickle becomes an inert stand-in, so neither yacs
nor an unrestricted ``torch.load`` is needed. Backbone keys load unchanged;
classifier-only keys are dropped.
"""
import os.path as osp
import pickle
import re
import types
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

# Classification-only parts of the authors' model: the BatchNorm1d before the
# classifier, the classifier, and RoPE tables that HViT3 recomputes per input.
CLASSIFIER_ONLY = re.compile(r'^(norm|head)\.|\.rope\.rotations$')
# The per-stage output norms exist only in the dense-prediction backbone.
DENSE_ONLY = re.compile(r'^norm\d+\.')
STATE_KEYS = {'model': 'model', 'ema': 'state_dict_ema'}


class ForeignObject(dict):
    """Inert stand-in for a class that a checkpoint pickled (yacs CfgNode...)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.__dict__['pickled_state'] = state


# Globals a weights file legitimately needs; anything else becomes inert.
_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'),
    ('builtins', 'set'),
    ('builtins', 'frozenset'),
    ('builtins', 'slice'),
    ('builtins', 'complex'),
    ('builtins', 'bytearray'),
    ('_codecs', 'encode'),
    ('copyreg', '_reconstructor'),
    ('numpy', 'dtype'),
    ('numpy', 'ndarray'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', 'scalar'),
}


def _is_safe(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    if module == 'torch._utils':
        return name.startswith('_rebuild_')
    if module == 'torch':  # dtypes, Size and storage classes
        return isinstance(getattr(torch, name, None), (torch.dtype, type))
    return module == 'numpy.dtypes' and name.endswith('DType')


class _StandInUnpickler(pickle.Unpickler):
    """Resolves only tensor-related globals; other classes become inert."""

    def find_class(self, module, name):
        if _is_safe(module, name):
            return super().find_class(module, name)
        return type(name, (ForeignObject, ), {'__module__': module})


_stand_in_pickle = types.SimpleNamespace(
    Unpickler=_StandInUnpickler, load=pickle.load, __name__='mmvit3_pickle')


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint without importing or running what it pickled."""
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'Pretrained checkpoint not found: {path!r}. Download the H-ViT3 '
            'ImageNet checkpoint of this variant and point '
            "model.backbone.init_cfg.checkpoint at it (e.g. --cfg-options "
            "model.backbone.init_cfg.checkpoint=PATH), or set "
            'model.backbone.init_cfg=None to train from scratch.')
    return torch.load(
        path,
        map_location='cpu',
        pickle_module=_stand_in_pickle,
        weights_only=False)


def select_state_dict(checkpoint: dict, state: str = 'model',
                      prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Pick the weights out of an authors' or mmengine checkpoint."""
    if state not in STATE_KEYS:
        raise ValueError(f"state must be one of {sorted(STATE_KEYS)}, got "
                         f'{state!r}')
    key = STATE_KEYS[state]
    if key in checkpoint:
        state_dict = checkpoint[key]
    elif state == 'ema':
        raise KeyError("pretrained_state='ema' but the checkpoint has no "
                       "'state_dict_ema' (keys: "
                       f"{sorted(checkpoint)}); use pretrained_state='model'")
    elif 'state_dict' in checkpoint:  # mmengine / mmdet / mmseg files
        state_dict = checkpoint['state_dict']
    elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise KeyError(f'No weights found in checkpoint: expected {key!r} or '
                       f"'state_dict', got keys {sorted(checkpoint)}")
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state_dict = {
            k[len(prefix):]: v
            for k, v in state_dict.items() if k.startswith(prefix)
        }
        if not state_dict:
            raise KeyError(f'No key of the checkpoint starts with {prefix!r}')
    return state_dict


def filter_classifier_keys(
        state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the keys that only the ImageNet classifier uses."""
    return {
        k: v
        for k, v in state_dict.items() if not CLASSIFIER_ONLY.search(k)
    }


def infer_arch(
        state_dict: Dict[str, torch.Tensor]) -> Tuple[tuple, tuple]:
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
    from .hvit3 import ARCH_SETTINGS
    for name, setting in ARCH_SETTINGS.items():
        if tuple(setting['dims']) == dims and tuple(
                setting['depths']) == depths:
            return f"H-ViT3 arch '{name}'"
    return f'an H-ViT3 with dims={dims}, depths={depths}'


def load_pretrained(model: nn.Module,
                    path: str,
                    state: str = 'model',
                    prefix: Optional[str] = None) -> None:
    """Load an H-ViT3 checkpoint into ``model`` strictly.

    Only classifier keys may be left over and only the dense-prediction
    output norms may be missing; anything else raises with the keys listed.
    """
    state_dict = select_state_dict(read_checkpoint(path), state, prefix)
    state_dict = filter_classifier_keys(state_dict)
    model_dims, model_depths = tuple(model.dims), tuple(model.depths)
    ckpt_dims, ckpt_depths = infer_arch(state_dict)
    if (ckpt_dims, ckpt_depths) != (model_dims, model_depths):
        raise ValueError(
            f'Checkpoint {path!r} looks like {describe_arch(ckpt_dims, ckpt_depths)}'
            f', but the model is {describe_arch(model_dims, model_depths)}. '
            'Use the checkpoint of the same variant or change backbone.arch.')
    own = model.state_dict()
    shape_errors = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    if shape_errors:
        raise ValueError(f'Shape mismatch loading {path!r}:\n  ' +
                         '\n  '.join(shape_errors))
    missing = sorted(
        k for k in own if k not in state_dict and not DENSE_ONLY.match(k))
    unexpected = sorted(k for k in state_dict if k not in own)
    if missing or unexpected:
        raise KeyError(f'Checkpoint {path!r} does not match HViT3:\n'
                       f'  missing keys: {missing}\n'
                       f'  unexpected keys: {unexpected}')
    model.load_state_dict(state_dict, strict=False)
