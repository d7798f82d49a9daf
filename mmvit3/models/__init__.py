from .backbone import HViT3Backbone
from .hvit3 import ARCH_SETTINGS, HViT3, checkpoint_filter_fn, set_impl

__all__ = [
    'ARCH_SETTINGS', 'HViT3', 'HViT3Backbone', 'checkpoint_filter_fn',
    'set_impl'
]
