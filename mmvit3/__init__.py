"""H-ViT3 (test-time-training ViT) for OpenMMLab detection and segmentation.

``import mmvit3`` registers the ``HViT3`` backbone into mmdet and mmseg.
"""
from .models import HViT3
from .registration import register_all

__version__ = '0.1.0'
REGISTERED_TOOLBOXES = register_all()

__all__ = ['HViT3', 'REGISTERED_TOOLBOXES', '__version__']
