"""The chunked TTT inner step (``mmvit3.ops.ttt.chunked``) against the
reference (``mmvit3.ops.ttt.naive``), and the dispatch.

The reference is the spec in torch ops and is itself checked against
autograd and a literal reading of the spec in ``test_ttt_math.py``; here the
chunked function must give the same outputs and gradients.
"""
import pytest
import torch

import mmvit3.ops.ttt.chunked as chunked
from mmvit3.models import HViT3Backbone
from mmvit3.models.hvit3 import TTT, set_impl
from mmvit3.ops import ttt_inner_step
from mmvit3.ops.ttt import chunked_ttt, naive_ttt
from mmvit3.testing import (DEVICES, backbone_outputs_and_grads,
                            relative_error, saved_bytes)

SCALE = 1 / 3
HEAD_DIM = 32


def make_inputs(batch, heads, height, width, dtype=torch.float64,
                device='cpu', inner_std=0.3):
    """qkv and the inner weights, larger than the 0.02 init so that the
    inner step, its clipping and its second-order terms all matter."""
    dim = heads * HEAD_DIM
    qkv = torch.randn(batch, height * width, 3 * (dim + HEAD_DIM),
                      dtype=dtype, device=device)
    inner = [
        torch.randn(shape, dtype=dtype, device=device) * inner_std
        for shape in [(1, heads, HEAD_DIM, HEAD_DIM)] * 2 +
        [(HEAD_DIM, 1, 3, 3)]
    ]
    return qkv, inner


def outputs_and_grads(fn, qkv, inner, heads, height, width, grad_out):
    qkv = qkv.detach().clone().requires_grad_()
    inner = [w.detach().clone().requires_grad_() for w in inner]
    out = fn(qkv, *inner, heads, height, width, SCALE)
    return [out] + list(torch.autograd.grad(out, [qkv] + inner, grad_out))


def assert_agree(qkv, inner, heads, height, width, tolerance):
    """Largest difference between the functions' output and gradients
    (qkv, w1, w2, w3), relative to the largest magnitude of each, at most
    ``tolerance``."""
    grad_out = torch.randn(qkv.shape[0], qkv.shape[1],
                           (heads + 1) * HEAD_DIM, dtype=qkv.dtype,
                           device=qkv.device)
    expected = outputs_and_grads(naive_ttt, qkv, inner, heads, height,
                                 width, grad_out)
    got = outputs_and_grads(chunked_ttt, qkv, inner, heads, height, width,
                            grad_out)
    for name, g, e in zip(['out', 'qkv', 'w1', 'w2', 'w3'], got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        error = relative_error(g, e)
        assert error <= tolerance, f'{name}: relative error {error:.2e}'


def set_chunk_elements(monkeypatch, elements: int):
    for name in ('CPU_CHUNK_ELEMENTS', 'GPU_CHUNK_ELEMENTS'):
        monkeypatch.setattr(chunked, name, elements)


@pytest.mark.parametrize('batch,heads,height,width,chunk_elements', [
    (2, 2, 5, 7, 1 << 20),
    # 100 elements: chunks of one or two tokens, every chunk boundary tested
    (2, 2, 5, 7, 100),
    (1, 3, 6, 4, 100),
    (3, 2, 9, 11, 1 << 20),
    (1, 2, 1, 1, 1 << 20),
    (2, 4, 1, 13, 1 << 20),
])
@pytest.mark.parametrize('device', DEVICES)
def test_matches_naive_float64(batch, heads, height, width, chunk_elements,
                               device, monkeypatch):
    set_chunk_elements(monkeypatch, chunk_elements)
    qkv, inner = make_inputs(batch, heads, height, width, device=device)
    assert_agree(qkv, inner, heads, height, width, 1e-12)


@pytest.mark.parametrize('inner_std', [0.02, 0.3])
@pytest.mark.parametrize('device', DEVICES)
def test_matches_naive_float32(inner_std, device, monkeypatch):
    # Either function is within about 6e-7 of float64 here, by this measure.
    set_chunk_elements(monkeypatch, 4096)
    qkv, inner = make_inputs(2, 4, 24, 20, torch.float32, device, inner_std)
    assert_agree(qkv, inner, 4, 24, 20, 1e-5)


def test_gradcheck():
    heads, height, width = 2, 2, 3
    qkv, inner = make_inputs(1, heads, height, width)

    def fn(qkv, w1, w2, w3):
        return chunked_ttt(qkv, w1, w2, w3, heads, height, width, SCALE)

    assert torch.autograd.gradcheck(
        fn, [t.requires_grad_() for t in [qkv] + inner], eps=1e-6,
        atol=1e-5, fast_mode=True)


@pytest.mark.parametrize('device', DEVICES)
def test_whole_backbone_fast_equals_plain(device):
    model = HViT3Backbone(
        dict(dims=(32, 64), depths=(2, 1)),
        drop_path_rate=0.,
        out_indices=(0, 1))
    model = model.double().to(device)
    image = torch.randn(2, 3, 29, 22, dtype=torch.float64, device=device)
    results = []
    for impl in ('plain', 'fast'):
        assert set_impl(model, impl) == 6
        results.append(backbone_outputs_and_grads(model, image))
    for plain, fast in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-11)


