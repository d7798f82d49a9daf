"""H-ViT3 (test-time-training ViT) for OpenMMLab detection and segmentation.

``import mmvit3`` registers the ``HViT3`` backbone into mmdet and mmseg, and
``hvit3_{tiny,small,base}`` into timm, whichever are installed.
"""
from .models import HViT3, HViT3Backbone
from .registration import register_all

__version__ = '0.1.0'
REGISTERED_TOOLBOXES = register_all()

__all__ = ['HViT3', 'HViT3Backbone', 'REGISTERED_TOOLBOXES', '__version__']
