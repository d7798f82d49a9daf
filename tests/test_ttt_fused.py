"""The fused Triton TTT kernels (:mod:`mmvit3.ops.ttt.fused`) against the
plain oracle (:func:`mmvit3.ops.ttt.naive.naive_ttt`).

On a CPU the kernels run under the Triton interpreter, which must be on
before the kernels are defined, while other test modules import mmvit3 (and
with it the compiled kernels) first. So the interpreted checks run in ONE
child process started with ``TRITON_INTERPRET=1``: this file run as a
script, which writes every check's result as JSON; the tests here assert
them. The test process itself never turns the interpreter on. The compiled
kernels are tested where a GPU is visible (skipped, and reported so,
elsewhere).

Inner weights are drawn with std 0.3, not the 0.02 init, so that the inner
step, its clipping and its second-order terms all matter. Errors are the
largest difference from the float64 oracle relative to the largest
magnitude of each tensor; the oracle gets the same (rounded) inputs.
"""
import json
import sys

import pytest
import torch

from mmvit3.testing import (GRADCHECK_TOLERANCE, compile_for_h100,
                            directional_grad_error, record_launches,
                            relative_error, requires_cuda, run_interpreted,
                            saved_bytes)

SCALE = 1 / 3
INNER_STD = 0.3
# The interpreter runs these with 16-token blocks and about 8 programs per
# pass, so that tiny maps still span several blocks, several blocks per
# program and several programs per reduction.
BLOCK_TOKENS, TARGET_PROGRAMS = 16, 8
# name: (batch, heads, height, width, dtype). The T/S/B widths C = 64, 96,
# 320, 640; odd sides; token counts that are no multiple of the block; at
# C = 96 the RoPE boundary between y and x pairs falls inside a head.
CASES = {
    'float64-c64-b2-5x7': (2, 2, 5, 7, 'float64'),
    'float64-c96-b1-6x4': (1, 3, 6, 4, 'float64'),
    'float64-c320-b2-3x5': (2, 10, 3, 5, 'float64'),
    'float64-c640-b1-2x3': (1, 20, 2, 3, 'float64'),
    'float64-c64-b1-1x1': (1, 2, 1, 1, 'float64'),
    'float32-c64-b2-5x7': (2, 2, 5, 7, 'float32'),
    'bfloat16-c64-b2-5x7': (2, 2, 5, 7, 'bfloat16'),
    'bfloat16-c320-b1-3x5': (1, 10, 3, 5, 'bfloat16'),
    'float16-c64-b1-7x3': (1, 2, 7, 3, 'float16'),
}
TOLERANCES = {
    # RoPE's angles and their cos/sin are float32 by the spec, in the
    # oracle and the kernels alike, and may differ by an ulp between the
    # two (6e-8 relative): measured <= 1e-7; everything else is float64.
    'float64': 1e-6,
    # float32 throughout, the dots too (input_precision='ieee', here and
    # on a GPU): measured <= 3e-7.
    'float32': 2e-6,
    # bf16 dot operands (unit roundoff u = 2^-8 = 3.9e-3): k, W, the error
    # terms, q and W' are rounded before their products; the interpreter
    # also truncates the stored bf16 outputs (up to 2u) where a GPU rounds:
    # measured <= 7e-3; the depthwise branch, with no dots, <= 1e-7.
    'bfloat16': 2e-2,
    # the same roundings with fp16's u = 2^-11 = 4.9e-4 (the interpreter
    # rounds fp16 to nearest): measured <= 6.5e-4.
    'float16': 3e-3,
}


def weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The inner weights' dtype in a run with ``qkv`` in ``dtype``: float32
    as AMP keeps them, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(batch, heads, height, width, dtype, device='cpu'):
    """qkv, w1, w2, w3 and grad_out, qkv and grad_out in ``dtype``."""
    dim, generator = heads * 32, torch.Generator().manual_seed(heads * 1000 +
                                                               height * width)

    def draw(*shape, std=1.):
        return torch.randn(*shape, generator=generator,
                           dtype=torch.float64) * std

    qkv = draw(batch, height * width, 3 * dim + 96).to(dtype)
    grad_out = draw(batch, height * width, dim + 32).to(dtype)
    weights = [
        draw(*shape, std=INNER_STD).to(weight_dtype(dtype))
        for shape in [(1, heads, 32, 32)] * 2 + [(32, 1, 3, 3)]
    ]
    return [t.to(device) for t in (qkv, *weights, grad_out)]


