from .fused_mlp import fused_mlp
from .ttt_fast import fast_ttt, rope_table
from .ttt import (clip_by_norm, depthwise_grad, depthwise_ttt, rope_2d,
                  swiglu_grads, swiglu_ttt)

__all__ = [
    'clip_by_norm', 'depthwise_grad', 'depthwise_ttt', 'fast_ttt',
    'fused_mlp', 'rope_2d', 'rope_table', 'swiglu_grads', 'swiglu_ttt'
]