def test_chunked_saves_far_less_for_backward():
    heads, height, width = 2, 32, 32
    qkv, inner = make_inputs(2, heads, height, width, torch.float32)
    qkv.requires_grad_()
    inner = [w.requires_grad_() for w in inner]
    args = (*inner, heads, height, width, SCALE)
    naive = saved_bytes(naive_ttt, qkv, *args)
    fast = saved_bytes(chunked_ttt, qkv, *args)
    # qkv, the RoPE table (a complex64 per channel pair and token) and the
    # inner state (per image and head: a few 32 x 64 matrices); the
    # reference keeps a dozen maps
    table = height * width * heads * HEAD_DIM * 4
    inner_state = 2 * heads * 6 * HEAD_DIM * 2 * HEAD_DIM * 4
    assert fast <= qkv.numel() * 4 + table + inner_state, fast
    assert naive > 4 * fast, (fast, naive)


def test_inference_mode_then_training():
    """RoPE tables cached under inference mode must serve autograd later."""
    layer = TTT(64)
    x = torch.randn(1, 6 * 5, 64)
    with torch.inference_mode():
        expected = layer(x, 6, 5)
    x.requires_grad_()
    out = layer(x, 6, 5)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dispatch_and_tracing_see_the_reference():
    """'fast' takes the custom operator; 'plain' and tracers the reference
    in torch ops."""
    qkv, inner = make_inputs(1, 2, 4, 6, torch.float32)
    args = (*inner, 2, 4, 6, SCALE)
    expected = naive_ttt(qkv, *args)
    torch.testing.assert_close(ttt_inner_step(qkv, *args), expected)
    torch.testing.assert_close(ttt_inner_step(qkv, *args, impl='plain'),
                               expected)
    traced = torch.jit.trace(lambda qkv: ttt_inner_step(qkv, *args), (qkv, ))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not any(kind.startswith('mmvit3::') for kind in kinds)
    assert 'aten::matmul' in kinds
    torch.testing.assert_close(traced(qkv), expected)
    graph = torch.jit.trace(lambda qkv: chunked_ttt(qkv, *args), (qkv, ))
    assert 'mmvit3::ttt_chunked' in {
        node.kind() for node in graph.inlined_graph.nodes()}


def test_rejects_a_qkv_that_does_not_split():
    _, inner = make_inputs(1, 2, 1, 1, torch.float32)
    with pytest.raises(ValueError, match='tokens do not form'):
        chunked_ttt(torch.randn(1, 10, 288), *inner, 2, 3, 4, SCALE)
    with pytest.raises(ValueError, match='does not split'):
        chunked_ttt(torch.randn(1, 12, 291), *inner, 2, 3, 4, SCALE)


def test_impl_option_is_checked():
    qkv, inner = make_inputs(1, 2, 2, 3, torch.float32)
    with pytest.raises(ValueError, match='impl'):
        ttt_inner_step(qkv, *inner, 2, 2, 3, SCALE, impl='triton')
    with pytest.raises(ValueError, match='impl'):
        TTT(64, impl='triton')
    assert 'plain' in repr(TTT(64, impl='plain'))


def test_double_backward_raises():
    qkv, inner = make_inputs(1, 2, 2, 3)
    qkv.requires_grad_()
    out = chunked_ttt(qkv, *inner, 2, 2, 3, SCALE)
    grad, = torch.autograd.grad(out.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match='no autograd formula'):
        grad.sum().backward()