def outputs_and_grads(fn, qkv, w1, w2, w3, grad_out, heads, height, width):
    inputs = [t.detach().clone().requires_grad_() for t in (qkv, w1, w2, w3)]
    out = fn(*inputs, heads, height, width, SCALE)
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def errors_against_oracle(fn, batch, heads, height, width, dtype,
                          device='cpu'):
    """{tensor: relative error} and {tensor: dtype} of ``fn`` against the
    float64 oracle on the same inputs."""
    from mmvit3.ops.ttt.naive import naive_ttt
    *inputs, grad_out = make_inputs(batch, heads, height, width, dtype,
                                    device)
    sizes = (heads, height, width)
    got = outputs_and_grads(fn, *inputs, grad_out, *sizes)
    expected = outputs_and_grads(naive_ttt, *(t.double() for t in inputs),
                                 grad_out.double(), *sizes)
    names = ['out', 'qkv', 'w1', 'w2', 'w3']
    errors = {
        name: relative_error(a, b)
        for name, a, b in zip(names, got, expected)
    }
    dtypes = {name: str(a.dtype) for name, a in zip(names, got)}
    return errors, dtypes


# ------------------------------------------------- the interpreted child


def _gradcheck(fused) -> float:
    """Backward is the derivative of forward (finite differences)."""
    heads, height, width = 2, 2, 3
    qkv, *weights, _ = make_inputs(1, heads, height, width, torch.float64)
    return directional_grad_error(
        lambda *args: fused.fused_ttt(*args, heads, height, width, SCALE),
        (qkv, *weights))


def _opcheck(fused) -> dict:
    """torch.library's checks of the operator: schema, fake (meta)
    implementation, autograd registration and AOT dispatch."""
    heads, height, width = 2, 3, 2
    qkv, *weights, _ = make_inputs(2, heads, height, width, torch.float32)
    inputs = [t.requires_grad_() for t in (qkv, *weights)]
    return torch.library.opcheck(fused._fused_op,
                                 (*inputs, heads, height, width, SCALE))


def _saved_bytes(fused) -> dict:
    """Bytes saved for backward, and qkv's, the weights' and the inner
    state's: nothing of N x C size besides qkv."""
    batch, heads, height, width = 2, 2, 5, 7
    qkv, w1, w2, w3, _ = make_inputs(batch, heads, height, width,
                                     torch.float32)
    inputs = [t.requires_grad_() for t in (qkv, w1, w2, w3)]
    saved = saved_bytes(fused.fused_ttt, *inputs, heads, height, width,
                        SCALE)
    state = batch * heads * (2 * 32 * 64 + 64) + batch * (2 * 9 * 32 + 32)
    return dict(saved=saved,
                allowed=qkv.nbytes + w1.nbytes + w2.nbytes + 4 * state)


def interpreted_results() -> dict:
    from mmvit3.ops.ttt import fused
    assert fused.INTERPRET and fused.is_available('cpu')
    fused.TOKEN_BLOCKS = dict.fromkeys(fused.TOKEN_BLOCKS, (BLOCK_TOKENS, 4))
    fused.TARGET_PROGRAMS = TARGET_PROGRAMS
    results = {}
    for name, (*sizes, dtype) in CASES.items():
        errors, dtypes = errors_against_oracle(fused.fused_ttt, *sizes,
                                               getattr(torch, dtype))
        results[name] = dict(errors=errors, dtypes=dtypes)
    results['gradcheck'] = _gradcheck(fused)
    results['opcheck'] = _opcheck(fused)
    results['saved'] = _saved_bytes(fused)
    return results


@pytest.fixture(scope='module')
def interpreted(tmp_path_factory):
    return run_interpreted(
        __file__, str(tmp_path_factory.mktemp('fused') / 'results.json'))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize('name', CASES)
def test_interpreted_kernels_match_naive(interpreted, name):
    """Forward and every gradient (qkv, w1, w2, w3)."""
    dtype = CASES[name][-1]
    result = interpreted[name]
    for tensor, error in result['errors'].items():
        assert error <= TOLERANCES[dtype], f'{tensor}: {error:.2e}'
    weights = str(weight_dtype(getattr(torch, dtype)))
    expected_dtypes = dict(out=f'torch.{dtype}', qkv=f'torch.{dtype}',
                           w1=weights, w2=weights, w3=weights)
    assert result['dtypes'] == expected_dtypes


def test_interpreted_gradcheck(interpreted):
    assert interpreted['gradcheck'] <= GRADCHECK_TOLERANCE


def test_interpreted_opcheck(interpreted):
    assert interpreted['opcheck'] and set(
        interpreted['opcheck'].values()) == {'SUCCESS'}, interpreted[
            'opcheck']


def test_interpreted_saves_only_qkv_and_inner_state(interpreted):
    saved = interpreted['saved']
    assert 0 < saved['saved'] <= saved['allowed'], saved


