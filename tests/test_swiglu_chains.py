"""The SwiGLU inner step's elementwise chains: their derivatives against
autograd in float64, compiled against eager, and the eager fallback."""
import pytest
import torch
import torch.nn.functional as F

from mmvit3.ops.ttt import swiglu_chains
from mmvit3.ops.ttt.swiglu_chains import (compiled_on_cpu, swiglu_vjp,
                                          swiglu_vjp_backward)

BATCH, HEADS, TOKENS, HEAD_DIM = 2, 3, 7, 4


def inputs(dtype):
    """z (B*h, T, 2d), v as the strided (B, h, T, d) head view of (B, T, C)
    tokens, as the inner step passes them, and a gradient like z."""
    z = torch.randn(BATCH * HEADS, TOKENS, 2 * HEAD_DIM, dtype=dtype)
    tokens = torch.randn(BATCH, TOKENS, HEADS * HEAD_DIM, dtype=dtype)
    v = tokens.unflatten(-1, (HEADS, -1)).transpose(1, 2)
    return z, v, torch.randn_like(z)


def swiglu(z):
    z1, z2 = z.chunk(2, dim=-1)
    return z1 * F.silu(z2)


def test_vjp_equals_autograd():
    z, g, _ = inputs(torch.float64)
    z = z.requires_grad_()
    # [g silu(z2) | g z1 silu'(z2)]: with g = v, the inner gradient's terms
    expected, = torch.autograd.grad((g.flatten(0, 1) * swiglu(z)).sum(), z)
    torch.testing.assert_close(swiglu_vjp.eager(z.detach(), g), expected)


def test_vjp_backward_equals_autograd():
    z, v, grad_terms = inputs(torch.float64)
    z, v = z.requires_grad_(), v.detach().requires_grad_()
    # the terms by autograd, kept differentiable
    terms, = torch.autograd.grad((v.flatten(0, 1) * swiglu(z)).sum(), z,
                                 create_graph=True)
    expected_z, expected_v = torch.autograd.grad((terms * grad_terms).sum(),
                                                 (z, v))
    got_terms, got_v, got_z = swiglu_vjp_backward.eager(
        z.detach(), v.detach(), grad_terms)
    torch.testing.assert_close(got_terms, terms.detach())
    torch.testing.assert_close(got_v, expected_v.flatten(0, 1))
    torch.testing.assert_close(got_z, expected_z)


@pytest.mark.parametrize('tokens', [7, 5])
def test_compiled_chains_match_eager(tokens):
    """Two chunk lengths: the last chunk of a map is shorter."""
    z, v, grad = (t[..., :tokens, :] for t in inputs(torch.float32))
    for chain, args in ((swiglu_vjp, (z, v)),
                        (swiglu_vjp_backward, (z, v, grad))):
        torch.testing.assert_close(chain(*args), chain.eager(*args))
    assert not swiglu_chains._compile_failed


def test_a_failing_compiler_warns_once_and_leaves_the_chains_eager(
        monkeypatch):
    monkeypatch.setattr(swiglu_chains, '_compile_failed', False)
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn)
            raise RuntimeError('no C++ compiler')
        return run

    monkeypatch.setattr(torch, 'compile', broken_compile)
    double = compiled_on_cpu(lambda x: 2 * x)
    square = compiled_on_cpu(lambda x: x * x)
    x = torch.arange(3.)
    with pytest.warns(UserWarning, match='no C.. compiler.*run eagerly'):
        torch.testing.assert_close(double(x), 2 * x)
    torch.testing.assert_close(square(x), x * x)
    assert len(calls) == 1


def test_disabled_chains_do_not_compile(monkeypatch):
    monkeypatch.setattr(swiglu_chains, 'ENABLED', False)
    compiled = []
    # records the call; the wrapper's fallback would hide a failure
    monkeypatch.setattr(torch, 'compile',
                        lambda fn, **kwargs: compiled.append(fn) or fn)
    x = torch.arange(3.)
    torch.testing.assert_close(compiled_on_cpu(lambda t: t + 1)(x), x + 1)
    assert compiled == []
