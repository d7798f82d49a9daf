from .hvit3 import ARCH_SETTINGS, HViT3

__all__ = ['ARCH_SETTINGS', 'HViT3']
