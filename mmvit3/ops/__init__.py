"""The ops of H-ViT3, each a package with its reference (``naive.py``) and
the fast implementations beside it, chosen by one dispatch function."""
from .mlp import mlp
from .ttt import ttt_inner_step

__all__ = ['mlp', 'ttt_inner_step']
