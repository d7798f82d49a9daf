"""The elementwise chains of the SwiGLU inner step, as pure functions that
run compiled on a CPU.

Per chunk of tokens, the inner step's matmuls are followed by chains of a
dozen elementwise ops (sigmoid, silu and its first two derivatives, products
with v). Eager torch runs each op as a pass through memory over the chunk's
maps; on a CPU those passes, not the matmuls, set the inner step's speed.
``torch.compile`` (inductor) turns each chain into one loop. The first call
in a process compiles (seconds; inductor caches on disk across processes).

Where compiling fails (no C++ compiler, say), a warning says so and the
chains run eagerly from then on: slower on a CPU, the same results. Set
``ENABLED = False`` to run them eagerly anyway. On a GPU they run eagerly.
"""
import functools
import warnings
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ENABLED = True
_compile_failed = False


def compiled_on_cpu(fn: Callable) -> Callable:
    """``fn``, run through ``torch.compile`` when its first argument is on a
    CPU. The eager function stays reachable as ``.eager``."""
    compiled = []  # built at the first call: importing Dynamo takes time

    @functools.wraps(fn)
    def run(*args):
        global _compile_failed
        if not ENABLED or _compile_failed or args[0].device.type != 'cpu':
            return fn(*args)
        try:
            if not compiled:
                compiled.append(torch.compile(fn, dynamic=True))
            return compiled[0](*args)
        except Exception as error:  # the compiler, not fn: fn runs below
            _compile_failed = True
            warnings.warn(
                'mmvit3: torch.compile failed on the TTT inner step\'s '
                f'elementwise chains ({type(error).__name__}: {error}); they '
                'run eagerly from now on, slower on a CPU')
            return fn(*args)

    run.eager = fn
    return run


def _silu_and_derivative(z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """sigmoid(z), silu(z) and silu'(z) = sigmoid(z) (1 + z - silu(z))."""
    sig = torch.sigmoid(z)
    silu = z * sig
    return sig, silu, sig * (1 + z - silu)


def _times_dsilu(x: Tensor, z: Tensor) -> Tensor:
    """x silu'(z) by aten's fused kernel: where the chains run eagerly (on a
    GPU, launch-bound), one op, not four."""
    return torch.ops.aten.silu_backward(x, z)


def _flat_heads(v: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, h, T, d) view -> (B*h, T, d) in ``dtype``."""
    return v.flatten(0, 1).to(dtype)


@compiled_on_cpu
def swiglu_vjp(z: Tensor, g: Tensor) -> Tensor:
    """Gradient w.r.t. z = [z1 | z2] (B*h, T, 2d) of sum(g z1 silu(z2)),
    given g (B, h, T, d): [g silu(z2) | g z1 silu'(z2)]. With g = v these
    are the terms whose product with k^T is the inner loss's gradient; with
    g the output's gradient, the gradient w.r.t. the output's
    pre-activations."""
    z1, z2 = z.chunk(2, dim=-1)
    g = _flat_heads(g, z.dtype)
    return torch.cat([g * F.silu(z2), _times_dsilu(g * z1, z2)], dim=-1)


@compiled_on_cpu
def swiglu_vjp_backward(z: Tensor, v: Tensor,
                        grad_terms: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The terms :func:`swiglu_vjp` ``(z, v)`` again, and their gradients
    w.r.t. v (B*h, T, d) and z (B*h, T, 2d), given ``grad_terms``
    (B*h, T, 2d)."""
    z1, z2 = z.chunk(2, dim=-1)
    grad_a, grad_b = grad_terms.chunk(2, dim=-1)
    v = _flat_heads(v, z.dtype)
    sig, silu, dsilu = _silu_and_derivative(z2)
    # silu''(z) = sigmoid(z) (1 - sigmoid(z)) (2 + z - 2 silu(z))
    d2silu = sig * (1 - sig) * (2 + z2 - 2 * silu)
    z1_dsilu = z1 * dsilu
    terms = torch.cat([v * silu, v * z1_dsilu], dim=-1)
    grad_v = grad_a * silu + grad_b * z1_dsilu
    grad_z = torch.cat(
        [grad_b * dsilu * v, (grad_a * dsilu + grad_b * z1 * d2silu) * v],
        dim=-1)
    return terms, grad_v, grad_z
