"""Register H-ViT3 into whichever OpenMMLab toolboxes are installed.

Kept apart from the model so that ``mmvit3.models`` needs only torch and
mmengine; a toolbox that is not installed is skipped.
"""
import importlib

from .models import HViT3

TOOLBOXES = ('mmdet', 'mmseg')


def register_all() -> list:
    """Register :class:`HViT3` as ``type='HViT3'``; return the toolboxes."""
    registered = []
    for toolbox in TOOLBOXES:
        try:
            registry = importlib.import_module(f'{toolbox}.registry')
        except ImportError:
            continue
        registry.MODELS.register_module(name='HViT3', module=HViT3, force=True)
        registered.append(toolbox)
    return registered
