"""Register H-ViT3 into whichever OpenMMLab toolboxes are installed.

Kept apart from the model so that ``mmvit3.models`` needs only torch and
mmengine; a toolbox that is not installed is skipped. The ImageNet
classifiers go into timm's model registry likewise.
"""
import importlib

from .fileio import register_atomic_local_backend
from .models import HViT3
from .utils import enable_mmengine_checkpoint_loading

TOOLBOXES = ('mmdet', 'mmseg')


def register_all() -> list:
    """Register :class:`HViT3` as ``type='HViT3'`` (and the timm models);
    return the OpenMMLab toolboxes."""
    registered = []
    for toolbox in TOOLBOXES:
        try:
            registry = importlib.import_module(f'{toolbox}.registry')
        except ImportError:
            continue
        registry.MODELS.register_module(name='HViT3', module=HViT3, force=True)
        registered.append(toolbox)
    register_timm_models()
    register_atomic_local_backend()  # checkpoints are never left half-written
    if registered:  # runners and inferencers resume / load their checkpoints
        enable_mmengine_checkpoint_loading()
    return registered


def register_timm_models() -> bool:
    """Register ``hvit3_{tiny,small,base}`` into timm if it is installed."""
    try:
        importlib.import_module('timm')
    except ImportError:
        return False
    importlib.import_module('mmvit3.timm_models')
    return True