def test_kernels_compile_for_h100_without_spills(monkeypatch):
    """Every launch of a forward and backward call, with bf16 and with
    float32 inputs, compiles to an sm_90 binary (H100, H200) with Triton's
    own ptxas, specialised as Triton's launcher would, and without register
    spills: no GPU needed. Numerics are the interpreter's to check."""
    from mmvit3.ops.ttt import fused
    if fused.INTERPRET:
        pytest.skip('TRITON_INTERPRET=1 here: the kernels are interpreted')
    launches = record_launches(monkeypatch, fused)
    for dtype in (torch.bfloat16, torch.float32):
        heads, height, width = 2, 5, 7
        qkv, w1, w2, w3, grad_out = make_inputs(2, heads, height, width,
                                                dtype)
        fused._forward(qkv, w1, w2, w3, heads, height, width, SCALE)
        # the inner state's shapes: g, its norms, W' per (image, head),
        # then per image
        state = [torch.zeros(shape) for shape in [
            (2 * heads, 32, 64), (2 * heads, 64), (2 * heads, 32, 64),
            (2, 9, 32), (2, 32), (2, 9, 32)]]
        fused._backward(grad_out, qkv, w1, w2, *state, heads, height, width,
                        SCALE)
    spills = compile_for_h100(launches)
    assert set(spills) == {name for name in dir(fused)
                           if name.endswith('_kernel')}
    assert not any(spills.values()), spills


def test_dispatch_keeps_cpu_on_chunked(monkeypatch):
    from mmvit3.ops import ttt
    calls = []
    monkeypatch.setattr(ttt, 'chunked_ttt',
                        lambda *args: calls.append('chunked'))
    if ttt.fused is not None:
        monkeypatch.setattr(ttt.fused, 'fused_ttt',
                            lambda *args: calls.append('fused'))
    qkv, w1, w2, w3, _ = make_inputs(1, 2, 2, 2, torch.float32)
    ttt.ttt_inner_step(qkv, w1, w2, w3, 2, 2, 2, SCALE)
    assert calls == ['chunked']


@requires_cuda
@pytest.mark.parametrize('dtype,expected', [
    (torch.bfloat16, 'fused'), (torch.float16, 'fused'),
    (torch.float32, 'fused'), (torch.float64, 'chunked')])
def test_dispatch_picks_fused_on_cuda(monkeypatch, dtype, expected):
    from mmvit3.ops import ttt
    calls = []
    monkeypatch.setattr(ttt, 'chunked_ttt',
                        lambda *args: calls.append('chunked'))
    monkeypatch.setattr(ttt.fused, 'fused_ttt',
                        lambda *args: calls.append('fused'))
    qkv, w1, w2, w3, _ = make_inputs(1, 2, 4, 4, dtype, 'cuda')
    ttt.ttt_inner_step(qkv, w1, w2, w3, 2, 4, 4, SCALE)
    assert calls == [expected]


@requires_cuda
@pytest.mark.parametrize('sizes', [(2, 2, 50, 38), (1, 3, 25, 19),
                                   (2, 10, 13, 10), (1, 20, 7, 5)])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_compiled_kernels_match_naive(sizes, dtype):
    from mmvit3.ops.ttt.fused import fused_ttt
    errors, _ = errors_against_oracle(fused_ttt, *sizes,
                                      getattr(torch, dtype), 'cuda')
    # float32 sums over up to 1900 tokens, in another order than the
    # oracle's; bf16 as in the interpreter
    tolerance = {'float32': 1e-4, 'bfloat16': 2e-2}[dtype]
    for tensor, error in errors.items():
        assert error <= tolerance, f'{tensor}: {error:.2e}'


@requires_cuda
def test_compiled_kernels_deterministic_and_graph_safe():
    from mmvit3.ops.ttt.fused import fused_ttt
    heads, height, width = 4, 40, 31
    *inputs, grad_out = make_inputs(2, heads, height, width, torch.bfloat16,
                                    'cuda')
    sizes = (heads, height, width)
    first = outputs_and_grads(fused_ttt, *inputs, grad_out, *sizes)
    second = outputs_and_grads(fused_ttt, *inputs, grad_out, *sizes)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # one opaque operator to torch.compile; CUDA graphs replay it
    compiled = torch.compile(fused_ttt, mode='reduce-overhead',
                             fullgraph=True)
    for _ in range(3):
        graphed = outputs_and_grads(compiled, *inputs, grad_out, *sizes)
    for a, b in zip(graphed, first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


if __name__ == '__main__':
    with open(sys.argv[1], 'w') as results:
        json.dump(interpreted_results(), results)
