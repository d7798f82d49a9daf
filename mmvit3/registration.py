"""Register H-ViT3 into whichever OpenMMLab toolboxes are installed.

Kept apart from the model so that ``mmvit3.models`` needs only torch and
mmengine; a toolbox that is not installed is skipped. The timm models
``hvit3_{tiny,small,base}`` register themselves where their model is
defined (:mod:`mmvit3.models.hvit3`), if timm is installed.
"""
import importlib

from .checkpoint import register_mmengine_loaders
from .fileio import register_atomic_local_backend
from .models import HViT3Backbone

TOOLBOXES = ('mmdet', 'mmseg')


def register_all() -> list:
    """Register :class:`HViT3Backbone` as ``type='HViT3'``; return the
    OpenMMLab toolboxes."""
    registered = []
    for toolbox in TOOLBOXES:
        try:
            registry = importlib.import_module(f'{toolbox}.registry')
        except ImportError:
            continue
        registry.MODELS.register_module(
            name='HViT3', module=HViT3Backbone, force=True)
        registered.append(toolbox)
    register_atomic_local_backend()  # checkpoints are never left half-written
    # mmengine's loads of paths and URLs (runners, load_checkpoint,
    # init_detector / init_model, inferencers) go through mmvit3's reader
    register_mmengine_loaders()
    return registered
