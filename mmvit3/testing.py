"""Helpers for tests: checkpoint files in the authors' published layout.

Real weights cannot be downloaded in CI, so tests write files with the same
structure as the published ImageNet checkpoints: ``model`` (classifier keys
and RoPE tables included), optionally ``state_dict_ema``, and the training
state with ``config`` pickled as a yacs ``CfgNode`` whose module is absent
when the file is read back.
"""
import sys
import types
from typing import Dict, Optional

import torch

from .models.hvit3 import HViT3

NUM_CLASSES = 1000


def published_state_dict(model: HViT3,
                         seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The authors' classification key layout for ``model``'s variant.

    With ``seed``, every backbone tensor is freshly randomised, so that a
    test can tell loaded weights from initial ones.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    state_dict = {}
    for key, value in model.state_dict().items():
        if key.startswith('norm') and key[4].isdigit():
            continue  # dense-prediction output norms are not in the file
        if generator is not None and value.is_floating_point():
            value = torch.randn(value.shape, generator=generator) * 0.05 + (
                1.0 if key.endswith('running_var') else 0.0)
            value = value.abs() if key.endswith('running_var') else value
        state_dict[key] = value.clone()
    last = model.dims[-1]
    for i, depth in enumerate(model.depths):
        for j in range(depth):
            state_dict[f'layers.{i}.blocks.{j}.rope.rotations'] = torch.randn(
                56 * 56 // 4**i, model.dims[i] // 2, 2)
    state_dict.update({
        'norm.weight': torch.ones(last),
        'norm.bias': torch.zeros(last),
        'norm.running_mean': torch.zeros(last),
        'norm.running_var': torch.ones(last),
        'norm.num_batches_tracked': torch.tensor(0),
        'head.weight': torch.randn(NUM_CLASSES, last) * 0.01,
        'head.bias': torch.zeros(NUM_CLASSES),
    })
    return state_dict


class _CfgNode(dict):
    """Pickled under the name ``yacs.config.CfgNode``, like the authors'."""


def write_published_checkpoint(path: str,
                               arch='tiny',
                               seed: int = 0,
                               with_ema: bool = True,
                               with_training_state: bool = True) -> dict:
    """Write an ImageNet checkpoint as the authors' training script does.

    Returns the dict of state dicts written (``model`` and maybe
    ``state_dict_ema``).
    """
    model = HViT3(arch)
    checkpoint = {'model': published_state_dict(model, seed)}
    if with_ema:
        checkpoint['state_dict_ema'] = published_state_dict(model, seed + 1)
    states = dict(checkpoint)
    if with_training_state:
        config = _CfgNode(MODEL=_CfgNode(TYPE='hvit3', NAME=f'hvit3_{arch}'))
        checkpoint.update(
            optimizer={'state': {}, 'param_groups': []},
            lr_scheduler={'last_epoch': 300},
            epoch=299,
            max_accuracy=84.0,
            config=config)
    yacs = types.ModuleType('yacs')
    yacs_config = types.ModuleType('yacs.config')
    yacs.config = yacs_config
    yacs_config.CfgNode = _CfgNode
    saved_name = (_CfgNode.__module__, _CfgNode.__qualname__)
    _CfgNode.__module__, _CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    previous = {name: sys.modules.get(name) for name in ('yacs', 'yacs.config')}
    sys.modules.update({'yacs': yacs, 'yacs.config': yacs_config})
    try:
        torch.save(checkpoint, path)
    finally:
        _CfgNode.__module__, _CfgNode.__qualname__ = saved_name
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return states
